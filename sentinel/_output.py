"""Where sentinel's records go: structlog on stderr, plus optional sinks.

Two formats: JSON lines for machines (the default), and a console view for people
(structlog's ConsoleRenderer; an exception report shows its culprit, then its traceback,
drawn by rich where it is installed), chosen when the stream is a terminal and no format is
set. Both render the same record after scrubbing: the console view reads the report's own
frames, never the live exception or the source files, so it shows nothing the JSON line
does not.

The output is independent of the app's ``logging`` and ``structlog`` configuration: sentinel
wraps its own logger with its own processors and writes straight to the stream.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import structlog

try:
    import fcntl
except ImportError:  # not POSIX: each worker writes as one process would
    fcntl = None  # type: ignore[assignment]

from ._exceptions import culprit, culprit_frame
from ._metrics import Metrics

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.text import Text

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


def _target(stream: IO[str] | None) -> IO[str] | None:
    # Resolved at write time so that a stream swapped by a test harness is honoured, but a
    # closed or replaced-with-None stderr falls back to the real one.
    return stream or sys.stderr or sys.__stderr__


STREAM_WAIT_SECONDS = 1.0
"""How long a record waits for another record's write to the stream before it is dropped
(and counted): a write to a pipe nobody reads never returns."""


class StreamBlocked(Exception):
    """Another write to the stream did not return in time; this record is not written."""


OUTPUT_LOCK_PREFIX = "sentinel_output_"
"""Lock files in the workers' shared directory, one per stream they write to (named by its
device and inode): a worker holds the one of its stream while it writes a record. A write to
a pipe is whole only up to PIPE_BUF (4 KiB), and a report can be 64 KiB."""
_MAX_LOCK_FILES = 16

_lock_files: dict[str, tuple[int, threading.Lock]] = {}
"""This process's open lock files, by path: one descriptor each, whatever the sentinels, and
the lock its threads take first (a flock is the descriptor's: two sentinels of one process
would both hold it at once)."""
_lock_files_pid: int | None = None
_lock_files_lock = threading.Lock()


def _lock_file(path: str) -> tuple[int, threading.Lock] | None:
    global _lock_files_pid
    with _lock_files_lock:
        if _lock_files_pid != os.getpid():  # a forked child: its parent's copies go
            for inherited, _ in _lock_files.values():
                with contextlib.suppress(OSError):
                    os.close(inherited)
            _lock_files.clear()
            _lock_files_pid = os.getpid()
        entry = _lock_files.get(path)
        if entry is None and len(_lock_files) < _MAX_LOCK_FILES:
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                entry = _lock_files[path] = (fd, threading.Lock())
        return entry


class _WorkersLock:
    """The lock the processes writing to one stream from one server (sharing a multiprocess
    directory: its workers, on their common stderr) take in turn to write a record, so that
    two workers' records never cut into each other; nothing outside such a server, and
    nothing between processes writing to different streams."""

    def __init__(self) -> None:
        self._stream: object = None
        self._pid: int | None = None
        self._file_lock: tuple[int, threading.Lock] | None = None
        self._stalled = False
        """A wait for the lock timed out and no write took it since: only try."""

    def acquire(self, stream: IO[str], timeout: float) -> bool | None:
        """Take the lock of ``stream`` within ``timeout``: True, False when another process
        held it that long, None when there is no lock to take."""
        entry = self._file(stream)
        if entry is None:
            return None
        fd, threads = entry
        wait = 0.0 if self._stalled else timeout
        deadline = time.monotonic() + wait
        acquired = threads.acquire(timeout=wait) if wait > 0 else threads.acquire(blocking=False)
        if not acquired:  # another thread of this process is writing to the stream
            self._stalled = True
            return False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    threads.release()
                    self._stalled = True
                    return False
                time.sleep(0.001)
            except OSError:
                threads.release()
                return None  # the file cannot be locked: written as one process would
            else:
                self._stalled = False
                return True

    def release(self) -> None:
        if self._file_lock is not None:
            fd, threads = self._file_lock
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            threads.release()

    def _file(self, stream: IO[str]) -> tuple[int, threading.Lock] | None:
        if stream is self._stream and self._pid == os.getpid():
            return self._file_lock
        self._stream, self._pid, self._file_lock = stream, os.getpid(), None
        from ._location import shared_directory

        directory = shared_directory()
        if not directory or fcntl is None:
            return None
        try:
            status = os.fstat(stream.fileno())
        except (OSError, ValueError, AttributeError):
            return None  # no file descriptor (a StringIO): this process's alone
        name = f"{OUTPUT_LOCK_PREFIX}{status.st_dev:x}_{status.st_ino:x}.lock"
        self._file_lock = _lock_file(os.path.join(directory, name))
        return self._file_lock


class _StreamLogger:
    """A structlog logger that writes each rendered record to a stream, one write each."""

    def __init__(self, stream: IO[str] | None, lock: threading.Lock) -> None:
        self._stream = stream
        self._lock = lock
        self._stalled = False
        """A wait for the lock timed out and its write has not returned since: only try."""
        self._workers = _WorkersLock()

    def msg(self, message: str) -> None:
        stream = _target(self._stream)
        if stream is None:
            return
        started = time.monotonic()
        if self._stalled:
            acquired = self._lock.acquire(blocking=False)
        else:
            acquired = self._lock.acquire(timeout=STREAM_WAIT_SECONDS)
        if not acquired:
            self._stalled = True
            raise StreamBlocked(f"a write to the stream took over {STREAM_WAIT_SECONDS} s")
        try:
            left = max(0.0, STREAM_WAIT_SECONDS - (time.monotonic() - started))
            shared = self._workers.acquire(stream, left)
            if shared is False:
                msg = f"another worker's write took over {STREAM_WAIT_SECONDS} s"
                raise StreamBlocked(msg)
            try:
                stream.write(message + "\n")
                stream.flush()
            finally:
                if shared:
                    self._workers.release()
        finally:
            self._stalled = False  # the stream takes writes again
            self._lock.release()

    debug = info = warning = warn = error = critical = exception = log = fatal = msg


class Emitter:
    """Writes records with the fields every record has: timestamp, level, event, service,
    environment, location.

    ``log_format`` is ``"json"``, ``"console"``, or None for console on a terminal and JSON
    otherwise (decided at write time, for the stream written to then).
    """

    def __init__(
        self,
        *,
        service: str,
        location: str,
        metrics: Metrics,
        stream: IO[str] | None = None,
        sinks: tuple[Sink, ...] = (),
        log_format: str | None = None,
        environment: str = "unknown",
    ) -> None:
        self.service = service
        self.environment = environment
        self.location = location
        self.log_format = log_format
        self._metrics = metrics
        self._sinks = sinks
        self._stream = stream
        self._terminal: tuple[object, bool] = (None, False)
        """The stream last looked at, and whether it is a terminal."""
        self._logger = structlog.wrap_logger(
            _StreamLogger(stream, threading.Lock()),
            processors=[
                self._add_common_fields,
                structlog.processors.add_log_level,
                _add_timestamp,
                self._call_sinks,
                self._render,
            ],
            # Explicit, so an app's structlog.configure() (a level filter, say) cannot
            # change or silence sentinel's output.
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=True,
        )

    def envelope_bytes(self, event: str, level: str) -> int:
        """Bytes the fields added on emission (event, level, service, environment) take in a
        line."""
        envelope = {
            "event": event,
            "level": level,
            "service": self.service,
            "environment": self.environment,
        }
        return len(dumps(envelope)) - 1

    def emit(self, level: str, event: str, **fields: Any) -> bool:
        """Write one record; returns False (and counts it) when it could not be written."""
        try:
            getattr(self._logger, level)(event, **fields)
        except (StreamBlocked, OSError):
            # Not a failure of sentinel's: the stream takes nothing, its reader went away
            # (a broken pipe) or its disk is full.
            self._metrics.dropped("write_failed")
            return False
        except Exception:
            if not getattr(_target(self._stream), "closed", False):  # else: closed under us
                self._metrics.internal_error("output")
            self._metrics.dropped("write_failed")
            return False
        return True

    def _add_common_fields(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.setdefault("service", self.service)
        event_dict.setdefault("environment", self.environment)
        event_dict.setdefault("location", self.location)
        return event_dict

    def _call_sinks(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        for sink in self._sinks:
            try:
                sink(copy.deepcopy(dict(event_dict)))
            except Exception:
                self._metrics.internal_error("sink")
        return event_dict

    def _render(self, _logger: Any, _method: str, event_dict: Any) -> str:
        if self.log_format == "json":
            return dumps(event_dict)
        terminal, width = self._is_terminal(_target(self._stream))
        if self.log_format is None and not terminal:
            return dumps(event_dict)
        colors = terminal and not os.environ.get("NO_COLOR")
        try:
            return render_console(event_dict, colors=colors, width=width)
        except Exception:  # the view failed: the record still goes out, as JSON
            self._metrics.internal_error("output")
            return dumps(event_dict)

    def _is_terminal(self, stream: IO[str] | None) -> tuple[bool, int]:
        """Whether ``stream`` is a terminal (remembered for the last stream), and its width
        now (a terminal may be resized)."""
        known, terminal = self._terminal
        if known is not stream or stream is None:
            try:
                terminal = stream is not None and bool(stream.isatty())
            except Exception:  # closed, detached, or not a file at all
                terminal = False
            self._terminal = (stream, terminal)
        if not terminal or stream is None:
            return False, _WIDTH
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except Exception:
            return True, _WIDTH
        return True, max(40, columns) if columns else _WIDTH  # 0: the size was never set


def iso_timestamp(seconds: float | None = None) -> str:
    """ISO 8601 UTC with millisecond precision, e.g. ``2026-11-26T04:11:54.123Z``."""
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _add_timestamp(_logger: Any, _method: str, event_dict: Any) -> Any:
    # Reports are written off the request path, so the caller passes the moment it happened.
    event_dict.setdefault("timestamp", iso_timestamp())
    return event_dict


# -- the console view -------------------------------------------------------------------------

_WIDTH = 100
"""Columns of the console view on a stream that is not a terminal."""
_TRACEBACK_FIELDS = (
    "frames",
    "causes",
    "causes_skipped",
    "exceptions",
    "exceptions_skipped",
    "notes",
    "notes_skipped",
)
_RESERVED = ("exception", "exc_info", "stack")
"""Keys ConsoleRenderer treats specially (exc_info would make it format the live exception,
locals and all); a record's own field of that name is shown as ``name_``."""
_SEPARATORS = {
    "cause": "The above exception was the direct cause of the following exception:",
    "context": "During handling of the above exception, another exception occurred:",
}
_RENDERERS: dict[bool, structlog.dev.ConsoleRenderer] = {}


def render_console(record: Mapping[str, Any], *, colors: bool, width: int = _WIDTH) -> str:
    """One record for people: structlog's ConsoleRenderer line (timestamp, level, event,
    then the fields), and for an exception report its culprit and traceback under it.

    Only the record is read, so what is shown is what the JSON line holds, scrubbed alike.
    Control characters are escaped: a message cannot forge a line or drive the terminal.
    """
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if key in _TRACEBACK_FIELDS or value is None:  # an empty trace_id says nothing here
            continue
        name = _printable(str(key))
        fields[f"{name}_" if name in _RESERVED else name] = (
            _printable(value) if isinstance(value, str) else value
        )
    renderer = _RENDERERS.get(colors)
    if renderer is None:
        renderer = _RENDERERS[colors] = structlog.dev.ConsoleRenderer(
            colors=colors,
            sort_keys=False,
            exception_formatter=structlog.dev.plain_traceback,
        )
    line = renderer(None, str(record.get("level", "info")), fields)
    frames = record.get("frames")
    if not isinstance(frames, list):
        return line
    try:
        block = _rich_traceback(record, colors, width)
    except Exception:  # rich is optional for this view (and never the reason a record is lost)
        block = _plain_traceback(record)
    return f"{line}\n{block}"


def _printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with control characters escaped as Python writes them (``\\x1b``)."""
    if text.isprintable():
        return text
    kept = "\n" if keep_newlines else ""
    return "".join(
        char if char.isprintable() or char in kept else repr(char)[1:-1] for char in text
    )


def _chain(record: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], str | None]]:
    """The exceptions of a report in the order Python prints them (the root cause first),
    each with the sentence that leads to the next one."""
    causes = [cause for cause in record.get("causes") or () if isinstance(cause, Mapping)]
    for cause in reversed(causes):
        yield cause, _SEPARATORS.get(str(cause.get("relation")))
    yield record, None


def _blamed(record: Mapping[str, Any]) -> str:
    """The report's culprit, or for a record without one, what its frames blame."""
    return _printable(str(record.get("culprit") or culprit(_frames(record))))


def _heading(item: Mapping[str, Any]) -> str:
    """``Type: message``, then its notes, as Python prints them; a message's or a note's
    further lines indented, so none reads as a record."""
    exception_type = _printable(str(item.get("exception_type", "?")))
    message = _printable(str(item.get("message", "")), keep_newlines=True)
    message = message.replace("\n", "\n    ")
    heading = f"{exception_type}: {message}" if message else exception_type
    for note in item.get("notes") or ():
        # Indented, unlike Python's own print: a note is the app's text, like the message.
        note_text = _printable(str(note), keep_newlines=True)
        heading += "\n    " + note_text.replace("\n", "\n        ")
    if item.get("notes_skipped"):
        heading += f"\n({item['notes_skipped']} more notes not kept)"
    return heading


def _links_left_out(item: Mapping[str, Any]) -> str | None:
    """What says that exceptions of the chain were not kept (``causes_skipped``)."""
    skipped = item.get("causes_skipped")
    return f"({skipped} more exceptions of the chain not kept)" if skipped else None


def _frames(item: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    frames = item.get("frames")
    return (
        [frame for frame in frames if isinstance(frame, Mapping)]
        if isinstance(frames, list)
        else []
    )


def _where(frame: Mapping[str, Any]) -> str:
    return _printable(
        f"{frame.get('file', '?')}:{frame.get('line', '?')} in {frame.get('function', '?')}"
    )


def _plain_traceback(record: Mapping[str, Any], indent: str = "") -> str:
    """The traceback in Python's own layout, from the report's scrubbed frames."""
    lines: list[str] = []
    if not indent:
        lines.append(f"culprit: {_blamed(record)}")
        blamed = culprit_frame(_frames(record))
        if blamed is not None and blamed.get("source"):
            lines.append(f"    {_printable(str(blamed['source']))}")
    left_out = _links_left_out(record)
    if left_out:
        lines.append(left_out)
    for item, separator in _chain(record):
        lines.append("Traceback (most recent call last):")
        for frame in _frames(item):
            if "skipped_frames" in frame:
                lines.append(f"  ... {frame['skipped_frames']} frames not kept ...")
                continue
            lines.append(
                _printable(
                    f'  File "{frame.get("file", "?")}", line {frame.get("line", "?")},'
                    f" in {frame.get('function', '?')}"
                )
            )
            if frame.get("source"):
                lines.append(f"    {_printable(str(frame['source']))}")
            for name, value in (frame.get("locals") or {}).items():
                lines.append(f"      {_printable(str(name))} = {_printable(str(value))}")
        lines.extend(_heading(item).split("\n"))
        lines.extend(_plain_members(item))
        if separator:
            lines.extend(("", separator, ""))
    return "\n".join(indent + line for line in lines)


def _plain_members(item: Mapping[str, Any]) -> list[str]:
    members = [member for member in item.get("exceptions") or () if isinstance(member, Mapping)]
    lines: list[str] = []
    for number, member in enumerate(members, 1):
        lines.append(f"  +---- {number} of {len(members)} ----")
        lines.append(_plain_traceback(member, indent="  | "))
    if item.get("exceptions_skipped"):
        lines.append(f"  +---- and {item['exceptions_skipped']} more ----")
    return lines


def _rich_traceback(record: Mapping[str, Any], colors: bool, width: int) -> str:
    """The culprit, then the traceback drawn by rich, from the report's scrubbed frames
    (rich's own Traceback would read the live exception and the source files)."""
    from rich.console import Console, Group
    from rich.text import Text

    parts: list[RenderableType] = [
        Text.assemble(("culprit ", "bold red"), (_blamed(record), "bold"))
    ]
    blamed = culprit_frame(_frames(record))
    if blamed is not None and blamed.get("source"):
        parts.append(_rich_source(blamed, highlight=True))
    parts.extend(_rich_chain(record))
    console = Console(
        file=io.StringIO(),
        width=width,
        force_terminal=colors,
        color_system="standard" if colors else None,
        no_color=not colors,
        highlight=False,
        markup=False,
        emoji=False,
        legacy_windows=False,
    )
    with console.capture() as capture:
        console.print(Group(*parts), crop=False)
    return capture.get().rstrip("\n")


def _rich_chain(record: Mapping[str, Any]) -> list[RenderableType]:
    from rich.panel import Panel
    from rich.text import Text

    parts: list[RenderableType] = []
    left_out = _links_left_out(record)
    if left_out:
        parts.append(Text(left_out, style="dim"))
    for item, separator in _chain(record):
        frames = _rich_frames(_frames(item))
        parts.append(
            Panel(
                frames,
                title="Traceback (most recent call last)",
                title_align="left",
                border_style="red",
                expand=True,
            )
        )
        parts.append(_Hanging(Text(_heading(item), style="bold red")))
        members = [member for member in item.get("exceptions") or () if isinstance(member, Mapping)]
        for number, member in enumerate(members, 1):
            inner = _rich_chain(member)
            parts.append(
                Panel(
                    _group(inner),
                    title=f"{number} of {len(members)}",
                    title_align="left",
                    border_style="dim",
                )
            )
        if item.get("exceptions_skipped"):
            parts.append(Text(f"and {item['exceptions_skipped']} more", style="dim"))
        if separator:
            parts.append(Text(f"\n{separator}\n", style="italic"))
    return parts


HANGING_INDENT = 4
"""How far the lines a heading wraps into are indented, as its own further lines are."""


class _Hanging:
    """Text wrapped to the width with every line after the first indented: an exception's
    message or note, however long, never starts a line of its own that could read as a
    record."""

    def __init__(self, text: Text) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        width = max(options.max_width - HANGING_INDENT, 8)
        lines: list[Text] = []
        for own_line in self.text.split("\n"):  # each as the heading indents it
            first, *wrapped = own_line.wrap(console, width)
            lines.append(first)
            for line in wrapped:
                line.pad_left(HANGING_INDENT)
                lines.append(line)
        yield Text("\n").join(lines)


def _group(parts: Sequence[RenderableType]) -> RenderableType:
    from rich.console import Group

    return Group(*parts)


def _rich_frames(frames: Sequence[Mapping[str, Any]]) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    parts: list[RenderableType] = []
    for frame in frames:
        if "skipped_frames" in frame:
            parts.append(Text(f"... {frame['skipped_frames']} frames not kept ...", style="dim"))
            continue
        in_app = bool(frame.get("in_app"))
        parts.append(Text(_where(frame), style="bold" if in_app else "dim"))
        if frame.get("source"):
            parts.append(_rich_source(frame, highlight=False))
        frame_locals = frame.get("locals")
        if isinstance(frame_locals, Mapping) and frame_locals:
            table = Table.grid(padding=(0, 1))
            table.add_column(style="cyan", no_wrap=True)
            table.add_column()
            for name, value in frame_locals.items():
                table.add_row(Text(_printable(str(name))), Text(f"= {_printable(str(value))}"))
            parts.append(table)
    return _group(parts) if parts else Text("(no frames)", style="dim")


def _rich_source(frame: Mapping[str, Any], *, highlight: bool) -> RenderableType:
    from rich.syntax import Syntax

    line = frame.get("line")
    start = line if isinstance(line, int) and line > 0 else 1
    return Syntax(
        _printable(str(frame["source"])),
        "python",
        theme="ansi_dark",
        line_numbers=True,
        start_line=start,
        highlight_lines={start} if highlight else None,
        word_wrap=True,
        background_color="default",
    )
