"""Request accounting: every request counted exactly, records sampled and shaped."""

from __future__ import annotations

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
            kept = [
                (r["route"], r["status"], r["reason"], r["sample_rate"], r["duration_ms"])
                for r in captured.events("request")
            ]
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
