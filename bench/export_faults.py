"""The request path's cost while the collector fails: ``python -m bench.export_faults``.

sentinel's span pipeline (``build_tracer_provider``: tail sampling, the bounded export queue,
the real OTLP/HTTP exporter with a 1 s timeout) is driven in-process as the middleware drives
it: per request, a server span with two child spans, kept. The collector on loopback is in
one state per measurement:

- ``up``: answers 200 and keeps nothing;
- ``refusing``: nobody listens on its port;
- ``hanging``: accepts the connection and never answers;
- ``429``: answers Too Many Requests with Retry-After: 1;
- ``503``: answers Service Unavailable.

Each round measures every state in turn (interleaved, so drift in the machine's load hits
them alike) and the output is, per state, the median over rounds of the per-request p50 and
p99, their ratio to ``up``, and the spans dropped per reason. The tests assert no timing
(tests/test_export_faults.py bounds "never held up" generously under real faults and load);
this is where the figure is measured. Bounded: ``--seconds`` caps the run.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from prometheus_client import CollectorRegistry

from sentinel import Config
from sentinel._context import RequestContext
from sentinel._metrics import Metrics
from sentinel._scrub import Scrubber
from sentinel._tracing import RequestTracer, build_tracer_provider, close_tracer_provider

STATES = ("up", "refusing", "hanging", "429", "503")
EXPORT_TIMEOUT_SECONDS = 1.0
SCHEDULE_DELAY_MILLIS = 50
DROP_REASONS = ("export_failed", "export_queue_full")


@contextmanager
def collector(state: str) -> Iterator[str]:
    """The OTLP/HTTP endpoint of a loopback collector in ``state``."""
    if state == "refusing":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1/traces"  # closed again: nobody listens there
        return
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            if state == "hanging":
                release.wait(30)
                return
            self.send_response(200 if state == "up" else int(state))
            if state == "429":
                self.send_header("retry-after", "1")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def measure(
    state: str, requests: int, max_export_queue: int
) -> tuple[list[float], dict[str, float]]:
    """Seconds per request against a collector in ``state``, and the spans dropped by reason."""
    registry = CollectorRegistry()
    with collector(state) as endpoint:
        provider, tail = build_tracer_provider(
            Config(service="bench", metrics_port=0, max_export_queue=max_export_queue),
            Metrics(registry),
            OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_SECONDS),
            schedule_delay_millis=SCHEDULE_DELAY_MILLIS,
        )
        tracer = RequestTracer(provider, Scrubber(), tail)
        app_tracer = provider.get_tracer("bench")
        scope = {"type": "http", "method": "GET", "path": "/items/1", "headers": []}
        request = RequestContext(scope, "GET", "fra", 0.0, resolve=lambda scope: "/items/{id}")
        durations: list[float] = []
        try:
            for _ in range(requests):
                started = time.perf_counter()
                span, token, _ = tracer.start_request({"type": "http"}, request)
                with (
                    app_tracer.start_as_current_span("load"),
                    app_tracer.start_as_current_span("query"),
                ):
                    pass
                tracer.finish(span, token, request, 200, None, keep=True, reason="bench")
                durations.append(time.perf_counter() - started)
        finally:
            close_tracer_provider(provider, tail)  # as sentinel closes: flush, bounded
    dropped = {
        reason: registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
        or 0.0
        for reason in DROP_REASONS
    }
    return durations, dropped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.export_faults", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per round and state (default 2000)"
    )
    parser.add_argument(
        "--max-export-queue", type=int, default=2048, help="sentinel's max_export_queue"
    )
    parser.add_argument(
        "--seconds", type=float, default=300.0, help="stop after the round that passes this"
    )
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.seconds
    p50: dict[str, list[float]] = {state: [] for state in STATES}
    p99: dict[str, list[float]] = {state: [] for state in STATES}
    dropped: dict[str, dict[str, float]] = {
        state: dict.fromkeys(DROP_REASONS, 0.0) for state in STATES
    }
    rounds = 0
    for _ in range(args.rounds):
        for state in STATES:
            durations, lost = measure(state, args.requests, args.max_export_queue)
            quantiles = statistics.quantiles(durations, n=100)
            p50[state].append(quantiles[49])
            p99[state].append(quantiles[98])
            for reason, count in lost.items():
                dropped[state][reason] += count
        rounds += 1
        if time.monotonic() > deadline:
            break
    up50, up99 = statistics.median(p50["up"]), statistics.median(p99["up"])
    print(
        f"{rounds} rounds x {args.requests} requests per state (3 spans each, all kept), "
        f"max_export_queue {args.max_export_queue}, export timeout {EXPORT_TIMEOUT_SECONDS:g} s"
    )
    print()
    print(
        "| collector | p50 µs | p99 µs | p50 / up | p99 / up | export_failed | export_queue_full |"
    )
    print("|---|---|---|---|---|---|---|")
    for state in STATES:
        median50, median99 = statistics.median(p50[state]), statistics.median(p99[state])
        print(
            f"| {state} | {median50 * 1e6:.1f} | {median99 * 1e6:.1f} | {median50 / up50:.2f} "
            f"| {median99 / up99:.2f} | {dropped[state]['export_failed']:,.0f} "
            f"| {dropped[state]['export_queue_full']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
