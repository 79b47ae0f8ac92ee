"""A failed scrape at the start of the gate's window, on the real Prometheus (scraping every
second) and two stand-in targets on loopback: the baseline's counts are the window's
traffic, never its process's whole lifetime, and a healthy rollout is not stopped.

Prometheus writes a staleness marker for every series of a target whose scrape fails; a
window that starts on that marker must not take the series for one that is new within it
(which counts by its whole value)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import free_port, stop, wait_for

from sentinel.gate import PrometheusClient, Thresholds, Verdict, decide, observe
from sentinel.mixin import MonitoringConfig

pytestmark = pytest.mark.timeout(120)
PER_SECOND = 100
LIFETIME = 6_000_000
"""What the baseline's process served before the test: a process up for weeks."""
WINDOW = 8


@dataclass
class Target:
    """A stand-in sentinel process: its build info and one request counter per status code
    (one in a thousand a 500), rising by PER_SECOND from ``served``; scrapes fail (HTTP 500)
    while ``failing`` is set."""

    version: str
    served: int
    started: float
    failing: threading.Event
    port: int = 0

    def exposition(self) -> bytes:
        total = self.served + PER_SECOND * (time.time() - self.started)
        errors, where = int(total / 1000), 'location="fra",route="/x",method="GET"'
        return (
            "# TYPE sentinel_build_info gauge\n"
            f'sentinel_build_info{{service="shop",version="{self.version}",'
            'sentinel_version="1",environment="production"} 1\n'
            "# TYPE sentinel_http_requests_total counter\n"
            f'sentinel_http_requests_total{{{where},code="200"}} {int(total) - errors}\n'
            f'sentinel_http_requests_total{{{where},code="500"}} {errors}\n'
        ).encode()


def _serve(target: Target) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if target.failing.is_set():
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = target.exposition()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    target.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def scrape_gap(tmp_path: Path) -> Iterator[tuple[str, Target, float]]:
    """Prometheus scraping v1 (the long-lived baseline) and v2 (new, from 0); v1's scrapes
    fail for about 2.5 s after a few good ones. Yields the URL, v1 and the time of its first
    failed scrape (where Prometheus wrote the staleness markers)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (tests/run.sh installs it)")
    now = time.time()
    v1 = Target("v1", LIFETIME, now, threading.Event())
    v2 = Target("v2", 0, now, threading.Event())
    servers = [_serve(v1), _serve(v2)]
    targets = ", ".join(f'"127.0.0.1:{target.port}"' for target in (v1, v2))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
        f"scrape_configs:\n  - job_name: shop\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    v1_up = f'up{{instance="127.0.0.1:{v1.port}"}}'
    try:
        assert wait_for(lambda: _values(url, f"{v1_up}[10s]").count(1.0) >= 4, 30), "no scrapes"
        v1.failing.set()
        assert wait_for(lambda: 0.0 in _values(url, f"{v1_up}[10s]"), 10), "no failed scrape"
        time.sleep(1.5)
        v1.failing.clear()
        failed_at = min(at for at, value in _samples(url, f"{v1_up}[20s]") if value == 0.0)
        # The window ends WINDOW s after a point just past the failed scrape: wait for it.
        assert wait_for(lambda: time.time() > failed_at + WINDOW + 1.5, WINDOW + 5)
        yield url, v1, failed_at
    finally:
        stop(server)
        for each in servers:
            each.shutdown()
            each.server_close()


def test_a_failed_scrape_at_the_window_start_does_not_count_the_baseline_lifetime(
    scrape_gap: tuple[str, Target, float],
) -> None:
    """The window starts just after v1's failed scrape (its series stale there): v1 counts
    about the window's requests, not the 6 million of its lifetime, and the gate does not
    stop v2, which serves at the same rate and error ratio."""
    url, _, failed_at = scrape_gap
    at = failed_at + 0.5 + WINDOW
    config = MonitoringConfig(selector='job="shop"')
    observation = observe(PrometheusClient(url, timeout=10), config, f"{WINDOW}s", at)
    traffic = observation.counts("v2", "production")
    baseline, new = traffic[("fra", "v1")], traffic[("fra", "v2")]
    assert 0 < baseline.requests <= PER_SECOND * (WINDOW + 2), baseline
    assert PER_SECOND * (WINDOW - 2) <= new.requests <= PER_SECOND * (WINDOW + 2), new
    decision = decide(traffic, "v2", Thresholds(min_requests=50), window=f"{WINDOW}s")
    assert decision.verdict is not Verdict.STOP, decision.summary


def _samples(url: str, expression: str) -> list[tuple[float, float]]:
    """The samples of the one series a range query selects (none when it selects none)."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=5)
    result = answer.json()["data"]["result"] if answer.status_code == 200 else []
    return [(float(at), float(value)) for at, value in result[0]["values"]] if result else []


def _values(url: str, expression: str) -> list[float]:
    try:
        return [value for _, value in _samples(url, expression)]
    except (httpx.HTTPError, ValueError):
        return []
