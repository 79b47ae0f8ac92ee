"""Canary secrets planted everywhere a request can carry one never leave the process: no byte
of stdout or stderr, of an OTLP request (on the wire, decompressed, decoded), of a scrape or
of a multiprocess metric file holds one, under `sentinel run` (one worker, and two with the
merged scrape and `sentinel sidecar`) and plain uvicorn serving ``sentinel.instrument(app)``.

One server run per row of ``MODES``, not the cross product (each run costs seconds): every
value of every dimension is in a row (log format json/console, mutation mode
report/raise/isolate, locals on/off, the three ways to serve; traces on in all), and locals
are on under both formats, which is where their rendering differs. What else could differ
does not depend on the pairing: the console view renders the same scrubbed record under
any server, uvicorn formats its own access, websocket and error lines (scrubbed by the log
filter) whatever SENTINEL_LOG_FORMAT says, and a mutation is scrubbed before its mode acts.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    answer_otlp_export,
    clean_env,
    first_response,
    free_port,
    run_client,
    start_http_server,
    stop,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

MARKER = "hunter2"
"""In every low-entropy canary: only its key or scheme gives it away, never its shape."""
SITES = (
    "query-password",
    "query-token",
    "query-nested",
    "matrix",
    "bearer",
    "cookie",
    "api-key-header",
    "csrf-header",
    "baggage",
    "websocket",
    "websocket-fail",
    "body-json",
    "body-dict",
    "body-form",
    "cause-dsn",
    "group-member",
    "message-bearer",
    "environ",
    "environ-url",
    "app-state",
    "local",
    "local-headers",
    "handled",
    "handled-local",
    "tag-key",
    "tag-value",
    "tag-pair",
    "context",
    "context-nested",
    "pydantic-field",
    "del-message",
    "local-form-body",
    "otlp-header",
    "span-attribute",
    "span-event",
    "span-exception",
    "span-status",
    "span-name",
    "span-link",
    "subprotocol",
    "totp-header",
    "padded-message",
    "tag-cut",
    "local-repr",
    "resource",
    "environ-glued",
)
CANARIES = {site: f"{MARKER}-{site}-q7" for site in SITES}
"""One canary per place it is planted, so a leak names where it came from."""
PATH_CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"
"""A random token in the URL path: value patterns alone must catch it."""
TENANT_CANARY = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
"""A token sent as the tenant: refused as a tenant and masked wherever it is written."""
TENANT_UUID = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
"""An ordinary tenant id, which stays readable."""
SECRETS = (MARKER, PATH_CANARY, "4eC39HqLyjWDarjtT1zdp7dc")
SENTINEL = [sys.executable, "-m", "sentinel.cli"]

APP = '''
"""The app the canary tests serve: every handler puts a secret somewhere sentinel looks."""

import dataclasses
import json
import os
from pathlib import Path
from urllib.parse import parse_qs

import sentinel
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

# Read, not written in the source: report frames quote source lines.
CANARIES = json.loads(Path(__file__).with_name("canaries.json").read_text())


async def ok(request):
    return PlainTextResponse("ok")


async def item(request):
    raise KeyError("no such item")


async def body_json(request):
    body = (await request.body()).decode()
    raise ValueError(f"bad payload {body}")


async def body_dict(request):
    body = await request.json()
    raise ValueError(f"bad payload {body}")


async def body_form(request):
    form = parse_qs((await request.body()).decode())
    raise ValueError(f"bad form {form}")


async def fail(request):
    api_key = CANARIES["local"]
    upstream_headers = {"Authorization": "Bearer " + CANARIES["local-headers"]}
    raise RuntimeError(f"upstream refused the call ({len(api_key)}, {len(upstream_headers)})")


async def chained(request):
    try:
        dsn = "postgres://shop:" + CANARIES["cause-dsn"] + "@db.internal:5432/shop"
        raise ConnectionError(f"cannot reach {dsn}")
    except ConnectionError as error:
        raise RuntimeError("the database is down") from error


async def group(request):
    raise ExceptionGroup(
        "batch failed",
        [ValueError("rejected token=" + CANARIES["group-member"]), KeyError("sku")],
    )


async def bearer(request):
    raise PermissionError("upstream answered 401 to Bearer " + CANARIES["message-bearer"])


async def environ(request):
    os.environ["API_TOKEN"] = CANARIES["environ"]
    return PlainTextResponse("ok")


async def environ_url(request):
    os.environ["UPSTREAM_URL"] = "https://shop:" + CANARIES["environ-url"] + "@api.example/v1"
    return PlainTextResponse("ok")


async def state(request):
    request.app.state.upstream_token = CANARIES["app-state"]
    return PlainTextResponse("ok")


async def handled(request):
    token = CANARIES["handled-local"]
    try:
        raise PermissionError(f"upstream said token={CANARIES['handled']} expired")
    except PermissionError as error:
        sentinel.capture_exception(error)
    return PlainTextResponse(f"handled ({len(token)})")


async def tagged(request):
    sentinel.set_tag("api_key", CANARIES["tag-key"])
    sentinel.set_tag("upstream", "Bearer " + CANARIES["tag-value"])
    sentinel.set_tag("note", "password=" + CANARIES["tag-pair"])
    # The tag's 200-character bound falls between the URL's password and its "@".
    url = "postgres://orders:" + CANARIES["tag-cut"] + "@db.internal:5432/orders"
    padding = "x" * (200 - len("failover; ") - len(url) + len("@db.internal:5432/orders"))
    sentinel.set_tag("upstream_db", "failover; " + padding + url)
    sentinel.set_context(
        "login",
        {
            "user": "alice",
            "password": CANARIES["context"],
            "client": {"session_id": CANARIES["context-nested"]},
        },
    )
    raise LookupError("tagged failure")


async def signup(request):
    from pydantic import BaseModel, Field

    class Signup(BaseModel):
        email: str
        password: str = Field(min_length=64)

    # pydantic writes the field's name on one line and its input on the next
    Signup.model_validate({"email": "a@b.example", "password": CANARIES["pydantic-field"]})


class Session:
    def __del__(self):
        raise ConnectionError("could not revoke session token=" + CANARIES["del-message"])


async def revoke(request):
    Session()  # dropped at once: its __del__ raises, an unraisable exception
    return PlainTextResponse("ok")


async def token_call(request):
    # A local longer than locals_max_chars (256): cutting its middle before scrubbing it
    # took the secret's key away at this length.
    body = (
        "grant_type=client_credentials&scope=openid+profile+email+offline_access"
        "&audience=https%3A%2F%2Fapi.shop.example%2F&resource=orders&client_id=shop-web"
        "&client_secret=" + CANARIES["local-form-body"]
        + "&ui_locales=en-US&prompt=consent&max_age=3600&display=page&acr_values=urn%3Amace"
    )
    raise RuntimeError(f"the token endpoint refused the request ({len(body)} bytes)")


async def span(request):
    # What the app writes on the current (server) span with the OpenTelemetry API.
    current = trace.get_current_span()
    current.set_attribute("db.password", CANARIES["span-attribute"])
    current.add_event("login", {"password": CANARIES["span-event"]})
    try:
        raise ConnectionError(f"cannot reach postgres://app:{CANARIES['span-exception']}@db/x")
    except ConnectionError as error:
        current.record_exception(error)
    current.set_status(Status(StatusCode.ERROR, "login failed password=" + CANARIES["span-status"]))
    return PlainTextResponse("no", status_code=401)


async def child(request):
    tracer = sentinel.current().tracer_provider.get_tracer("canaryapp")
    name = "GET https://svc:" + CANARIES["span-name"] + "@api.example/v1"
    with tracer.start_as_current_span(name) as called:
        called.add_link(called.get_span_context(), {"password": CANARIES["span-link"]})
    return PlainTextResponse("upstream failed", status_code=502)


UPSTREAM = "postgres://orders:" + CANARIES["padded-message"] + "@db.internal:5432/orders"


async def lookup(request):
    # The client pads its input so that the message's 8192-character bound falls between
    # the password and the "@" of the app's own URL.
    sku = (await request.body()).decode()
    raise LookupError(f"no sku {sku!r} in {UPSTREAM}")


@dataclasses.dataclass
class Settings:
    # Its repr's "@" is its 257th character: cut at 256, the password is all that is left.
    service_name: str = "checkout-service-production-eu-west-1b"
    region: str = "eu-west-1"
    feature_flags: str = "new-checkout,fast-refunds,async-receipts"
    cache_ttl_seconds: int = 300
    retry_backoff: str = "exponential-jitter"
    database_url: str = "postgres://checkout:" + CANARIES["local-repr"] + "@db.internal/checkout"


async def settings_local(request):
    # A repr longer than locals_max_chars (256), cut between the password and its "@".
    settings = Settings()
    raise RuntimeError(f"settings rejected ({len(settings.region)})")


async def deploy(request):
    os.environ["SSHPASS"] = CANARIES["environ-glued"]  # read by `sshpass -e`
    return PlainTextResponse("ok")


async def ws(websocket):
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


async def ws_token(websocket):
    # A browser's websocket auth: the token offered as a subprotocol after "access_token".
    await websocket.accept(subprotocol="access_token")
    raise ConnectionAbortedError("the token feed broke")


async def ws_fail(websocket):
    await websocket.accept()
    raise ConnectionAbortedError("the feed broke")


app = Starlette(
    routes=[
        Route("/ok", ok),
        Route("/items/{item_id}", item),
        Route("/body/json", body_json, methods=["POST"]),
        Route("/body/dict", body_dict, methods=["POST"]),
        Route("/body/form", body_form, methods=["POST"]),
        Route("/fail", fail),
        Route("/chained", chained),
        Route("/group", group),
        Route("/bearer", bearer),
        Route("/environ", environ),
        Route("/environ/url", environ_url),
        Route("/state", state),
        Route("/handled", handled),
        Route("/tagged", tagged),
        Route("/signup", signup),
        Route("/revoke", revoke),
        Route("/token", token_call),
        Route("/span", span),
        Route("/child", child),
        Route("/lookup", lookup, methods=["POST"]),
        Route("/settings", settings_local),
        Route("/deploy", deploy),
        WebSocketRoute("/ws", ws),
        WebSocketRoute("/ws/fail", ws_fail),
        WebSocketRoute("/ws/token", ws_token),
    ]
)
'''
PLAIN = """
import sentinel
from canaryapp import app as bare

app = sentinel.instrument(bare)
"""


@dataclasses.dataclass(frozen=True)
class Mode:
    """One server run: how it is served and which modes are on."""

    server: str  # "run", "run-workers" or "uvicorn"
    log_format: str
    mutation_mode: str
    log_locals: bool

    def __str__(self) -> str:
        locals_ = "locals" if self.log_locals else "nolocals"
        return f"{self.server}-{self.log_format}-{self.mutation_mode}-{locals_}"


MODES = [
    Mode("run", "json", "report", log_locals=True),
    Mode("run-workers", "console", "raise", log_locals=True),
    Mode("uvicorn", "json", "isolate", log_locals=False),
]


class RawReceiver:
    """An OTLP/HTTP receiver on 127.0.0.1 that keeps every request body as it came."""

    def __init__(self) -> None:
        bodies: list[tuple[str, bytes, bytes]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                wire = self.rfile.read(int(self.headers.get("content-length", "0")))
                body = wire
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(wire)
                with lock:
                    bodies.append((self.path, wire, body))
                answer_otlp_export(self, 200 if self.path == "/v1/traces" else 404)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._bodies = bodies
        self._lock = lock
        self._server, self._thread = start_http_server(Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def bodies(self) -> list[tuple[str, bytes, bytes]]:
        """(path, bytes on the wire, decompressed bytes) of every request received."""
        with self._lock:
            return list(self._bodies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextmanager
def raw_receiver() -> Iterator[RawReceiver]:
    server = RawReceiver()
    try:
        yield server
    finally:
        server.close()


def _headers(tenant: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {CANARIES['bearer']}",
        "cookie": f"theme=dark; session={CANARIES['cookie']}",
        "x-api-key": CANARIES["api-key-header"],
        "x-csrf-token": CANARIES["csrf-header"],
        "x-totp": CANARIES["totp-header"],
        "baggage": f"region=eu,api_key={CANARIES['baggage']};ttl=3",
        "x-tenant": tenant,
    }


QUERY = (
    f"?password={CANARIES['query-password']}&token={CANARIES['query-token']}&page=2"
    f"&next=/callback%3Faccess_token%3D{CANARIES['query-nested']}"
)
_LOOKUP_PADDING = "Z" * (
    8192 - len("no sku '") - len("' in postgres://orders:" + CANARIES["padded-message"])
)
"""A client's input, echoed into the app's message, that puts the message's bound right
between the password of the app's URL and its ``@``."""
FOLDED_REPEATS = 21
"""More than the 10 full reports of one fingerprint a minute in at least one of two workers:
the rest fold into a summary."""


def _traffic(url: str, ws_url: str) -> dict[str, int]:
    """Every planted secret, once per route, and one route until it folds; the status each
    route answered."""
    statuses: dict[str, int] = {}
    # A connection per request: the server closes one after an unhandled exception.
    fresh = httpx.Limits(max_keepalive_connections=0)
    headers = _headers(TENANT_UUID)
    matrix = f";jsessionid={CANARIES['matrix']}"
    form = {"password": CANARIES["body-form"], "user": "alice"}
    plants: list[tuple[str, str, str, dict[str, Any]]] = [
        ("ok", "GET", "/ok", {}),
        ("item", "GET", f"/items/{PATH_CANARY}{matrix}", {}),
        ("body-json", "POST", "/body/json", {"json": {"password": CANARIES["body-json"]}}),
        ("body-dict", "POST", "/body/dict", {"json": {"password": CANARIES["body-dict"]}}),
        ("body-form", "POST", "/body/form", {"data": form}),
        ("chained", "GET", "/chained", {}),
        ("group", "GET", "/group", {}),
        ("bearer", "GET", "/bearer", {}),
        ("environ", "GET", "/environ", {}),
        ("environ-url", "GET", "/environ/url", {}),
        ("state", "GET", "/state", {}),
        ("handled", "GET", "/handled", {}),
        ("tagged", "GET", "/tagged", {}),
        ("signup", "GET", "/signup", {}),
        ("revoke", "GET", "/revoke", {}),
        ("token", "GET", "/token", {}),
        ("span", "GET", "/span", {}),
        ("child", "GET", "/child", {}),
        ("lookup", "POST", "/lookup", {"content": _LOOKUP_PADDING}),
        ("settings", "GET", "/settings", {}),
        ("deploy", "GET", "/deploy", {}),
        *[("fail", "GET", "/fail", {})] * FOLDED_REPEATS,
    ]
    with httpx.Client(base_url=url, timeout=10, headers=headers, limits=fresh) as client:
        for name, method, path, body in plants:
            response = client.request(method, path + QUERY, **body)
            statuses[name] = response.status_code
        for path in ("/ok", "/fail"):  # the token as a tenant, answered and failing
            response = client.get(path + QUERY, headers={"x-tenant": TENANT_CANARY})
            statuses[f"token-tenant{path}"] = response.status_code
    run_client(_websocket_hello(f"{ws_url}/ws?api_key={CANARIES['websocket']}&page=2"))
    run_client(_websocket_broken(f"{ws_url}/ws/fail?access_token={CANARIES['websocket-fail']}"))
    run_client(_websocket_broken(f"{ws_url}/ws/token", ["access_token", CANARIES["subprotocol"]]))
    return statuses


async def _websocket_hello(url: str) -> None:
    import websockets

    async with websockets.connect(url, additional_headers=_headers(TENANT_UUID)) as socket:
        assert await socket.recv() == "hello"


async def _websocket_broken(url: str, subprotocols: list[str] | None = None) -> None:
    import websockets

    async with websockets.connect(
        url,
        additional_headers=_headers(TENANT_UUID),
        subprotocols=subprotocols,  # type: ignore[arg-type]
    ) as socket:
        with pytest.raises(websockets.ConnectionClosedError):
            await socket.recv()


@dataclasses.dataclass
class Outputs:
    """Everything one server run wrote or exported, as bytes."""

    stdout: bytes
    stderr: bytes
    scrapes: dict[str, bytes]
    otlp: list[tuple[str, bytes, bytes]]
    """Each OTLP request: its path, its bytes on the wire and decompressed."""
    files: dict[str, bytes]
    statuses: dict[str, int]

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")


def _environment(tmp_path: Path, mode: Mode, metrics_port: int, otlp: str) -> dict[str, str]:
    return clean_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        SENTINEL_LOCATION="fra",
        SENTINEL_METRICS_HOST="127.0.0.1",
        SENTINEL_METRICS_PORT=str(metrics_port),
        SENTINEL_LOG_FORMAT=mode.log_format,
        SENTINEL_MUTATION_MODE=mode.mutation_mode,
        SENTINEL_LOG_LOCALS="1" if mode.log_locals else "0",
        SENTINEL_TENANT_HEADER="x-tenant",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
        # The common mistake, ": " for "=": OpenTelemetry's parser warns, quoting the entry.
        OTEL_EXPORTER_OTLP_HEADERS=f"x-api-key: {CANARIES['otlp-header']}",
        OTEL_RESOURCE_ATTRIBUTES=(
            f"vcs.repository.url.full=https://ci:{CANARIES['resource']}@git.example/shop.git"
        ),
        OTEL_BSP_SCHEDULE_DELAY="50",
        COLUMNS="100",  # the console view wraps at the terminal's width
    )


def _serve(tmp_path: Path, mode: Mode) -> Outputs:
    (tmp_path / "canaryapp.py").write_text(textwrap.dedent(APP))
    (tmp_path / "canaryplain.py").write_text(textwrap.dedent(PLAIN))
    (tmp_path / "canaries.json").write_text(json.dumps(CANARIES))
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    port, metrics_port = free_port(), free_port()
    scrapes: dict[str, bytes] = {}
    with raw_receiver() as receiver:
        env = _environment(tmp_path, mode, metrics_port, receiver.endpoint)
        address = ["--host", "127.0.0.1", "--port", str(port)]
        if mode.server == "uvicorn":
            command = [sys.executable, "-m", "uvicorn", "canaryplain:app", *address]
        else:
            command = [*SENTINEL, "run", "canaryapp:app", *address]
        if mode.server == "run-workers":
            command += ["--workers", "2"]
            env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        url = f"http://127.0.0.1:{port}"
        with (tmp_path / "stdout").open("wb") as out, (tmp_path / "stderr").open("wb") as err:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=err, cwd=tmp_path, text=True
            )
            try:
                first_response(process, f"{url}/ok", timeout=60)
                statuses = _traffic(url, f"ws://127.0.0.1:{port}")
                scrapes["server"] = _scrape(metrics_port)
                if mode.server == "run-workers":
                    scrapes["sidecar"] = _sidecar_scrape(env, tmp_path)
            finally:
                stop(process)
        assert process.returncode == 0, (tmp_path / "stderr").read_text()
        otlp = receiver.bodies
    return Outputs(
        stdout=(tmp_path / "stdout").read_bytes(),
        stderr=(tmp_path / "stderr").read_bytes(),
        scrapes=scrapes,
        otlp=otlp,
        files={str(path): path.read_bytes() for path in multiproc.rglob("*") if path.is_file()},
        statuses=statuses,
    )


def _scrape(port: int) -> bytes:
    """The scrape once it counts the readable tenant (workers publish their tenant counts
    when they flush), or the last one after 15 s."""

    def scrape() -> bytes:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200
        return response.content

    deadline = time.monotonic() + 15
    content = scrape()
    while TENANT_UUID.encode() not in content and time.monotonic() < deadline:
        time.sleep(0.2)
        content = scrape()
    return content


def _sidecar_scrape(env: dict[str, str], tmp_path: Path) -> bytes:
    """The workers' metric files as `sentinel sidecar` serves them."""
    port = free_port()
    with (tmp_path / "sidecar.err").open("wb") as err:
        sidecar = subprocess.Popen(
            [*SENTINEL, "sidecar", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=err,
            stderr=err,
            text=True,
        )
        try:
            first_response(sidecar, f"http://127.0.0.1:{port}/metrics")
            scraped = _scrape(port)
        finally:
            stop(sidecar)
    return scraped + (tmp_path / "sidecar.err").read_bytes()


def _decoded(body: bytes) -> str:
    """The OTLP request as protobuf's text format: every span, attribute and event."""
    return str(ExportTraceServiceRequest.FromString(body))


_CONSOLE_WRAPPING = r"[\s\u2500-\u257f\u2771]+"
"""Whitespace and the box-drawing characters of the console view's panels."""


def _leaks(name: str, data: bytes) -> list[str]:
    """Where a secret appears in ``data``: in its raw bytes, or in its text as written, with
    the console's wrapping taken out, or with the escapes of JSON and reprs taken out."""
    text = data.decode("utf-8", "replace")
    readings = (
        text,
        re.sub(_CONSOLE_WRAPPING, "", text),
        text.replace("\\", ""),
    )
    found = []
    for secret in SECRETS:
        if secret.encode() in data:
            found.append(f"{name}: {secret!r} in the raw bytes")
        for reading in readings:
            if (index := reading.find(secret)) >= 0:
                found.append(f"{name}: {reading[max(0, index - 160) : index + 60]!r}")
                break
    return found


@pytest.fixture(scope="module", params=MODES, ids=str)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    mode: Mode = request.param
    return mode, _serve(tmp_path_factory.mktemp(str(mode)), mode)


def test_no_canary_leaves_the_process(served: tuple[Mode, Outputs]) -> None:
    """No secret appears in any byte of stdout, stderr, the OTLP requests (on the wire,
    decompressed and decoded), the scrapes or the multiprocess metric files."""
    _, outputs = served
    leaks = _leaks("stdout", outputs.stdout) + _leaks("stderr", outputs.stderr)
    for name, scrape in outputs.scrapes.items():
        leaks += _leaks(f"{name} scrape", scrape)
    for index, (path, wire, body) in enumerate(outputs.otlp):
        leaks += _leaks(f"OTLP request {index} (wire)", wire)
        leaks += _leaks(f"OTLP request {index}", body)
        if path == "/v1/traces":
            leaks += _leaks(f"OTLP request {index} (decoded)", _decoded(body).encode())
    for path, content in outputs.files.items():
        leaks += _leaks(path, content)
    assert not leaks, "\n".join(leaks)


def test_every_canary_reached_sentinel(served: tuple[Mode, Outputs]) -> None:
    """Not vacuous: the app failed where it should, and the reports, the mutations, the
    fold, the spans and the tenant series that would carry the secrets were all written."""
    mode, outputs = served
    raising = mode.mutation_mode == "raise"
    mutated = 500 if raising else 200
    assert outputs.statuses == {
        "ok": 200,
        **dict.fromkeys(["item", "body-json", "body-dict", "body-form", "chained"], 500),
        **dict.fromkeys(["group", "bearer", "tagged", "fail", "signup", "token"], 500),
        **dict.fromkeys(["lookup", "settings"], 500),
        "span": 401,
        "child": 502,
        "revoke": 200,
        **dict.fromkeys(["environ", "environ-url", "state", "deploy"], mutated),
        "handled": 200,
        "token-tenant/ok": 200,
        "token-tenant/fail": 500,
    }
    text = outputs.text
    for shown in (
        "bad payload",
        "bad form",
        "the database is down",
        "cannot reach postgres://",
        "batch failed",
        "upstream answered 401",
        "upstream said token=",
        "API_TOKEN",
        "UPSTREAM_URL",
        "upstream_token",
        "tagged failure",
        "the feed broke",
        "String should have at least 64 characters",
        "could not revoke session",
        "the token endpoint refused",
        "no sku 'ZZZZ",
        "settings rejected",
        "SSHPASS",
        "the token feed broke",
        "Header format invalid",
        "exception_summary",
    ):
        # The console view wraps long lines where the terminal width falls (the temporary
        # path's length moves it), so a phrase may be split across lines and box borders.
        unwrapped = re.sub(_CONSOLE_WRAPPING, "", shown) in re.sub(_CONSOLE_WRAPPING, "", text)
        assert shown in text or unwrapped, f"{shown!r} is missing from the output of {mode}"
    assert text.count("[scrubbed len=") >= len(SITES)
    assert TENANT_UUID in text  # an ordinary tenant id stays readable in records
    assert {path for path, _, _ in outputs.otlp} == {"/v1/traces"}
    decoded = "".join(_decoded(body) for _, _, body in outputs.otlp)
    assert 'name: "GET /tagged"' in decoded and "exception.message" in decoded
    for written_on_spans in ('name: "GET /span"', "db.password", "login failed password=["):
        assert written_on_spans in decoded
    assert 'name: "GET https://[scrubbed len=' in decoded
    assert "vcs.repository.url.full" in decoded
    assert TENANT_UUID in decoded
    for scrape in outputs.scrapes.values():
        assert f'tenant="{TENANT_UUID}"' in scrape.decode()
        assert 'tenant="other"' in scrape.decode()
    assert bool(outputs.files) is (mode.server == "run-workers")
