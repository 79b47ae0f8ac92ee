"""sentinel's output: JSON lines with fixed fields, independent of the app's logging setup."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from sentinel import Config, Sentinel
from sentinel._metrics import Metrics
from sentinel._output import Emitter
from sentinel.testing import capture_reports

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
COMMON_FIELDS = ("timestamp", "level", "event", "service", "location")
FIXED_TIMESTAMP = "2026-01-02T03:04:05.678Z"


class PaymentDeclined(Exception):
    """An app exception to report."""


def raise_declined(message: str) -> None:
    raise PaymentDeclined(message)


def caught(message: str) -> BaseException:
    try:
        raise_declined(message)
    except PaymentDeclined as exc:
        return exc
    raise AssertionError("did not raise")


def fresh_emitter(stream: Any, service: str = "shop", location: str = "eu-1") -> Emitter:
    return Emitter(
        service=service, location=location, metrics=Metrics(CollectorRegistry()), stream=stream
    )


def one_line(emitter_stream: io.StringIO) -> str:
    text = emitter_stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text[:300])
    return text[:-1]


def sample_record(emitter: Emitter) -> None:
    """A record whose rendering is fully determined (fixed timestamp)."""
    emitter.emit(
        "error",
        "unhandled_exception",
        timestamp=FIXED_TIMESTAMP,
        exception_type="PaymentDeclined",
        message="card declined",
        frames=[{"file": "app.py", "line": 3}],
    )


@pytest.fixture
def pristine_structlog() -> Iterator[None]:
    """structlog at its defaults before and after the test, and the stdlib Logger class kept."""
    logger_class = logging.getLoggerClass()
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.setLoggerClass(logger_class)


@pytest.fixture
def pristine_logging() -> Iterator[None]:
    """The stdlib logging configuration is restored after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    disabled = {
        name: logger.disabled
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    logging.disable(logging.NOTSET)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was_disabled in disabled.items():
        logging.getLogger(name).disabled = was_disabled


# -- fields and format ------------------------------------------------------------------------


def test_every_record_kind_has_the_common_fields() -> None:
    """Every record kind has timestamp (ISO 8601 UTC, Z), level, event, service and location."""
    before = datetime.now(UTC) - timedelta(seconds=1)
    with capture_reports(service="shop", location="eu-1", fold_full_reports=1) as cap:
        for _ in range(3):
            cap.sentinel.capture_exception(caught("card declined"), "request")
        cap.sentinel.writer.note_drop("test")
        cap.sentinel.emitter.emit("info", "custom_event", detail=1)
        cap.sentinel.writer.close()
        records = [json.loads(line) for line in cap.stream.getvalue().splitlines()]
    after = datetime.now(UTC) + timedelta(seconds=1)

    kinds = {record["event"] for record in records}
    assert kinds == {"unhandled_exception", "exception_summary", "reports_dropped", "custom_event"}
    for record in records:
        for field in COMMON_FIELDS:
            assert field in record, (field, record["event"])
        assert ISO_UTC.match(record["timestamp"]), record["timestamp"]
        moment = datetime.fromisoformat(record["timestamp"])
        assert moment.utcoffset() == timedelta(0)
        assert before <= moment <= after
        assert record["service"] == "shop"
        assert record["location"] == "eu-1"
        assert record["level"] in {"error", "warning", "info"}
    levels = {record["event"]: record["level"] for record in records}
    assert levels["unhandled_exception"] == "error"
    assert levels["exception_summary"] == "warning"
    assert levels["reports_dropped"] == "warning"


def test_output_is_ascii_json_with_exactly_one_line_per_record() -> None:
    """Non-ASCII text and every kind of line break are escaped: one ASCII JSON line per record."""
    messages = [
        "caf\u00e9 \u65e5\u672c \U0001f4a5",
        "multi\nline\r\nmessage",
        "unicode\u2028line\u2029breaks\x85\x0b\x0c\x1c\x1d\x1e",
        "tab\tand \x00 nul",
    ]
    with capture_reports(fold_full_reports=100) as cap:
        for message in messages:
            cap.sentinel.capture_exception(caught(message), "request")
        cap.sentinel.emitter.emit("info", "free_text", note="\u00fcber\nnext")
        records = cap.records
        text = cap.stream.getvalue()

    assert text.endswith("\n")
    raw = text[:-1].split("\n")
    assert len(raw) == len(records) == len(messages) + 1
    assert text.splitlines() == raw  # no other character any reader treats as a line break
    assert text.isascii()
    parsed = [json.loads(line) for line in raw]
    assert all(isinstance(record, dict) for record in parsed)
    assert [r["message"] for r in parsed if r["event"] == "unhandled_exception"] == messages
    (free_text,) = [r for r in parsed if r["event"] == "free_text"]
    assert free_text["note"] == "\u00fcber\nnext"


def test_unserializable_field_values_are_rendered_not_fatal() -> None:
    """Values JSON cannot encode (objects, bytes, sets, objects whose repr raises) become text."""

    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    stream = io.StringIO()
    emitter = fresh_emitter(stream)
    assert emitter.emit("info", "odd_values", blob=b"\xff\x00", items={1}, thing=Opaque())
    record = json.loads(one_line(stream))
    assert record["blob"] == repr(b"\xff\x00")
    assert record["items"] == "{1}"
    assert "Opaque" in record["thing"]


# -- independence from the app's logging setup ----------------------------------------------------


def app_structlog_setups() -> dict[str, Callable[[], dict[str, Any]]]:
    """``structlog.configure`` arguments apps use; built in the test (LoggerFactory() has a
    process-wide side effect: it sets the stdlib Logger class)."""
    return {
        "key_value_renderer": lambda: {
            "processors": [
                structlog.processors.add_log_level,
                structlog.processors.KeyValueRenderer(),
            ]
        },
        "console_renderer": lambda: {"processors": [structlog.dev.ConsoleRenderer(colors=False)]},
        "contextvars_and_extra_fields": lambda: {
            "processors": [
                structlog.contextvars.merge_contextvars,
                structlog.processors.TimeStamper(fmt="%Y"),
                structlog.processors.JSONRenderer(sort_keys=True, indent=2),
            ],
            "context_class": dict,
        },
        "stdlib_integration": lambda: {
            "processors": [structlog.stdlib.render_to_log_kwargs],
            "wrapper_class": structlog.stdlib.BoundLogger,
            "logger_factory": structlog.stdlib.LoggerFactory(),
            "cache_logger_on_first_use": True,
        },
        "level_filtering": lambda: {
            "wrapper_class": structlog.make_filtering_bound_logger(logging.CRITICAL),
        },
    }


@pytest.mark.parametrize("setup", app_structlog_setups())
@pytest.mark.usefixtures("pristine_structlog")
def test_lines_do_not_change_when_the_app_configures_structlog(setup: str) -> None:
    """The app's structlog.configure(...) changes nothing in sentinel's lines."""
    baseline_stream = io.StringIO()
    sample_record(fresh_emitter(baseline_stream))
    baseline = one_line(baseline_stream)

    created_before_stream = io.StringIO()
    created_before = fresh_emitter(created_before_stream)  # first used after the configure
    structlog.configure(**app_structlog_setups()[setup]())
    structlog.contextvars.bind_contextvars(user_id="u-1")
    created_after_stream = io.StringIO()
    sample_record(fresh_emitter(created_after_stream))
    sample_record(created_before)

    assert one_line(created_after_stream) == baseline
    assert one_line(created_before_stream) == baseline


@pytest.mark.usefixtures("pristine_structlog")
def test_reports_survive_an_app_structlog_level_filter() -> None:
    """An app filtering structlog at CRITICAL does not swallow sentinel's exception reports."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with capture_reports() as cap:
        cap.sentinel.capture_exception(caught("card declined"), "request")
        cap.flush()
        lines = cap.stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["unhandled_exception"]


@pytest.mark.usefixtures("pristine_logging")
def test_lines_do_not_change_when_the_app_configures_stdlib_logging() -> None:
    """Silencing or reconfiguring stdlib logging changes nothing in sentinel's lines."""
    baseline_stream = io.StringIO()
    sample_record(fresh_emitter(baseline_stream))
    baseline = one_line(baseline_stream)

    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": True,
            "handlers": {"null": {"class": "logging.NullHandler"}},
            "root": {"level": "CRITICAL", "handlers": ["null"]},
        }
    )
    logging.disable(logging.CRITICAL)
    stream = io.StringIO()
    sample_record(fresh_emitter(stream))
    assert one_line(stream) == baseline


@pytest.mark.usefixtures("pristine_logging")
def test_default_output_goes_to_the_current_stderr_even_with_logging_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without a stream, records go to sys.stderr as it is at write time, logging or not."""
    logging.disable(logging.CRITICAL)
    emitter = fresh_emitter(None)
    sample_record(emitter)
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    record = json.loads(line)
    assert (record["event"], record["timestamp"], record["service"]) == (
        "unhandled_exception",
        FIXED_TIMESTAMP,
        "shop",
    )


# -- a failing stream ---------------------------------------------------------------------------


class BrokenPipeStream(io.StringIO):
    """A stream whose reader went away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


class FailingFlushStream(io.StringIO):
    """A stream that accepts the text but fails to flush it."""

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def closed_stream() -> io.StringIO:
    stream = io.StringIO()
    stream.close()
    return stream


FAILING_STREAMS = {
    "broken_pipe": BrokenPipeStream,
    "closed": closed_stream,
    "flush_fails": FailingFlushStream,
}


@pytest.mark.parametrize("make_stream", FAILING_STREAMS.values(), ids=FAILING_STREAMS.keys())
def test_failing_stream_is_counted_and_never_raises(make_stream: Any) -> None:
    """A stream that raises: emit returns False, internal error and write_failed drop counted."""
    registry = CollectorRegistry()
    emitter = Emitter(
        service="shop", location="eu-1", metrics=Metrics(registry), stream=make_stream()
    )

    assert emitter.emit("error", "unhandled_exception", message="x") is False
    assert emitter.emit("warning", "exception_summary", occurrences=3) is False

    assert registry.get_sample_value("sentinel_internal_errors_total", {"component": "output"}) == 2
    dropped = registry.get_sample_value(
        "sentinel_reports_dropped_total", {"reason": "write_failed"}
    )
    assert dropped == 2


def test_failing_stream_under_the_reporter_does_not_reach_the_app() -> None:
    """capture_exception with a broken stream returns normally; the failure is only counted."""
    registry = CollectorRegistry()
    sentinel = Sentinel(Config(), registry=registry, stream=BrokenPipeStream())
    assert sentinel.capture_exception(caught("card declined"), "request") is True
    assert sentinel.writer.flush(5)
    sentinel.close()
    assert registry.get_sample_value("sentinel_internal_errors_total", {"component": "output"}) == 1
    dropped = registry.get_sample_value(
        "sentinel_reports_dropped_total", {"reason": "write_failed"}
    )
    assert dropped == 1
    counted = registry.get_sample_value(
        "sentinel_unhandled_exceptions_total",
        {
            "location": "unknown",
            "route": "<none>",
            "exception_type": f"{__name__}.PaymentDeclined",
            "phase": "request",
        },
    )
    assert counted == 1
