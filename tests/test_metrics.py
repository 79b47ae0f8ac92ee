"""Metric families: fixed names and labels, bounded label values."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_env, record_calls
from prometheus_client import CollectorRegistry, generate_latest

from sentinel._metrics import INVALID_STATUS, MAX_EXCEPTION_TYPES, OTHER, Metrics, metrics_for
from sentinel.types import Receive, Scope, Send


def test_every_product_metric_is_registered_with_its_labels() -> None:
    # records seen is derived from the request counter (every request is considered).
    """The names and label sets PRODUCT.md fixes are the ones exposed."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.count_later(metrics.request_children("fra", "/items/{id}", "GET", 200), 0.01)
    metrics.count_exception("fra", "/items/{id}", "KeyError", "request")
    metrics.global_mutations.labels("fra", "/", "os.environ").inc()
    metrics.records_kept.labels("fra", "2xx").inc()
    metrics.dropped("queue_full")
    metrics.internal_error("sink")
    metrics.set_build_info("kv", "1.2.3", "production")
    text = generate_latest(registry).decode()
    for line in [
        'sentinel_http_requests_total{code="200",location="fra",method="GET",route="/items/{id}"}',
        'sentinel_http_request_duration_seconds_bucket{le="0.05",location="fra",method="GET"',
        'sentinel_location_request_duration_seconds_bucket{le="0.005",location="fra"}',
        'sentinel_series_overflow_total{metric="sentinel_http_requests_total"} 0.0',
        'sentinel_unhandled_exceptions_total{exception_type="KeyError",location="fra",'
        'phase="request",route="/items/{id}"}',
        'sentinel_global_mutations_total{location="fra",route="/",target="os.environ"}',
        'sentinel_records_seen_total{location="fra",status_class="2xx"}',
        'sentinel_records_kept_total{location="fra",status_class="2xx"}',
        'sentinel_reports_dropped_total{reason="queue_full"}',
        'sentinel_internal_errors_total{component="sink"}',
        'sentinel_build_info{environment="production",sentinel_version=',
        'service="kv",version="1.2.3"}',
    ]:
        assert line in text, line


def test_exception_type_labels_are_bounded() -> None:
    """Dynamically created exception types cannot explode the label set."""
    metrics = Metrics(CollectorRegistry())
    labels = {metrics.exception_type_label(f"pkg.Error{i}") for i in range(1000)}
    assert len(labels) == MAX_EXCEPTION_TYPES + 1
    assert OTHER in labels


def test_metrics_are_shared_per_registry() -> None:
    """One registry gets one set of families, however often sentinel is installed."""
    registry = CollectorRegistry()
    assert metrics_for(registry) is metrics_for(registry)
    assert metrics_for(CollectorRegistry()) is not metrics_for(registry)


def test_random_traffic_keeps_series_bounded_and_memory_flat() -> None:
    """44,000 requests with random paths, methods and location headers: a bounded number of
    series, and no memory growth once every bounded value has been seen."""
    import asyncio
    import gc
    import random
    import string
    import tracemalloc

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from sentinel import Config, instrument
    from sentinel._runtime import Sentinel

    async def hello(request: Request) -> Response:
        return PlainTextResponse("hi")

    routes = [Route("/", hello), Route("/items/{item_id}", hello), Route("/a/b", hello)]
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "BREW", "PROPFIND", "get", "\x00X"]
    rng = random.Random(20261126)
    alphabet = string.printable + "\u00e9\u4e2d\x00\x7f"

    def random_location() -> bytes:
        size = rng.choice([1, 3, 8, 40, 300])
        return "".join(rng.choice(alphabet) for _ in range(size)).encode("utf-8", "replace")

    def random_path() -> str:
        return rng.choice(
            [
                f"/items/{rng.randrange(10**9)}",
                f"/{rng.randrange(10**9)}/{rng.random()}",
                "/",
                "/a/b",
                "/" + "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(40))),
            ]
        )

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        return None

    async def drive(app: object, count: int) -> None:
        for _ in range(count):
            path = random_path()
            scope = {
                "type": "http",
                "method": rng.choice(methods),
                "path": path,
                "raw_path": path.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"x-location", random_location())],
                "server": ("127.0.0.1", 80),
                "client": ("127.0.0.1", 1),
                "scheme": "http",
                "http_version": "1.1",
                "asgi": {"version": "3.0"},
            }
            await app(scope, receive, send)  # type: ignore[operator]

    def series() -> list[dict[str, str]]:
        return [
            sample.labels
            for family in captured.registry.collect()
            if family.name == "sentinel_http_requests"
            for sample in family.samples
            if sample.name == "sentinel_http_requests_total"
        ]

    growth: list[tuple[int, int]] = []  # (new series, bytes) per chunk of 8,000 requests

    async def run_chunks() -> None:
        await drive(app, 20_000)  # most label sets appear here (not traced: it is slow)
        tracemalloc.start()
        try:
            for _ in range(3):
                series_before = len(series())  # (collecting accounts for every request)
                sentinel.writer.flush()  # the bounded queue of records, written
                gc.collect()
                memory_before = tracemalloc.get_traced_memory()[0]
                await drive(app, 8_000)
                new_series = len(series()) - series_before
                sentinel.writer.flush()
                gc.collect()
                growth.append((new_series, tracemalloc.get_traced_memory()[0] - memory_before))
        finally:
            tracemalloc.stop()

    class Discard(io.StringIO):
        """Output that keeps nothing: the records themselves are not sentinel's memory."""

        def write(self, text: str) -> int:
            return len(text)

    config = Config(location="fra", location_header="x-location", metrics_port=0)
    sentinel = Sentinel(config, registry=CollectorRegistry(), stream=Discard())
    captured = sentinel.metrics  # read back through its registry below
    app = instrument(Starlette(routes=routes), sentinel=sentinel)
    asyncio.run(run_chunks())
    sentinel.close()
    label_sets = series()
    total = sum(
        captured.registry.get_sample_value("sentinel_http_requests_total", labels) or 0
        for labels in label_sets
    )
    locations = {labels["location"] for labels in label_sets}
    route_values = {labels["route"] for labels in label_sets}
    method_values = {labels["method"] for labels in label_sets}
    codes = {labels["code"] for labels in label_sets}
    # The stated bound: (64 first valid locations + "other" + the static one) x (3 templates
    # + the unmatched value) x (9 standard methods + OTHER) x the codes the app sends.
    assert total == 44_000
    assert len(locations) <= 66 and "other" in locations
    assert route_values <= {"/", "/items/{item_id}", "/a/b", "<unmatched>"}
    assert method_values <= STANDARD_METHODS_AND_OTHER
    assert len(label_sets) <= 66 * 4 * 10 * len(codes)
    # Memory follows the (bounded) series, not the requests: once most label sets exist,
    # 8,000 more requests cost no more than their few new series (~4.5 KiB each, a
    # counter child plus at most one histogram child).
    for new_series, grown in growth:
        assert grown <= new_series * 5 * 1024 + 64 * 1024, growth
    assert growth[-1][1] < 256 * 1024, growth


STANDARD_METHODS_AND_OTHER = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER"}
)


def test_client_that_went_away_is_counted_as_499() -> None:
    """A request whose client disconnected before any response is counted with code 499."""
    import httpx
    import pytest

    from sentinel import instrument
    from sentinel.testing import capture_reports, serve

    async def waits_for_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gives up without a response, as apps do for a gone client

    with capture_reports() as captured:
        app = instrument(
            waits_for_disconnect,
            sentinel=captured.sentinel,
            route_template=lambda scope: "/slow",
        )
        with serve(app, lifespan="off") as url:
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{url}/slow", timeout=0.3)
            deadline = time.monotonic() + 5
            while __import__("time").monotonic() < deadline:
                if captured.metric(
                    "sentinel_http_requests_total",
                    location="unknown",
                    route="/slow",
                    method="GET",
                    code="499",
                ):
                    break
                time.sleep(0.05)
        assert (
            captured.metric(
                "sentinel_http_requests_total",
                location="unknown",
                route="/slow",
                method="GET",
                code="499",
            )
            == 1
        )
        assert captured.reports == []


def test_histogram_buckets_are_configurable() -> None:
    """latency_buckets reaches the per-location histogram; the per-route one stays coarse."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, buckets=(0.1, 1.0))
    metrics.count_later(metrics.request_children("fra", "/", "GET", 200), 0.5)
    text = generate_latest(registry).decode()

    def bounds(family: str) -> set[str]:
        return {
            line.split('le="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith(f"{family}_bucket")
        }

    assert bounds("sentinel_location_request_duration_seconds") == {"0.1", "1.0", "+Inf"}
    assert bounds("sentinel_http_request_duration_seconds") == {
        "0.05",
        "0.25",
        "1.0",
        "5.0",
        "+Inf",
    }


def test_batched_requests_are_exact_at_every_collect() -> None:
    """Requests are applied in batches, yet any collect (from any thread) sees every one."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.batch > 1
    metrics.count_later(metrics.request_children("fra", "/", "GET", 200), 0.01)
    assert (
        registry.get_sample_value(
            "sentinel_http_requests_total",
            {"location": "fra", "route": "/", "method": "GET", "code": "200"},
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "sentinel_records_seen_total", {"location": "fra", "status_class": "2xx"}
        )
        == 1
    )

    total = 20_000
    done = threading.Event()

    def serve() -> None:
        for _ in range(total - 1):
            metrics.count_later(metrics.request_children("fra", "/", "GET", 200), 0.01)
        done.set()

    server = threading.Thread(target=serve)
    server.start()
    scrapes = 0
    while not done.is_set() and scrapes < 10_000:  # a scraper racing the requests
        generate_latest(registry)
        scrapes += 1
    server.join(timeout=60)
    labels = {"location": "fra", "route": "/", "method": "GET"}
    assert (
        registry.get_sample_value("sentinel_http_requests_total", {**labels, "code": "200"})
        == total
    )
    assert (
        registry.get_sample_value("sentinel_http_request_duration_seconds_count", labels) == total
    )
    assert (
        registry.get_sample_value(
            "sentinel_location_request_duration_seconds_bucket", {"location": "fra", "le": "0.01"}
        )
        == total
    )


def test_settle_soon_applies_at_the_loops_next_turn_once_for_every_request() -> None:
    """What a worker process uses (its files are read without a collect of its own): the
    requests that end in one loop turn are accounted and applied together at the next, by
    one flush; without a loop, at once."""
    metrics = Metrics(CollectorRegistry())
    children = metrics.request_children("fra", "/", "GET", 200)
    accounted: list[int] = []
    flushes = record_calls(metrics, "flush")

    def account(request: object, status: int, end: float, span: object) -> None:
        accounted.append(status)
        metrics.count_later(children, 0.01)

    async def one_turn() -> tuple[float, float]:
        for status in (200, 201, 202):
            metrics.settling.append((account, None, status, 0.0))
            metrics.settle_soon()
        before = children[0]._value.get()
        await asyncio.sleep(0)
        return before, children[0]._value.get()

    assert asyncio.run(one_turn()) == (0, 3)
    assert accounted == [200, 201, 202] and len(flushes) == 1
    metrics.settling.append((account, None, 200, 0.0))
    metrics.settle_soon()  # no running loop: at once
    assert children[0]._value.get() == 4


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 9.99, 10.0, 11.0, 1e9, 0.005] * 7,  # sorted, bisected
        [0.0051, 10.0, 0.005],  # fewer values than bounds: one bisection per value
        [0.001, 0.002, 0.003] * 20,  # all in the first bucket
        [10.5, 11.0, 1e9] * 20,  # all above the last bound
    ],
    ids=["many", "few", "first-bucket", "overflow-bucket"],
)
def test_batched_histogram_matches_observe_one_by_one(values: list[float]) -> None:
    """Applying a batch gives exactly the exposition that observing each value gives, at the
    bounds (a value equal to a bound is in that bound's bucket) and beyond the last."""
    from prometheus_client import Histogram

    from sentinel._metrics import observe_all

    batched, single = CollectorRegistry(), CollectorRegistry()
    buckets = (0.005, 0.01, 0.25, 2.5, 10.0)
    one = Histogram("h", "h", ("l",), buckets=buckets, registry=batched).labels("x")
    other = Histogram("h", "h", ("l",), buckets=buckets, registry=single).labels("x")
    observe_all(one, values)
    for value in values:
        other.observe(value)
    strip_created = [
        line for line in generate_latest(batched).decode().splitlines() if "_created" not in line
    ]
    expected = [
        line for line in generate_latest(single).decode().splitlines() if "_created" not in line
    ]
    assert strip_created == expected


def test_tenant_counts_sum_to_the_request_counter_at_every_scrape() -> None:
    """Requests counted from several threads while another scrapes: in every scrape, per
    status class, the tenants sum to sentinel_http_requests_total, with at most
    max_tenants + 1 tenant values."""
    import threading

    from prometheus_client import CollectorRegistry

    from sentinel._metrics import Metrics
    from sentinel._tenants import TenantTracker

    metrics = Metrics(CollectorRegistry())
    metrics.tenants = TenantTracker(5)
    stop = threading.Event()

    def serve(worker: int) -> None:
        for index in range(20_000):
            status = 503 if index % 7 == 0 else 200
            children = metrics.request_children("fra", "/", "GET", status)
            klass = "5xx" if status == 503 else "2xx"
            metrics.count_request(children, 0.001, f"t{worker}-{index % 40}", klass)
            if stop.is_set():
                return

    threads = [threading.Thread(target=serve, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    scrapes = 0
    try:
        while any(thread.is_alive() for thread in threads) and scrapes < 2000:
            requests: dict[str, float] = {}
            tenants: dict[str, float] = {}
            labels: dict[str, set[str]] = {}
            for family in metrics.registry.collect():
                for sample in family.samples:
                    if sample.name == "sentinel_http_requests_total":
                        klass = sample.labels["code"][0] + "xx"
                        requests[klass] = requests.get(klass, 0.0) + sample.value
                    elif sample.name == "sentinel_tenant_requests_total":
                        klass = sample.labels["status_class"]
                        tenants[klass] = tenants.get(klass, 0.0) + sample.value
                        labels.setdefault(klass, set()).add(sample.labels["tenant"])
            assert {k: v for k, v in tenants.items() if v} == requests
            assert all(len(names) <= 6 for names in labels.values())
            scrapes += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert scrapes > 1


def test_location_requests_sum_the_request_counter_over_route_and_method() -> None:
    """sentinel_location_requests_total{location, code} and sentinel_records_seen_total are
    the request counter summed when scraped; invalid codes count as 5xx records."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    served = [
        ("fra", "/", "GET", 200, 3),
        ("fra", "/items/{id}", "POST", 200, 2),
        ("fra", "/boom", "GET", 503, 4),
        ("sin", "/", "GET", 503, 1),
        ("sin", "/", "GET", INVALID_STATUS, 1),
    ]
    for location, route, method, status, count in served:
        for _ in range(count):
            metrics.count_later(metrics.request_children(location, route, method, status), 0.01)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("sentinel_location_requests_total", location="fra", code="200") == 5
    assert value("sentinel_location_requests_total", location="fra", code="503") == 4
    assert value("sentinel_location_requests_total", location="sin", code="503") == 1
    assert value("sentinel_location_requests_total", location="sin", code="invalid") == 1
    assert value("sentinel_records_seen_total", location="fra", status_class="2xx") == 5
    assert value("sentinel_records_seen_total", location="sin", status_class="5xx") == 2


def test_series_budget_folds_new_label_sets_and_keeps_sums_exact() -> None:
    """Over max_series series, new label sets count under route <other> and method other
    (location and code kept), in sentinel_series_overflow_total too; every sum stays exact, the fine
    per-location histogram counts every request, and no family has _created lines."""
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    registry = CollectorRegistry()
    metrics = Metrics(registry, max_series=14)
    served = 0
    for location in ("fra", "sin"):
        for route in range(8):
            for method, status in (("GET", 200), ("POST", 503)):
                for _ in range(3):
                    metrics.count_later(
                        metrics.request_children(location, f"/r{route}", method, status), 0.02
                    )
                    served += 1
    requests = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        if family.name == "sentinel_http_requests"
        for sample in family.samples
    }
    named = [labels for labels in requests if ("route", "<other>") not in labels]
    folded = {
        dict(labels)["location"] + dict(labels)["code"]: value
        for labels, value in requests.items()
        if labels not in named
    }
    assert len(named) == 14
    assert sum(requests.values()) == served == 96
    assert set(folded) == {"fra200", "fra503", "sin200", "sin503"}  # fra ran out at route 6
    assert {
        dict(labels)["method"] for labels in requests if dict(labels)["route"] == "<other>"
    } == {"other"}

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert value("sentinel_series_overflow_total", metric="sentinel_http_requests_total") == (
        served - 14 * 3
    )
    durations = [
        sample
        for family in registry.collect()
        if family.name == "sentinel_http_request_duration_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    ]
    # A duration label set is 7 series (5 buckets, count, sum): 2 fit in 14, + a fold each.
    assert len(durations) == 2 + 2
    assert sum(sample.value for sample in durations) == served
    for location in ("fra", "sin"):
        assert value("sentinel_location_request_duration_seconds_count", location=location) == 48
        assert (
            value(
                "sentinel_location_request_duration_seconds_bucket", location=location, le="0.025"
            )
            == 48
        )
    assert value("sentinel_location_requests_total", location="sin", code="503") == 24
    for text in (generate_latest(registry).decode(), openmetrics(registry).decode()):
        assert "_created" not in text


def test_exceptions_and_mutations_fold_their_route_over_the_budget() -> None:
    """The exception and mutation counters fold route (keeping location, exception type,
    phase and target) once they have max_series label sets, and count every occurrence."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_series=3)
    for route in range(6):
        metrics.count_exception("fra", f"/r{route}", "KeyError", "request")
        metrics.count_handled("fra", f"/r{route}", "ValueError")
        metrics.global_mutations.labels("fra", f"/r{route}", "os.environ").inc()

    def samples(name: str) -> dict[str, float]:
        return {
            sample.labels["route"]: sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == name
        }

    for name in (
        "sentinel_unhandled_exceptions_total",
        "sentinel_handled_exceptions_total",
        "sentinel_global_mutations_total",
    ):
        assert samples(name) == {"/r0": 1, "/r1": 1, "/r2": 1, "<other>": 3}, name
        overflow = registry.get_sample_value("sentinel_series_overflow_total", {"metric": name})
        assert overflow == 3, name
    assert (
        registry.get_sample_value(
            "sentinel_unhandled_exceptions_total",
            {
                "location": "fra",
                "route": "<other>",
                "exception_type": "KeyError",
                "phase": "request",
            },
        )
        == 3
    )


def test_reaching_the_budget_is_announced_once_per_family() -> None:
    """The first fold of each family writes one warning naming the family and the budget."""
    import json

    from sentinel import Config
    from sentinel._runtime import Sentinel

    stream = io.StringIO()
    config = Config(location="fra", metrics_port=0, max_series=2, log_format="json")
    sentinel = Sentinel(config, registry=CollectorRegistry(), stream=stream)
    try:
        metrics = sentinel.metrics
        for route in range(5):
            metrics.count_later(metrics.request_children("fra", f"/r{route}", "GET", 200), 0.01)
            metrics.count_exception("fra", f"/r{route}", "KeyError", "request")
        metrics.flush()
    finally:
        sentinel.close()
    warnings = [
        record
        for record in map(json.loads, stream.getvalue().splitlines())
        if record["event"] == "series_budget_reached"
    ]
    assert sorted(record["metric"] for record in warnings) == [
        "sentinel_http_request_duration_seconds",
        "sentinel_http_requests_total",
        "sentinel_unhandled_exceptions_total",
    ]
    assert {record["max_series"] for record in warnings} == {2}
    assert all(record["level"] == "warning" for record in warnings)


class _PipeNobodyReads(io.StringIO):
    """A stderr whose reader stalled: a write blocks until ``unblock`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()

    def write(self, text: str) -> int:
        self.unblock.wait(30)
        return super().write(text)


def test_reaching_the_budget_on_a_stalled_stream_never_blocks_the_request() -> None:
    """The budget is reached on the request path (the event loop's thread): its warning is
    queued for the writer, so a stream that takes nothing (a stalled log shipper) cannot
    stall the request, and the warning is written once the stream moves again."""
    import json

    from sentinel import Config
    from sentinel._runtime import Sentinel

    stream = _PipeNobodyReads()
    config = Config(location="fra", metrics_port=0, max_series=1, log_format="json")
    sentinel = Sentinel(config, registry=CollectorRegistry(), stream=stream)
    try:

        def overflow() -> None:
            for route in range(3):
                sentinel.metrics.count_exception("fra", f"/r{route}", "KeyError", "request")

        request = threading.Thread(target=overflow, daemon=True)
        request.start()
        request.join(2.0)
        assert not request.is_alive()
    finally:
        stream.unblock.set()
        sentinel.close()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["series_budget_reached"]


def test_requests_being_settled_still_wait_so_a_request_ending_meanwhile_queues_behind() -> None:
    """While another thread (the writer, a scrape) accounts for the waiting requests, they
    stay in ``settling``: a request of the same key ending meanwhile on the loop queues
    behind them instead of being decided at once. Made to happen: the settle is held inside
    the accounting of a tenant's request R1 while a plain request R2 ends. R1 ended first,
    so R1 is the key's first occurrence (``new_key``) and R2 comes after it."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sentinel import instrument, testing

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        return None

    def scope(tenant: bytes | None) -> dict[str, object]:
        headers = [(b"x-tenant", tenant)] if tenant else []
        return {
            "type": "http",
            "method": "GET",
            "path": "/k",
            "query_string": b"",
            "headers": headers,
        }

    with testing.capture_reports(tenant_header="x-tenant") as captured:
        app = instrument(Starlette(routes=[Route("/k", ok)]), sentinel=captured.sentinel)
        metrics, accounting = captured.sentinel.metrics, app._accounting
        inside, go = threading.Event(), threading.Event()
        account_batch = accounting.account_batch

        def held(run: object) -> None:
            inside.set()
            go.wait(10)
            account_batch(run)

        accounting.account_batch = held
        asyncio.run(app(scope(b"acme"), receive, send))  # R1 waits for its batch
        settler = threading.Thread(target=metrics.settle)
        settler.start()
        try:
            assert inside.wait(10)
            assert len(metrics.settling) == 1  # R1, being accounted for, still waits
            asyncio.run(app(scope(None), receive, send))  # R2
            assert len(metrics.settling) == 2
        finally:
            go.set()
            settler.join(10)
        captured.sentinel.flush()
        kept = [(record.get("tenant"), record["reason"]) for record in captured.events("request")]
    assert kept[0] == ("acme", "new_key"), kept
    assert len(kept) == 2 and kept[1][0] is None, kept


def test_a_settle_entered_again_from_its_own_accounting_counts_each_request_once() -> None:
    """A sampling hook that collects the registry (a test's ``get_sample_value`` in a hook,
    say) re-enters the settle that runs it, on the same thread: the requests still waiting
    are the ones being accounted for, and are counted once."""
    from sentinel import instrument, testing

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        return None

    def served() -> float:
        return sum(
            sample.value
            for family in captured.registry.collect()
            for sample in family.samples
            if sample.name == "sentinel_http_requests_total"
        )

    collected: list[float] = []

    def hook(record: object) -> None:
        collected.append(served())

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    with testing.capture_reports() as captured:
        wrapped = instrument(app, sentinel=captured.sentinel, sampling_hook=hook)

        async def serve(count: int) -> None:
            for _ in range(count):
                await wrapped(dict(scope), receive, send)

        asyncio.run(serve(100))
        captured.sentinel.flush()
        assert served() == 100
    assert len(collected) == 100


def test_two_sentinels_on_one_registry_export_every_tenant_rejection() -> None:
    """Two apps instrumented on one registry with different max_tenants: building the second
    (which replaces the registry's tenant tracker) does not lower
    sentinel_tenants_rejected_total, and the first app's later rejections are exported too,
    as are its requests in the tenant sums."""
    import sentinel

    registry = CollectorRegistry()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(wrapped: object, tenant: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/",
            "raw_path": b"/",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"x-tenant", tenant)],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            pass

        await wrapped(scope, receive, send)  # type: ignore[operator]

    def scrape() -> tuple[float, float, float]:
        values = {"rejected": 0.0, "tenants": 0.0, "requests": 0.0}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "sentinel_tenants_rejected_total":
                    if sample.labels["reason"] == "bad_character":
                        values["rejected"] += sample.value
                elif sample.name == "sentinel_tenant_requests_total":
                    values["tenants"] += sample.value
                elif sample.name == "sentinel_http_requests_total":
                    values["requests"] += sample.value
        return values["rejected"], values["tenants"], values["requests"]

    options = {"tenant_header": "x-tenant", "metrics_port": 0, "location": "here"}
    first = sentinel.instrument(app, stream=io.StringIO(), registry=registry, **options)
    asyncio.run(call(first, b"bad value"))
    asyncio.run(call(first, b"acme"))
    assert scrape() == (1, 2, 2)
    second = sentinel.instrument(
        app, stream=io.StringIO(), registry=registry, max_tenants=10, **options
    )
    assert scrape() == (1, 2, 2)
    asyncio.run(call(first, b"bad value 2"))
    asyncio.run(call(second, b"bad value 3"))
    asyncio.run(call(first, b"acme"))
    assert scrape() == (3, 5, 5)


def _run_workers(script: str, directory: Path, name: str, count: int = 4) -> list[Any]:
    """Run ``script`` in ``count`` processes at once, in multiprocess mode on ``directory``,
    each given ``name`` with its number; what each printed, as JSON."""
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, name.format(k)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(count)
    ]
    answers = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        answers.append(json.loads(out))
    return answers


SHARING_BUDGET_WORKER = """
import json
import sys

from prometheus_client import CollectorRegistry

from sentinel._metrics import Metrics

metrics = Metrics(CollectorRegistry(), max_series=12)
own = sys.argv[1]
folded = {}
for n in range(40):
    for route in (f"/{own}{n}", f"/common{n % 10}"):
        children = metrics.request_children("fra", route, "GET", 200)
        metrics.count_later(children, 0.01)
        folded[route] = children[4] is not None
        metrics.count_exception("fra", route, "KeyError", "request")
metrics.flush()
print(json.dumps(folded))
"""


def test_workers_sharing_a_directory_spend_one_budget_together(tmp_path: Path) -> None:
    """Four worker processes (prometheus_client in multiprocess mode) counting their own
    new label sets and common ones at once: together they name at most max_series label
    sets of each family, as one process would, and a label set any of them names is named
    by every one that meets it (never folded by some), so a merged series counts all of
    its requests; the label sets they share are in one file per family in the directory."""
    answers = _run_workers(SHARING_BUDGET_WORKER, tmp_path, "w{}-")
    named = {route for each in answers for route, folded in each.items() if not folded}
    assert len(named) == 12
    for route in {route for each in answers for route in each}:
        assert len({each[route] for each in answers if route in each}) == 1, route
    shared = sorted(path.name for path in tmp_path.glob("sentinel_admitted_*"))
    assert shared == [
        "sentinel_admitted_exception_type.jsonl",
        "sentinel_admitted_sentinel_http_request_duration_seconds.jsonl",
        "sentinel_admitted_sentinel_http_requests_total.jsonl",
        "sentinel_admitted_sentinel_unhandled_exceptions_total.jsonl",
    ]
    lines = (tmp_path / shared[2]).read_text().splitlines()
    assert lines[0] == '{"limit": 12}'
    assert {json.loads(line)[1] for line in lines[1:]} == named


SHARING_TYPES_WORKER = """
import json
import sys

from prometheus_client import CollectorRegistry

from sentinel import _metrics

_metrics.MAX_EXCEPTION_TYPES = 6
metrics = _metrics.Metrics(CollectorRegistry())
own = sys.argv[1]
print(json.dumps({
    name: metrics.exception_type_label(name)
    for n in range(20)
    for name in (f"{own}Error{n}", f"Common{n % 4}")
}))
"""


def test_workers_sharing_a_directory_name_the_same_exception_types(tmp_path: Path) -> None:
    """Four worker processes meeting their own exception types and common ones at once:
    together they name at most MAX_EXCEPTION_TYPES types, as one process would, and a type
    any of them names is named by every one that meets it (never ``other`` in some), so its
    merged count is every exception of that type."""
    answers = _run_workers(SHARING_TYPES_WORKER, tmp_path, "w{}")
    named = {label for each in answers for label in each.values() if label != OTHER}
    assert len(named) == 6
    for name in {name for each in answers for name in each}:
        assert len({each[name] for each in answers if name in each}) == 1, name
    lines = (tmp_path / "sentinel_admitted_exception_type.jsonl").read_text().splitlines()
    assert lines[0] == '{"limit": 6}'
    assert {json.loads(line) for line in lines[1:]} == named


def test_a_registrys_metrics_go_with_the_registry() -> None:
    """Each registry's Metrics was kept in a module-level dict for the life of the process,
    and through its callbacks the sentinel that used it: a test suite making a registry per
    test (every capture_reports block) grew without bound. They live as long as the registry
    does, and are shared while it lives."""
    import gc
    import weakref

    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    assert metrics_for(registry) is metrics
    gone = weakref.ref(metrics)
    del metrics, registry
    gc.collect()
    assert gone() is None
