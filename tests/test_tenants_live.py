"""The tenant dimension under `sentinel run` (a real uvicorn on 127.0.0.1): thousands of
tenants on a skewed mix, a few mid-sized ones failing at 20%, scraped while the load runs."""

from __future__ import annotations

import itertools
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from helpers import clean_env, free_port, stop, wait_for
from prometheus_client.parser import text_string_to_metric_families

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
CLASSES = ("2xx", "3xx", "4xx", "5xx")
MAX_TENANTS = 50
TENANTS = 3000
"""Distinct tenants on the Zipf-like mix, plus the one-off ids of the long tail."""
LOAD_LIMIT_SECONDS = 120
"""Bound on sending one plan (about 25 s for 80,000 requests here, alone)."""
FAILING_RANKS = (60, 70, 80)
"""Mid-sized tenants (ranked by traffic, 1 the busiest; each about 0.2% of the traffic,
a sixtieth of the busiest's) that fail at 20%: outside the top MAX_TENANTS, so traffic
alone never names them."""
FAILING_FROM = 0.25
"""They start failing a quarter into the plan, once the tracked set is full and has
settled, as a customer starts failing in a running service."""

APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    status = 503 if scope["query_string"] == b"fail" else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
"""


def _plan(requests: int, seed: int) -> tuple[list[tuple[str, bool]], set[str]]:
    """(tenant, fails) per request: Zipf (s=1) over TENANTS tenants, 2% one-off ids; the
    FAILING_RANKS tenants fail every fifth of their requests (20%, exactly: the assertions
    are about the tracker, not the dice) from FAILING_FROM of the plan on, everyone else
    (and they before) 0.05% at random."""
    rng = random.Random(seed)
    names = [f"acct-{rank:05d}" for rank in range(1, TENANTS + 1)]
    weights = [1.0 / rank for rank in range(1, TENANTS + 1)]
    failing = {names[rank - 1] for rank in FAILING_RANKS}
    chosen = rng.choices(names, weights, k=requests)
    plan = []
    since: Counter[str] = Counter()
    for index, tenant in enumerate(chosen):
        if rng.random() < 0.02:
            tenant = f"once-{seed}-{index}"
        if tenant in failing and index >= FAILING_FROM * requests:
            since[tenant] += 1
            plan.append((tenant, since[tenant] % 5 == 0))
        else:
            plan.append((tenant, rng.random() < 0.0005))
    return plan, failing


def _send_all(port: int, plan: list[tuple[str, bool]], connections: int) -> None:
    """Send the plan over ``connections`` keep-alive connections (raw HTTP/1.1, one request
    at a time on each); every response must come back within 10 s."""
    errors: list[BaseException] = []

    def worker(part: list[tuple[str, bool]]) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader = sock.makefile("rb")
                for tenant, fails in part:
                    query = "?fail" if fails else ""
                    sock.sendall(
                        f"GET /{query} HTTP/1.1\r\nhost: t\r\nx-tenant: {tenant}\r\n\r\n".encode()
                    )
                    status_line = reader.readline()
                    assert status_line.startswith(b"HTTP/1.1 "), status_line
                    while reader.readline() not in (b"\r\n", b""):
                        pass  # headers; the body is empty (content-length: 0)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [
        threading.Thread(target=worker, args=(plan[index::connections],), daemon=True)
        for index in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_LIMIT_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "the load did not finish in time"
    assert not errors, errors[0]


def _scrape(metrics_port: int) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """(tenant, status class) -> value, and status class -> sentinel_http_requests_total."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    tenants: dict[tuple[str, str], float] = {}
    requests: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sentinel_tenant_requests_total":
                tenants[(sample.labels["tenant"], sample.labels["status_class"])] = sample.value
            elif sample.name == "sentinel_http_requests_total":
                code = sample.labels["code"]
                klass = f"{code[0]}xx" if code[0] in "2345" else "5xx"
                requests["2xx" if code[0] == "1" else klass] += sample.value
    return tenants, dict(requests)


def _sums(tenants: dict[tuple[str, str], float]) -> dict[str, float]:
    sums: Counter[str] = Counter()
    for (_, klass), value in tenants.items():
        sums[klass] += value
    return {klass: value for klass, value in sums.items() if value}


def _check_bounds(tenants: dict[tuple[str, str], float]) -> None:
    for klass in CLASSES:
        labels = {tenant for tenant, k in tenants if k == klass}
        assert len(labels) <= MAX_TENANTS + 1, (klass, len(labels))
        assert "other" in labels


def _check_monotonic(scrapes: list[dict[tuple[str, str], float]]) -> None:
    for before, after in itertools.pairwise(scrapes):
        for series, value in before.items():
            if series in after:
                assert after[series] >= value, (series, value, after[series])


def _run(
    tmp_path: Path, workers: int, requests: int, lags: list[tuple[float, float]] | None = None
) -> tuple[list[dict[tuple[str, str], float]], dict[str, float], list[tuple[str, bool]], set[str]]:
    """Serve the plan, scraping every second; ``lags`` gets (requests counted, requests
    counted but not yet under a tenant) per scrape under load."""
    (tmp_path / "tenantapp.py").write_text(APP, encoding="utf-8")
    port, metrics_port = free_port(), free_port()
    plan, failing = _plan(requests, seed=19)
    log = (tmp_path / "stderr.log").open("w", encoding="utf-8")
    options = ["--workers", str(workers)] if workers > 1 else []
    process = subprocess.Popen(
        [*SENTINEL, "run", "tenantapp:app", "--host", "127.0.0.1", "--port", str(port), *options],
        env=clean_env(
            PYTHONPATH=str(tmp_path),
            SENTINEL_METRICS_PORT=str(metrics_port),
            SENTINEL_METRICS_HOST="127.0.0.1",
            SENTINEL_TENANT_HEADER="x-tenant",
            SENTINEL_MAX_TENANTS=str(MAX_TENANTS),
            SENTINEL_LOG_FORMAT="json",
        ),
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    scrapes: list[dict[tuple[str, str], float]] = []
    try:

        def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"sentinel run exited: {(tmp_path / 'stderr.log').read_text()}")
            try:
                httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=1)
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except (OSError, httpx.HTTPError):
                return False

        assert wait_for(up, 30), "the server did not come up in 30 s"
        done = threading.Event()
        failure: list[BaseException] = []

        def load() -> None:
            try:
                _send_all(port, plan, connections=8)
            except BaseException as error:
                failure.append(error)
            finally:
                done.set()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        deadline = time.monotonic() + LOAD_LIMIT_SECONDS + 10
        while not done.wait(1.0) and time.monotonic() < deadline:
            tenants, requests_by_class = _scrape(metrics_port)
            _check_bounds(tenants)
            if workers == 1:  # one process: exact at every scrape, under load too
                assert _sums(tenants) == requests_by_class
            if lags is not None:
                counted, named = sum(requests_by_class.values()), sum(_sums(tenants).values())
                lags.append((counted, counted - named))
            scrapes.append(tenants)
        loader.join(5)
        assert not failure, failure[0]
        assert done.is_set(), "the load did not finish"

        # Once the load stops the workers' last counts are published within half a second.
        def settled() -> tuple[dict[tuple[str, str], float], dict[str, float]] | None:
            tenants, requests_by_class = _scrape(metrics_port)
            total = sum(requests_by_class.values())
            if total == len(plan) and _sums(tenants) == requests_by_class:
                return tenants, requests_by_class
            return None

        final = wait_for(settled, 10)
        assert final, f"sums never matched: {_scrape(metrics_port)}"
        tenants, requests_by_class = final
        scrapes.append(tenants)
    finally:
        stop(process)
        log.close()
    return scrapes, requests_by_class, plan, failing


def _named_share(
    tenants: dict[tuple[str, str], float], plan: list[tuple[str, bool]], failing: set[str]
) -> dict[str, tuple[float, int]]:
    """For each failing tenant: (its 5xx counted under its own name, its 5xx sent)."""
    sent = Counter(tenant for tenant, fails in plan if fails)  # a 5xx before is 1 in 2,000
    return {tenant: (tenants.get((tenant, "5xx"), 0.0), sent[tenant]) for tenant in failing}


def test_one_process_names_the_failing_tenants_with_exact_sums(tmp_path: Path) -> None:
    """`sentinel run`, one process, 80,000 requests from 3,000+ tenants (Zipf, plus one-off
    ids): the three mid-sized tenants that start failing at 20% once the set is full are
    named with >= 80% of their 5xx under their own name, every scrape has at most
    MAX_TENANTS + 1 tenant values per status class, sums equal to
    sentinel_http_requests_total, and no series decreases."""
    scrapes, requests_by_class, plan, failing = _run(tmp_path, workers=1, requests=80_000)
    final = scrapes[-1]
    assert len({tenant for tenant, _ in plan}) > TENANTS  # thousands of distinct ids
    assert sum(requests_by_class.values()) == len(plan)
    _check_monotonic(scrapes)
    shares = _named_share(final, plan, failing)
    print({tenant: f"{named:.0f} of {sent} 5xx named" for tenant, (named, sent) in shares.items()})
    for tenant, (named, sent) in shares.items():
        assert sent >= 5, (tenant, sent)
        assert named >= 0.8 * sent, (tenant, named, sent)


def test_four_workers_keep_the_bounds_and_exact_sums(tmp_path: Path) -> None:
    """`sentinel run --workers 4`, the same mix: the merged scrape has at most MAX_TENANTS + 1
    tenant values per status class, no series decreases, and once the load stops the sums
    equal the merged sentinel_http_requests_total; the failing tenants are named. Under
    load the tenants' sum is never ahead of the request counter, and behind it by a few
    seconds of traffic at most: the workers publish their tenant counts twice a second,
    while the request counter's files are written at every turn of their event loops."""
    lags: list[tuple[float, float]] = []
    scrapes, requests_by_class, plan, failing = _run(
        tmp_path, workers=4, requests=64_000, lags=lags
    )
    rates = [after[0] - before[0] for before, after in itertools.pairwise(lags)]
    print(f"behind the request counter under load: {[lag for _, lag in lags]}, per second {rates}")
    assert all(lag >= 0 for _, lag in lags), lags
    # here about 0.4 s of traffic; bounded at 3 s for a machine busy with other tests
    assert all(lag <= 3 * max(rates, default=0) + 100 for _, lag in lags), (lags, rates)
    final = scrapes[-1]
    assert sum(requests_by_class.values()) == len(plan)
    _check_monotonic(scrapes)
    shares = _named_share(final, plan, failing)
    print({tenant: f"{named:.0f} of {sent} 5xx named" for tenant, (named, sent) in shares.items()})
    # Each worker sees a quarter of a tenant's traffic and promotes it on its own few 5xx:
    # every failing tenant is named, with some of its first 5xx in `other` in each worker
    # (the share under its own name varies from run to run in this cold start; the README
    # states the undercount).
    for named, sent in shares.values():
        assert 0 < named <= sent, shares
