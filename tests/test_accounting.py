"""Request accounting: every request counted exactly, records sampled and shaped."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from helpers import request_context

from sentinel._accounting import RequestAccounting, record_fields
from sentinel._context import Annotations
from sentinel._metrics import INVALID_STATUS
from sentinel._sampling import KEEP_UNSAMPLED
from sentinel.testing import Captured


def _accounting(captured: Captured) -> RequestAccounting:
    """A RequestAccounting over the captured sentinel's parts, as a middleware builds one."""
    sentinel = captured.sentinel
    return RequestAccounting(
        sentinel.config,
        sentinel.metrics,
        sentinel.sampler,
        sentinel.writer,
        sentinel.emitter,
        sentinel.scrubber,
    )


def test_requests_finished_in_batches_are_counted_exactly_at_every_collect(
    captured: Captured,
) -> None:
    """finish() is one append on the request path; a collect settles every waiting request,
    so the count is exact whenever it is read."""
    accounting = _accounting(captured)
    for status in (200, 200, 503):
        accounting.finish(request_context(), status)
    labels = {"location": "fra", "route": "/", "method": "GET"}
    assert captured.metric("sentinel_http_requests_total", code="200", **labels) == 2
    assert captured.metric("sentinel_http_requests_total", code="503", **labels) == 1


def test_a_record_says_what_it_stands_for_and_an_invalid_status_by_name() -> None:
    """Record fields: the route template, the weight of the record, and "invalid" for a
    status that was not an HTTP status."""
    fields = record_fields(request_context(), 503, 0.0125, None, KEEP_UNSAMPLED)
    assert fields["status"] == 503
    assert fields["duration_ms"] == 12.5
    assert fields["route"] == "/"
    assert fields["sample_rate"] == KEEP_UNSAMPLED.sample_rate
    assert (
        record_fields(request_context(), INVALID_STATUS, 0, None, KEEP_UNSAMPLED)["status"]
        == "invalid"
    )


def test_a_record_carries_its_requests_tags_and_contexts_only_when_set() -> None:
    """Tags and contexts set in the request are record fields; a request without them has
    no such fields at all."""
    plain = record_fields(request_context(), 200, 0.001, None, KEEP_UNSAMPLED)
    assert not {"tags", "contexts", "scope_truncated"} & set(plain)
    tagged = request_context()
    tagged.annotations = Annotations()
    tagged.annotations.set_tag("customer", "acme")
    tagged.annotations.set_context("order", {"id": 7})
    fields = record_fields(tagged, 200, 0.001, None, KEEP_UNSAMPLED)
    assert (fields["tags"], fields["contexts"]) == ({"customer": "acme"}, {"order": {"id": 7}})


def _kept_records(captured: Captured) -> list[tuple[object, ...]]:
    """What says which request each kept record is, in the order they were written."""
    return [
        (r["route"], r["status"], r["reason"], r["sample_rate"], r["duration_ms"])
        for r in captured.events("request")
    ]


def _batch(
    accounting: RequestAccounting, routes: list[str], statuses: list[int], special: bool
) -> list[tuple[Any, Any, int, float]]:
    """300 finished requests of the middleware's kind, in the order they ended; with
    ``special``, one of a tenant and one forced (a keep header)."""
    from sentinel._middleware import TenantRequest

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    items = []
    for index in range(300):
        route, status = routes[index % len(routes)], statuses[index % len(statuses)]
        request = TenantRequest(scope, "GET", "fra", index / 1000)
        request.route = route
        request.tenant = "acme" if special and index == 41 else None
        if special and index == 52:  # the tenth request of /b 200: the sampler drops it
            request.forced = "keep_header"
        # Durations differ, so a record says which request it is.
        items.append((accounting.account, request, status, index / 1000 + 0.25 + index % 7 / 1e4))
    return items


@pytest.mark.parametrize(
    ("routes", "statuses", "special"),
    [
        (["/a", "/b", "/c"], [200, 200, 503, 404], True),  # one by one where a rule applies
        (["/a", "/b", "/c"], [200, 200, 503, 404], False),  # grouped in C by label set
        (["/a"], [200], False),  # one label set: the whole batch at once
    ],
    ids=["tenant-and-forced", "label-sets", "one-label-set"],
)
def test_a_batch_is_accounted_as_its_requests_one_by_one(
    routes: list[str], statuses: list[int], special: bool
) -> None:
    """account_batch (what a settle does with a middleware's requests) counts, samples and
    keeps records exactly as account() per request does, a forced request and a tenant's
    included, within one sampling window (a batch spans milliseconds)."""
    from sentinel.testing import capture_reports

    def outcome(batched: bool) -> tuple[dict[tuple[str, str], float], list[tuple[object, ...]]]:
        with capture_reports() as captured:
            sentinel = captured.sentinel
            accounting = _accounting(captured)
            items = _batch(accounting, routes, statuses, special)
            if batched:
                accounting.account_batch(items)
            else:
                for _, request, status, end in items:
                    accounting.account(request, status, end)
            sentinel.flush()
            counts = {
                (route, code): captured.metric(
                    "sentinel_http_requests_total",
                    location="fra",
                    route=route,
                    method="GET",
                    code=code,
                )
                for route in routes
                for code in ("200", "503", "404")
            }
            kept = _kept_records(captured)
            return counts, kept

    counts, kept = outcome(batched=True)
    one_by_one_counts, one_by_one_kept = outcome(batched=False)
    assert counts == one_by_one_counts
    assert sorted(kept) == sorted(one_by_one_kept)
    # Within a label set, records are kept in the order the requests ended.
    for label_set in {k[:2] for k in kept}:
        assert [k for k in kept if k[:2] == label_set] == [
            k for k in one_by_one_kept if k[:2] == label_set
        ]
    assert sum(counts.values()) == 300
    if special:
        assert ("/b", 200, "keep_header", 1.0, 250.3) in kept
    assert {reason for *_, reason, _, _ in kept} >= {"new_key", "provisional"}


def test_only_a_batch_with_no_tenant_rule_or_pending_route_takes_the_grouped_way() -> None:
    """The batch grouped in C is only for requests with nothing to decide one by one: a
    tenant, a forced keep, or a route not resolved yet send the whole batch the general
    way, before anything of it is counted."""
    from sentinel.testing import capture_reports

    with capture_reports() as captured:
        accounting = _accounting(captured)
        assert accounting._account_plain_batch(_batch(accounting, ["/a"], [200], special=False))
        assert captured.sentinel.metrics.pending  # grouped: counted with the next apply
    for case in ("special", "unresolved"):
        with capture_reports() as captured:
            accounting = _accounting(captured)
            items = _batch(accounting, ["/a", "/b"], [200], special=case == "special")
            if case == "unresolved":
                items[-1][1]._route = None  # the last request of a batch, not released yet
            assert not accounting._account_plain_batch(items)
            assert not captured.sentinel.metrics.pending
            captured.sentinel.flush()
            assert not captured.metric("sentinel_http_requests_total", route="/a")


def test_a_tracked_tenants_first_5xx_is_kept_where_the_sampler_drops(captured: Captured) -> None:
    """Once a key's 5xx are sampled, a tracked tenant's first 5xx on it is still kept in full
    (reason ``tenant_first_error``, with its tenant); its second is sampled like the rest."""
    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)

    def failed(tenant: str, end: float) -> str:
        scope = {"type": "http", "method": "GET", "path": "/boom", "headers": []}
        request = TenantRequest(scope, "GET", "fra", end - 0.001)
        request.route, request.tenant = "/boom", tenant
        return accounting.account(request, 500, end).reason

    for index in range(200):  # a storm of 250 5xx/s: the key gets a rate
        failed("bigcorp", index / 250)
    later = [failed("bigcorp", 1.0 + index / 250) for index in range(200)]
    assert later.count("sampled") < 50 and "sampled_out" in later, "the key's 5xx are sampled"
    moment = 1.8
    for _ in range(100):  # to just after a sampled record: the next is the sampler's to drop
        moment += 0.004
        if failed("bigcorp", moment) == "sampled":
            break
    else:
        pytest.fail("no bigcorp 5xx was sampled in 100 requests")
    assert failed("acme", moment + 0.001) == "tenant_first_error"
    assert failed("acme", moment + 0.002) in ("sampled_out", "sampled")
    kept = [r for r in captured.records if r.get("tenant") == "acme"]
    assert [(r["reason"], r["status"], r["sample_rate"]) for r in kept][:1] == [
        ("tenant_first_error", 500, 1.0)
    ]


@pytest.mark.parametrize(
    ("routes", "statuses"),
    [(["/a"], [200]), (["/a", "/b", "/c"], [200, 200, 503, 404])],
    ids=["one-label-set", "many"],
)
def test_a_request_accounted_at_its_end_is_accounted_as_account_does(
    routes: list[str], statuses: list[int]
) -> None:
    """account_now (the request path's own, for a request with no tenant or rule) counts,
    times, samples and keeps records exactly as account() does, request by request."""
    from sentinel.testing import capture_reports

    def outcome(now: bool) -> tuple[dict[tuple[str, ...], float], list[tuple[object, ...]]]:
        with capture_reports() as captured:
            accounting = _accounting(captured)
            assert accounting.account_now is not None
            for _, request, status, end in _batch(accounting, routes, statuses, False):
                if now:
                    accounting.account_now(request, status, end)
                else:
                    accounting.account(request, status, end)
            captured.sentinel.flush()
            found: dict[tuple[str, ...], float] = {}
            for route in routes:
                labels = {"location": "fra", "route": route, "method": "GET"}
                for code in ("200", "503", "404"):
                    found["requests", route, code] = captured.metric(
                        "sentinel_http_requests_total", code=code, **labels
                    )
                for suffix in ("count", "sum"):
                    found["duration", route, suffix] = captured.metric(
                        f"sentinel_http_request_duration_seconds_{suffix}", **labels
                    )
            for klass in ("2xx", "4xx", "5xx"):
                found["tenant", "other", klass] = captured.metric(
                    "sentinel_tenant_requests_total", tenant="other", status_class=klass
                )
            kept = _kept_records(captured)
            return found, kept

    found, kept = outcome(now=True)
    one_by_one, one_by_one_kept = outcome(now=False)
    assert found == pytest.approx(one_by_one)  # sums added in other groupings: float rounding
    assert kept == one_by_one_kept
    assert sum(v for k, v in found.items() if k[0] == "requests") == 300
    assert sum(v for k, v in found.items() if k[0] == "tenant") == 300


def test_requests_accounted_at_their_end_are_exact_while_another_thread_applies(
    captured: Captured,
) -> None:
    """The loop appends each duration while a collect (another thread) takes what waits:
    no request is lost or counted twice, and nothing waits once both are done."""
    import threading

    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)
    assert accounting.account_now is not None
    metrics = captured.sentinel.metrics
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    done = threading.Event()
    applies = [0]

    def collect() -> None:
        while not done.is_set():
            metrics.apply()
            applies[0] += 1

    collector = threading.Thread(target=collect)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: the race is there to be lost
    collector.start()
    try:
        for index in range(30_000):
            request = TenantRequest(scope, "GET", "fra", 0.0)
            request.route, request.tenant = f"/r{index % 3}", None
            accounting.account_now(request, 200, 0.001)
    finally:
        done.set()
        collector.join()
        sys.setswitchinterval(interval)
    metrics.apply()
    assert applies[0] > 10
    counted = [
        captured.metric(
            "sentinel_http_requests_total", location="fra", route=f"/r{i}", method="GET", code="200"
        )
        for i in range(3)
    ]
    assert counted == [10_000] * 3
    assert all(not live.durations for live in metrics.live.values())


def test_an_apply_goes_through_the_label_sets_that_wait_only(captured: Captured) -> None:
    """However many label sets exist, an apply visits only those with durations waiting
    (in a worker process there is one apply per turn of the event loop)."""
    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)
    assert accounting.account_now is not None
    metrics = captured.sentinel.metrics
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}

    def serve(route: str) -> None:
        request = TenantRequest(scope, "GET", "fra", 0.0)
        request.route, request.tenant = route, None
        accounting.account_now(request, 200, 0.001)

    for index in range(500):
        serve(f"/r{index}")
    assert len(metrics.ready) == 500
    metrics.apply()
    assert (len(metrics.live), len(metrics.ready)) == (500, 0)
    serve("/r7")
    serve("/r7")
    assert len(metrics.ready) == 1


def test_a_duration_appended_while_an_apply_takes_the_list_waits_for_the_next(
    captured: Captured,
) -> None:
    """The interleaving the threaded test can only hope to hit, made to happen: the loop
    appends after an apply has read how many durations wait and before it removes them. The
    apply leaves that one in the list and the label set ready, and the next counts it."""
    metrics = captured.sentinel.metrics
    live = metrics.durations_for(("fra", "/", "GET", 200))
    assert live is not None

    class AppendedMeanwhile(list):  # type: ignore[type-arg]
        reads = 0

        def __len__(self) -> int:
            AppendedMeanwhile.reads += 1
            length = super().__len__()
            if AppendedMeanwhile.reads == 1:
                self.append(0.002)  # the loop's append, right after the apply's first read
            return length

    waiting = live.durations = AppendedMeanwhile([0.001])
    live.queued = True
    metrics.ready.append(live)
    labels = {"location": "fra", "route": "/", "method": "GET", "code": "200"}
    metrics.apply()
    assert list(waiting) == [0.002] and len(metrics.ready) == 1  # left for the next apply
    assert captured.metric("sentinel_http_requests_total", **labels) == 2  # a collect's
    assert not waiting and not metrics.ready


def test_two_threads_counting_one_label_set_at_once_lose_nothing(captured: Captured) -> None:
    """Two event loops in two threads serving one app (granian's threads, say) append to
    the same label set's list: the second append can come between the first's append and
    its look at whether the label set is ready. Made to happen here: thread B's whole
    request runs right after thread A's append. Every request is counted at the next
    collect, then and ever after."""
    from sentinel._accounting import _LabelSet
    from sentinel._metrics import LiveLabelSet
    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)
    assert accounting.account_now is not None
    metrics = captured.sentinel.metrics
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}

    def serve() -> None:
        request = TenantRequest(scope, "GET", "fra", 0.0)
        request.route, request.tenant = "/", None
        accounting.account_now(request, 200, 0.001)

    class ThreadBRunsAfterTheAppend(list):  # type: ignore[type-arg]
        interleaved = False

        def append(self, duration: float) -> None:
            super().append(duration)
            if not ThreadBRunsAfterTheAppend.interleaved:
                ThreadBRunsAfterTheAppend.interleaved = True
                serve()

    key = ("fra", "/", "GET", 200)
    serve()
    metrics.apply()  # the label set exists, nothing waits, not ready
    live = metrics.live[key]
    assert isinstance(live, LiveLabelSet) and not live.queued and not metrics.ready
    live.durations = ThreadBRunsAfterTheAppend()
    cached = accounting._label_sets[key]
    accounting._label_sets[key] = _LabelSet(live, cached.cursor)
    serve()  # thread A, with thread B inside its append
    labels = {"location": "fra", "route": "/", "method": "GET", "code": "200"}
    assert captured.metric("sentinel_http_requests_total", **labels) == 3
    for _ in range(10):
        serve()
    assert captured.metric("sentinel_http_requests_total", **labels) == 13
    assert not live.durations


def test_a_request_whose_route_cannot_be_a_label_costs_only_itself(captured: Captured) -> None:
    """A route_template that gives something unhashable (a list) for one request of a
    batch: that request is counted as an internal error, the others of the batch are
    counted as usual."""
    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    for index in range(10):
        request = TenantRequest(scope, "GET", "fra", 0.0)
        request.route = ["/bad"] if index == 5 else "/ok"  # type: ignore[assignment]
        request.tenant = "acme"
        accounting.finish(request, 200)
    captured.sentinel.flush()
    labels = {"location": "fra", "route": "/ok", "method": "GET", "code": "200"}
    assert captured.metric("sentinel_http_requests_total", **labels) == 9
    assert captured.metric("sentinel_internal_errors_total", component="metrics") == 1


def test_a_forced_keep_says_why_even_when_the_sampler_would_have_kept_it(
    captured: Captured,
) -> None:
    """A request kept for a reason of its own (a keep header, a sampled parent) carries that
    reason although the sampler would have kept it anyway (the first requests of a key, a
    sampled one): the Collector's tail sampling keeps traces by it, and a 'provisional' or
    'sampled' one may be dropped there. It stands for itself (sample_rate 1), its weight
    given back for the next record kept by rate to carry."""
    from sentinel._middleware import TenantRequest

    accounting = _accounting(captured)
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    for index in range(200):
        request = TenantRequest(scope, "GET", "fra", index / 1000)
        request.route = "/orders"
        request.tenant = None
        if index % 10 == 3:
            request.forced = "parent_sampled"
        accounting.account(request, 200, index / 1000 + 0.01)
    captured.flush()
    records = captured.events("request")
    forced = [r for r in records if r["reason"] == "parent_sampled"]
    assert len(forced) == 20
    assert {r["sample_rate"] for r in forced} == {1.0}
    # The fourth request, kept by the sampler too (a new key's first few are), carried 1.
    others = [(r["reason"], r["sample_rate"]) for r in records if r not in forced]
    assert others[:3] == [("new_key", 1.0), ("provisional", 1.0), ("provisional", 1.0)]
