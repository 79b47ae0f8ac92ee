"""Helpers for users' tests: capture what sentinel wrote and read its metrics back."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry

from ._config import Config
from ._runtime import Sentinel, install_process_wide, set_current


class Captured:
    """Records written by a sentinel under test, and its private metrics registry."""

    def __init__(self, sentinel: Sentinel, stream: io.StringIO) -> None:
        self.sentinel = sentinel
        self.registry: CollectorRegistry = sentinel.registry
        self.stream = stream
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def sink(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the requests being served have finished and their reports are written.

        A client can have its response before the server's middleware is done with the
        request (an inner error middleware sends the 500, then the exception travels up),
        so waiting for the queue alone could miss the last report.
        """
        deadline = time.monotonic() + timeout
        while self.sentinel.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.sentinel.flush(max(0.0, deadline - time.monotonic()))

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (after a flush)."""
        self.flush()
        with self._lock:
            return list(self._records)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Records whose ``event`` is ``event``, e.g. ``"unhandled_exception"``."""
        return [record for record in self.records if record.get("event") == event]

    @property
    def reports(self) -> list[dict[str, Any]]:
        """The ``unhandled_exception`` records."""
        return self.events("unhandled_exception")

    @property
    def mutations(self) -> list[dict[str, Any]]:
        """Reports of writes to process-global state made by requests: attributed ``exact``
        or to ``suspects`` in flight. ``unattributed`` writes (made on the serving loop
        outside any request while requests were in flight) and the summaries of repeats
        are in ``events("global_state_mutated")``."""
        return [
            record
            for record in self.events("global_state_mutated")
            if not record.get("summary") and record.get("attribution") != "unattributed"
        ]

    def assert_no_mutations(self) -> None:
        """Fail when any request wrote process-global state, naming each write."""
        found = self.mutations
        if found:
            lines = [
                f"- {m.get('target')} {m.get('key')!r} by {m.get('method')} {m.get('route')}"
                f" at {m.get('file')}:{m.get('line')} ({m.get('attribution')})"
                for m in found
            ]
            msg = f"requests mutated process-global state ({len(found)}):\n" + "\n".join(lines)
            raise AssertionError(msg)

    def wait_for(
        self, count: int, event: str = "unhandled_exception", timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The ``event`` records once there are at least ``count`` (or after ``timeout``).

        For reports that arrive on their own time: an unawaited task's failure, say, is
        reported after ``task_grace_seconds``.
        """
        deadline = time.monotonic() + timeout
        found = self.events(event)
        while len(found) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            found = self.events(event)
        return found

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from the captured registry (0.0 when absent)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextmanager
def capture_reports(
    config: Config | None = None,
    *,
    span_exporter: SpanExporter | None = None,
    **overrides: Any,
) -> Iterator[Captured]:
    """Install a fresh sentinel (own registry, in-memory stream) for the ``with`` block.

    The previously installed sentinel is restored afterwards. Configuration comes from
    ``config``/``overrides`` only, never from the environment, so tests are reproducible;
    the metrics endpoint is off unless a ``metrics_port`` is given. With ``span_exporter``
    (an ``InMemorySpanExporter``, say) the tail-sampled traces of kept requests go there.
    """
    stream = io.StringIO()
    if config is None:
        config = Config(metrics_port=0)  # tests read the registry, not a port
    config = config.replace(**overrides)
    holder: list[Captured] = []

    def sink(record: dict[str, Any]) -> None:
        holder[0].sink(record)

    sentinel = Sentinel(
        config,
        registry=CollectorRegistry(),
        stream=stream,
        sinks=(sink,),
        span_exporter=span_exporter,
    )
    captured = Captured(sentinel, stream)
    holder.append(captured)
    previous = set_current(sentinel)
    install_process_wide()
    try:
        yield captured
    finally:
        sentinel.close()
        set_current(previous)


@contextmanager
def serve(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any
) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on ``port`` (default: a free loopback port), in a
    background thread.

    Yields the base URL (``http://127.0.0.1:PORT``); the server is stopped on exit, also
    when the block raises. Extra keyword arguments go to ``uvicorn.Config``.
    """
    import time

    import uvicorn

    uvicorn_options.setdefault("log_level", "warning")
    uvicorn_options.setdefault("lifespan", "auto")
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sentinel-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            msg = "uvicorn did not start (see its log above)"
            raise RuntimeError(msg)
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
