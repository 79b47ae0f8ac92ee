"""Metric families: fixed names and labels, bounded label values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sentinel._metrics import MAX_EXCEPTION_TYPES, OTHER, Metrics, bounded_method, metrics_for


def test_every_product_metric_is_registered_with_its_labels() -> None:
    """The names and label sets PRODUCT.md fixes are the ones exposed."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.count_request("fra", "/items/{id}", "GET", 200, 0.01)
    metrics.count_exception("fra", "/items/{id}", "KeyError", "request")
    metrics.global_mutations.labels("fra", "/", "os.environ").inc()
    metrics.records_seen.labels("fra", "2xx").inc()
    metrics.records_kept.labels("fra", "2xx").inc()
    metrics.dropped("queue_full")
    metrics.internal_error("sink")
    metrics.set_build_info("kv")
    text = generate_latest(registry).decode()
    for line in [
        'sentinel_http_requests_total{code="200",location="fra",method="GET",route="/items/{id}"}',
        'sentinel_http_request_duration_seconds_bucket{le="0.005",location="fra",method="GET"',
        'sentinel_unhandled_exceptions_total{exception_type="KeyError",location="fra",'
        'phase="request",route="/items/{id}"}',
        'sentinel_global_mutations_total{location="fra",route="/",target="os.environ"}',
        'sentinel_records_seen_total{location="fra",status_class="2xx"}',
        'sentinel_records_kept_total{location="fra",status_class="2xx"}',
        'sentinel_reports_dropped_total{reason="queue_full"}',
        'sentinel_internal_errors_total{component="sink"}',
        'sentinel_build_info{service="kv",version=',
    ]:
        assert line in text, line


def test_methods_outside_the_standard_set_become_other() -> None:
    """Method label values are bounded."""
    assert bounded_method("GET") == "GET"
    assert bounded_method("PROPFIND") == "OTHER"
    assert bounded_method("get") == "OTHER"


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
