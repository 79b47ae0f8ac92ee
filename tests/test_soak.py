"""Reliability under load on a real uvicorn server: a one-minute soak (1% of requests raising,
a few writing global state) against the bare app in the same test, the same traffic under
`sentinel run --workers 2`, and an error storm with a health endpoint polled throughout.
Counts are exact, memory and the multiprocess files stay bounded, latency stays near the
bare app's. Each test prints the figures it measured (`pytest -s`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, free_port, run_client, stop
from prometheus_client.parser import text_string_to_metric_families

from sentinel._routes import UNMATCHED_ROUTE

SOAK_SECONDS = 60.0
"""Wrapped app under load (the issue asks for at least 60 s), in SOAK_ROUNDS rounds, each
followed by BARE_ROUND_SECONDS of the bare app: short rounds, so that both see the same
mix of the machine's other work."""
SOAK_ROUNDS = 12
BARE_ROUND_SECONDS = 0.75
"""9 s of the bare app in all: over 10,000 requests for its p99 even on a busy machine."""
WARMUP_SECONDS = 2.0
"""Both servers take traffic this long before memory and latency are measured."""
CONNECTIONS = 8
"""Keep-alive connections of the load generator: enough to keep one uvicorn worker busy."""
WORKERS_SECONDS = 20.0
STORM_SECONDS = 30.0
HEALTH_POLL_SECONDS = 0.05
FOLD_WINDOW_SECONDS = 10.0
"""The storm's fold window (default 60 s): three windows close during the storm."""
FOLD_FULL_REPORTS = 10
"""sentinel's default number of full reports per fingerprint and window."""

P99_FACTOR = 2.0
"""Wrapped p99 / bare p99, both over every request of the measured rounds (the failing 1%
included). sentinel adds some 15 µs to a request (README, Performance) that costs uvicorn's
h11 server and Starlette several hundred microseconds here, so the true ratio is close to 1
(measured 0.9-1.2); the margin is for this shared 2-core machine, where other jobs take
whole milliseconds from one round and not from the next."""
RSS_GROWTH_BYTES = 4 * 2**20
"""Growth of the server's RSS from the end of warm-up to the end of the load, soak and
storm alike. Every structure sentinel keeps is bounded (samplers, fold and fingerprint
tables, label children, the writer's queue), so what remains is the allocator settling:
measured at 0.05-0.2 MiB. A leak of 64 bytes per request over the soak's 60,000 or more
requests would pass 4 MiB."""
HEALTH_LATENCY_BOUND_SECONDS = 1.0
"""Slowest /healthz answer allowed during the storm: Kubernetes' default probe timeout. A
health request waits behind at most CONNECTIONS failing requests in the event loop,
milliseconds of work on an idle machine; measured slowest 160-500 ms here with the load
average at 18-22 on 2 cores."""
MULTIPROC_GROWTH_BYTES = 4096
"""Growth allowed per file of the multiprocess directory after every label set was seen:
prometheus_client maps a value file at a fixed size and allocates a page when a series is
first written, then only overwrites values; a worker's tenant file is rewritten whole and
gains a byte when a count gains a digit. Measured: 13 files, 0.69 MiB apparent and 92 KiB
on disk, unchanged from the moment every label set was seen to the end."""
SETTLE_SECONDS = 1.0
"""After a worker first answers a (route, code), what sentinel's writer thread adds for it
(records kept, summaries) is on disk within this (the writer runs every half second)."""
STUCK_SECONDS = 30.0
"""A connection whose request is still unanswered this long after its drive was due to end
gives up, and the test fails with it."""
MAX_REQUESTS = 3_000_000
"""Cap on requests per drive, whatever the machine sustains (each drive is also bounded in
time)."""

APP_MODULE = textwrap.dedent(
    """
    import os

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route


    class Settings:
        def __init__(self):
            self.backend = "primary"


    SETTINGS = Settings()


    class OrderFailed(Exception):
        pass


    STORM_ERRORS = (ValueError, KeyError, TimeoutError, OrderFailed)


    async def root(request):
        return PlainTextResponse("ok")


    async def item(request):
        return PlainTextResponse(request.path_params["item_id"])


    async def orders(request):
        return PlainTextResponse(f"orders of {request.path_params['user']}")


    async def fail(request):
        raise OrderFailed(f"order {request.path_params['n']} failed")


    async def env(request):
        os.environ["SOAK_BACKEND"] = request.path_params["n"]
        return PlainTextResponse("ok")


    async def setting(request):
        SETTINGS.backend = request.path_params["n"]
        return PlainTextResponse("ok")


    async def storm(request):
        n = int(request.path_params["n"])
        raise STORM_ERRORS[n % len(STORM_ERRORS)](f"shard {n} is unavailable")


    async def healthz(request):
        return PlainTextResponse("ok")


    class WorkerHeader:
        # Names the process that answered in every response (x-worker), 404s and the
        # 500s of Starlette's error middleware too.

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def send_naming_the_worker(message):
                if message["type"] == "http.response.start":
                    worker = (b"x-worker", str(os.getpid()).encode())
                    message = {**message, "headers": [*message.get("headers", []), worker]}
                await send(message)

            await self.app(scope, receive, send_naming_the_worker)


    starlette_app = Starlette(
        routes=[
            Route("/", root),
            Route("/items/{item_id}", item),
            Route("/users/{user}/orders", orders),
            Route("/fail/{n}", fail),
            Route("/env/{n}", env),
            Route("/settings/{n}", setting),
            Route("/storm/{n}", storm),
            Route("/healthz", healthz),
        ]
    )
    app = WorkerHeader(starlette_app)
    """
)

WRAPPED_MODULE = textwrap.dedent(
    """
    import os

    import sentinel
    import soakapp

    sentinel.watch(soakapp.SETTINGS, name="soakapp.SETTINGS")
    app = sentinel.instrument(
        soakapp.app,
        fold_window_seconds=float(os.environ.get("SOAK_FOLD_WINDOW_SECONDS", "60")),
    )
    """
)

Plan = Callable[[int], tuple[str, str]]
"""Request number -> (path, route template)."""


def soak_plan(number: int) -> tuple[str, str]:
    """Per 200 requests: 2 raising (1%), 2 unmatched (404), 1 writing os.environ, 1 writing
    a watched setting; the rest spread over three routes."""
    slot = number % 200
    if slot in (0, 100):
        return f"/fail/{number}", "/fail/{n}"
    if slot in (25, 125):
        return f"/nowhere/{number}", UNMATCHED_ROUTE
    if slot == 50:
        return f"/env/{number}", "/env/{n}"
    if slot == 150:
        return f"/settings/{number}", "/settings/{n}"
    kind = number % 3
    if kind == 0:
        return "/", "/"
    if kind == 1:
        return f"/items/{number % 1000}", "/items/{item_id}"
    return f"/users/u{number % 50}/orders", "/users/{user}/orders"


def storm_plan(number: int) -> tuple[str, str]:
    return f"/storm/{number}", "/storm/{n}"


# -- the load generator: asyncio, raw HTTP/1.1, keep-alive ----------------------------------


@dataclass
class Tally:
    """What the load generator sent to one server and what came back."""

    answered: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(route template, status code) -> responses."""
    storm_types: Counter[int] = field(default_factory=Counter)
    """Storm requests by the index of the exception type they raise (number modulo 4)."""
    latencies: list[float] = field(default_factory=list)
    first_seen: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(worker pid, route template, status code) -> when the generator first got it."""
    failures: list[str] = field(default_factory=list)
    connections: int = 0

    @property
    def total(self) -> int:
        return sum(self.answered.values())


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects after a response that closes it."""

    def __init__(self, port: int, tally: Tally) -> None:
        self.port = port
        self.tally = tally
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, str]:
        """GET ``path``: the status and the pid of the worker that answered."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.tally.connections += 1
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close, worker = 0, False, ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "x-worker":
                worker = value.strip()
        await self.reader.readexactly(length)
        # uvicorn closes the connection after an exception even when Starlette already
        # sent the 500: the next request goes on a new connection.
        if close or status >= 500:
            await self.close()
        return status, worker

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):  # the server closed it first
                await self.writer.wait_closed()
            self.reader = self.writer = None


async def drive(
    port: int,
    plan: Plan,
    tally: Tally,
    seconds: float,
    numbers: Iterator[int],
    connections: int = CONNECTIONS,
    record_latency: bool = True,
) -> None:
    """Send requests from ``plan`` over ``connections`` keep-alive connections, one in
    flight on each, for ``seconds`` or until MAX_REQUESTS, recording each answer in
    ``tally``. A transport failure ends that connection's loop and is recorded."""
    deadline = time.monotonic() + seconds
    budget = itertools.count()

    async def loop() -> None:
        connection = Connection(port, tally)
        try:
            async with asyncio.timeout(seconds + STUCK_SECONDS):
                while time.monotonic() < deadline and next(budget) < MAX_REQUESTS:
                    number = next(numbers)
                    path, route = plan(number)
                    started = time.perf_counter()
                    status, worker = await connection.get(path)
                    elapsed = time.perf_counter() - started
                    tally.answered[route, str(status)] += 1
                    tally.first_seen.setdefault((worker, route, str(status)), time.monotonic())
                    if record_latency:
                        tally.latencies.append(elapsed)
                    if route == "/storm/{n}":
                        tally.storm_types[number % 4] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:  # TimeoutError too
            tally.failures.append(f"{type(error).__name__}: {error}")
        finally:
            await connection.close()

    await asyncio.gather(*(loop() for _ in range(connections)))


# -- servers and what they expose -------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    stderr_path: Path


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "soakapp.py").write_text(APP_MODULE)
    (tmp_path / "soakwrapped.py").write_text(WRAPPED_MODULE)
    return tmp_path


@pytest.fixture
def servers(app_dir: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers on loopback (stderr to a file); stops each by its pid at the end."""
    started: list[Server] = []
    files: list[Any] = []

    def start(command: list[str], name: str, **env: str) -> Server:
        port, metrics_port = free_port(), free_port()
        stderr_path = app_dir / f"{name}.stderr"
        stderr = stderr_path.open("w")
        files.append(stderr)
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=clean_env(
                PYTHONPATH=str(app_dir),
                SENTINEL_METRICS_PORT=str(metrics_port),
                SENTINEL_METRICS_HOST="127.0.0.1",
                SENTINEL_LOCATION="fra",
                SENTINEL_LOG_FORMAT="json",
                **env,
            ),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            cwd=app_dir,
        )
        server = Server(process, port, metrics_port, stderr_path)
        started.append(server)
        _wait_for_port(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            stop(server.process)
        for file in files:
            file.close()


def _wait_for_port(server: Server, timeout: float = 30.0) -> None:
    """Until the server accepts connections (uvicorn listens once startup is complete); no
    request is sent, so nothing is counted."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                stop(server.process)
                msg = f"the server never listened:\n{server.stderr_path.read_text()}"
                raise AssertionError(msg) from None
            time.sleep(0.05)


def uvicorn(module: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", module, "--no-access-log"]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    msg = f"no VmRSS for pid {pid!r}"
    raise AssertionError(msg)


def scrape(server: Server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The server's /metrics, as samples by name."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def counted_requests(samples: dict[str, list[tuple[dict[str, str], float]]]) -> Counter[Any]:
    counted: Counter[tuple[str, str]] = Counter()
    for labels, value in samples.get("sentinel_http_requests_total", []):
        counted[labels["route"], labels["code"]] += int(value)
    return counted


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> int:
    return int(
        sum(
            value
            for found, value in samples.get(name, [])
            if all(found.get(key) == wanted for key, wanted in labels.items())
        )
    )


def records(server: Server) -> list[dict[str, Any]]:
    """The JSON records the server wrote to stderr."""
    found = []
    for line in server.stderr_path.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def assert_sentinel_healthy(samples: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    """Nothing failed inside sentinel and no report or record was dropped."""
    assert total(samples, "sentinel_internal_errors_total") == 0, samples.get(
        "sentinel_internal_errors_total"
    )
    assert total(samples, "sentinel_reports_dropped_total") == 0, samples.get(
        "sentinel_reports_dropped_total"
    )


def assert_mutations_exact(
    samples: dict[str, list[tuple[dict[str, str], float]]], tally: Tally
) -> None:
    env_writes = tally.answered["/env/{n}", "200"]
    setting_writes = tally.answered["/settings/{n}", "200"]
    assert env_writes > 0 and setting_writes > 0
    assert total(samples, "sentinel_global_mutations_total", route="/env/{n}") == env_writes
    assert total(samples, "sentinel_global_mutations_total", target="os.environ") == env_writes
    assert (
        total(samples, "sentinel_global_mutations_total", target="soakapp.SETTINGS")
        == setting_writes
    )
    assert total(samples, "sentinel_global_mutations_total") == env_writes + setting_writes


def assert_mutation_records_add_up(written: list[dict[str, Any]], tally: Tally) -> None:
    """Each watched write is reported in full first, then folded into summaries whose
    occurrences, with the full reports, add up to every write the generator caused."""
    for target, route in (("os.environ", "/env/{n}"), ("soakapp.SETTINGS", "/settings/{n}")):
        own = [r for r in written if r["event"] == "global_state_mutated" and r["target"] == target]
        assert own and not own[0].get("summary"), own[:1]
        assert {(r["route"], r["attribution"]) for r in own} == {(route, "exact")}
        full = sum(1 for r in own if not r.get("summary"))
        folded = sum(r["occurrences"] for r in own if r.get("summary"))
        assert full + folded == tally.answered[route, "200"], target


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_minute_of_load_is_counted_exactly_with_bounded_memory_and_latency(
    servers: Callable[..., Server],
) -> None:
    """A minute at the highest rate the machine sustains, 1% raising and 1% writing global
    state: the scraped counters equal what the load generator got, per route and code;
    every exception and every write is counted; RSS growth and p99 against the bare app
    (served the same way, interleaved) stay within their bounds; nothing inside sentinel
    failed or was dropped."""
    wrapped = servers(uvicorn("soakwrapped:app"), "wrapped")
    bare = servers(uvicorn("soakapp:app"), "bare")
    wrapped_tally, bare_tally = Tally(), Tally()
    wrapped_numbers, bare_numbers = itertools.count(), itertools.count()
    rss: dict[str, int] = {}

    async def soak() -> None:
        for server, tally, numbers in (
            (wrapped, wrapped_tally, wrapped_numbers),
            (bare, bare_tally, bare_numbers),
        ):
            await drive(
                server.port, soak_plan, tally, WARMUP_SECONDS, numbers, record_latency=False
            )
        rss["start"] = rss_bytes(wrapped.process.pid)
        rss["bare_start"] = rss_bytes(bare.process.pid)
        for _ in range(SOAK_ROUNDS):
            await drive(
                wrapped.port, soak_plan, wrapped_tally, SOAK_SECONDS / SOAK_ROUNDS, wrapped_numbers
            )
            await drive(bare.port, soak_plan, bare_tally, BARE_ROUND_SECONDS, bare_numbers)
        rss["end"] = rss_bytes(wrapped.process.pid)
        rss["bare_end"] = rss_bytes(bare.process.pid)

    started = time.monotonic()
    run_client(soak(), timeout=SOAK_SECONDS + SOAK_ROUNDS * BARE_ROUND_SECONDS + 60)
    elapsed = time.monotonic() - started
    samples = scrape(wrapped)
    stop(wrapped.process)
    assert not wrapped_tally.failures, wrapped_tally.failures[:5]
    assert not bare_tally.failures, bare_tally.failures[:5]

    wrapped_p99, bare_p99 = p99(wrapped_tally.latencies), p99(bare_tally.latencies)
    growth = rss["end"] - rss["start"]
    print(
        f"\nsoak: {wrapped_tally.total} requests to the wrapped app in "
        f"{SOAK_SECONDS + WARMUP_SECONDS:.0f} s "
        f"({len(wrapped_tally.latencies) / SOAK_SECONDS:.0f}/s measured), "
        f"{bare_tally.total} to the bare app "
        f"({len(bare_tally.latencies) / (SOAK_ROUNDS * BARE_ROUND_SECONDS):.0f}/s); "
        f"p99 {wrapped_p99 * 1e3:.2f} ms wrapped vs {bare_p99 * 1e3:.2f} ms bare "
        f"({wrapped_p99 / bare_p99:.2f}x); RSS {rss['start'] / 2**20:.1f} -> "
        f"{rss['end'] / 2**20:.1f} MiB (+{growth / 2**20:.2f}; bare "
        f"+{(rss['bare_end'] - rss['bare_start']) / 2**20:.2f}); "
        f"{wrapped_tally.connections} connections; {elapsed:.0f} s in all"
    )

    assert counted_requests(samples) == dict(wrapped_tally.answered)
    assert set(wrapped_tally.answered) == {
        ("/", "200"),
        ("/items/{item_id}", "200"),
        ("/users/{user}/orders", "200"),
        ("/fail/{n}", "500"),
        (UNMATCHED_ROUTE, "404"),
        ("/env/{n}", "200"),
        ("/settings/{n}", "200"),
    }
    # Request numbers 0..total-1 were each answered once: the plan says which failed.
    failed = wrapped_tally.answered["/fail/{n}", "500"]
    assert failed == sum(1 for n in range(wrapped_tally.total) if n % 200 in (0, 100))
    assert (
        total(samples, "sentinel_unhandled_exceptions_total")
        == total(
            samples,
            "sentinel_unhandled_exceptions_total",
            route="/fail/{n}",
            exception_type="soakapp.OrderFailed",
            phase="request",
        )
        == failed
    )
    assert_mutations_exact(samples, wrapped_tally)
    assert_sentinel_healthy(samples)
    assert growth <= RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert wrapped_p99 <= P99_FACTOR * bare_p99, (wrapped_p99, bare_p99)
    # Detail is folded: the written reports and summaries stand for every failure.
    written = records(wrapped)
    full = [r for r in written if r["event"] == "unhandled_exception"]
    folded = sum(r["occurrences"] for r in written if r["event"] == "exception_summary")
    assert 1 <= len(full) <= FOLD_FULL_REPORTS * 2  # the test is shorter than two windows
    assert len(full) + folded == failed
    assert_mutation_records_add_up(written, wrapped_tally)
    assert "Exception in ASGI application" not in wrapped.stderr_path.read_text()


@pytest.mark.timeout(120)
def test_two_workers_merge_exactly_and_their_files_stop_growing(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """`sentinel run --workers 2` under the same traffic: the merged counters are exact,
    both workers served, and the multiprocess directory stops growing once every label set
    was seen (sampled every half second)."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    server = servers(
        [sys.executable, "-m", "sentinel.cli", "run", "soakwrapped:app", "--workers", "2"],
        "workers",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    tally = Tally()
    sizes: list[tuple[float, dict[str, tuple[int, int]]]] = []

    def directory() -> dict[str, tuple[int, int]]:
        """File name -> (bytes the file says, bytes allocated on disk), in the multiprocess
        directory; a tenant file's temporary twin counts as the file itself."""
        files: dict[str, tuple[int, int]] = {}
        for entry in os.scandir(multiproc):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # a tenant file's temporary, renamed meanwhile
                continue
            name = (
                entry.name.split(".json.", 1)[0] + ".json" if ".json." in entry.name else entry.name
            )
            files[name] = (stat.st_size, stat.st_blocks * 512)
        return files

    async def sample(deadline: float) -> None:
        while time.monotonic() < deadline:
            sizes.append((time.monotonic(), directory()))
            await asyncio.sleep(0.5)

    async def load() -> float:
        started = time.monotonic()
        deadline = started + WORKERS_SECONDS
        await asyncio.gather(
            drive(server.port, soak_plan, tally, WORKERS_SECONDS, itertools.count()),
            sample(deadline),
        )
        return started

    started = run_client(load(), timeout=WORKERS_SECONDS + 60)
    samples = scrape(server)
    final = directory()
    stop(server.process)
    assert not tally.failures, tally.failures[:5]

    def size(files: dict[str, tuple[int, int]]) -> tuple[int, int]:
        return sum(a for a, _ in files.values()), sum(d for _, d in files.values())

    # The moment each worker had answered every (route, code) at least once; the records,
    # exceptions and mutations those bring are written by then or within SETTLE_SECONDS.
    workers = {worker for worker, _, _ in tally.first_seen}
    every_label_set = {(route, code) for _, route, code in tally.first_seen}
    missing = {
        (worker, route, code)
        for worker in workers
        for route, code in every_label_set
        if (worker, route, code) not in tally.first_seen
    }
    assert not missing, f"a worker never answered these: {missing}"
    all_seen = max(tally.first_seen.values()) + SETTLE_SECONDS
    settled = [files for at, files in sizes if at >= all_seen]
    first, last = size(settled[0]), size(final)
    print(
        f"\nworkers: {tally.total} requests in {WORKERS_SECONDS:.0f} s "
        f"({tally.total / WORKERS_SECONDS:.0f}/s) over workers {sorted(workers)}; every "
        f"label set seen by both after {all_seen - started - SETTLE_SECONDS:.1f} s; "
        f"multiprocess directory ({len(final)} files) then {first[0] / 2**20:.2f} MiB "
        f"apparent, {first[1] / 2**10:.0f} KiB on disk; at the end {last[0] / 2**20:.2f} MiB, "
        f"{last[1] / 2**10:.0f} KiB ({len(sizes)} samples)"
    )
    assert len(workers) == 2, f"requests did not spread over the workers: {workers}"
    assert counted_requests(samples) == dict(tally.answered)
    assert (
        total(samples, "sentinel_unhandled_exceptions_total", phase="request")
        == (tally.answered["/fail/{n}", "500"])
    )
    assert_mutations_exact(samples, tally)
    assert_mutation_records_add_up(records(server), tally)
    assert_sentinel_healthy(samples)
    assert len(settled) >= 10, f"every label set was seen only {all_seen - started:.1f} s in"
    for files in [*settled, final]:
        grown = {
            name: (settled[0].get(name), now)
            for name, now in files.items()
            if settled[0].get(name, (0, 0))[0] + MULTIPROC_GROWTH_BYTES < now[0]
            or settled[0].get(name, (0, 0))[1] + MULTIPROC_GROWTH_BYTES < now[1]
        }
        assert not grown, f"grew after every label set was seen: {grown}"


@pytest.mark.timeout(120)
def test_an_error_storm_keeps_health_answering_and_folds_its_reports(
    servers: Callable[..., Server],
) -> None:
    """Every request raising for 30 s (four exception types from one line, every message
    different), with /healthz polled throughout: every health request answers within the
    bound; each fingerprint's first occurrence is written in full, repeats fold into
    exception_summary records, and full reports plus folded occurrences add up to the
    exact count; memory stays bounded."""
    server = servers(
        uvicorn("soakwrapped:app"),
        "storm",
        SOAK_FOLD_WINDOW_SECONDS=str(FOLD_WINDOW_SECONDS),
    )
    tally, health = Tally(), Tally()
    rss: dict[str, float] = {}

    async def poll_health(deadline: float) -> None:
        connection = Connection(server.port, health)
        try:
            async with asyncio.timeout(STORM_SECONDS + STUCK_SECONDS):
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    status, _ = await connection.get("/healthz")
                    health.latencies.append(time.perf_counter() - started)
                    health.answered["/healthz", str(status)] += 1
                    await asyncio.sleep(HEALTH_POLL_SECONDS)
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            health.failures.append(f"{type(error).__name__}: {error}")
        finally:
            await connection.close()

    async def take_rss(after: float) -> None:
        await asyncio.sleep(after)
        rss["start"] = rss_bytes(server.process.pid)

    async def storm() -> None:
        deadline = time.monotonic() + STORM_SECONDS
        await asyncio.gather(
            drive(server.port, storm_plan, tally, STORM_SECONDS, itertools.count()),
            poll_health(deadline),
            take_rss(3.0),
        )
        rss["end"] = rss_bytes(server.process.pid)

    run_client(storm(), timeout=STORM_SECONDS + 60)
    samples = scrape(server)
    stop(server.process)
    assert not tally.failures, tally.failures[:5]
    assert not health.failures, health.failures[:5]

    written = records(server)
    full = [r for r in written if r["event"] == "unhandled_exception"]
    summaries = [r for r in written if r["event"] == "exception_summary"]
    growth = rss["end"] - rss["start"]
    print(
        f"\nstorm: {tally.total} failing requests in {STORM_SECONDS:.0f} s "
        f"({tally.total / STORM_SECONDS:.0f}/s); /healthz {health.total} answers, p99 "
        f"{p99(health.latencies) * 1e3:.1f} ms, slowest {max(health.latencies) * 1e3:.1f} ms; "
        f"{len(full)} unhandled_exception records and {len(summaries)} exception_summary "
        f"records standing for {sum(r['occurrences'] for r in summaries)} occurrences; "
        f"RSS {rss['start'] / 2**20:.1f} -> {rss['end'] / 2**20:.1f} MiB "
        f"(+{growth / 2**20:.2f})"
    )

    # Counts are exact.
    assert set(tally.answered) == {("/storm/{n}", "500")}
    assert counted_requests(samples) == {
        ("/storm/{n}", "500"): tally.total,
        ("/healthz", "200"): health.total,
    }
    types = ["ValueError", "KeyError", "TimeoutError", "soakapp.OrderFailed"]
    for remainder, exception_type in enumerate(types):
        assert (
            total(samples, "sentinel_unhandled_exceptions_total", exception_type=exception_type)
            == tally.storm_types[remainder]
        ), exception_type
    assert total(samples, "sentinel_unhandled_exceptions_total") == tally.total
    assert_sentinel_healthy(samples)

    # Health answered throughout, each time within the bound.
    assert health.answered == {("/healthz", "200"): health.total}
    assert health.total >= STORM_SECONDS / (HEALTH_POLL_SECONDS + HEALTH_LATENCY_BOUND_SECONDS)
    assert max(health.latencies) <= HEALTH_LATENCY_BOUND_SECONDS, sorted(health.latencies)[-5:]

    # Folding: one fingerprint per type (messages vary, the line is the same); its first
    # occurrence in full; at most the full quota per window; the rest in summaries.
    by_type = dict(pairs := {(r["exception_type"], r["fingerprint"]) for r in full})
    assert len(pairs) == len(set(by_type.values())) == len(types), pairs
    assert sorted(by_type) == sorted(types)
    windows = STORM_SECONDS / FOLD_WINDOW_SECONDS + 1
    for exception_type, fingerprint in by_type.items():
        own = [r for r in written if r.get("fingerprint") == fingerprint]
        assert own[0]["event"] == "unhandled_exception"
        own_full = [r for r in own if r["event"] == "unhandled_exception"]
        own_summaries = [r for r in own if r["event"] == "exception_summary"]
        assert len(own_full) <= FOLD_FULL_REPORTS * windows, exception_type
        assert len(own_summaries) >= 2, exception_type  # windows closed during the storm
        assert len({r["message"] for r in own_full}) == len(own_full)
        counted = total(
            samples, "sentinel_unhandled_exceptions_total", exception_type=exception_type
        )
        assert len(own_full) + sum(r["occurrences"] for r in own_summaries) == counted
    assert "Exception in ASGI application" not in server.stderr_path.read_text()
    assert growth <= RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB"
