"""The metrics endpoint: its own thread and port, loop lag, multiple workers, real Prometheus."""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import httpx
import pytest
from helpers import clean_env, free_port, stop, wait_for
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import instrument
from sentinel._sidecar import MetricsServer, bind_failure_advice
from sentinel.testing import capture_reports, serve

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
ROOT = Path(__file__).resolve().parents[1]
"""The checkout under test: its sentinel is the one the servers started here import."""


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((sample.labels, sample.value))
    return found


def _wait_until_up(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                _, err = process.communicate(timeout=5)
                raise RuntimeError(f"{url} did not come up:\n{err}") from None
            time.sleep(0.1)


# -- the endpoint answers when the loop cannot ------------------------------------------------


def test_metrics_answer_while_the_event_loop_is_blocked() -> None:
    """A handler that blocks the loop for seconds: /metrics still answers, lag shows it."""

    async def blocking(request: Request) -> Response:
        time.sleep(3)  # noqa: ASYNC251 -- a blocking call in an async handler stops the loop
        return PlainTextResponse("finally")

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    with capture_reports(metrics_port=1) as captured:  # non-zero: loops are watched
        endpoint = MetricsServer(captured.registry, "127.0.0.1", 0).start()
        try:
            app = Starlette(routes=[Route("/block", blocking), Route("/ok", ok)])
            with serve(instrument(app, sentinel=captured.sentinel)) as url:
                assert httpx.get(f"{url}/ok").text == "ok"
                time.sleep(0.6)  # the lag monitor has probed the running loop
                with ThreadPoolExecutor(1) as pool:
                    blocked = pool.submit(httpx.get, f"{url}/block", timeout=10)
                    time.sleep(1.5)
                    started = time.monotonic()
                    scrape = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=2)
                    scrape_seconds = time.monotonic() - started
                    assert not blocked.done(), "the loop was supposed to be blocked still"
                    assert blocked.result().text == "finally"
        finally:
            endpoint.stop()
    assert scrape.status_code == 200
    assert scrape_seconds < 1.0
    [(_, lag)] = _samples(scrape.text, "sentinel_event_loop_lag_seconds")
    assert lag >= 0.9, scrape.text
    [(labels, value)] = _samples(scrape.text, "sentinel_http_requests_total")
    assert labels["route"] == "/ok" and value == 1


def test_healthz_and_content_negotiation() -> None:
    """/healthz answers ok; /metrics speaks text or OpenMetrics as the scraper asks."""
    with capture_reports() as captured:
        captured.sentinel.metrics.count_later(
            captured.sentinel.metrics.request_children("fra", "/", "GET", 200), 0.01
        )
        endpoint = MetricsServer(captured.registry, "127.0.0.1", 0).start()
        try:
            base = f"http://127.0.0.1:{endpoint.port}"
            health = httpx.get(f"{base}/healthz")
            text = httpx.get(f"{base}/metrics")
            openmetrics = httpx.get(
                f"{base}/metrics", headers={"accept": "application/openmetrics-text"}
            )
            missing = httpx.get(f"{base}/elsewhere")
        finally:
            endpoint.stop()
    assert health.status_code == 200 and health.text == "ok\n"
    assert text.headers["content-type"].startswith("text/plain")
    assert 'sentinel_http_requests_total{code="200"' in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert missing.status_code == 404


def test_a_taken_port_is_reported_not_raised() -> None:
    """When the metrics port is in use the app still starts; the failure is counted."""
    from sentinel._runtime import Sentinel

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with capture_reports(metrics_port=port, metrics_host="127.0.0.1") as captured:
            sentinel: Sentinel = captured.sentinel
            import sentinel._runtime as runtime

            previous = runtime._metrics_server
            runtime._metrics_server = None
            try:
                assert sentinel.start_metrics_endpoint() is None
            finally:
                runtime._metrics_server = previous
            warnings = captured.events("metrics_endpoint_unavailable")
            assert captured.metric("sentinel_internal_errors_total", component="sidecar") == 1
    assert warnings and warnings[0]["port"] == port
    # Most often the port is a sibling worker's (plain uvicorn --workers): the way out is the
    # merged view, not another port nobody scrapes.
    assert "sentinel run --workers N" in warnings[0]["detail"]
    assert "PROMETHEUS_MULTIPROC_DIR" in warnings[0]["detail"]


# -- the endpoint is bounded: it lives in the app's process ----------------------------------


def _registry_with(*collectors: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("app_up", "Whether the app is up.", registry=registry).set(1)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


def _closed_by_peer(client: socket.socket) -> bool:
    """Whether the server closed ``client`` (read without waiting)."""
    timeout = client.gettimeout()
    client.setblocking(False)
    try:
        return client.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset
    finally:
        client.settimeout(timeout)


def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` on a connection of its own; the status line, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request)
        received = b""
        for _ in range(1000):  # until the server closes (it answers one request)
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (x.partition(":") for x in lines)}
    return status, headers, body


def _connection_threads(before: set[threading.Thread]) -> int:
    """Threads started since ``before`` that still run (the endpoint's own loop too)."""
    return sum(1 for thread in threading.enumerate() if thread not in before)


def test_a_flood_of_idle_connections_holds_few_threads_and_a_scrape_still_answers() -> None:
    """200 connections that send one byte and then nothing: the endpoint serves at most 16
    at once (one thread each), a scrape made while they are all held open is answered, and
    the idle ones are closed after the request timeout, their threads gone."""
    before = set(threading.enumerate())
    endpoint = MetricsServer(_registry_with(), "127.0.0.1", 0, request_timeout=1.0).start()
    clients: list[socket.socket] = []
    most_threads = 0
    try:
        for _ in range(200):
            client = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
            clients.append(client)
            client.sendall(b"G")
            most_threads = max(most_threads, _connection_threads(before))
        for _ in range(20):  # the endpoint catches up with the last ones
            time.sleep(0.01)
            most_threads = max(most_threads, _connection_threads(before))
        scrape = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5)
        health = httpx.get(f"http://127.0.0.1:{endpoint.port}/healthz", timeout=5)
        most_threads = max(most_threads, _connection_threads(before))
        closed: set[socket.socket] = set()

        def all_closed() -> bool:
            closed.update(c for c in clients if c not in closed and _closed_by_peer(c))
            return len(closed) == len(clients)

        everything_closed = wait_for(all_closed, timeout=4.0)
        threads_gone = wait_for(lambda: _connection_threads(before) <= 1, timeout=3.0)
    finally:
        for client in clients:
            client.close()
        endpoint.stop()
    # The endpoint's loop, 16 connections, and one whose slot was just freed, ending.
    assert most_threads <= 1 + 16 + 2, f"{most_threads} threads for 200 idle connections"
    assert scrape.status_code == 200 and "app_up 1.0" in scrape.text
    assert health.status_code == 200
    assert everything_closed, f"{len(clients) - len(closed)} idle connections still open"
    assert threads_gone


def test_a_request_sent_a_byte_at_a_time_is_cut_off_at_the_timeout() -> None:
    """A client that sends its request a byte every 0.2 s (each read well inside the socket
    timeout) is closed once the request timeout has passed, and nothing is rendered."""
    rendered: list[float] = []

    class Counting:
        def describe(self) -> list[object]:
            return []

        def collect(self) -> list[object]:
            rendered.append(time.monotonic())
            return []

    endpoint = MetricsServer(_registry_with(Counting()), "127.0.0.1", 0, request_timeout=1.0)
    endpoint.start()
    request = b"GET /metrics HTTP/1.1\r\nHost: sentinel\r\nUser-Agent: slow\r\n"
    closed_after = None
    try:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as client:
            started = time.monotonic()
            for byte in request:  # at most len(request) * 0.2 s
                if _closed_by_peer(client):
                    closed_after = time.monotonic() - started
                    break
                try:
                    client.sendall(bytes([byte]))
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.2)
    finally:
        endpoint.stop()
    assert closed_after is not None, "a trickling client kept its connection open"
    assert closed_after < 1.0 + 3.0  # the timeout, the sweep's half second, slack for a busy host
    assert not rendered


def test_a_burst_of_connections_waits_in_the_backlog_not_for_its_syn() -> None:
    """100 connections at once while the endpoint's thread is not accepting yet (busy, or
    short of the GIL): the kernel completes them all at once (a listen backlog of 128,
    not the standard library's 5, where the rest wait a second or more for their SYN to
    be answered), and each is answered once the thread accepts."""
    endpoint = MetricsServer(_registry_with(), "127.0.0.1", 0)  # listening, not accepting
    clients = []
    try:
        for _ in range(100):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", endpoint.port))
            clients.append(client)
        pending = set(clients)
        deadline = time.monotonic() + 0.5  # the first SYN retransmission comes after 1 s
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], deadline - time.monotonic())
            pending.difference_update(writable)
        connected = [
            c
            for c in clients
            if c not in pending and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        ]
        endpoint.start()
        answers = []
        for client in connected:
            client.setblocking(True)
            client.settimeout(5)
            client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        for client in connected:
            answers.append(client.recv(64).split(b"\r\n")[0])
    finally:
        for client in clients:
            client.close()
        endpoint.stop()
    assert len(connected) == 100
    assert answers == [b"HTTP/1.0 200 OK"] * 100


def test_concurrent_scrapes_are_rendered_one_at_a_time() -> None:
    """Eight scrapes at once: each is answered, and the registry is rendered by one of them
    at a time, so concurrent scrapers cannot multiply the CPU taken from the app."""
    lock = threading.Lock()
    rendering = [0]
    most = [0]

    class Slow:
        def describe(self) -> list[object]:
            return []

        def collect(self) -> list[object]:
            with lock:
                rendering[0] += 1
                most[0] = max(most[0], rendering[0])
            time.sleep(0.05)
            with lock:
                rendering[0] -= 1
            return []

    endpoint = MetricsServer(_registry_with(Slow()), "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with ThreadPoolExecutor(8) as pool:
            scrapes = list(pool.map(lambda _: httpx.get(url, timeout=10), range(8)))
    finally:
        endpoint.stop()
    assert [scrape.status_code for scrape in scrapes] == [200] * 8
    assert all("app_up 1.0" in scrape.text for scrape in scrapes)
    assert most[0] == 1


def test_head_answers_the_get_headers_without_a_body() -> None:
    """HEAD /healthz and HEAD /metrics: the status and headers GET gets, and no body."""
    endpoint = MetricsServer(_registry_with(), "127.0.0.1", 0).start()
    try:
        exchanges = {
            (method, path): _exchange(
                endpoint.port, f"{method} {path} HTTP/1.0\r\nHost: sentinel\r\n\r\n".encode()
            )
            for method in ("GET", "HEAD")
            for path in ("/healthz", "/metrics", "/elsewhere")
        }
    finally:
        endpoint.stop()
    for path in ("/healthz", "/metrics", "/elsewhere"):
        get_status, get_headers, get_body = exchanges["GET", path]
        head_status, head_headers, head_body = exchanges["HEAD", path]
        assert head_status == get_status, path
        assert head_headers["content-type"] == get_headers["content-type"], path
        assert head_headers["content-length"] == str(len(get_body)), path
        assert head_body == b"", path
    assert exchanges["HEAD", "/healthz"][0].endswith("200 OK")
    assert exchanges["GET", "/healthz"][2] == b"ok\n"
    assert exchanges["HEAD", "/metrics"][0].endswith("200 OK")


# -- sentinel run: one process, then several workers ------------------------------------------


APP_MODULE = textwrap.dedent(
    """
    import asyncio
    import os

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route


    async def whoami(request):
        await asyncio.sleep(0.005)  # so concurrent requests spread over the workers
        return PlainTextResponse(str(os.getpid()))


    app = Starlette(routes=[Route("/whoami/{n}", whoami)])
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "countedapp.py").write_text(APP_MODULE)
    return tmp_path


def _send_concurrently(url: str, count: int) -> set[str]:
    def one(n: int) -> str:
        response = httpx.get(f"{url}/whoami/{n}", headers={"connection": "close"}, timeout=10)
        assert response.status_code == 200
        return response.text

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(count)))


def _sentinel_run(
    app_dir: Path,
    *options: str,
    stdout: int = subprocess.DEVNULL,
    stderr: int | IO[str] = subprocess.PIPE,
    **env: str,
) -> tuple[subprocess.Popen[str], int, int]:
    """`sentinel run countedapp:app` with ``options``, the app and its metrics endpoint on
    free ports of 127.0.0.1, ``env`` added: the process, the app's port, the metrics port."""
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [*SENTINEL, "run", "countedapp:app", "--host", "127.0.0.1", "--port", str(port), *options],
        env=clean_env(
            PYTHONPATH=f"{app_dir}{os.pathsep}{ROOT}",
            SENTINEL_METRICS_PORT=str(metrics_port),
            SENTINEL_METRICS_HOST="127.0.0.1",
            **env,
        ),
        stdout=stdout,
        stderr=stderr,
        text=True,
    )
    return process, port, metrics_port


def test_sentinel_run_serves_metrics_on_its_port(app_dir: Path) -> None:
    """Single process: `sentinel run` serves /metrics and /healthz on SENTINEL_METRICS_PORT."""
    process, port, metrics_port = _sentinel_run(
        app_dir, stdout=subprocess.PIPE, SENTINEL_LOCATION="fra"
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", process)
        _send_concurrently(f"http://127.0.0.1:{port}", 49)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        health = httpx.get(f"http://127.0.0.1:{metrics_port}/healthz")
    finally:
        stop(process)
    assert health.text == "ok\n"
    [(labels, value)] = _samples(metrics, "sentinel_http_requests_total")
    assert value == 50
    assert labels == {"location": "fra", "route": "/whoami/{n}", "method": "GET", "code": "200"}
    [(info, _)] = _samples(metrics, "sentinel_build_info")
    assert info["service"] == "countedapp"


def test_workers_add_up_exactly_in_the_merged_view(app_dir: Path) -> None:
    """`sentinel run --workers 2`: requests spread over both, the merged counter is exact."""
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *SENTINEL,
            "run",
            "countedapp:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        env=clean_env(
            PYTHONPATH=str(app_dir),
            SENTINEL_METRICS_PORT=str(metrics_port),
            SENTINEL_METRICS_HOST="127.0.0.1",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = 300
    try:
        _wait_until_up(f"http://127.0.0.1:{metrics_port}/healthz", process)
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", process)
        pids = _send_concurrently(f"http://127.0.0.1:{port}", sent - 1)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        stop(process)
    assert len(pids) == 2, f"requests did not spread over the workers: {pids}"
    total = sum(value for _, value in _samples(metrics, "sentinel_http_requests_total"))
    assert total == sent
    seen = sum(value for _, value in _samples(metrics, "sentinel_records_seen_total"))
    assert seen == sent  # derived from the merged request counter
    lag_pids = {labels["pid"] for labels, _ in _samples(metrics, "sentinel_event_loop_lag_seconds")}
    assert pids <= lag_pids


def test_a_given_directory_holds_only_the_workers_files(app_dir: Path, tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR given, `sentinel run --workers 2` writes no metric file
    of its own supervising process: it serves no request, and its files (a lag gauge, its
    build info, the app's own per-process gauges at their first values) would stand in the
    merged view as a worker that never ends, and into the next run in that directory."""
    given = tmp_path / "multiproc"
    given.mkdir()
    process, port, metrics_port = _sentinel_run(
        app_dir, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(given)
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{metrics_port}/healthz", process)
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", process)
        pids = _send_concurrently(f"http://127.0.0.1:{port}", 99)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        files = sorted(path.name for path in given.iterdir())
    finally:
        stop(process)
    assert len(pids) == 2, f"requests did not spread over the workers: {pids}"
    supervisor = str(process.pid)
    assert not [name for name in files if name.endswith(f"_{supervisor}.db")], files
    lag_pids = {labels["pid"] for labels, _ in _samples(metrics, "sentinel_event_loop_lag_seconds")}
    assert lag_pids == pids
    assert sum(value for _, value in _samples(metrics, "sentinel_http_requests_total")) == 100


def test_sentinel_sidecar_serves_workers_of_another_supervisor(app_dir: Path) -> None:
    """Plain `uvicorn --workers 2` with PROMETHEUS_MULTIPROC_DIR; `sentinel sidecar` merges."""
    (app_dir / "wrappedapp.py").write_text(
        "import sentinel\nfrom countedapp import app as inner\napp = sentinel.instrument(inner)\n"
    )
    multiproc = tempfile.mkdtemp(prefix="sentinel-test-multiproc-")
    port, metrics_port = free_port(), free_port()
    env = clean_env(
        PYTHONPATH=str(app_dir),
        PROMETHEUS_MULTIPROC_DIR=multiproc,
        SENTINEL_METRICS_PORT=str(metrics_port),
        SENTINEL_METRICS_HOST="127.0.0.1",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "wrappedapp:app", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sidecar = subprocess.Popen(
        [*SENTINEL, "sidecar"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sent = 200
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", server)
        _wait_until_up(f"http://127.0.0.1:{metrics_port}/healthz", sidecar)
        _send_concurrently(f"http://127.0.0.1:{port}", sent - 1)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        stop(server)
        stop(sidecar)
        shutil.rmtree(multiproc, ignore_errors=True)
    total = sum(value for _, value in _samples(metrics, "sentinel_http_requests_total"))
    assert total == sent


def _sidecar(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SENTINEL, "sidecar", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("directory", "shown", "advice"),
    [
        (None, "PROMETHEUS_MULTIPROC_DIR is not set", "set it to the directory the workers"),
        ("missing", "which does not exist", "create it"),
        ("file", "which is not a directory", "set it to the directory the workers"),
    ],
    ids=["unset", "missing", "a-file"],
)
def test_sidecar_says_what_is_wrong_with_the_directory_and_what_to_do(
    directory: str | None, shown: str, advice: str, tmp_path: Path
) -> None:
    """`sentinel sidecar` names the variable, the directory it tried and what to do, exits
    2, and never prints "None"."""
    env = {}
    if directory is not None:
        path = tmp_path / directory
        if directory == "file":
            path.write_text("")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    result = _sidecar(**env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("sentinel sidecar: ")
    assert "PROMETHEUS_MULTIPROC_DIR" in line and shown in line and advice in line
    if directory is not None:
        assert repr(env["PROMETHEUS_MULTIPROC_DIR"]) in line
    assert "None" not in line


def test_sidecar_on_a_taken_port_names_the_address_and_what_to_do(tmp_path: Path) -> None:
    """A port another process listens on: exit 1, the address, the reason, the options."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _sidecar(
            "--host", "127.0.0.1", "--port", str(port), PROMETHEUS_MULTIPROC_DIR=str(tmp_path)
        )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"cannot bind 127.0.0.1:{port} (Address already in use)" in line
    assert "choose a free port with --port or SENTINEL_METRICS_PORT" in line


def test_sidecar_on_an_address_this_host_does_not_have_says_which_to_use(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1, never a local address): the bind fails, the message names the
    address and the --host choices."""
    result = _sidecar("--host", "192.0.2.1", "--port", "9", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert result.returncode == 1
    assert "cannot bind 192.0.2.1:9" in result.stderr
    assert "192.0.2.1 is not an address of this host" in result.stderr
    assert "--host or SENTINEL_METRICS_HOST" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (["--host", "metrics.internal"], {}, "--host must be an IP address or localhost: "),
        (["--port", "70000"], {}, "--port must be an integer between 0 and 65535: 70000"),
        ([], {"SENTINEL_METRICS_PORT": "lots"}, "SENTINEL_METRICS_PORT must be an integer"),
        (["--port", "0"], {}, "--port 0 turns the metrics endpoint off"),
        ([], {"SENTINEL_METRICS_PORT": "0"}, "SENTINEL_METRICS_PORT=0 turns the metrics"),
    ],
    ids=["host-flag", "port-flag", "port-variable", "port-flag-off", "port-variable-off"],
)
def test_sidecar_configuration_errors_name_the_flag_or_variable(
    args: list[str], env: dict[str, str], shown: str, tmp_path: Path
) -> None:
    """A bad flag is named as the flag (not as Config's keyword), a bad variable as the
    variable; exit 2."""
    result = _sidecar(*args, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), **env)
    assert result.returncode == 2
    assert shown in result.stderr
    assert '"metrics_' not in result.stderr


@pytest.mark.parametrize(
    ("number", "advice"),
    [
        (errno.EACCES, "ports below 1024 need privileges: choose a higher one with --port"),
        (errno.EAFNOSUPPORT, "this host has no IPv6: choose an IPv4 address with --host"),
        (errno.EIO, "check the address (--host) and the port (--port)"),
    ],
    ids=["privileged", "no-ipv6", "other"],
)
def test_bind_failure_advice_for_each_reason(number: int, advice: str) -> None:
    """Failures a test cannot provoke here (root binds any port): each has its advice, and
    an IPv6 address is written in brackets."""
    error = OSError(number, os.strerror(number))
    text = bind_failure_advice(error, "::1", 80, host_option="--host", port_option="--port")
    assert text == f"cannot bind [::1]:80 ({os.strerror(number)}): {advice}"


# -- the merged view's directory goes away while it serves ------------------------------------


def _requests_and_tenants(directory: Path) -> None:
    """A worker's request counter (3 requests) and its tenant file, as a worker leaves them."""
    labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", "/"))
    _write(
        directory / "counter_77.db",
        {("sentinel_http_requests", "sentinel_http_requests_total", labels): 3.0},
    )
    counts = {"acme": [3, 0, 0, 0], "other": [0, 0, 0, 0]}
    _publish_tenants(directory, "77_1", counts, age=0, max_tenants=5)


def _health(base: str) -> tuple[int, str]:
    response = httpx.get(f"{base}/healthz", timeout=5)
    return response.status_code, response.text


@pytest.mark.parametrize("how", ["removed", "a-file", "unreadable"])
def test_healthz_answers_503_while_the_merged_directory_cannot_be_read(
    how: str, tmp_path: Path
) -> None:
    """The merged view's directory removed, replaced by a file or made unreadable while it
    is served: /healthz (GET and HEAD) answers 503 with one line naming the directory and
    what is wrong, and 200 ok again once the directory is back."""
    from sentinel._sidecar import merged_registry

    if how == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any directory (the sidecar test drops that capability)")
    directory = tmp_path / "multiproc"
    directory.mkdir()
    _requests_and_tenants(directory)
    endpoint = MetricsServer(merged_registry(str(directory)), "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        before = _health(base)
        if how == "unreadable":
            directory.chmod(0)
        else:
            shutil.rmtree(directory)
            if how == "a-file":
                directory.write_text("")
        during = _health(base)
        head_status, _, head_body = _exchange(
            endpoint.port, b"HEAD /healthz HTTP/1.0\r\nHost: sentinel\r\n\r\n"
        )
        if how == "unreadable":
            directory.chmod(0o755)
        else:
            if how == "a-file":
                directory.unlink()
            directory.mkdir()
        after = _health(base)
    finally:
        endpoint.stop()
        if directory.is_dir():
            directory.chmod(0o755)
    shown = {
        "removed": "is gone, and the workers' metric files with it: recreate it",
        "a-file": "is not a directory any more",
        "unreadable": f"cannot be read by this user (uid {os.getuid()})",
    }[how]
    assert before == (200, "ok\n")
    status, body = during
    [line] = body.splitlines()
    assert status == 503, body
    assert line.startswith(f"the multiprocess directory {str(directory)!r} ") and shown in line
    assert head_status.endswith("503 Service Unavailable") and head_body == b""
    assert after == (200, "ok\n")


def test_metrics_serve_nothing_stale_while_the_merged_directory_is_gone(tmp_path: Path) -> None:
    """While the directory is gone /metrics still answers 200, with none of the workers'
    series: the tenant families empty too, not the counts last seen (which would no longer
    add up to the request totals). Once the files are back, so are their counts."""
    from sentinel._sidecar import merged_registry

    directory = tmp_path / "multiproc"
    directory.mkdir()
    _requests_and_tenants(directory)
    endpoint = MetricsServer(merged_registry(str(directory)), "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        before = httpx.get(url, timeout=5)
        shutil.rmtree(directory)
        during = httpx.get(url, timeout=5)
        openmetrics = httpx.get(url, headers={"accept": "application/openmetrics-text"}, timeout=5)
        directory.mkdir()
        _requests_and_tenants(directory)
        after = httpx.get(url, timeout=5)
    finally:
        endpoint.stop()

    def counts(scrape: httpx.Response) -> tuple[float, float]:
        requests = _samples(scrape.text, "sentinel_http_requests_total")
        tenants = _samples(scrape.text, "sentinel_tenant_requests_total")
        return sum(v for _, v in requests), sum(v for _, v in tenants)

    assert before.status_code == 200 and counts(before) == (3, 3)
    assert during.status_code == 200 and counts(during) == (0, 0), during.text
    assert openmetrics.status_code == 200 and openmetrics.text.rstrip().endswith("# EOF")
    assert after.status_code == 200 and counts(after) == (3, 3)


def _bound_by_permissions() -> list[str] | None:
    """A prefix for a command that makes it bound by a directory's permissions: none for a
    user other than root; for root (which reads any directory), setpriv taking away the
    capabilities that let it; None when that cannot be had here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    try:
        check = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if check.returncode == 0 else None


def test_sidecar_healthz_follows_its_directory_and_metrics_keep_answering(tmp_path: Path) -> None:
    """`sentinel sidecar` serving a directory made unreadable, then moved away, then
    replaced by a file, then put back: /healthz answers 503 with the reason for each (the
    directory named), and 200 ok whenever the directory is readable again; /metrics
    answers 200 throughout, with the workers' counts only while they can be read."""
    prefix = _bound_by_permissions()
    directory = tmp_path / "multiproc"
    directory.mkdir()
    moved = tmp_path / "moved"
    _requests_and_tenants(directory)
    metrics_port = free_port()
    sidecar = subprocess.Popen(
        [*(prefix or []), *SENTINEL, "sidecar"],
        env=clean_env(
            PROMETHEUS_MULTIPROC_DIR=str(directory),
            SENTINEL_METRICS_PORT=str(metrics_port),
            SENTINEL_METRICS_HOST="127.0.0.1",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{metrics_port}"
    seen: dict[str, tuple[tuple[int, str], int, float]] = {}

    def probe(phase: str) -> None:
        scrape = httpx.get(f"{base}/metrics", timeout=5)
        requests = sum(v for _, v in _samples(scrape.text, "sentinel_http_requests_total"))
        seen[phase] = (_health(base), scrape.status_code, requests)

    try:
        _wait_until_up(f"{base}/healthz", sidecar)
        probe("up")
        if prefix is not None:
            directory.chmod(0)
            probe("unreadable")
            directory.chmod(0o755)
            probe("readable again")
        directory.rename(moved)
        probe("moved away")
        directory.write_text("")
        probe("a file")
        directory.unlink()
        moved.rename(directory)
        probe("back")
    finally:
        stop(sidecar)
        if directory.is_dir():
            directory.chmod(0o755)
    named = f"the multiprocess directory {str(directory)!r} "
    ok = ((200, "ok\n"), 200, 3)
    assert seen.pop("up") == ok
    assert seen.pop("back") == ok
    reasons = {
        "unreadable": f"cannot be read by this user (uid {os.getuid()}): make it readable again",
        "moved away": "is gone, and the workers' metric files with it: recreate it",
        "a file": "is not a directory any more: put the directory back",
    }
    for phase, ((status, body), metrics_status, requests) in seen.items():
        if phase == "readable again":
            assert (status, body, requests) == (200, "ok\n", 3)
            continue
        [line] = body.splitlines()
        assert status == 503 and line.startswith(named) and reasons[phase] in line, (phase, body)
        assert (metrics_status, requests) == (200, 0), phase


# -- a real Prometheus scrapes it ---------------------------------------------------------------


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (tests/run.sh installs it from Debian)")
    return binary


def test_real_prometheus_reads_the_exact_count(prometheus_binary: str, tmp_path: Path) -> None:
    """Debian's Prometheus scrapes the sidecar; its HTTP API returns the exact counter."""

    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    prometheus_port = free_port()
    with capture_reports(location="fra") as captured:
        endpoint = MetricsServer(captured.registry, "127.0.0.1", 0).start()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            textwrap.dedent(
                f"""
                global:
                  scrape_interval: 1s
                  evaluation_interval: 1s
                scrape_configs:
                  - job_name: sentinel
                    static_configs:
                      - targets: ["127.0.0.1:{endpoint.port}"]
                """
            )
        )
        prometheus = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            app = instrument(
                Starlette(routes=[Route("/hello/{name}", hello)]), sentinel=captured.sentinel
            )
            with serve(app) as url, httpx.Client() as client:
                for index in range(137):
                    assert client.get(f"{url}/hello/{index}").status_code == 200
            query = (
                'sum(sentinel_http_requests_total{job="sentinel",location="fra",'
                'route="/hello/{name}",code="200"})'
            )
            value = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    answer = httpx.get(
                        f"http://127.0.0.1:{prometheus_port}/api/v1/query",
                        params={"query": query},
                        timeout=2,
                    ).json()
                    result = answer["data"]["result"]
                    if result:
                        value = float(result[0]["value"][1])
                        if value == 137:
                            break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
            endpoint.stop()
    assert value == 137


def test_lag_monitor_thread_stops_with_its_sentinel() -> None:
    """Closing a sentinel stops its lag thread (no thread left behind per test)."""
    import asyncio

    with capture_reports(metrics_port=1) as captured:

        async def touch() -> None:
            captured.sentinel.watch_loop(asyncio.get_running_loop())
            await asyncio.sleep(0.05)

        asyncio.run(touch())
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if not any(t.name == "sentinel-loop-lag" and t.is_alive() for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(t.name == "sentinel-loop-lag" and t.is_alive() for t in threading.enumerate())


def test_tenant_files_fold_into_one_bounded_set(tmp_path: Path) -> None:
    """Workers' published tenant counts (each naming its own tenants) fold into at most
    max_tenants + 1 tenant values per status class, summing to the workers' totals; a torn
    or half-written file is skipped until it is whole."""
    import json

    from sentinel._sidecar import TENANT_FILE_PREFIX, TenantFiles

    def publish(process: str, counts: dict[str, list[int]]) -> None:
        document = {"process": process, "max_tenants": 3, "counts": counts, "rejected": {}}
        (tmp_path / f"{TENANT_FILE_PREFIX}{process}.json").write_text(json.dumps(document))

    for worker in range(4):
        counts = {f"w{worker}-t{n}": [10 + n, 0, 0, n] for n in range(3)}
        counts["other"] = [5, 0, 0, 1]
        publish(f"{worker}_1", counts)
    (tmp_path / f"{TENANT_FILE_PREFIX}broken.json").write_text("{not json")
    collector = TenantFiles(str(tmp_path))
    [family, rejected] = collector.collect()
    by_class: dict[str, set[str]] = {}
    sums: dict[str, float] = {}
    for sample in family.samples:
        by_class.setdefault(sample.labels["status_class"], set()).add(sample.labels["tenant"])
        sums[sample.labels["status_class"]] = (
            sums.get(sample.labels["status_class"], 0) + sample.value
        )
    assert all(len(names) <= 4 and "other" in names for names in by_class.values())
    assert sums == {"2xx": 4 * (10 + 11 + 12 + 5), "3xx": 0, "4xx": 0, "5xx": 4 * (0 + 1 + 2 + 1)}
    assert {sample.labels["reason"] for sample in rejected.samples} >= {"empty", "secret"}


# -- the merged view: cheap, exact, bounded ----------------------------------------------------


def _write(path: Path, values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float]) -> None:
    """Write values into a prometheus_client multiprocess file, as a worker would."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    file = MmapedDict(str(path))
    try:
        for (family, sample, labels), value in values.items():
            names, label_values = [k for k, _ in labels], [v for _, v in labels]
            file.write_value(mmap_key(family, sample, names, label_values, "h"), value, 0.0)
    finally:
        file.close()


def _view(families: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): round(sample.value, 9)
        for family in families  # type: ignore[attr-defined]
        for sample in family.samples
    }


def test_merged_files_equal_prometheus_clients_merge_as_the_files_grow(tmp_path: Path) -> None:
    """The cached merge gives what MultiProcessCollector gives, on every scrape: after new
    keys are appended, values change, a worker's file appears or goes away."""
    from prometheus_client.multiprocess import MultiProcessCollector

    from sentinel._sidecar import MergedFiles

    def counter(route: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return ("app_hits", "app_hits_total", (("route", route),))

    def bucket(le: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return ("app_seconds", "app_seconds_bucket", (("le", le), ("route", "/a")))

    seconds_sum = ("app_seconds", "app_seconds_sum", (("route", "/a"),))
    gauge = ("app_up", "app_up", ())
    merged = MergedFiles(str(tmp_path))

    def check() -> None:
        expected = _view(MultiProcessCollector.merge([str(p) for p in tmp_path.glob("*.db")]))
        assert _view(merged.collect()) == expected
        assert expected  # the comparison is not of two empty views

    _write(tmp_path / "counter_1.db", {counter("/a"): 2.0})
    _write(
        tmp_path / "histogram_1.db", {bucket("0.1"): 1.0, bucket("+Inf"): 0.0, seconds_sum: 0.05}
    )
    _write(tmp_path / "gauge_max_1.db", {gauge: 1.0})
    check()
    _write(tmp_path / "counter_1.db", {counter("/a"): 5.0, counter("/b"): 1.0})  # grows
    _write(tmp_path / "histogram_1.db", {bucket("+Inf"): 3.0, bucket("1.0"): 2.0})
    check()
    _write(tmp_path / "counter_2.db", {counter("/b"): 4.0, counter("/c"): 1.0})  # a new worker
    check()
    (tmp_path / "counter_1.db").unlink()  # a worker's files removed
    check()
    (tmp_path / "counter_1.db").write_bytes(b"\x10\x00\x00\x00")  # torn: left out, no error
    assert _view(merged.collect())[("app_hits_total", (("route", "/c"),))] == 1.0


def test_merged_view_bounds_the_union_of_the_workers_budgets(tmp_path: Path) -> None:
    """Workers that each stay within max_series but saw different routes: the merged view
    names at most max_series series, folds the rest (location and code kept) into sums that
    stay exact, counts them as overflow, and keeps every series' place on later scrapes."""
    from sentinel._sidecar import MergedFiles

    def requests(route: str, code: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        labels = (("code", code), ("location", "fra"), ("method", "GET"), ("route", route))
        return ("sentinel_http_requests", "sentinel_http_requests_total", labels)

    _write(tmp_path / "counter_1.db", {requests(f"/a{i}", "200"): 1.0 for i in range(4)})
    _write(tmp_path / "counter_2.db", {requests(f"/b{i}", "503"): 2.0 for i in range(4)})
    merged = MergedFiles(str(tmp_path), max_series=5)

    def totals() -> dict[tuple[str, str], float]:
        return {
            (sample.labels["route"], sample.labels["code"]): sample.value
            for family in merged.collect()
            for sample in family.samples
            if sample.name == "sentinel_http_requests_total"
        }

    first = totals()
    named = {(f"/a{i}", "200"): 1 for i in range(4)} | {("/b0", "503"): 2}
    assert first == {**named, ("<other>", "503"): 6}
    overflow = _view(merged.collect())[
        ("sentinel_series_overflow_total", (("metric", "sentinel_http_requests_total"),))
    ]
    assert overflow == 6
    _write(tmp_path / "counter_2.db", {requests("/b1", "503"): 7.0, requests("/a9", "200"): 1.0})
    later = totals()  # /b1 stays folded, /a9 is folded: nothing named changes
    assert later == {**named, ("<other>", "503"): 2 + 2 + 7, ("<other>", "200"): 1}


WORKER_TRAFFIC = """
from prometheus_client import CollectorRegistry
from sentinel._metrics import Metrics

metrics = Metrics(CollectorRegistry())
for n in range(300):
    route = f"/r{n % 7}"
    method, status = ("GET", "POST")[n % 2], (200, 503)[n % 5 == 0]
    children = metrics.request_children(f"l{n % 3}", route, method, status)
    metrics.count_later(children, (n % 13) / 20)
    if n % 11 == 0:
        metrics.count_exception(f"l{n % 3}", route, "KeyError", "request")
        metrics.global_mutations.labels(f"l{n % 3}", route, "os.environ").inc()
metrics.flush()
"""


def test_multiprocess_merge_equals_the_single_process_view(tmp_path: Path) -> None:
    """The same traffic counted by a worker in multiprocess mode (served merged) and in one
    process: every request, duration, exception and mutation sample is the same."""
    from prometheus_client import CollectorRegistry

    from sentinel._sidecar import merged_registry

    subprocess.run(
        [sys.executable, "-c", WORKER_TRAFFIC],
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
        check=True,
        timeout=60,
    )
    single = CollectorRegistry()
    namespace: dict[str, object] = {"CollectorRegistry": lambda: single}
    exec(WORKER_TRAFFIC.replace("from prometheus_client import CollectorRegistry", ""), namespace)
    ignored = ("sentinel_build_info", "sentinel_event_loop_lag", "sentinel_tenant")

    def sentinel_samples(registry: CollectorRegistry) -> dict[object, float]:
        return {
            key: value
            for key, value in _view(registry.collect()).items()
            if not key[0].startswith(ignored)
        }

    merged = sentinel_samples(merged_registry(str(tmp_path)))
    assert merged == sentinel_samples(single)
    assert (
        merged[("sentinel_location_request_duration_seconds_count", (("location", "l0"),))] == 100
    )


WORKER_WITH_AN_APP_HISTOGRAM = (
    WORKER_TRAFFIC
    + """
from prometheus_client import Histogram

seconds = Histogram("app_job_seconds", "An app's own histogram.", ["job"], registry=None)
for n in range(30):
    seconds.labels(f"j{n % 3}").observe(n / 10)
"""
)


def test_merged_scrape_in_openmetrics_is_valid_with_histograms_of_many_label_sets(
    tmp_path: Path,
) -> None:
    """Two workers' histograms, several label sets each (sentinel's and an app's own),
    scraped from the merged view as OpenMetrics: prometheus_client's strict parser reads
    it (each label set's samples together), and the counts add up over the workers."""
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )

    from sentinel._sidecar import merged_registry

    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", WORKER_WITH_AN_APP_HISTOGRAM],
            env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
            check=True,
            timeout=60,
        )
    endpoint = MetricsServer(merged_registry(str(tmp_path)), "127.0.0.1", 0).start()
    try:
        scrape = httpx.get(
            f"http://127.0.0.1:{endpoint.port}/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10,
        )
    finally:
        endpoint.stop()
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in openmetrics_families(scrape.text)}
    label_sets = {
        name: {
            tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            for sample in families[name].samples
        }
        for name in ("app_job_seconds", "sentinel_http_request_duration_seconds")
    }
    assert len(label_sets["app_job_seconds"]) == 3
    assert len(label_sets["sentinel_http_request_duration_seconds"]) > 10
    counts = {
        sample.labels["job"]: sample.value
        for sample in families["app_job_seconds"].samples
        if sample.name == "app_job_seconds_count"
    }
    assert counts == {"j0": 20, "j1": 20, "j2": 20}


# -- ended workers: their per-process gauges go, their unpublished requests are folded in ----

WORKER_THAT_ENDS = """
import os
import signal
import sys

from prometheus_client import CollectorRegistry, Gauge

from sentinel._metrics import Metrics
from sentinel._sidecar import TenantPublisher

version, lag, ending = sys.argv[1], float(sys.argv[2]), sys.argv[3]
registry = CollectorRegistry()
metrics = Metrics(registry)
metrics.set_build_info("svc", version, "prod")
metrics.event_loop_lag.set(lag)
Gauge("app_live", "an app's live gauge", registry=registry, multiprocess_mode="liveall").set(1)
metrics.use_tenants(5, None)
publisher = TenantPublisher(os.environ["PROMETHEUS_MULTIPROC_DIR"], metrics)
ok = metrics.request_children("fra", "/a", "GET", 200)
failing = metrics.request_children("fra", "/a", "GET", 503)
for n in range(10):
    metrics.count_request(ok, 0.01, f"t{n % 3}", "2xx")
publisher.publish()
for n in range(4):
    metrics.count_request(failing, 0.01, "t1", "5xx")
metrics.flush()  # in the request files, not published yet
print("ready", flush=True)
if ending == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


def _worker(directory: Path, version: str, lag: float, ending: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_THAT_ENDS, version, str(lag), ending],
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def _by_class(families: object, name: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for family in families:  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name == name:
                code = sample.labels.get("code", "")
                klass = sample.labels.get("status_class") or f"{code[0]}xx"
                sums[klass] = sums.get(klass, 0) + sample.value
    return sums


def _samples_of(families: object, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in families  # type: ignore[attr-defined]
        for sample in family.samples
        if sample.name == name
    ]


def test_an_ended_workers_lag_release_and_live_gauges_go_and_its_requests_add_up(
    tmp_path: Path,
) -> None:
    """A killed worker: its lag, its release's build_info and its live gauges leave the
    merged view at the next scrape, and its requests it never published are counted as
    tenant ``other``, so the tenant sums equal the request totals again. A running
    worker's values stay; once it is killed too, its values go as well."""
    from sentinel._sidecar import merged_registry

    killed = _worker(tmp_path, "v1", 7.8, "killed")
    assert killed.wait(10) == -signal.SIGKILL
    running = _worker(tmp_path, "v2", 0.01, "running")
    try:
        view = list(merged_registry(str(tmp_path)).collect())
        lags = _samples_of(view, "sentinel_event_loop_lag_seconds")
        releases = {labels["version"] for labels, _ in _samples_of(view, "sentinel_build_info")}
        live = _samples_of(view, "app_live")
        requests = _by_class(view, "sentinel_http_requests_total")
        tenants = _by_class(view, "sentinel_tenant_requests_total")
    finally:
        running.kill()
        running.wait(10)
    assert lags == [({"pid": str(running.pid)}, 0.01)]
    assert releases == {"v2"}
    assert live == [({"pid": str(running.pid)}, 1.0)]
    assert requests == {"2xx": 20, "5xx": 8}
    # The running worker publishes its 4 failures at its next turn; the killed one never will.
    assert tenants == {"2xx": 20, "3xx": 0, "4xx": 0, "5xx": 4}
    registry = merged_registry(str(tmp_path))
    view = list(registry.collect())
    assert _samples_of(view, "sentinel_event_loop_lag_seconds") == []
    assert _by_class(view, "sentinel_tenant_requests_total")["5xx"] == 8
    assert _samples_of(view, "app_live") == []


def test_sentinel_run_drops_a_killed_workers_lag_and_its_tenants_add_up(app_dir: Path) -> None:
    """`sentinel run --workers 2`, one worker SIGKILLed under traffic (uvicorn starts
    another): its lag series leaves the merged view, and the tenant sums come back to the
    request totals, its unpublished requests counted as ``other``."""
    process, port, metrics_port = _sentinel_run(
        app_dir, "--workers", "2", SENTINEL_TENANT_HEADER="x-tenant"
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    stop_sending = threading.Event()

    def send(n: int) -> set[str]:
        pids = set()
        while not stop_sending.is_set():
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/whoami/{n}",
                    headers={"x-tenant": f"t{n % 3}", "connection": "close"},
                    timeout=5,
                )
                pids.add(response.text)
            except httpx.TransportError:
                pass  # the killed worker's connections
        return pids

    last: list[tuple[list[str], dict[str, float], dict[str, float]]] = []

    def settled() -> bool:
        view = list(text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text))
        lags = _samples_of(view, "sentinel_event_loop_lag_seconds")
        requests = _by_class(view, "sentinel_http_requests_total")
        tenants = _by_class(view, "sentinel_tenant_requests_total")
        last[:] = [([labels["pid"] for labels, _ in lags], requests, tenants)]
        return requests == {k: v for k, v in tenants.items() if v}

    try:
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", process)
        _wait_until_up(metrics_url, process)
        with ThreadPoolExecutor(4) as pool:
            sending = [pool.submit(send, n) for n in range(4)]
            time.sleep(1.5)
            victim = httpx.get(f"http://127.0.0.1:{port}/whoami/9", timeout=5).text
            os.kill(int(victim), signal.SIGKILL)
            time.sleep(1.0)
            stop_sending.set()
            served = set().union(*(future.result(timeout=30) for future in sending))
        came_back = wait_for(settled, timeout=10)
    finally:
        stop_sending.set()
        stop(process)
    assert victim in served and len(served) >= 2, served
    [(lag_pids, requests, tenants)] = last
    assert came_back, f"tenant sums {tenants} never came back to the request totals {requests}"
    assert lag_pids and victim not in lag_pids, lag_pids
    assert requests["2xx"] > 0


def test_ended_workers_are_forgotten_once_their_counts_are_folded_in(tmp_path: Path) -> None:
    """Workers replaced one after another (killed, or ending without a last publication):
    once the sidecar has folded in an ended worker's last counts, it keeps nothing of it
    in full, neither in its fold nor in its own records, while the tenant sums stay equal
    to the request totals at every scrape. Before, every ended worker's labels stayed
    (about 10 KB each, for good)."""
    from sentinel._sidecar import MergedFiles, TenantFiles

    collector = TenantFiles(str(tmp_path))
    requests_view = MergedFiles(str(tmp_path))
    for round_index in range(4):
        worker = _worker(tmp_path, "v1", 0.01, "killed" if round_index % 2 else "running")
        assert worker.stdin is not None
        worker.stdin.close()  # a running one reads stdin to its end, then exits
        worker.wait(10)
        tenants = _by_class(collector.collect(), "sentinel_tenant_requests_total")
        requests = _by_class(requests_view.collect(), "sentinel_http_requests_total")
        assert (
            {k: v for k, v in tenants.items() if v}
            == requests
            == {
                "2xx": 10 * (round_index + 1),
                "5xx": 4 * (round_index + 1),
            }
        )
        assert collector._fold is not None and collector._fold.processes() == 0
        assert collector.processes() == 0


def test_a_reused_pid_continues_from_what_its_ended_worker_folded_in(tmp_path: Path) -> None:
    """A pid reused by a later worker (whose request file continues the ended one's): what
    the first worker had folded in, published or not, is counted once, and so is the new
    worker's; the sums equal the request file at every scrape, and rejections never go
    down when a worker is forgotten."""
    import fcntl
    import json

    from sentinel._sidecar import LIVENESS_PREFIX, LIVENESS_SUFFIX, TENANT_FILE_PREFIX, TenantFiles

    def requests(ok: int, failed: int) -> None:
        labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", "/"))
        failing = (("code", "503"), ("location", "fra"), ("method", "GET"), ("route", "/"))
        _write(
            tmp_path / "counter_77.db",
            {
                ("sentinel_http_requests", "sentinel_http_requests_total", labels): ok,
                ("sentinel_http_requests", "sentinel_http_requests_total", failing): failed,
            },
        )

    def publish(process: str, counts: dict[str, list[int]], rejected: int) -> None:
        document = {"process": process, "counts": counts, "rejected": {"empty": rejected}}
        (tmp_path / f"{TENANT_FILE_PREFIX}{process}.json").write_text(json.dumps(document))

    def alive() -> int:
        """A liveness file for pid 77, as hold_liveness makes it, held by this test."""
        temporary = tmp_path / "alive.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(temporary, tmp_path / f"{LIVENESS_PREFIX}77{LIVENESS_SUFFIX}")
        return descriptor

    collector = TenantFiles(str(tmp_path), 5)

    def scrape() -> tuple[dict[str, float], float]:
        tenants, rejected = collector.collect()
        return (
            _by_class([tenants], "sentinel_tenant_requests_total"),
            sum(sample.value for sample in rejected.samples),
        )

    first = alive()
    requests(10, 2)
    publish("77_100", {"acme": [6, 0, 0, 2], "other": [3, 0, 0, 0]}, rejected=3)
    assert scrape() == ({"2xx": 9, "3xx": 0, "4xx": 0, "5xx": 2}, 3)
    os.close(first)  # ended, one request never published
    assert scrape() == ({"2xx": 10, "3xx": 0, "4xx": 0, "5xx": 2}, 3)
    assert collector.processes() == 0
    second = alive()  # the pid again: its request file goes on from 10 and 2
    requests(15, 5)
    publish("77_200", {"acme": [2, 0, 0, 3], "other": [1, 0, 0, 0]}, rejected=1)
    assert scrape() == ({"2xx": 13, "3xx": 0, "4xx": 0, "5xx": 5}, 4)
    os.close(second)
    assert scrape() == ({"2xx": 15, "3xx": 0, "4xx": 0, "5xx": 5}, 4)
    assert scrape() == ({"2xx": 15, "3xx": 0, "4xx": 0, "5xx": 5}, 4)
    assert collector.processes() == 0


def _publish_tenants(
    directory: Path, process: str, counts: dict[str, list[int]], *, age: float, **limits: object
) -> None:
    """A worker's tenant file (as TenantPublisher writes it), last written ``age`` s ago."""
    import json

    from sentinel._sidecar import TENANT_FILE_PREFIX

    path = directory / f"{TENANT_FILE_PREFIX}{process}.json"
    path.write_text(json.dumps({"process": process, "counts": counts, "rejected": {}, **limits}))
    written = time.time() - age
    os.utime(path, (written, written))


def test_without_limits_the_merged_view_takes_the_newest_files(tmp_path: Path) -> None:
    """`sentinel sidecar` takes max_tenants and max_series from the workers' newest file,
    not from a stale one an earlier run left (here also the one whose name sorts last)."""
    from sentinel._sidecar import merged_registry

    def requests(route: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", route))
        return ("sentinel_http_requests", "sentinel_http_requests_total", labels)

    _publish_tenants(tmp_path, "9_1", {}, age=3600, max_tenants=1, max_series=1)
    counts = {f"t{n}": [5, 0, 0, 0] for n in range(3)} | {"other": [0, 0, 0, 0]}
    _publish_tenants(tmp_path, "10_1", counts, age=1, max_tenants=3, max_series=50)
    _write(tmp_path / "counter_10.db", {requests(f"/r{n}"): 5.0 for n in range(3)})
    view = list(merged_registry(str(tmp_path)).collect())
    tenants = {
        labels["tenant"] for labels, _ in _samples_of(view, "sentinel_tenant_requests_total")
    }
    routes = {labels["route"] for labels, _ in _samples_of(view, "sentinel_http_requests_total")}
    assert tenants == {"t0", "t1", "t2", "other"}
    assert routes == {"/r0", "/r1", "/r2"}


def test_sentinel_run_bounds_the_merged_view_with_its_own_configuration(
    app_dir: Path, tmp_path: Path
) -> None:
    """`sentinel run --workers 2` merges with this run's SENTINEL_MAX_TENANTS, whatever the
    tenant files of an earlier run in the directory say (the oldest, or the newest)."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    _publish_tenants(multiproc, "1_1", {}, age=3600, max_tenants=1, max_series=1)
    _publish_tenants(multiproc, "2_1", {}, age=-3600, max_tenants=1, max_series=1)
    process, port, metrics_port = _sentinel_run(
        app_dir,
        "--workers",
        "2",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        SENTINEL_TENANT_HEADER="x-tenant",
        SENTINEL_MAX_TENANTS="5",
    )
    named: set[str] = set()

    def every_tenant_named() -> bool:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        view = text_string_to_metric_families(text)
        samples = _samples_of(view, "sentinel_tenant_requests_total")
        named.update(labels["tenant"] for labels, _ in samples)
        return {"t0", "t1", "t2"} <= named

    try:
        _wait_until_up(f"http://127.0.0.1:{port}/whoami/0", process)
        for n in range(30):
            headers = {"x-tenant": f"t{n % 3}"}
            httpx.get(f"http://127.0.0.1:{port}/whoami/{n}", headers=headers, timeout=5)
        assert wait_for(every_tenant_named, timeout=10), named
    finally:
        stop(process)


def test_the_merged_view_bounds_a_tenant_limit_a_file_claims(tmp_path: Path) -> None:
    """A tenant file that claims more than a worker may have (max_tenants is at most 1000)
    makes the fold no bigger than that."""
    from sentinel._sidecar import TenantFiles

    _publish_tenants(tmp_path, "9_1", {"other": [1, 0, 0, 0]}, age=1, max_tenants=10**7)
    collector = TenantFiles(str(tmp_path))
    collector.collect()
    assert collector._fold is not None
    assert collector._fold.tracker.max_tenants == 1000


KEYWORD_LIMITS_APP = textwrap.dedent(
    """
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import sentinel


    async def hello(request):
        return PlainTextResponse("hello")


    app = sentinel.instrument(
        Starlette(routes=[Route("/hello", hello)]),
        tenant_header="x-tenant",
        max_tenants=2,
        location_header="x-loc",
        max_locations=70,
    )
    """
)


def test_sentinel_run_bounds_the_merged_view_with_the_apps_own_limits(
    app_dir: Path,
) -> None:
    """`sentinel run --workers 2` of an app given max_tenants=2 and max_locations=70 by
    keyword, with no variable setting them: the merged view is bounded as the workers are.
    Two tenants named, then displaced in the workers by two busier ones: no scrape names
    more than 2 tenants (with the run's default of 50 the fold kept all four); and 70
    locations (the process's own, unknown, among them) are all named, none folded into
    other (the default of 64 folded 6)."""
    (app_dir / "countedapp.py").write_text(KEYWORD_LIMITS_APP)
    process, port, metrics_port = _sentinel_run(app_dir, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    scrapes: list[dict[str, float]] = []

    def send(tenants: list[str], each: int) -> None:
        def one(tenant: str) -> None:
            headers = {"x-tenant": tenant, "connection": "close"}
            assert httpx.get(f"{base}/hello", headers=headers, timeout=10).status_code == 200

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, tenants * each))

    def named() -> set[str]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        tenants = {
            labels["tenant"]: value
            for labels, value in _samples(text, "sentinel_tenant_requests_total")
            if labels["status_class"] == "2xx"
        }
        scrapes.append(tenants)
        return set(tenants) - {"other"}

    try:
        _wait_until_up(f"{base}/hello", process)
        send(["a0", "a1"], 5)
        assert wait_for(lambda: named() == {"a0", "a1"}, timeout=10), scrapes[-1:]
        send(["b0", "b1"], 40)  # 8 times as busy: the workers evict a0 and a1
        assert wait_for(lambda: named() == {"b0", "b1"}, timeout=10), scrapes[-1:]
        for n in range(69):  # and the process's own location, unknown: 70
            headers = {"x-loc": f"loc-{n:02d}", "connection": "close"}
            httpx.get(f"{base}/hello", headers=headers, timeout=10)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        stop(process)
    assert all(len(set(tenants) - {"other"}) <= 2 for tenants in scrapes), scrapes
    locations = {
        labels["location"]
        for labels, _ in _samples(text, "sentinel_http_requests_total")
        if labels["route"] == "/hello"
    }
    assert locations == {"unknown"} | {f"loc-{n:02d}" for n in range(69)}


def test_sidecar_says_once_that_the_directory_holds_ended_processes_files(
    tmp_path: Path,
) -> None:
    """Files of a process that has ended (its liveness file unlocked): one line at startup
    naming the directory and what to do. A running process's files (its file locked, here
    by this test) are not counted."""
    import fcntl

    from sentinel._sidecar import LIVENESS_PREFIX, LIVENESS_SUFFIX, TENANT_FILE_PREFIX

    for name in ("counter_77.db", "gauge_all_77.db", f"{TENANT_FILE_PREFIX}77_1.json"):
        (tmp_path / name).write_text("")
    (tmp_path / f"{LIVENESS_PREFIX}77{LIVENESS_SUFFIX}").write_text("")
    (tmp_path / "counter_78.db").write_text("")
    with (tmp_path / f"{LIVENESS_PREFIX}78{LIVENESS_SUFFIX}").open("w") as running:
        fcntl.flock(running.fileno(), fcntl.LOCK_EX)
        result = _sidecar("--port", "0", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    said = [line for line in result.stderr.splitlines() if "ended" in line]
    assert said == [
        f"sentinel sidecar: PROMETHEUS_MULTIPROC_DIR names {str(tmp_path)!r}, which holds the "
        "files of 1 process that has ended (3 files: an earlier run's, or workers since "
        "replaced), whose counts stay in the merged totals: empty it between runs, before the "
        "workers start"
    ]


# -- the merged view's bounds are one process's: locations, budgets, damaged files -----------


def test_sentinel_run_bounds_locations_across_workers_and_their_restarts(
    app_dir: Path, tmp_path: Path
) -> None:
    """`sentinel run --workers 2` with workers recycled every 40 requests and a new
    location value on most requests: the merged view names at most max_locations (64)
    values plus ``other``, as one process does, whichever worker (or worker life) met
    them; a named value counts every request sent with it, from every worker; what is
    named stays named and no count goes back between scrapes."""
    log = (tmp_path / "server.log").open("w")  # a record per new location: more than a pipe holds
    process, port, metrics_port = _sentinel_run(
        app_dir,
        "--workers",
        "2",
        "--limit-max-requests",
        "40",
        stderr=log,
        SENTINEL_LOCATION_HEADER="x-loc",
    )
    values = [f"v{n}" for n in range(150)]

    def send(locations: list[str]) -> None:
        def one(location: str) -> None:
            headers = {"x-loc": location, "connection": "close"}
            for _ in range(5):  # a worker being replaced may refuse it: sent again
                try:
                    response = httpx.get(f"{base}/whoami/1", headers=headers, timeout=10)
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                assert response.status_code == 200
                return
            raise AssertionError(f"{location} was never answered")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, locations))

    def scrape() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        by_location: dict[str, float] = {}
        for labels, value in _samples(text, "sentinel_http_requests_total"):
            if labels["route"] == "/whoami/{n}":
                location = labels["location"]
                by_location[location] = by_location.get(location, 0) + value
        return by_location

    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{base}/whoami/0", process)
        send(values)
        first = scrape()
        send(values)
        second = scrape()
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        stop(process)
        log.close()
    assert len(set(second) - {"other"}) <= 64
    assert "other" in second
    assert set(first) <= set(second)
    assert all(second[location] >= count for location, count in first.items())
    assert sum(second.values()) == 1 + 2 * len(values)
    named = set(second) - {"other", "unknown"}
    assert all(second[location] == 2 for location in named), second
    timed = "sentinel_location_request_duration_seconds_count"
    assert {labels["location"] for labels, _ in _samples(text, timed)} == set(second)


def test_merged_view_bounds_the_locations_of_workers_that_named_their_own(tmp_path: Path) -> None:
    """Files of workers that each named their own first values (no shared admissions: an
    earlier version's, or a directory where the file could not be written): the merged
    view names at most the workers' max_locations, the first seen, in every family with a
    location, folds the rest into ``other`` with the sums exact, and keeps each value's
    place on later scrapes. With an allow-list published, its values are named (however
    many) and nothing else."""
    from sentinel._sidecar import merged_registry

    def requests(location: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        labels = (("code", "200"), ("location", location), ("method", "GET"), ("route", "/a"))
        return ("sentinel_http_requests", "sentinel_http_requests_total", labels)

    def timed(location: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        name = "sentinel_location_request_duration_seconds"
        return (name, f"{name}_sum", (("location", location),))

    def scrape(registry: CollectorRegistry) -> tuple[dict[str, float], dict[str, float]]:
        view = list(registry.collect())
        by_location = {
            labels["location"]: value
            for labels, value in _samples_of(view, "sentinel_http_requests_total")
        }
        seconds = {
            labels["location"]: value
            for labels, value in _samples_of(view, "sentinel_location_request_duration_seconds_sum")
        }
        return by_location, seconds

    first = tmp_path / "first"
    first.mkdir()
    _publish_tenants(first, "1_1", {}, age=1, max_series=2000, max_locations=50, locations=["fra"])
    _write(first / "counter_1.db", {requests(f"l{n}"): 1.0 for n in range(40)})
    _write(first / "counter_2.db", {requests(f"l{n}"): 2.0 for n in range(30, 70)})
    _write(first / "histogram_1.db", {timed(f"l{n}"): 0.5 for n in range(70)})
    registry = merged_registry(str(first))
    named, seconds = scrape(registry)
    assert set(named) == {*(f"l{n}" for n in range(50)), "other"}
    assert set(seconds) == set(named)
    assert sum(named.values()) == 40 + 2 * 40
    assert named["l0"] == 1 and named["l35"] == 3 and named["other"] == 2 * 20
    assert seconds["other"] == 0.5 * 20
    more = {requests(f"l{n}"): 1.0 for n in range(70, 80)} | {requests("l1"): 5.0}
    _write(first / "counter_3.db", more)
    later, _ = scrape(registry)
    assert set(later) == set(named)
    assert later["l1"] == 6 and later["other"] == named["other"] + 10

    listed = tmp_path / "listed"
    listed.mkdir()
    allowed = [f"a{n}" for n in range(70)]
    _publish_tenants(
        listed,
        "1_1",
        {},
        age=1,
        max_series=2000,
        max_locations=64,
        locations=[*allowed, "unknown"],
        allow_list=True,
    )
    values = ["junk", *allowed, "unknown"]
    _write(listed / "counter_1.db", {requests(value): 1.0 for value in values})
    listed_view, _ = scrape(merged_registry(str(listed)))
    assert set(listed_view) == {*allowed, "unknown", "other"}
    assert listed_view["other"] == 1


BUDGETED_WORKER = """
import sys

from prometheus_client import CollectorRegistry

from sentinel._metrics import Metrics

metrics = Metrics(CollectorRegistry(), max_series=10)
for route in sys.argv[1].split(","):
    metrics.count_later(metrics.request_children("fra", route, "GET", 200), 0.01)
metrics.flush()
"""


def test_a_label_set_the_merged_view_names_counts_every_workers_requests(
    tmp_path: Path,
) -> None:
    """Workers over their budget (max_series 10) that met the label sets in different
    orders (the second in reverse; a third started later, as a recycled worker is, with
    new ones): every label set the merged view names counts all of its requests, from
    every worker, the rest are folded whole into route ``<other>`` (and counted as
    overflow), and the merged view needs no setting to know the budget."""
    from sentinel._sidecar import merged_registry

    orders = [
        [f"/r{n}" for n in range(20)],
        [f"/r{n}" for n in reversed(range(20))],
        [*(f"/r{n}" for n in range(20, 30)), "/r5"],
    ]
    sent: dict[str, int] = {}
    for order in orders:
        subprocess.run(
            [sys.executable, "-c", BUDGETED_WORKER, ",".join(order)],
            env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
            check=True,
            timeout=60,
        )
        for route in order:
            sent[route] = sent.get(route, 0) + 1
    view = list(merged_registry(str(tmp_path)).collect())
    counted = {
        labels["route"]: value
        for labels, value in _samples_of(view, "sentinel_http_requests_total")
    }
    named = {route: value for route, value in counted.items() if route != "<other>"}
    assert named == {route: sent[route] for route in named}
    assert len(named) == 10
    assert counted["<other>"] == sum(sent.values()) - sum(named.values())
    timed = {
        labels["route"]: value
        for labels, value in _samples_of(view, "sentinel_http_request_duration_seconds_count")
    }
    assert {route: timed[route] for route in timed if route != "<other>"} == {"/r0": 2}
    assert timed["<other>"] == sum(sent.values()) - 2
    overflow = {
        labels["metric"]: value
        for labels, value in _samples_of(view, "sentinel_series_overflow_total")
    }
    assert overflow["sentinel_http_requests_total"] == counted["<other>"]


def test_a_damaged_worker_file_never_takes_merged_counts_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker's file with a torn entry at its end (its used size raised over an entry
    that does not parse), later repaired, and another cut below its used size: the merged
    counts never go back (Prometheus would read a reset); each damaged file is said once
    on stderr and counted in sentinel_internal_errors_total{component="sidecar"}."""
    import struct

    from sentinel._sidecar import MergedFiles

    def requests(route: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", route))
        return ("sentinel_http_requests", "sentinel_http_requests_total", labels)

    _write(tmp_path / "counter_1.db", {requests(f"/a{n}"): 10.0 for n in range(5)})
    _write(tmp_path / "counter_2.db", {requests(f"/b{n}"): 7.0 for n in range(5)})
    merged = MergedFiles(str(tmp_path))

    def scrape() -> tuple[float, float]:
        view = _view(merged.collect())
        total = sum(v for (name, _), v in view.items() if name == "sentinel_http_requests_total")
        errors = view.get(("sentinel_internal_errors_total", (("component", "sidecar"),)), 0.0)
        return total, errors

    assert scrape() == (85, 0)
    torn = tmp_path / "counter_1.db"
    with torn.open("r+b") as file:
        used = struct.unpack("i", file.read(4))[0]
        key = b'["sentinel_http_req'
        padded = key + b" " * (8 - (len(key) + 4) % 8)
        entry = struct.pack(f"i{len(padded)}sdd", len(key), padded, 1.0, 0.0)
        file.seek(used)
        file.write(entry)
        file.seek(0)
        file.write(struct.pack("i", used + len(entry)))
    assert scrape() == (85, 1)
    _write(tmp_path / "counter_2.db", {requests("/b0"): 9.0})  # the others go on counting
    assert scrape() == (87, 1)
    with torn.open("r+b") as file:
        file.write(struct.pack("i", used))  # the torn entry gone again
    assert scrape() == (87, 1)
    _write(tmp_path / "counter_1.db", {requests("/a9"): 3.0})  # and it grows again
    assert scrape() == (90, 1)
    cut = tmp_path / "counter_2.db"
    with cut.open("r+b") as file:
        used = struct.unpack("i", file.read(4))[0]
        file.truncate(used - 40)  # the last value and a half of its key's entry are gone
    assert scrape() == (90, 2)
    assert scrape() == (90, 2)
    said = [line for line in capsys.readouterr().err.splitlines() if "merged metrics view" in line]
    assert len(said) == 2
    assert "counter_1.db" in said[0] and "counter_2.db" in said[1]


def test_a_gauge_file_that_cannot_be_read_costs_its_values_not_the_scrape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prometheus_client merges gauge and summary files itself, and raises on one it cannot
    read: a worker's gauge file not yet sized (killed as it was created, or scraped in that
    instant), one cut, one overwritten. Every scrape then failed with a 500 while /healthz
    said ok. Such a file is left out: one being created silently, a damaged one said once and
    counted in sentinel_internal_errors_total{component="sidecar"}; the rest is served."""
    import struct

    from sentinel._sidecar import merged_registry

    labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", "/a"))
    _write(
        tmp_path / "counter_1.db",
        {("sentinel_http_requests", "sentinel_http_requests_total", labels): 10.0},
    )

    def gauge(path: Path, value: float) -> None:
        pid = path.stem.rsplit("_", 1)[1]
        _write(path, {("queue_depth", "queue_depth", (("pid", pid),)): value})

    gauge(tmp_path / "gauge_all_1.db", 3.0)
    registry = merged_registry(str(tmp_path))

    def scrape() -> dict[str, float]:
        text = generate_latest(registry).decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("queue_depth", "sentinel_http_requests_total", "sentinel_internal"))
        }

    request_line = next(iter(scrape()))
    assert scrape() == {request_line: 10.0, 'queue_depth{pid="1"}': 3.0}
    (tmp_path / "gauge_all_2.db").write_bytes(b"")  # created, not yet sized
    (tmp_path / "summary_2.db").write_bytes(b"")
    assert scrape() == {request_line: 10.0, 'queue_depth{pid="1"}': 3.0}
    gauge(tmp_path / "gauge_all_3.db", 5.0)
    cut = tmp_path / "gauge_all_3.db"
    with cut.open("r+b") as file:
        used = struct.unpack("i", file.read(4))[0]
        file.truncate(used - 12)
    errors = 'sentinel_internal_errors_total{component="sidecar"}'
    for _ in range(2):
        assert scrape() == {request_line: 10.0, 'queue_depth{pid="1"}': 3.0, errors: 1.0}
    said = [line for line in capsys.readouterr().err.splitlines() if "merged metrics view" in line]
    assert len(said) == 1 and "gauge_all_3.db" in said[0], said
    gauge(tmp_path / "gauge_all_2.db", 7.0)  # sized and written now
    assert scrape() == {
        request_line: 10.0,
        'queue_depth{pid="1"}': 3.0,
        'queue_depth{pid="2"}': 7.0,
        errors: 1.0,
    }


@pytest.mark.parametrize(
    ("scraped_while_empty", "same_pids"),
    [(True, False), (False, False), (False, True)],
    ids=["scraped-empty", "not", "same-pids-and-inodes"],
)
def test_a_sidecar_that_outlives_its_run_merges_the_next_run_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scraped_while_empty: bool, same_pids: bool
) -> None:
    """docs/operating.md asks to empty the directory between runs; a sidecar in its own
    container keeps running meanwhile. The last run's tenants stayed in its fold (their sum
    ahead of the request counter for good) and its locations held their places, so the next
    run's were counted as `other`. Once every file it read is gone, the merged view starts
    again: the tenants add up to the requests, and the new run's locations are named. Also
    when the next run's workers have the same pids (a container's) and their metric files
    the same inodes (ext4 reuses them; here they are rewritten in place): their tenant
    files name when they started."""
    from sentinel._sidecar import merged_registry

    def run(pids: tuple[int, int], location: str, tenant: str, each: int, started: int) -> None:
        for pid in pids:
            labels = (("code", "200"), ("location", location), ("method", "GET"), ("route", "/"))
            _write(
                tmp_path / f"counter_{pid}.db",
                {("sentinel_http_requests", "sentinel_http_requests_total", labels): each},
            )
            counts = {tenant: [each, 0, 0, 0], "other": [0, 0, 0, 0]}
            _publish_tenants(tmp_path, f"{pid}_{started}", counts, age=0, max_tenants=5)

    registry = merged_registry(str(tmp_path), max_locations=1)

    def scrape() -> tuple[dict[str, float], dict[str, float]]:
        text = generate_latest(registry).decode()
        requests: dict[str, float] = {}
        for labels, value in _samples(text, "sentinel_http_requests_total"):
            requests[labels["location"]] = requests.get(labels["location"], 0) + value
        tenants: dict[str, float] = {}
        for labels, value in _samples(text, "sentinel_tenant_requests_total"):
            tenants[labels["tenant"]] = tenants.get(labels["tenant"], 0) + value
        return requests, {name: value for name, value in tenants.items() if value}

    run((101, 102), "fra", "alpha", 150, started=1)
    assert scrape() == ({"fra": 300}, {"alpha": 300})
    for path in tmp_path.iterdir():
        if same_pids and path.suffix == ".db":
            with path.open("r+b") as file:
                file.truncate(0)  # the same inode, empty, as a new file on it
        else:
            path.unlink()
    if scraped_while_empty:
        assert scrape() == ({}, {})
    run((101, 102) if same_pids else (201, 202), "sin", "beta", 20, started=2)
    assert scrape() == ({"sin": 40}, {"beta": 40})
    assert "a new run, merged from its own files only" in capsys.readouterr().err


def test_a_publication_in_flight_is_no_new_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scrape that finds a worker's first tenant publication still under its temporary
    name, renamed by the next scrape, is the same run: the view is not started again."""
    from sentinel._sidecar import TENANT_FILE_PREFIX, merged_registry

    labels = (("code", "200"), ("location", "fra"), ("method", "GET"), ("route", "/"))
    _write(
        tmp_path / "counter_7.db",
        {("sentinel_http_requests", "sentinel_http_requests_total", labels): 5.0},
    )
    _publish_tenants(tmp_path, "7_1", {"acme": [5, 0, 0, 0]}, age=0, max_tenants=5)
    published = tmp_path / f"{TENANT_FILE_PREFIX}7_1.json"
    in_flight = tmp_path / f"{TENANT_FILE_PREFIX}7_1.json.1234.tmp"
    published.rename(in_flight)
    registry = merged_registry(str(tmp_path))
    generate_latest(registry)
    in_flight.rename(published)
    text = generate_latest(registry).decode()
    assert "merged view read" not in capsys.readouterr().err
    assert sum(v for _, v in _samples(text, "sentinel_tenant_requests_total")) == 5
