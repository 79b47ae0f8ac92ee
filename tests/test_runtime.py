"""The process's sentinel: install() is idempotent and the current one receives reports."""

from __future__ import annotations

import io

import pytest
from helpers import request_context
from prometheus_client import CollectorRegistry

import sentinel
from sentinel import Config, _runtime
from sentinel._context import current_request


def test_install_is_idempotent_for_the_same_setup() -> None:
    """Installing the same configuration twice returns the same sentinel."""
    previous = _runtime.current()
    registry = CollectorRegistry()
    stream = io.StringIO()
    try:
        first = sentinel.install(
            Config(service="svc", metrics_port=0), registry=registry, stream=stream
        )
        again = sentinel.install(
            Config(service="svc", metrics_port=0), registry=registry, stream=stream
        )
        other = sentinel.install(
            Config(service="other", metrics_port=0), registry=registry, stream=stream
        )
        assert again is first
        assert other is not first
        assert sentinel.current() is other
    finally:
        _runtime.set_current(previous)


def test_build_info_names_service_release_sentinel_version_and_environment(
    clean_environ: None,
) -> None:
    """sentinel_build_info is 1 with the service, the app's release as ``version`` (from
    SENTINEL_VERSION or service.version), sentinel's own version as ``sentinel_version``
    and the environment (SENTINEL_ENVIRONMENT or deployment.environment): the labels the
    release regression alert and the rollout gate join on."""
    registry = CollectorRegistry()
    _runtime.Sentinel(Config(service="kv"), registry=registry)
    default = {"service": "kv", "version": "unknown", "environment": "unknown"}
    labels = {**default, "sentinel_version": sentinel.__version__}
    assert registry.get_sample_value("sentinel_build_info", labels) == 1

    environ = {
        "OTEL_RESOURCE_ATTRIBUTES": "service.version=2.4.1,deployment.environment=staging",
    }
    config = Config.from_env(environ, service_fallback="kv")
    registry = CollectorRegistry()
    _runtime.Sentinel(config, registry=registry)
    labels = {**labels, "version": "2.4.1", "environment": "staging"}
    assert registry.get_sample_value("sentinel_build_info", labels) == 1
    config = Config.from_env(
        {**environ, "SENTINEL_VERSION": "2.5.0", "SENTINEL_ENVIRONMENT": "production"},
        service_fallback="kv",
    )
    assert (config.version, config.environment) == ("2.5.0", "production")


def test_request_id_is_generated_once_and_lazily() -> None:
    """A request without a trusted id gets one random id, the same on every read."""
    request = request_context()
    assert request._request_id is None
    first = request.request_id
    assert first == request.request_id and len(first) == 32
    assert current_request.get() is None


def test_install_from_async_code_hooks_the_running_loop() -> None:
    """install() called inside a running loop hooks it: an unawaited task is reported."""
    import asyncio

    from sentinel.testing import capture_reports

    async def main(captured_sentinel: _runtime.Sentinel) -> None:
        # A loop the middleware never saw: only install() can have hooked it.
        again = sentinel.install(
            captured_sentinel.config,
            registry=captured_sentinel.registry,
            stream=captured_sentinel.stream,
            sinks=captured_sentinel.sinks,
        )
        assert again is captured_sentinel

        async def fails() -> None:
            raise LookupError("forgotten task")

        task = asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0.2)
        assert task.done()

    with capture_reports(task_grace_seconds=0.05) as captured:
        asyncio.run(main(captured.sentinel))
        [report] = captured.reports
    assert report["phase"] == "task"
    assert report["exception_type"] == "LookupError"


def test_an_exporter_that_cannot_be_built_costs_the_traces_not_the_app(
    clean_environ: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTel variables that make the OTLP exporter itself fail (a bad gRPC timeout) turn
    traces off with a warning and a count; the app is wrapped and served all the same."""
    import os

    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    for name, value in {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "not-a-number",
    }.items():
        monkeypatch.setitem(os.environ, name, value)
    stream = io.StringIO()
    registry = CollectorRegistry()
    app = sentinel.instrument(Starlette(), registry=registry, stream=stream, metrics_port=0)
    assert TestClient(app).get("/").status_code == 404
    assert app.sentinel.tracing == (None, None)
    failed = registry.get_sample_value("sentinel_internal_errors_total", {"component": "tracing"})
    assert failed == 1
    assert '"event":"traces_unavailable"' in stream.getvalue()
