"""Where sentinel's records go: JSON lines on stderr through structlog, plus optional sinks.

The output is independent of the app's ``logging`` and ``structlog`` configuration: sentinel
wraps its own logger with its own processors and writes straight to the stream.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import structlog

from ._metrics import Metrics

Sink = Callable[[dict[str, Any]], None]
"""A callable given a copy of every record sentinel writes (after scrubbing)."""


def _json_default(value: Any) -> str:
    try:
        return repr(value)[:1024]
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def dumps(record: dict[str, Any]) -> str:
    """Serialize one record; ASCII-only so no stream encoding can fail on it."""
    return json.dumps(record, default=_json_default, ensure_ascii=True, separators=(",", ":"))


class _StreamLogger:
    """A structlog logger that writes each rendered line to a stream, one write per line."""

    def __init__(self, stream: IO[str] | None, lock: threading.Lock) -> None:
        self._stream = stream
        self._lock = lock

    def msg(self, message: str) -> None:
        # Resolved at write time so that a stream swapped by a test harness is honoured,
        # but a closed or replaced-with-None stderr falls back to the real one.
        stream = self._stream or sys.stderr or sys.__stderr__
        if stream is None:
            return
        with self._lock:
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = critical = exception = log = fatal = msg


class Emitter:
    """Writes records with the fields every record has: timestamp, level, event, service,
    location."""

    def __init__(
        self,
        *,
        service: str,
        location: str,
        metrics: Metrics,
        stream: IO[str] | None = None,
        sinks: tuple[Sink, ...] = (),
    ) -> None:
        self.service = service
        self.location = location
        self._metrics = metrics
        self._sinks = sinks
        self._logger = structlog.wrap_logger(
            _StreamLogger(stream, threading.Lock()),
            processors=[
                self._add_common_fields,
                structlog.processors.add_log_level,
                _add_timestamp,
                self._call_sinks,
                structlog.processors.JSONRenderer(serializer=_serialize),
            ],
            # Explicit, so an app's structlog.configure() (a level filter, say) cannot
            # change or silence sentinel's output.
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=True,
        )

    def envelope_bytes(self, event: str, level: str) -> int:
        """Bytes the fields added on emission (event, level, service) take in a line."""
        return len(dumps({"event": event, "level": level, "service": self.service})) - 1

    def emit(self, level: str, event: str, **fields: Any) -> bool:
        """Write one record; returns False (and counts it) when it could not be written."""
        try:
            getattr(self._logger, level)(event, **fields)
        except Exception:
            self._metrics.internal_error("output")
            self._metrics.dropped("write_failed")
            return False
        return True

    def _add_common_fields(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.setdefault("service", self.service)
        event_dict.setdefault("location", self.location)
        return event_dict

    def _call_sinks(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        for sink in self._sinks:
            try:
                sink(copy.deepcopy(dict(event_dict)))
            except Exception:
                self._metrics.internal_error("sink")
        return event_dict


def iso_timestamp(seconds: float | None = None) -> str:
    """ISO 8601 UTC with millisecond precision, e.g. ``2026-11-26T04:11:54.123Z``."""
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _add_timestamp(_logger: Any, _method: str, event_dict: Any) -> Any:
    # Reports are written off the request path, so the caller passes the moment it happened.
    event_dict.setdefault("timestamp", iso_timestamp())
    return event_dict


def _serialize(record: Any, **_kwargs: Any) -> str:
    return dumps(record)
