"""Fuzzing the parsers of untrusted input with Hypothesis, each for a bounded number of examples.

The location, request-id, tenant and keep headers and the W3C ``traceparent``, ``tracestate``
and ``baggage`` headers are fuzzed through the whole middleware (the parse is the header scan
plus what it feeds); ``Config.from_env`` with random ``SENTINEL_*`` values; the scrubber with
random text. atheris is not used: the package indexes this project installs from do not
offer it, and Hypothesis reaches the same parsers in-process within the suite's time budget.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sentinel import _config, instrument
from sentinel._config import ENVIRONMENT, Config, ConfigError, is_valid_location
from sentinel._location import OTHER_LOCATION
from sentinel._scrub import MAX_SCANNED_CHARS, Scrubber
from sentinel.testing import Captured, capture_reports
from sentinel.types import Message, Receive, Scope, Send

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Bounded: each fuzzed parser runs in a few seconds on a loaded two-core machine
(``FUZZ_EXAMPLES=5000`` fuzzes longer)."""

LOCATION_HEADER = b"x-location"
REQUEST_ID_HEADER = b"x-request-id"
TENANT_HEADER = b"x-tenant"
KEEP_HEADER = b"x-keep"
MAX_LOCATIONS = 4
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b" ", b"\x00", b"\xff\xfe", b"fra\r\nx-injected: 1", b"fra\x00", b"\xc3\x28", b"fra"]
    ),
)
"""Header values as a server may hand them over: any bytes (servers reject some of these,
in-process callers do not)."""

traceparents = st.one_of(
    hostile_bytes,
    st.builds(
        lambda version, trace, span, flags, tail: (
            f"{version}-{trace}-{span}-{flags}{tail}".encode()
        ),
        st.sampled_from(["00", "01", "ff", "0", "zz"]),
        st.text("0123456789abcdef", min_size=31, max_size=33),
        st.text("0123456789abcdef", min_size=15, max_size=17),
        st.sampled_from(["00", "01", "03", "ff", "1"]),
        st.sampled_from(["", "-", "-extra", " ", "\t"]),
    ),
)
baggages = st.one_of(
    hostile_bytes,
    st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=200).map(
        lambda pairs: ",".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")
    ),
    st.integers(0, 70_000).map(lambda size: b"k=" + b"v" * size),
)


class _Loop:
    """One event loop for a test's examples (no signal handlers installed, unlike
    asyncio.run in the main thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 10))

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[_Loop]:
    running = _Loop()
    yield running
    running.close()


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """One GET through ``app``; the messages the server got."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def total(captured: Captured, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        sample.value
        for metric in captured.registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def label_values(captured: Captured, name: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for metric in captured.registry.collect()
        for sample in metric.samples
        if sample.name == name
    }


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Captured, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    with capture_reports(
        span_exporter=exporter,
        traces=True,
        location="home",
        location_header="x-location",
        max_locations=MAX_LOCATIONS,
        request_id_header="x-request-id",
        tenant_header="x-tenant",
        keep_header="x-keep",
        mutation_mode="off",
    ) as captured:
        yield captured, exporter


@FUZZ
@given(
    location=st.one_of(hostile_bytes, st.sampled_from([b"fra", b" iad ", b"sin", b"gru", b"a"])),
    request_id=st.one_of(hostile_bytes, st.text("Ab9._:- \t", max_size=130).map(str.encode)),
    tenant=hostile_bytes,
    traceparent=traceparents,
    tracestate=hostile_bytes,
    baggage=baggages,
    order=st.randoms(use_true_random=False),
)
@example(
    location=b"fra\x00",
    request_id=b"\xff" * 200,
    tenant=b"password=hunter2",
    traceparent=b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01",
    tracestate=b"\xff",
    baggage=b"k=" + b"v" * 70_000,
    order=__import__("random").Random(0),
)
def test_trusted_and_propagation_headers_never_break_a_request(
    loop: _Loop,
    traced: tuple[Captured, InMemorySpanExporter],
    location: bytes,
    request_id: bytes,
    tenant: bytes,
    traceparent: bytes,
    tracestate: bytes,
    baggage: bytes,
    order: Any,
) -> None:
    """Any bytes in the location, request-id, tenant, keep, traceparent, tracestate and
    baggage headers: the response is the app's, the request is counted once under a valid
    location (or other, within the bound), the request id is the header's when it is
    well-formed and a generated one otherwise, a well-formed sampled traceparent is
    continued, and nothing inside sentinel failed."""
    captured, exporter = traced
    headers = [
        (LOCATION_HEADER, location),
        (REQUEST_ID_HEADER, request_id),
        (TENANT_HEADER, tenant),
        (KEEP_HEADER, b"1"),  # every record kept: the record shows the request id
        (b"traceparent", traceparent),
        (b"tracestate", tracestate),
        (b"baggage", baggage),
    ]
    order.shuffle(headers)
    app = instrument(ok_app, sentinel=captured.sentinel)
    before = total(captured, "sentinel_http_requests_total")
    records_before = len(captured.events("request"))
    exporter.clear()

    sent = loop.run(call(app, headers))

    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
    assert total(captured, "sentinel_http_requests_total") == before + 1
    locations = label_values(captured, "sentinel_http_requests_total", "location")
    assert len(locations - {OTHER_LOCATION, "home"}) <= MAX_LOCATIONS - 1
    assert all(is_valid_location(value) for value in locations)
    records = captured.events("request")[records_before:]
    assert len(records) == 1
    stripped = request_id.decode("latin-1").strip()
    if _REQUEST_ID_RE.fullmatch(stripped):
        assert records[0]["request_id"] == stripped
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", records[0]["request_id"])
    provider = captured.sentinel.tracer_provider
    assert provider is not None and provider.force_flush(5000)  # type: ignore[attr-defined]
    [span] = exporter.get_finished_spans()
    parent = _TRACEPARENT_RE.fullmatch(traceparent.decode("latin-1").strip(" \t"))
    if parent and int(parent[1], 16) and int(parent[2], 16):
        assert format(span.context.trace_id, "032x") == parent[1]
    assert total(captured, "sentinel_internal_errors_total") == 0


# -- configuration from the environment -------------------------------------------------------

SENTINEL_VARIABLES = sorted(
    {variable.name for variable in ENVIRONMENT if variable.name.startswith("SENTINEL_")}
)
plausible_values = st.sampled_from(
    [
        "1",
        "0",
        "-1",
        "65536",
        "9464",
        "1e999",
        "nan",
        "inf",
        "true",
        "off",
        "maybe",
        "report",
        "RAISE",
        "json",
        "fra",
        "fra,iad",
        ",",
        " , ",
        "x-location",
        "bad header",
        "1_000",
        "\u0661",
        "1.5",
        ".5",
        "5.",
        "mypkg.errors.Expected",
        "os.environ:X_*",
        "a b",
        "\u00a0fra",
        "fra\u00a0",
        "9" * 5000,
        "\udcff",
    ]
)
env_values = st.one_of(
    plausible_values,
    st.text(st.characters(exclude_characters="\x00"), max_size=40),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(SENTINEL_VARIABLES), env_values, max_size=8))
@example({"SENTINEL_METRICS_PORT": "9" * 5000})
@example({"SENTINEL_LOCATIONS": "fra, bad value!"})
@example({"SENTINEL_MUTATION_WARMUP_SECONDS": "1e999"})
def test_config_from_env_raises_only_config_errors_that_show_the_value(
    environ: dict[str, str],
) -> None:
    """Random SENTINEL_* values: a Config, or a ConfigError that names the variable and
    shows the value at fault (the variable's text, or the list entry at fault, as error
    messages show a value: its repr scrubbed, so a long one is masked past 2,048
    characters); never any other exception."""
    try:
        Config.from_env(environ)
    except ConfigError as error:
        message = str(error)
        named = [name for name in environ if message.startswith(f"{name} ")]
        assert named, message
        raw = environ[named[0]]
        entries = [part.strip(" \t\n\r\f\v") for part in raw.split(",")]
        shown = [_config._shown(raw), *(_config._shown(entry) for entry in entries)]
        assert any(message.endswith(f": {value}") for value in shown), message


# -- the scrubber -----------------------------------------------------------------------------

_MASK = re.compile(r"\[scrubbed len=(\d+) hash=[0-9a-f]{8}\]")
SECRET_KEYS = ["password", "api_key", "token", "X-Auth-Token", "client_secret", "pin"]
any_text = st.text(st.characters(exclude_categories=()), max_size=400)
token_chars = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"


def unmasked_length(scrubbed: str) -> int:
    """The length of the text the masks in ``scrubbed`` stand for."""
    length = len(scrubbed)
    for mask in _MASK.finditer(scrubbed):
        length += int(mask[1]) - len(mask[0])
    return length


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber(hash_key=b"0" * 16)


@FUZZ
@given(text=any_text)
@example(text="password='a\\'b' token=\"x\\\"y\" \\npin=4242")
@example(text="https://user:pa ss@host/ Bearer  abc.def== eyJhbGciOi.eyJzdWIiOi.sig")
def test_scrubbed_text_only_replaces_spans_with_masks_of_their_length(
    scrubber: Scrubber, text: str
) -> None:
    """Any text scrubs without raising, and the output is the input with some spans replaced
    by masks that state their length: it is exactly as long as the input once each mask is
    counted as what it hides, so scrubbing never grows text except by the masks' text."""
    scrubbed = scrubber.text(text)
    assert unmasked_length(scrubbed) == len(text)
    if not _MASK.search(scrubbed):
        assert scrubbed == text


@FUZZ
@given(text=any_text)
@example(text="token=abc password=[scrubbed len=3 hash=00000000]")
def test_scrubbing_is_idempotent(scrubber: Scrubber, text: str) -> None:
    """Scrubbing scrubbed text changes nothing: a mask is never masked again, and masking
    never makes a neighbour look secret."""
    once = scrubber.text(text)
    assert scrubber.text(once) == once


@FUZZ
@given(
    before=any_text,
    after=any_text,
    key=st.sampled_from(SECRET_KEYS),
    separator=st.sampled_from(["=", ": ", " = ", ":"]),
    secret=st.text(token_chars, min_size=6, max_size=40),
)
@example(before="Led", after="", key="pin", separator="=", secret="222222")
def test_a_secret_planted_in_random_text_is_masked(
    scrubber: Scrubber, before: str, after: str, key: str, separator: str, secret: str
) -> None:
    """``key=value`` with a secret-looking key on a line of its own inside any text: the
    value never appears in the output (unless the surrounding text holds it on its own).
    (On the same line, a word before can make the name harmless by design: "led pin".)"""
    text = f"{before}\n{key}{separator}{secret} {after}"
    scrubbed = scrubber.text(text)
    if secret not in before and secret not in after:
        assert secret not in scrubbed


@FUZZ
@given(
    before=any_text,
    after=any_text,
    token=st.text(token_chars, min_size=24, max_size=64).filter(
        lambda token: (
            sum(c.isdigit() for c in token) >= 3
            and sum(c.isupper() for c in token) >= 3
            and sum(c.islower() for c in token) >= 3
        )
    ),
)
@example(before="", after="", token="Zq8vK2mX9pL4wR7tB1nC6yH3")
def test_a_random_token_planted_in_random_text_is_masked(
    scrubber: Scrubber, before: str, after: str, token: str
) -> None:
    """A random-looking token of 24+ characters, set apart by spaces inside any text, is
    masked by its value alone."""
    scrubbed = scrubber.text(f"{before} {token} {after}")
    if token not in before and token not in after:
        assert token not in scrubbed


@settings(max_examples=20, deadline=None)
@given(
    head=st.text(st.characters(exclude_categories=()), min_size=1, max_size=200),
    extra=st.integers(1, 3 * MAX_SCANNED_CHARS),
)
def test_long_text_output_is_bounded_by_the_scanned_part(
    scrubber: Scrubber, head: str, extra: int
) -> None:
    """Text beyond what is scanned is masked whole: the output stays within a mask's length
    of the scanned part, however long the input."""
    text = (head * (MAX_SCANNED_CHARS // len(head) + 1))[:MAX_SCANNED_CHARS] + "x" * extra
    scrubbed = scrubber.text(text)
    assert unmasked_length(scrubbed) == len(text) + len("[rest not scanned: ]")
    scanned_output = scrubbed.rsplit("[rest not scanned: ", 1)[0]
    assert len(scrubbed) - len(scanned_output) < 80


_LOG_CANARY = "canary-5e3f9a"


class _Texted:
    """An argument whose str and repr are the canary."""

    def __str__(self) -> str:
        return _LOG_CANARY

    __repr__ = __str__


_log_values = st.sampled_from(
    [
        _LOG_CANARY,
        _LOG_CANARY.encode(),
        ValueError(_LOG_CANARY),
        _Texted(),
        (_LOG_CANARY,),
        {"token": _LOG_CANARY},
    ]
)


@FUZZ
@given(
    prefix=st.sampled_from(
        ["", "retry ", "/p?", "/p?a=1&", "{'", '{"', "user=bob ", "(", "GET /x?", "https://"]
    ),
    key=st.sampled_from(
        ["token", "password", "api_key", "x-api-key", "Authorization", "secret", "pin", "Cookie"]
    ),
    separator=st.sampled_from(["=", ": ", " = ", "='", '="', '": "', "': '", ":", "=["]),
    placeholder=st.sampled_from(["%s", "%r", "%a", "%-20s", "%.40s", "%20s", "%(k)s", "%(k)r"]),
    suffix=st.sampled_from(["", "'", '"', " done", "&page=2", "]"]),
    value=_log_values,
    before=st.sampled_from([(), ("Bearer",), ("password",)]),
)
def test_a_secret_the_formatted_line_shows_never_leaves_the_log_filter(
    prefix: str,
    key: str,
    separator: str,
    placeholder: str,
    suffix: str,
    value: object,
    before: tuple[str, ...],
) -> None:
    """Whatever shape the template and its arguments take, a value the scrubber masks in
    the line logging would write is in no line the filtered record formats to, and a record
    whose line formatted still formats."""
    import logging

    from sentinel._log_filter import ScrubbingFilter

    scrubber = Scrubber(hash_key=b"fuzz")
    mapping = "(k)" in placeholder
    template = ("%s " * len(before) if not mapping else "") + prefix + key + separator
    template += placeholder + suffix
    arguments: Any = ({"k": value},) if mapping else (*before, value)

    def record() -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.error", logging.WARNING, __file__, 1, template, arguments, None
        )

    line = record().getMessage()
    if _LOG_CANARY not in line or _LOG_CANARY in scrubber.text(line):
        return  # the whole line does not show the canary as a secret
    filtered = record()
    assert ScrubbingFilter(lambda: scrubber, rate_limited=False, on_error=lambda: None).filter(
        filtered
    )
    assert _LOG_CANARY not in filtered.getMessage()
