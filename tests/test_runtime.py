"""The process's sentinel: install() is idempotent and the current one receives reports."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, request_context, wait_for
from prometheus_client import CollectorRegistry

import sentinel
from sentinel import Config, ConfigError, _runtime
from sentinel._context import current_request
from sentinel.testing import capture_reports


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


# -- the metrics endpoint, reinstalls, captures and the process-wide hooks ----------------------


@pytest.fixture
def restore_current() -> Iterator[None]:
    """The sentinel current before the test is current again after it; the test's are
    closed and the metrics endpoint they started is stopped."""
    previous = _runtime.current()
    yield
    installed = _runtime.set_current(previous)
    if installed is not None and installed is not previous:
        installed.close()
    _runtime.stop_metrics_endpoint()


def _build_info_services(port: int) -> list[str]:
    """The services sentinel_build_info names on the endpoint at ``port``; [] when it is
    not served."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return []
    return [
        line.split('service="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("sentinel_build_info{")
    ]


def test_a_reinstall_rebinds_the_metrics_endpoint(restore_current: None) -> None:
    """The metrics endpoint serves the current sentinel's registry: installed again with
    another registry or port, the old endpoint stops and the new one serves; with the same
    registry and address it stays; with port 0 none serves (never a closed sentinel's
    registry)."""
    first_port, second_port = free_port(), free_port()
    quiet = {"metrics_host": "127.0.0.1", "stream": io.StringIO()}
    first = sentinel.install(
        registry=CollectorRegistry(), metrics_port=first_port, service="first", **quiet
    )
    assert _build_info_services(first_port) == ["first"]
    registry = CollectorRegistry()
    second = sentinel.install(
        registry=registry, metrics_port=second_port, service="second", **quiet
    )
    assert first.closed and sentinel.current() is second
    assert _build_info_services(first_port) == []
    assert _build_info_services(second_port) == ["second"]
    served = _runtime.metrics_endpoint()
    assert served is not None and served[0] is registry
    third = sentinel.install(registry=registry, metrics_port=second_port, service="third", **quiet)
    assert _runtime.metrics_endpoint() == served  # the same registry and address: kept
    assert third is not second
    sentinel.install(registry=CollectorRegistry(), metrics_port=0, **quiet)
    assert _runtime.metrics_endpoint() is None
    assert _build_info_services(second_port) == []


def test_close_says_what_it_does() -> None:
    """Sentinel.close() is public: its docstring says what it does and when it is called."""
    assert _runtime.Sentinel.close.__doc__ and "idempotent" in _runtime.Sentinel.close.__doc__


def test_install_inside_a_capture_hands_back_the_captures_sentinel() -> None:
    """While a capture_reports() block is in force, install() (what instrument(app) and an
    add_middleware app do) returns the capture's sentinel rather than replacing and closing
    it; where the app serves its metrics is left to the capture."""
    with capture_reports(location="fra") as captured:
        assert sentinel.install() is captured.sentinel
        assert sentinel.install(location="fra", metrics_port=9999) is captured.sentinel
        assert sentinel.install(Config(location="fra")) is captured.sentinel
        assert sentinel.install(registry=captured.registry) is captured.sentinel
        assert not captured.sentinel.closed
        assert _runtime.current() is captured.sentinel


def test_install_inside_a_capture_refuses_settings_it_would_drop() -> None:
    """Settings or collaborators given to install() inside a capture that are not the
    capture's are a ConfigError naming each, with both values: never silently dropped."""
    with capture_reports() as captured:
        with pytest.raises(ConfigError) as refused:
            sentinel.install(location="fra", service="shop", metrics_port=0)
        message = str(refused.value)
        assert "\"location\" 'fra' (the capture's: 'unknown')" in message
        assert "\"service\" 'shop' (the capture's: 'unknown_service')" in message
        assert "capture_reports(location=..., service=...)" in message
        assert "metrics_port" not in message
        with pytest.raises(ConfigError, match="own registry, sinks"):
            sentinel.install(registry=CollectorRegistry(), sinks=[print])
        with pytest.raises(ConfigError, match='unknown setting "locaton"'):
            sentinel.install(locaton="fra")  # type: ignore[call-arg]
        with pytest.raises(ConfigError, match='"mutation_mode"'):
            sentinel.install(Config(mutation_mode="raise"))
        assert _runtime.current() is captured.sentinel and not captured.sentinel.closed


def _process_wide_state() -> dict[str, object]:
    """What install_process_wide() replaces or adds."""
    return {
        "excepthook": sys.excepthook,
        "threading": threading.excepthook,
        "unraisable": sys.unraisablehook,
        "environ": type(os.environ),
        "putenv": os.putenv,
        "set_level": logging.Logger.setLevel,
        "error": logging.Logger.error,
        "filters": {
            name: list(logging.getLogger(name).filters)
            for name in ("uvicorn.error", "uvicorn.access")
        },
    }


def test_uninstall_process_wide_puts_back_the_parts_named() -> None:
    """uninstall_process_wide() restores every part install_process_wide() put in place,
    the log filters on the servers' loggers included, or only the parts named, so a test
    helper removes what it installed and leaves what was there before it."""
    _runtime.uninstall_process_wide()
    before = _process_wide_state()
    assert _runtime.process_wide_installed() == frozenset()
    _runtime.install_process_wide()
    assert _runtime.process_wide_installed() == frozenset(_runtime.PROCESS_WIDE_PARTS)
    installed = _process_wide_state()
    assert all(installed[key] != before[key] for key in before), installed
    _runtime.uninstall_process_wide(["log_scrubbing"])
    assert _runtime.process_wide_installed() == {"watches", "hooks"}
    assert _process_wide_state()["filters"] == before["filters"]
    assert _process_wide_state()["excepthook"] == installed["excepthook"]
    _runtime.uninstall_process_wide()
    assert _process_wide_state() == before


# -- shutdown against a collector that fails: bounded, and every lost span said -----------------

FLUSH_TIMEOUT_SECONDS = 2.0
SHUTDOWN_BOUND_SECONDS = 8.0
"""A final flush given FLUSH_TIMEOUT_SECONDS, or a close, must return within this. Without a
bound, each batch queued waits out the exporter's own timeout (10 s) against a collector
that hangs, or its retries (about 7 s) against one that refuses or answers 503."""
BATCH_SIZE = 30
REQUESTS = 40
SPANS_PER_REQUEST = 3
"""The server span, "load" and "query" (test_otlp's app): four batches of spans in all."""


@contextlib.contextmanager
def _served_to(receiver: Any, phase: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A sentinel exporting with the real OTLP/HTTP exporter (its default 10 s timeout) to
    ``receiver`` behaving as ``phase``, after REQUESTS kept requests under uvicorn; yields
    the capture."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from test_otlp import _app, _provider_of, traced_sentinel

    from sentinel.testing import serve

    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(BATCH_SIZE))
    receiver.set_phase(phase)
    exporter = OTLPSpanExporter(endpoint=receiver.endpoint, timeout=10)
    with traced_sentinel(exporter, keep_header="x-debug") as captured:
        provider = _provider_of(captured.sentinel)
        assert provider is not None
        app = sentinel.instrument(_app(provider), sentinel=captured.sentinel)
        with serve(app) as url, httpx.Client(base_url=url, headers={"x-debug": "1"}) as client:
            for _ in range(REQUESTS):
                assert client.get("/ok").status_code == 200
        yield captured


def _announced(captured: Any) -> int:
    """Spans the spans_dropped warnings on the output said were lost, in all."""
    lines = [json.loads(line) for line in captured.stream.getvalue().splitlines()]
    return sum(sum(line["dropped"].values()) for line in lines if line["event"] == "spans_dropped")


def _dropped(captured: Any, reason: str) -> float:
    value = captured.registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
    return 0.0 if value is None else value


@pytest.mark.parametrize("phase", ["hanging", "refusing", "503"])
def test_a_final_flush_against_a_failing_collector_is_bounded_and_says_what_it_lost(
    phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan's final flush, with the collector hanging, refusing connections or
    answering 503: it returns by its deadline (not after one exporter timeout per batch
    queued), and every span it could not export is counted and said on the output before
    it returns (the process may be ended by the signal right after). Closing afterwards is
    quick, and once the exports left behind have returned, nothing was sent or counted
    twice."""
    from test_export_faults import HTTPReceiver

    spans = SPANS_PER_REQUEST * REQUESTS
    receiver = HTTPReceiver()
    try:
        with _served_to(receiver, phase, monkeypatch) as captured:
            started = time.monotonic()
            captured.sentinel.flush(FLUSH_TIMEOUT_SECONDS, final=True)
            flushed = time.monotonic() - started
            assert flushed < SHUTDOWN_BOUND_SECONDS, flushed
            lost, announced = _dropped(captured, "export_failed"), _announced(captured)
            assert lost == announced == spans, (lost, announced)
            started = time.monotonic()
            captured.sentinel.close()
            closed = time.monotonic() - started
            assert closed < SHUTDOWN_BOUND_SECONDS, closed
            receiver.close()  # the exports it held are let go
            _, tail = captured.sentinel.tracing
            assert tail is not None and tail.batch is not None
            exporter = tail.batch.exporter
            assert wait_for(lambda: exporter.outstanding == 0, 30)
            assert _dropped(captured, "export_failed") == spans
    finally:
        receiver.close()
    assert not receiver.spans


def test_close_against_a_hanging_collector_is_bounded_and_says_what_it_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing without a final flush first (a script's exit): bounded too, and what was
    queued is counted and said."""
    from test_export_faults import HTTPReceiver

    receiver = HTTPReceiver()
    try:
        with _served_to(receiver, "hanging", monkeypatch) as captured:
            started = time.monotonic()
            captured.sentinel.close()
            closed = time.monotonic() - started
    finally:
        receiver.close()
    assert closed < SHUTDOWN_BOUND_SECONDS, closed
    spans = SPANS_PER_REQUEST * REQUESTS
    assert _dropped(captured, "export_failed") == _announced(captured) == spans


def test_sigterm_against_a_hanging_collector_exits_in_time_saying_every_lost_span(
    tmp_path: Path,
) -> None:
    """uvicorn stopped by SIGTERM while the collector hangs: the process exits within the
    bound (about the final flush's 5 s), not after one exporter timeout per queued batch,
    and its output says every span of every request was lost, by reason, although no
    close() runs (uvicorn re-raises the signal)."""
    from test_export_faults import SPANS_PER_REQUEST as SPANS
    from test_export_faults import HTTPReceiver, Server

    receiver = HTTPReceiver()
    receiver.set_phase("hanging")
    server = Server(tmp_path / "app", receiver)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers={"x-debug": "1"}, timeout=10) as client:
            for _ in range(100):  # more spans than the export queue holds
                assert client.get("/work").status_code == 200
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(20)
        exited = time.monotonic() - started
    finally:
        server.stop()
        receiver.close()
    lines = [
        json.loads(line)
        for line in server.stderr_path.read_text().splitlines()
        if line.startswith("{")
    ]
    requests = sum(1 for line in lines if line.get("event") == "request")
    dropped: dict[str, int] = {}
    for line in lines:
        if line.get("event") == "spans_dropped":
            for reason, count in line["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + count
    assert exited < 15, exited
    assert requests >= 100
    assert set(dropped) <= {"export_failed", "export_queue_full"}, dropped
    assert sum(dropped.values()) == SPANS * requests, (dropped, requests)
    assert not receiver.spans
