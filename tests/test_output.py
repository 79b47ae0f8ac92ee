"""sentinel's output: JSON lines with fixed fields, independent of the app's logging setup."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import logging.config
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from sentinel import Config, Sentinel, _output, instrument, testing
from sentinel._metrics import Metrics
from sentinel._output import Emitter
from sentinel.testing import capture_reports

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
COMMON_FIELDS = ("timestamp", "level", "event", "service", "environment", "location")
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


def fresh_emitter(
    stream: Any, service: str = "shop", location: str = "eu-1", log_format: str | None = None
) -> Emitter:
    return Emitter(
        service=service,
        location=location,
        metrics=Metrics(CollectorRegistry()),
        stream=stream,
        log_format=log_format,
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


def test_every_record_kind_has_the_common_fields(clean_environ: None) -> None:
    """Every record kind (reports, handled reports, summaries, request records, mutations,
    sentinel's own warnings) has timestamp (ISO 8601 UTC, Z), level, event, service,
    environment and location."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        os.environ["OUTPUT_TEST_FLAG"] = "written by a request"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    before = datetime.now(UTC) - timedelta(seconds=1)
    with capture_reports(
        service="shop", environment="staging", location="eu-1", fold_full_reports=1
    ) as cap:
        for _ in range(3):
            cap.sentinel.capture_exception(caught("card declined"), "request")
        cap.sentinel.capture_exception(caught("handled"), "request", handled=True)
        cap.sentinel.writer.note_drop("test")
        cap.sentinel.emitter.emit("info", "custom_event", detail=1)
        testing.Client(instrument(app, sentinel=cap.sentinel)).get("/")
        cap.flush()
        cap.sentinel.writer.close()
        records = [json.loads(line) for line in cap.stream.getvalue().splitlines()]
    after = datetime.now(UTC) + timedelta(seconds=1)

    kinds = {record["event"] for record in records}
    assert kinds == {
        "unhandled_exception",
        "handled_exception",
        "exception_summary",
        "reports_dropped",
        "custom_event",
        "request",
        "global_state_mutated",
    }
    for record in records:
        for field in COMMON_FIELDS:
            assert field in record, (field, record["event"])
        assert ISO_UTC.match(record["timestamp"]), record["timestamp"]
        moment = datetime.fromisoformat(record["timestamp"])
        assert moment.utcoffset() == timedelta(0)
        assert before <= moment <= after
        assert record["service"] == "shop"
        assert record["environment"] == "staging"
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


class MisbehavingStream(io.StringIO):
    """A stream object whose write is broken itself (no failure of the stream's target)."""

    def write(self, text: str) -> int:
        raise TypeError("write() of a stream replaced by something else")


FAILING_STREAMS["misbehaving"] = MisbehavingStream


@pytest.mark.parametrize("make_stream", FAILING_STREAMS.values(), ids=FAILING_STREAMS.keys())
def test_failing_stream_is_counted_and_never_raises(make_stream: Any) -> None:
    """A stream that raises: emit returns False and a write_failed drop is counted. A reader
    gone, a full disk or a closed stream is no failure of sentinel's; a stream object that
    fails otherwise is counted as an internal error of the output too."""
    registry = CollectorRegistry()
    emitter = Emitter(
        service="shop", location="eu-1", metrics=Metrics(registry), stream=make_stream()
    )

    assert emitter.emit("error", "unhandled_exception", message="x") is False
    assert emitter.emit("warning", "exception_summary", occurrences=3) is False

    internal = counted(registry, "sentinel_internal_errors_total", component="output")
    assert internal == (2 if make_stream is MisbehavingStream else 0)
    dropped = registry.get_sample_value(
        "sentinel_reports_dropped_total", {"reason": "write_failed"}
    )
    assert dropped == 2


class StuckStream(io.StringIO):
    """A pipe nobody reads: a write blocks until ``unblock`` is set (and says it started)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.unblock = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.unblock.wait(30)
        return super().write(text)


def test_a_write_that_never_returns_costs_others_one_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one record's write hangs, another record waits for it STREAM_WAIT_SECONDS at
    most, then is dropped and counted (write_failed, not an internal error); the ones after
    it do not wait at all; once the write returns, records are written again."""
    monkeypatch.setattr(_output, "STREAM_WAIT_SECONDS", 0.2)
    registry = CollectorRegistry()
    stream = StuckStream()
    emitter = Emitter(service="shop", location="eu-1", metrics=Metrics(registry), stream=stream)
    stuck = threading.Thread(target=emitter.emit, args=("info", "first"), daemon=True)
    stuck.start()
    try:
        assert stream.writing.wait(5)
        started = time.monotonic()
        assert emitter.emit("info", "second") is False
        waited = time.monotonic() - started
        started = time.monotonic()
        assert emitter.emit("info", "third") is False
        assert 0.2 <= waited < 2.0
        assert time.monotonic() - started < 0.1
    finally:
        stream.unblock.set()
        stuck.join(5)
    assert emitter.emit("info", "fourth") is True
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "first",
        "fourth",
    ]
    assert counted(registry, "sentinel_reports_dropped_total", reason="write_failed") == 2
    assert counted(registry, "sentinel_internal_errors_total", component="output") == 0


def test_failing_stream_under_the_reporter_does_not_reach_the_app() -> None:
    """capture_exception with a broken stream returns normally; the failure is only counted."""
    registry = CollectorRegistry()
    sentinel = Sentinel(Config(), registry=registry, stream=BrokenPipeStream())
    assert sentinel.capture_exception(caught("card declined"), "request") is True
    assert sentinel.writer.flush(5)
    sentinel.close()
    assert registry.get_sample_value("sentinel_internal_errors_total", {"component": "output"}) in (
        None,
        0.0,
    )
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


WORKER_WRITING_BIG_RECORDS = """
import sys

from prometheus_client import CollectorRegistry

from sentinel._metrics import Metrics
from sentinel._output import Emitter

import threading

# Two emitters (two sentinels of one process) on two threads, as a worker may have.
emitters = [
    Emitter(service="s", location="l", metrics=Metrics(CollectorRegistry()), log_format="json")
    for _ in range(2)
]


def write(emitter, numbers):
    for number in numbers:
        emitter.emit("error", "big", worker=sys.argv[1], number=number, payload=sys.argv[1] * 20000)


threads = [
    threading.Thread(target=write, args=(emitter, range(half, 40, 2)))
    for half, emitter in enumerate(emitters)
]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def test_workers_sharing_a_pipe_write_whole_records(tmp_path: Path) -> None:
    """Two workers of one server (one multiprocess directory), each with two sentinels
    writing from two threads, write 20 KB records to one stderr pipe that a slow reader
    drains: a pipe keeps only writes of up to 4 KiB whole, yet every line read is one whole
    record."""
    import subprocess

    from helpers import clean_env

    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    read_end, write_end = os.pipe()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_WRITING_BIG_RECORDS, letter],
            env=env,
            stderr=write_end,
        )
        for letter in "ab"
    ]
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chunk = os.read(read_end, 4096)  # a reader a little slower than the writers
        if not chunk:
            break
        chunks.append(chunk)
        time.sleep(0.001)
    os.close(read_end)
    for worker in workers:
        assert worker.wait(30) == 0
    lines = b"".join(chunks).decode().splitlines()
    records = [json.loads(line) for line in lines]  # each line whole JSON
    assert sorted((r["worker"], r["number"]) for r in records) == sorted(
        (letter, number) for letter in "ab" for number in range(40)
    )
    assert all(r["payload"] == r["worker"] * 20000 for r in records)


STALLED_WORKER = """
import sys

from prometheus_client import CollectorRegistry

from sentinel._metrics import Metrics
from sentinel._output import Emitter

metrics = Metrics(CollectorRegistry())
emitter = Emitter(service="s", location="l", metrics=metrics, log_format="json")
print("ready", flush=True)
emitter.emit("error", "big", payload="x" * 200_000)  # blocks: nobody reads this pipe
"""

WORKER_WRITING_A_FILE = """
import json
import sys
import time

from prometheus_client import CollectorRegistry

from sentinel._metrics import Metrics
from sentinel._output import Emitter

metrics = Metrics(CollectorRegistry())
with open(sys.argv[1], "w") as stream:
    emitter = Emitter(service="s", location="l", metrics=metrics, stream=stream, log_format="json")
    started = time.monotonic()
    written = [emitter.emit("info", "request", number=n) for n in range(5)]
    print(json.dumps({"seconds": time.monotonic() - started, "written": written}))
"""


def test_a_worker_stalled_on_its_stream_holds_up_no_other_stream(tmp_path: Path) -> None:
    """The workers' write lock is their stream's: one worker blocked writing to a pipe
    nobody reads holds up the workers writing to that pipe only, not a process of the same
    directory writing to a file of its own. And each process holds one descriptor per
    stream, however many sentinels it makes."""
    import subprocess

    from helpers import clean_env

    directory = tmp_path / "metrics"
    directory.mkdir()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory))
    read_end, write_end = os.pipe()
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_WORKER],
        env=env,
        stdout=subprocess.PIPE,
        stderr=write_end,
        text=True,
    )
    try:
        assert stalled.stdout is not None and stalled.stdout.readline() == "ready\n"
        time.sleep(0.5)  # in its write, holding its stream's lock
        other = subprocess.run(
            [sys.executable, "-c", WORKER_WRITING_A_FILE, str(tmp_path / "own.log")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stalled.kill()
        stalled.wait(10)
        os.close(read_end)
        os.close(write_end)
    result = json.loads(other.stdout)
    assert result["written"] == [True] * 5 and result["seconds"] < 0.5
    assert len((tmp_path / "own.log").read_text().splitlines()) == 5


def test_one_lock_descriptor_per_stream_whatever_the_sentinels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many emitters writing to one file in a multiprocess directory share one descriptor
    of its lock file: none is left open per emitter."""
    monkeypatch.setattr("sentinel._location.shared_directory", lambda: str(tmp_path))
    monkeypatch.setattr(_output, "_lock_files", {})

    def lock_descriptors() -> int:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(Path(name).name.startswith(_output.OUTPUT_LOCK_PREFIX) for name in names)

    with (tmp_path / "out.log").open("w") as stream:
        for number in range(50):
            registry = CollectorRegistry()
            emitter = Emitter(service="s", location="l", metrics=Metrics(registry), stream=stream)
            assert emitter.emit("info", "record", number=number)
    assert lock_descriptors() == 1
    assert len((tmp_path / "out.log").read_text().splitlines()) == 50


# -- the console view -----------------------------------------------------------------------------

RECORD_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T[^ ]+ \[", re.M)
"""The start of a ConsoleRenderer line: the timestamp, then the level in brackets."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def terminal() -> Iterator[tuple[IO[str], Callable[[], str]]]:
    """A real pseudo-terminal: a stream whose isatty() is true, and a function that reads
    back what was written to it (newlines as written, not as the terminal sends them)."""
    controller, device = os.openpty()
    stream = open(device, "w", encoding="utf-8")  # noqa: SIM115 - closed below

    def read() -> str:
        chunks: list[bytes] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if not ready:
                if chunks:
                    break
                continue
            chunks.append(os.read(controller, 1 << 16))
        return b"".join(chunks).decode("utf-8").replace("\r\n", "\n")

    try:
        yield stream, read
    finally:
        stream.close()
        os.close(controller)


def app_hook(item: dict[str, Any]) -> dict[str, Any]:
    """The app's code called back from the standard library: where the error is raised."""
    if "amount" not in item:
        raise ValueError(f"no amount in {sorted(item)}")
    return item


def parse_order(body: str) -> Any:
    return json.loads(body, object_hook=app_hook)


def order_error() -> BaseException:
    try:
        try:
            parse_order('{"items": [1]}')
        except ValueError as error:
            raise PaymentDeclined("order rejected") from error
    except PaymentDeclined as declined:
        return declined
    raise AssertionError("did not raise")


def console_report(**config: Any) -> tuple[str, dict[str, Any]]:
    """The console output of one report of ``order_error()``, and the report itself."""
    with capture_reports(log_format="console", **config) as cap:
        cap.sentinel.capture_exception(order_error(), "request")
        [report] = cap.reports
        return cap.stream.getvalue(), report


def line_of(function: Callable[..., Any], text: str) -> int:
    """The number of the line in ``function``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(function)
    [offset] = [index for index, line in enumerate(lines) if text in line]
    return start + offset


def test_console_view_is_the_record_line_then_the_culprit_then_the_traceback() -> None:
    """In the console view, a report is structlog's ConsoleRenderer line (timestamp, level,
    event, the fields), then its culprit with that line of code, then the traceback from
    the root cause to the exception reported, each ending in ``Type: message``."""
    output, report = console_report()
    raised_at = line_of(order_error, "raise PaymentDeclined")
    culprit = f"test_output.py:{raised_at} in order_error"  # of the exception reported
    assert report["culprit"] == culprit

    lines = output.splitlines()
    assert RECORD_LINE.match(lines[0])
    assert "[error" in lines[0] and "unhandled_exception" in lines[0]
    assert f"exception_type={__name__}.PaymentDeclined" in lines[0]
    assert f"culprit='{culprit}'" in lines[0]
    assert lines[1] == f"culprit {culprit}"
    assert 'raise PaymentDeclined("order rejected") from error' in lines[2]
    assert str(raised_at) in lines[2]
    assert len(RECORD_LINE.findall(output)) == 1
    assert ANSI.search(output) is None  # not a terminal: no colours

    order = [
        output.index(text)
        for text in (
            f"culprit {culprit}",
            "Traceback (most recent call last)",
            f"{__file__}:{line_of(parse_order, 'json.loads')} in parse_order",
            "ValueError: no amount in ['items']",
            "The above exception was the direct cause of the following exception:",
            f"{__name__}.PaymentDeclined: order rejected",
        )
    ]
    assert order == sorted(order)


def order_error_in_app() -> BaseException:
    api_token = "hunter2-console"
    try:
        parse_order('{"items": [1]}' if api_token else "")
    except ValueError as error:
        return error
    raise AssertionError("did not raise")


def test_the_console_traceback_marks_the_apps_frames_and_shows_scrubbed_locals() -> None:
    """Library frames (json's) are drawn apart from the app's; locals come from the report,
    scrubbed, never from the live frame."""
    with capture_reports(
        log_format="console", log_locals=True, locals_time_budget_seconds=5.0
    ) as cap:
        cap.sentinel.capture_exception(order_error_in_app(), "request")
        [report] = cap.reports
        output = cap.stream.getvalue()
    frames = [frame for frame in report["frames"] if "line" in frame]
    assert [frame["function"] for frame in frames if frame["in_app"]] == [
        "order_error_in_app",
        "parse_order",
        "app_hook",
    ]
    library = [frame for frame in frames if not frame["in_app"]]
    assert library and all(f"{os.sep}json{os.sep}" in frame["file"] for frame in library)
    assert report["culprit"] == f"test_output.py:{line_of(app_hook, 'raise Value')} in app_hook"
    for frame in frames:
        assert f"{frame['file']}:{frame['line']} in {frame['function']}" in output
    assert "= {'items': [1]}" in output  # app_hook's local, from the report
    assert frames[0]["locals"]["api_token"].startswith("[scrubbed len=")
    assert "hunter2-console" not in output


def test_without_rich_the_console_view_falls_back_to_pythons_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where rich is not installed the traceback is laid out as Python prints it, the
    culprit still first."""
    for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
        monkeypatch.setitem(sys.modules, name, None)
    output, report = console_report()
    lines = output.splitlines()
    assert lines[1] == f"culprit: {report['culprit']}"
    assert lines[2].strip() == 'raise PaymentDeclined("order rejected") from error'
    hook_line = line_of(app_hook, "raise ValueError")
    assert f'  File "{__file__}", line {hook_line}, in app_hook' in lines
    assert lines[-1] == f"{__name__}.PaymentDeclined: order rejected"
    assert lines.count("Traceback (most recent call last):") == 2
    assert "╭" not in output


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_console_view_escapes_what_could_forge_a_line_or_drive_the_terminal(
    rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message or field with escape sequences and line breaks cannot clear the terminal,
    colour it, or start a line that reads as another record."""
    if not rich:
        for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
            monkeypatch.setitem(sys.modules, name, None)
    forged = "2026-01-01T00:00:00.000Z [info     ] request"
    stream = io.StringIO()
    fresh_emitter(stream, log_format="console").emit(
        "error",
        "unhandled_exception",
        exception_type="ValueError",
        message=f"bad\x1b[2J\x1b[31m\n{forged}\u2028{forged}",
        culprit="app.py:3 in f",
        note=f"x\r\n{forged}",
        frames=[{"file": "app.py", "line": 3, "function": "f", "source": "f(\x1b[2J)"}],
    )
    output = stream.getvalue()
    assert "\x1b" not in output
    assert "\r" not in output and "\u2028" not in output
    assert len(RECORD_LINE.findall(output)) == 1
    assert "\\x1b[2J" in output


def test_a_terminal_gets_the_console_view_in_colour_and_other_streams_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no format set, a stream that is a terminal gets the console view, in colour
    (none with NO_COLOR set), and any other stream JSON lines; a format that is set wins
    over what the stream is."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    written = {}
    for log_format in (None, "json", "console"):
        with terminal() as (tty, read):
            sample_record(fresh_emitter(tty, log_format=log_format))
            written[log_format, "tty"] = read()
        stream = io.StringIO()
        sample_record(fresh_emitter(stream, log_format=log_format))
        written[log_format, "pipe"] = stream.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    with terminal() as (tty, read):
        sample_record(fresh_emitter(tty))
        written["no_color"] = read()

    for key in [(None, "pipe"), ("json", "tty"), ("json", "pipe")]:
        record = json.loads(written[key])
        assert record["event"] == "unhandled_exception", key
    for key in [(None, "tty"), ("console", "tty"), ("console", "pipe"), "no_color"]:
        plain = ANSI.sub("", written[key])
        assert plain.startswith(FIXED_TIMESTAMP), key
        assert "unhandled_exception" in plain.splitlines()[0], key
        assert "culprit app.py:3 in ?" in plain, key
    assert ANSI.search(written[None, "tty"]) and ANSI.search(written["console", "tty"])
    assert not ANSI.search(written["console", "pipe"]) and not ANSI.search(written["no_color"])


def test_a_format_from_the_configuration_reaches_the_output() -> None:
    """SENTINEL_LOG_FORMAT (or log_format=) decides the format of everything written: the
    console view even on a pipe, JSON even on a terminal."""
    stream = io.StringIO()
    config = Config.from_env({"SENTINEL_LOG_FORMAT": "console"}, metrics_port=0)
    sentinel = Sentinel(config, registry=CollectorRegistry(), stream=stream)
    sentinel.capture_exception(order_error(), "request")
    sentinel.close()
    assert RECORD_LINE.match(stream.getvalue())
    assert "\nculprit " in stream.getvalue()

    with terminal() as (tty, read):
        sentinel = Sentinel(Config(log_format="json"), registry=CollectorRegistry(), stream=tty)
        sentinel.capture_exception(order_error(), "request")
        sentinel.close()
        [line] = read().splitlines()
    assert json.loads(line)["culprit"].endswith(" in order_error")


def test_reserved_field_names_never_make_the_console_format_a_live_exception() -> None:
    """A record field called exc_info, exception or stack is shown as a field: structlog's
    ConsoleRenderer would otherwise format the exception being handled (locals and all)."""
    stream = io.StringIO()
    emitter = fresh_emitter(stream, log_format="console")
    try:
        password = "hunter2-live"  # noqa: F841 - would show in a rich traceback's locals
        raise KeyError("live")
    except KeyError:
        emitter.emit("warning", "odd_fields", exc_info=True, exception="text", stack="s")
    output = stream.getvalue()
    assert output.count("\n") == 1
    assert "exc_info_=True" in output and "exception_=text" in output
    assert "KeyError" not in output and "hunter2-live" not in output


def raise_group() -> None:
    errors: list[Exception] = []
    for message in ("first failed", "second failed"):
        try:
            raise KeyError(message)
        except KeyError as error:
            errors.append(error)
    raise ExceptionGroup("two tasks failed", errors)


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_console_view_shows_each_member_of_an_exception_group(
    rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's report shows the group, then each member with its own traceback."""
    if not rich:
        for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
            monkeypatch.setitem(sys.modules, name, None)
    with capture_reports(log_format="console") as cap:
        try:
            raise_group()
        except ExceptionGroup as group:
            cap.sentinel.capture_exception(group, "request")
        [report] = cap.reports
        output = cap.stream.getvalue()
    assert [member["message"] for member in report["exceptions"]] == [
        "'first failed'",
        "'second failed'",
    ]
    order = [
        output.index(text)
        for text in (
            "ExceptionGroup: two tasks failed (2 sub-exceptions)",
            "1 of 2",
            "KeyError: 'first failed'",
            "2 of 2",
            "KeyError: 'second failed'",
        )
    ]
    assert order == sorted(order)
    assert output.count("raise_group") >= 3  # the group's frame and each member's


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_console_view_shows_notes_and_says_when_a_chain_was_cut(
    rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception's notes (add_note) follow its heading, indented (the app's text, like
    the message) and each further line more; a chain longer than a report keeps says how
    many links are not shown. Both were in the JSON but not in the console view."""
    if not rich:
        for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
            monkeypatch.setitem(sys.modules, name, None)

    def chained(depth: int) -> None:
        if depth == 0:
            raise OSError("root of it all")
        try:
            chained(depth - 1)
        except Exception as error:
            raise RuntimeError(f"link {depth}") from error

    with capture_reports(log_format="console") as cap:
        try:
            chained(12)
        except RuntimeError as error:
            error.add_note("while loading order 42\n2026-12-07 [error] forged")
            cap.sentinel.capture_exception(error, "request")
        [report] = cap.reports
        output = cap.stream.getvalue()
    assert report["causes_skipped"] > 0
    assert f"({report['causes_skipped']} more exceptions of the chain not kept)" in output
    assert "OSError: root of it all" in output
    heading = output.index("RuntimeError: link 12")
    note = output.index("while loading order 42", heading)
    assert output[note - 5 : note] == "\n    "
    assert "\n        2026-12-07 [error] forged" in output[note:]
    assert "notes=" not in output and "causes_skipped=" not in output  # not in the line


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_a_long_message_or_note_never_starts_a_line_that_reads_as_a_record(
    rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message padded to the view's width wraps, and a note starts a line: neither puts
    the app's text at the start of a line, where a forged record line would read as one."""
    if not rich:
        for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
            monkeypatch.setitem(sys.modules, name, None)
    forged = "2026-12-07T23:59:59.000Z [info     ] request  location=fra route=/admin"
    with capture_reports(log_format="console") as cap:
        for pad in range(60, 110, 7):
            error = RuntimeError("x" * pad + " " + forged)
            error.add_note(forged)
            cap.sentinel.capture_exception(error, "request")
        cap.wait_for(8)
        output = cap.stream.getvalue()
    assert output.count("route=/admin") >= 8
    forgeries = [line for line in RECORD_LINE.findall(output) if "[info" in line]
    assert forgeries == [], forgeries
    assert not [line for line in output.splitlines() if line.startswith(forged[:24])]


def test_a_console_view_that_fails_still_writes_the_record_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever goes wrong drawing the console view, the record is written (as JSON) and the
    failure counted: the view never costs a record."""
    from sentinel import _output

    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise RuntimeError("view failed")

    monkeypatch.setattr(_output, "render_console", broken)
    stream = io.StringIO()
    registry = CollectorRegistry()
    emitter = Emitter(
        service="shop",
        location="eu-1",
        metrics=Metrics(registry),
        stream=stream,
        log_format="console",
    )
    assert emitter.emit("info", "custom_event", detail=1)
    assert json.loads(one_line(stream))["detail"] == 1
    assert counted(registry, "sentinel_internal_errors_total", component="output") == 1
