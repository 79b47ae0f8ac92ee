"""What servers and libraries log about requests is scrubbed and bounded before it is written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, first_response, free_port, run_client, stop
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import _log_filter, instrument
from sentinel._scrub import Scrubber
from sentinel.testing import capture_reports
from sentinel.types import Receive, Scope, Send

CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"
WORDY = "hunter2-path-q7"  # a secret only its key or its place gives away


def test_plain_uvicorn_access_and_websocket_lines_carry_no_secret(tmp_path: Path) -> None:
    """Under plain `uvicorn app:app` (not `sentinel run`) with instrument(), uvicorn's access
    log line and its websocket handshake line keep the path but not the query's secrets."""
    (tmp_path / "plainserved.py").write_text(
        textwrap.dedent(
            """
            import sentinel
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route, WebSocketRoute

            async def items(request):
                return PlainTextResponse("ok")

            async def ws(websocket):
                await websocket.accept()
                await websocket.send_text("hello")
                await websocket.close()

            app = sentinel.instrument(
                Starlette(routes=[Route("/items", items), WebSocketRoute("/ws", ws)])
            )
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "plainserved:app", "--port", str(port)],
        env=clean_env(PYTHONPATH=str(tmp_path), SENTINEL_METRICS_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first_response(process, f"{url}/items")
        response = httpx.get(f"{url}/items", params={"token": CANARY, "page": "2"})
        assert response.text == "ok"
        run_client(_websocket_hello(f"ws://127.0.0.1:{port}/ws?access_token={CANARY}"))
    finally:
        stop(process)
        stdout, stderr = process.communicate(timeout=15)
    output = stdout + stderr
    assert CANARY not in output
    assert '"GET /items?token=[scrubbed len=24' in output and "page=2" in output
    assert '"WebSocket /ws?access_token=[scrubbed len=24' in output


async def _websocket_hello(url: str) -> None:
    import websockets

    async with websockets.connect(url) as websocket:
        assert await websocket.recv() == "hello"


def test_malformed_baggage_warnings_are_scrubbed_bounded_and_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The OTel SDK quotes a malformed `baggage` header whole in its warning when the app
    extracts the caller's baggage (sentinel extracts the trace context only): through
    sentinel each line is scrubbed and cut, and a flood of them is a few lines a minute."""
    from opentelemetry import propagate
    from starlette.requests import Request
    from starlette.testclient import TestClient

    async def ok(request: Request) -> PlainTextResponse:
        propagate.extract(dict(request.headers))
        return PlainTextResponse("ok")

    with capture_reports(span_exporter=InMemorySpanExporter()) as captured:
        client = TestClient(
            instrument(Starlette(routes=[Route("/", ok)]), sentinel=captured.sentinel)
        )
        huge = ",".join(f"k{index}=v{index}" for index in range(200)) + f",session={CANARY}"
        malformed = f"not a baggage list token={CANARY} " + "x" * 40_000
        with caplog.at_level(logging.WARNING, logger="opentelemetry.baggage.propagation"):
            for _ in range(13):
                assert client.get("/", headers={"baggage": huge}).text == "ok"
                assert client.get("/", headers={"baggage": malformed}).text == "ok"
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "opentelemetry.baggage.propagation"
    ]
    assert lines, "the SDK's warnings were expected to reach the log"
    assert all(CANARY not in line for line in lines)
    assert all(len(line) < 2 * _log_filter.MAX_ARGUMENT_CHARS + 200 for line in lines)
    assert len(lines) <= 3 * _log_filter.LINES_PER_MINUTE


def test_query_in_a_log_argument_is_scrubbed_by_key_and_value() -> None:
    """The request target of a log line keeps its path and harmless parameters."""
    scrubber = Scrubber(hash_key=b"k")
    scrubbed = _log_filter.scrub_log_text(scrubber, f"/pay/42?token={CANARY}&page=2")
    assert scrubbed.startswith("/pay/42?token=[scrubbed len=24 hash=")
    assert scrubbed.endswith("&page=2")
    assert _log_filter.scrub_log_text(scrubber, "/plain/path") == "/plain/path"


@pytest.mark.parametrize(
    ("template", "arguments", "line"),
    [
        # the key in the template, the secret in the argument: a secret only together
        ("token=%s", (CANARY,), "token=[scrubbed len=24 hash="),
        ("Authorization: Bearer %s (retrying)", (CANARY,), "[scrubbed len=24 hash="),
        # a placeholder after a secret-looking key (the OTLP exporter's "code: %s"): the
        # line still formats, instead of logging's "--- Logging error" with the arguments
        ("Failed to export %s batch code: %s, reason: %s", ("span", 503, "busy"), "batch code: "),
        ("%(who)s said api_key=%(key)s", {"who": "client", "key": CANARY}, "client said api_key=["),
        ("Started server process [%d]", (1234,), "Started server process [1234]"),
    ],
)
def test_a_secret_split_between_template_and_argument_is_masked_and_the_line_formats(
    template: str, arguments: Any, line: str
) -> None:
    """Template and arguments scrubbed apart missed a secret split between them, and could
    mask a placeholder, breaking the format (logging's error then printed the raw
    arguments). The template keeps its placeholders and the record its arguments (uvicorn's
    colour formatter and Sentry's grouping read them), and an argument in a place where the
    line reads as a secret is masked."""
    log_filter = _log_filter.ScrubbingFilter(
        lambda: Scrubber(hash_key=b"k"), rate_limited=False, on_error=lambda: None
    )
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, template, None, None)
    record.args = arguments
    assert log_filter.filter(record) is True
    message = record.getMessage()
    assert line in message and CANARY not in message
    assert type(record.args) is type(arguments) and len(record.args) == len(arguments)
    assert record.msg.count("%") == template.count("%")


PLAIN = "canary-5e3f9a"
"""A secret only its place shows (CANARY also looks random on its own)."""


class _Shown:
    """An object whose text is a secret-bearing URL."""

    def __str__(self) -> str:
        return f"https://app:{PLAIN}@db.internal/shop"

    __repr__ = __str__


def _filtered(template: object, arguments: Any, **extra: Any) -> tuple[logging.LogRecord, str]:
    log_filter = _log_filter.ScrubbingFilter(
        lambda: Scrubber(hash_key=b"k"), rate_limited=False, on_error=lambda: None
    )
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, template, None, None)
    record.args = arguments
    record.__dict__.update(extra)
    assert log_filter.filter(record) is True
    return record, record.getMessage()


@pytest.mark.parametrize(
    ("template", "arguments"),
    [
        # a key in one argument, its value in the next
        ("%s=%s", ("password", PLAIN)),
        ("Authorization: %s %s", ("Bearer", PLAIN)),
        # what the template adds after the place shows the secret
        ("Connecting to postgresql://%s:%s@%s/%s", ("app", PLAIN, "db.internal", "shop")),
        ("<password>%s</password>", (PLAIN,)),
        ("Key (api_token)=(%s) already exists.", (PLAIN,)),
        # a mapping key named like a secret
        ("login %(user)s with %(password)s", {"user": "bob", "password": PLAIN}),
        # arguments that are not strings
        ("headers: %s", {"password": PLAIN}),
        ("sent %s to %s", ({"token": PLAIN}, "host")),
        ("body %s", (b"token=" + PLAIN.encode(),)),
        ("export to %s failed", (_Shown(),)),
        ("otp=%d", (123456,)),
        # a mapping that is not a dict
        (
            "db password=%(DATABASE_PASSWORD)s",
            __import__("types").MappingProxyType({"DATABASE_PASSWORD": PLAIN}),
        ),
        # a long argument whose password holds a separator the cut looked for
        ("export to %s failed", (f"postgresql://app:{PLAIN};x@db/" + "x" * 1100,)),
        # a secret in the template's own text, next to an argument that makes it one
        (f"connect %s:{PLAIN}@%s", ("postgres://admin", "db")),
        (f"%s {PLAIN}", ("Authorization: Bearer",)),
        # a secret split between a string and a number, or a number and a string
        ("token=%s%d", ("abc", 123456789)),
        ("password=%d%s", (12345678, PLAIN)),
        # a long template, and one whose widths come from the arguments
        ("token=%s " + "x" * 1100, (PLAIN,)),
        ("%*s token=%s", (5, "a", PLAIN)),
    ],
)
def test_a_secret_the_whole_line_shows_is_masked_however_it_is_split(
    template: str, arguments: Any
) -> None:
    """Scrubbing the template and each argument apart missed every secret only the whole
    line shows. The line the record formats to now holds none of what the scrubber masks in
    the original whole line: the arguments masked whole where need be (their number and
    kind kept), else the record is its whole line scrubbed."""
    _, message = _filtered(template, arguments)
    assert PLAIN not in message and "123456" not in message, message
    assert "[scrubbed len=" in message and "abc123" not in message, message


def test_a_message_that_is_not_a_string_is_scrubbed() -> None:
    """logger.error(exc) or logger.warning(a_dict): the message is not a template."""
    error = ConnectionError(f"POST https://collector.example/v1/traces?token={PLAIN}")
    for message in (error, {"password": PLAIN}):
        _, line = _filtered(message, None)
        assert PLAIN not in line and "[scrubbed len=" in line, line


def test_a_query_is_kept_as_sent_but_for_what_it_masks() -> None:
    """A request target's query was rewritten decoded: an encoded newline became a real one
    (a forged second access line), "+" a space, repeated keys joined."""
    _, harmless = _filtered("%s - %s", ("1.2.3.4", "GET /p?q=x%0Aforged+line&tag=a&tag=b&d&&"))
    assert harmless == "1.2.3.4 - GET /p?q=x%0Aforged+line&tag=a&tag=b&d&&"
    _, secret = _filtered("%s - %s", ("1.2.3.4", f"GET /p?q=x%0Ab&token={CANARY}"))
    assert secret.startswith("1.2.3.4 - GET /p?q=x%0Ab&token=[scrubbed len=")


def test_a_template_scrubbed_around_its_places_gets_no_new_placeholder() -> None:
    """A masked URL value is percent-encoded: "%20s" in the scrubbed template text started a
    placeholder, so the line failed to format and logging printed the raw arguments."""
    template = "%s /login?next-url=https://a.example/?q=xpassword=hunter2+sa"
    record, line = _filtered(template, ("GET",))
    assert "hunter2" not in line and line.startswith("GET /login?next-url=")
    assert record.args == ("GET",)


def test_harmless_lines_keep_their_meaning() -> None:
    """The OTLP exporter's status code and the SDK's duplicate attribute key are no
    secrets; a read-only mapping (werkzeug's ImmutableDict) no longer drops the line."""

    class ReadOnly(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            raise TypeError("read-only")

        def update(self, *args: Any, **kwargs: Any) -> None:
            raise TypeError("read-only")

    _, export = _filtered("Failed to export %s batch code: %s, reason: %s", ("span", 503, "x"))
    assert export == "Failed to export span batch code: 503, reason: x"
    _, duplicate = _filtered("Duplicate key: %s found.", ("http.route",))
    assert duplicate == "Duplicate key: http.route found."
    _, read_only = _filtered("user %(user)s logged in", ReadOnly(user="bob"))
    assert read_only == "user bob logged in"


def test_each_scrubber_judges_a_template_with_its_own_keys() -> None:
    """What a template's places are is remembered per scrubber: a sentinel whose scrub_keys
    name ``corr`` masks ``corr=%s``'s argument even after another one judged it harmless."""
    template = "upstream said corr=%s"
    masked = []
    for scrubber in (Scrubber(hash_key=b"a"), Scrubber(extra_keys=("corr",), hash_key=b"b")):
        log_filter = _log_filter.ScrubbingFilter(
            lambda scrubber=scrubber: scrubber, rate_limited=False, on_error=lambda: None
        )
        record = logging.LogRecord(
            "uvicorn.error", logging.WARNING, __file__, 1, template, ("abc123",), None
        )
        assert log_filter.filter(record) is True
        masked.append("abc123" not in record.getMessage())
    assert masked == [False, True]


def test_uvicorns_coloured_lines_still_format_with_their_arguments() -> None:
    """uvicorn's colour formatter formats its own ``color_message`` template with the
    record's arguments: they stay, and its startup lines read as without sentinel."""
    from uvicorn.logging import DefaultFormatter

    log_filter = _log_filter.ScrubbingFilter(
        lambda: Scrubber(hash_key=b"k"), rate_limited=False, on_error=lambda: None
    )
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (1234,), None
    )
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    assert log_filter.filter(record) is True
    line = DefaultFormatter("%(message)s", use_colors=True).format(record)
    assert line == "Started server process [\x1b[36m1234\x1b[0m]"


class Atoms(dict[str, Any]):
    """Like hypercorn's access log atoms: header and variable atoms looked up in lower case,
    a missing one answered "-"."""

    def __getitem__(self, key: str) -> Any:
        try:
            return super().__getitem__(key.lower() if key.startswith("{") else key)
        except KeyError:
            return "-"


def test_an_access_loggers_atoms_keep_their_type_and_secret_named_ones_are_masked() -> None:
    """hypercorn's access line reads its arguments as atoms: a header the request lacks is
    "-" (a plain dict put in their place raised, and logging's error printed every atom,
    environment variables included). A header or variable whose name the scrubber masks is
    masked whatever its value looks like."""
    log_filter = _log_filter.ScrubbingFilter(
        lambda: Scrubber(hash_key=b"k"), rate_limited=False, on_error=lambda: None
    )
    atoms = Atoms(
        {
            "h": "1.2.3.4:5",
            "R": f"GET /p?api_key={CANARY} 1.1",
            "s": "200",
            "{authorization}i": "Basic dXNlcjpwYXNz",
            "{database_password}e": "plainpass",
            "{user-agent}i": "curl",
        }
    )
    template = (
        '%(h)s "%(R)s" %(s)s %({X-Forwarded-For}i)s %({authorization}i)s '
        "%({database_password}e)s %({user-agent}i)s"
    )
    record = logging.LogRecord("hypercorn.access", logging.INFO, __file__, 1, template, None, None)
    record.args = atoms
    assert log_filter.filter(record) is True
    assert type(record.args) is Atoms
    line = record.getMessage()
    assert line.startswith('1.2.3.4:5 "GET /p?api_key=[scrubbed len=24 hash=')
    assert " 200 - [scrubbed len=18 hash=" in line and line.endswith(" curl")
    assert "dXNlcjpwYXNz" not in line and "plainpass" not in line and CANARY not in line


def _access_line(arguments: tuple[object, ...]) -> tuple[logging.LogRecord, str]:
    """An access record of uvicorn's with ``arguments``, filtered, and the line uvicorn's
    AccessFormatter makes of it (it unpacks client, method, path, version and status)."""
    from uvicorn.logging import AccessFormatter

    log_filter = _log_filter.ScrubbingFilter(
        lambda: Scrubber(hash_key=b"k"), rate_limited=False, on_error=lambda: None
    )
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', arguments, None
    )
    assert log_filter.filter(record) is True
    assert isinstance(record.args, tuple) and len(record.args) == 5
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s").format(record)
    return record, line


def test_uvicorns_access_lines_keep_their_arguments_for_its_formatter() -> None:
    """uvicorn's AccessFormatter unpacks a record's arguments (client, method, path, version,
    status): its lines keep them, each scrubbed, and still format."""
    _, line = _access_line(("127.0.0.1:5000", "GET", f"/pay?token={CANARY}", "1.1", 200))
    assert line.startswith("127.0.0.1:5000 GET /pay?token=[scrubbed len=24 hash=")
    assert CANARY not in line


@pytest.mark.parametrize(
    "path", ["/oauth/token", "/csrf-token", "/x?q=token", "/x?code=", "/x?access_token=", "/bearer"]
)
def test_an_access_line_for_a_path_named_like_a_secret_keeps_its_arguments(path: str) -> None:
    """A request line ending in a secret's name ("POST /oauth/token HTTP/1.1") read as a
    name and its value, HTTP/1.1: the whole-line check took the record for secret, emptied
    its arguments, and uvicorn's access formatter (which unpacks five) printed a logging
    error instead of the line."""
    record, line = _access_line(("127.0.0.1:5000", "POST", path, "1.1", 200))
    assert record.args[3:] == ("1.1", 200)
    # (an empty value of a secret's name is shown masked: "?code=[scrubbed len=0 ...]")
    assert line.startswith(f"127.0.0.1:5000 POST {path}") and line.endswith(" HTTP/1.1 200 OK")


def test_an_access_line_whose_whole_line_shows_a_secret_keeps_five_arguments() -> None:
    """When only masking every argument leaves nothing secret, the access formatter still
    gets five arguments to unpack. (A key in one argument and its value in the next: only
    the whole line shows it.)"""
    _, line = _access_line(("127.0.0.1:5000", "password", f"= {PLAIN}", "1.1", 200))
    assert PLAIN not in line and line.endswith(" 200 OK")


@pytest.mark.parametrize("value", ["hash", "scrubbed", "ubbed", "hash/abc"])
def test_a_query_value_that_is_part_of_a_mask_keeps_the_access_line(value: str) -> None:
    """A client sending ?token=hash: every masked line "held" the value (in the mask's own
    "hash=") and the record lost its arguments, so uvicorn's formatter dropped the line."""
    _, line = _access_line(("127.0.0.1:5000", "GET", f"/login?token={value}", "1.1", 200))
    assert line.startswith("127.0.0.1:5000 GET /login?token=[scrubbed len=")
    assert line.endswith(" HTTP/1.1 200 OK")


def test_a_coloured_line_whose_numbers_are_masked_still_formats() -> None:
    """uvicorn's colour formatter formats ``color_message`` with the arguments: once the
    numbers are masked (their placeholders made %s) its "%d" failed, and the line was lost;
    an argument masked already is not masked again (its length and hash kept)."""
    from uvicorn.logging import DefaultFormatter

    record, _ = _filtered("%s=%d", ("pin", 123456), color_message="%s=\x1b[36m%d\x1b[0m")
    line = DefaultFormatter("%(message)s", use_colors=True).format(record)
    assert "123456" not in line and "[scrubbed len=6 hash=" in line, line


def test_an_argument_whose_text_raises_is_masked_by_its_type() -> None:
    """Masking the arguments of a line that shows a secret called every argument's
    ``__str__``; one that raised made the filter drop the whole line."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    _, line = _filtered("token=%s %s", ("abcdefgh1234", Unprintable()))
    assert "abcdefgh1234" not in line and "[scrubbed len=" in line, line


def test_an_encoded_secret_in_a_path_is_masked_whole() -> None:
    """Keeping the encoded form where decoding masked no more values showed the start of an
    encoded code (its "%3D" cut it in two): decoding shows it whole, and it is masked so."""
    path = "/auth%2Fcallback%3Fcode%3D62xUYxZ%3DwYNYqL9vK2mX%26x%3D1"
    scrubbed = _log_filter.scrub_log_text(Scrubber(hash_key=b"k"), path)
    assert "62xUYxZ" not in scrubbed and "wYNY" not in scrubbed, scrubbed


def test_a_record_that_cannot_be_scrubbed_is_not_written_and_is_counted() -> None:
    """When scrubbing fails the line is withheld (it might hold the secret) and counted."""
    failures: list[bool] = []

    class Broken(Scrubber):
        def text(self, value: str) -> str:
            raise RuntimeError("scrubber broke")

    log_filter = _log_filter.ScrubbingFilter(
        lambda: Broken(), rate_limited=False, on_error=lambda: failures.append(True)
    )
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", ("x",), None)
    assert log_filter.filter(record) is False
    assert failures == [True]


def test_exporter_retry_warnings_quote_no_secret_of_the_collector_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An export to a collector that refuses: the OTLP exporter's retry warnings quote the
    HTTP client's error, whose URL carries the endpoint's query; the exporter's loggers are
    filtered and an exception argument is scrubbed as text, so the key is not written."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider

    span = TracerProvider().get_tracer("canary").start_span("export me")
    span.end()
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces?api_key={CANARY}"  # nobody listens
    with capture_reports(), caplog.at_level(logging.WARNING):
        # Long enough for one retry (the first waits about a second): its warning quotes it.
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=3)
        try:
            exporter.export([span])  # type: ignore[list-item]
        finally:
            exporter.shutdown()
    assert "Transient error" in caplog.text, caplog.text
    assert "/v1/traces?api_key=[scrubbed len=24" in caplog.text
    assert CANARY not in caplog.text


def test_a_logged_traceback_is_scrubbed_and_the_live_exception_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch processor logs what an export raised with its traceback: the exception's
    message in that traceback is scrubbed, and the record no longer carries the exception
    for a handler to format again."""
    logger = logging.getLogger("opentelemetry.sdk._shared_internal")
    with capture_reports(), caplog.at_level(logging.ERROR):
        try:
            raise ConnectionError(f"POST https://collector.example/v1/traces?token={CANARY}")
        except ConnectionError:
            logger.exception("Exception while exporting %s.", "span batch")
    [record] = [r for r in caplog.records if r.name == logger.name]
    assert record.exc_info is None
    assert record.exc_text is not None and "Traceback (most recent call last)" in record.exc_text
    assert "ConnectionError: POST https://collector.example/v1/traces?token=[scrubbed" in (
        caplog.text
    )
    assert CANARY not in caplog.text


@pytest.mark.parametrize(
    "header", [f"x-api-key: {CANARY}", f"x-honeycomb-team:{CANARY}", f"{CANARY}"]
)
def test_a_malformed_otlp_header_entry_is_not_quoted(
    caplog: pytest.LogCaptureFixture, header: str
) -> None:
    """OpenTelemetry's parser of OTEL_EXPORTER_OTLP_HEADERS warns about an entry it cannot
    parse by quoting it, credential and all, whatever the header is called: the entry is
    masked whole."""
    from opentelemetry.util.re import parse_env_headers

    with capture_reports(), caplog.at_level(logging.WARNING):
        parse_env_headers(header, liberal=True)
    assert "Header format invalid" in caplog.text, caplog.text
    assert CANARY not in caplog.text
    assert "[scrubbed len=" in caplog.text


@pytest.mark.parametrize(
    "path",
    [
        f"/fetch/https%3A%2F%2Falice%3A{WORDY}%40db.example%2Fx",
        f"/fetch/cb%3Faccess_token%3D{WORDY}",
        f"/fetch/cb%3Faccess_token%3D{WORDY} HTTP/1.1",
    ],
)
def test_a_percent_encoded_secret_in_a_logged_path_is_scrubbed(path: str) -> None:
    """A path segment can carry a whole URL or query, percent-encoded (uvicorn's access log
    writes the raw path): what decoding shows is scrubbed, a secret no value pattern knows
    included."""
    scrubbed = _log_filter.scrub_log_text(Scrubber(hash_key=b"k"), path)
    assert WORDY not in scrubbed and "[scrubbed len=" in scrubbed
    assert _log_filter.scrub_log_text(Scrubber(hash_key=b"k"), "/a%20b/c") == "/a%20b/c"


class _Lines(logging.Handler):
    """Keeps the messages of the records that reach it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _start_failing_lifespan(**settings: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Run uvicorn's own lifespan startup (in process) on an instrumented Starlette app whose
    lifespan raises; uvicorn's error log lines, and the reports written."""
    import asyncio
    from contextlib import asynccontextmanager

    import uvicorn
    from uvicorn.lifespan.on import LifespanOn

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError(f"cannot connect to the database, password={WORDY}")
        yield

    lines = _Lines()
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(lines)
    try:
        with capture_reports(**settings) as cap:
            app = instrument(Starlette(lifespan=lifespan), sentinel=cap.sentinel)
            config = uvicorn.Config(app, lifespan="on", log_config=None)
            config.load()
            server_lifespan = LifespanOn(config)

            async def start() -> None:
                await server_lifespan.startup()
                await asyncio.sleep(0.05)  # the app's task re-raises through the middleware

            run_client(start())
            assert server_lifespan.should_exit
            cap.flush()
            reports = cap.reports
    finally:
        server_log.removeHandler(lines)
    return lines.messages, reports


def test_a_failed_lifespans_traceback_line_is_left_out_once_sentinel_reported_it() -> None:
    """Starlette sends a failed lifespan's traceback as its message, and uvicorn logs it at
    ERROR: sentinel reports that exception (phase lifespan) once, and the server's copy of
    it is left out, as the "Exception in ASGI application" line is; the line that says the
    startup failed stays."""
    messages, reports = _start_failing_lifespan()
    assert "Application startup failed. Exiting." in messages
    assert not any("Traceback" in message for message in messages), messages
    [report] = reports
    assert report["phase"] == "lifespan"
    assert report["exception_type"] == "RuntimeError"
    assert WORDY not in json.dumps(report)


def test_a_failed_lifespan_sentinel_does_not_report_keeps_its_line() -> None:
    """An exception sentinel is told to ignore is not reported: the server's line is all
    that says it, and it stays (scrubbed)."""
    messages, reports = _start_failing_lifespan(ignore_exceptions=[RuntimeError])
    assert reports == []
    [traceback_line] = [message for message in messages if "Traceback" in message]
    assert "RuntimeError" in traceback_line and WORDY not in traceback_line


def test_a_traceback_the_app_handles_and_logs_in_its_lifespan_is_its_own() -> None:
    """An app that catches an error at startup and logs its traceback as text on uvicorn's
    logger, then starts: the exception was handled, so nothing is reported and the app's
    line is written. (A filter that took any traceback line logged during the lifespan
    for the failure's quote reported it as unhandled and dropped the line.)"""
    import traceback

    lines = _Lines()
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(lines)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        try:
            raise ConnectionError("cache not reachable, using the local one")
        except ConnectionError:
            server_log.error(traceback.format_exc())
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    try:
        with capture_reports() as cap:
            wrapped = instrument(app, sentinel=cap.sentinel)
            messages: list[dict[str, Any]] = [
                {"type": "lifespan.startup"},
                {"type": "lifespan.shutdown"},
            ]
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return messages.pop(0)

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            run_client(wrapped({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
            cap.flush()
            assert cap.reports == []
            assert cap.metric("sentinel_unhandled_exceptions_total") == 0
    finally:
        server_log.removeHandler(lines)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert any("ConnectionError: cache not reachable" in line for line in lines.messages)
