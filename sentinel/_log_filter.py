"""Scrub what servers and libraries log about requests, before any handler writes it.

An ASGI server logs request targets with their query strings (uvicorn's access log, its
websocket handshake lines), the OpenTelemetry SDK logs a malformed ``baggage`` header as it
came, and its exporters quote the collector's URL when an export fails. sentinel cannot
stop them logging, but it sees each record first: a filter on those loggers scrubs every
string argument (query values by key and by value) and exception argument, bounds its
length, scrubs a logged traceback, and lets at most a few lines of one library warning
through per minute, counting the rest.

One server line is left out: the traceback a framework sends as the message of a failed
lifespan (Starlette's ``lifespan.startup.failed``), which uvicorn logs at ERROR. sentinel
reports that exception itself (phase ``lifespan``), as it leaves out the server's
"Exception in ASGI application" for what it reported: each exception is reported once.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from ._scrub import MASKED, Scrubber, cut_scrubbed

SERVER_LOGGERS = (
    "uvicorn.access",
    "uvicorn.error",
    "hypercorn.access",
    "hypercorn.error",
    "granian.access",
    "daphne.server",
    "gunicorn.access",
    "gunicorn.error",
)
"""Loggers through which ASGI servers write request lines: scrubbed, never rate-limited."""

LIBRARY_LOGGERS = (
    "opentelemetry.baggage.propagation",
    "opentelemetry.propagate",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.sdk.trace",
    "opentelemetry.attributes",
    # The exporters quote the collector's URL, query and all, in their retry and failure
    # warnings (an HTTP client's error, the gRPC endpoint), and the batch processor logs
    # what an export raised with its traceback.
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)
"""Loggers of libraries that may quote a request's headers or the exporter's credentials in
a warning: scrubbed, bounded and rate-limited."""
HEADER_LOGGERS = (
    # OpenTelemetry's parser of OTEL_EXPORTER_OTLP_HEADERS quotes an entry it cannot parse,
    # credential and all ("x-api-key: ..." where "x-api-key=..." was meant).
    "opentelemetry.util.re",
)
"""Loggers whose arguments are always header material: each is masked whole, whatever its
name."""

MAX_ARGUMENT_CHARS = 512
"""Longest string argument of a filtered record; longer ones are cut and say so."""
LINES_PER_MINUTE = 5
"""Lines one library warning (logger and message) may write per minute."""


class ScrubbingFilter(logging.Filter):
    """Scrubs a record's message and string arguments; optionally rate-limits them."""

    def __init__(
        self,
        scrubber: Callable[[], Scrubber | None],
        *,
        rate_limited: bool,
        on_error: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        mask_arguments: bool = False,
    ) -> None:
        super().__init__()
        self._scrubber = scrubber
        self._rate_limited = rate_limited
        self._mask_arguments = mask_arguments
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        scrubber = self._scrubber()
        if scrubber is None:
            return True
        try:
            if _reported_lifespan_failure(record):
                return False
            if self._rate_limited and not self._admit(record):
                return False
            original = (record.msg, record.args)
            secret: frozenset[int | str] = frozenset()
            if record.args and isinstance(record.msg, str):
                # The template and its arguments stay apart (formatters and error trackers
                # read them: uvicorn's colours, Sentry's grouping), the placeholders whole;
                # an argument where the line reads as a secret ("token=%s") is masked.
                record.msg, secret = _template(scrubber, record.msg)
            elif isinstance(record.msg, str):
                record.msg = _bounded(scrubber, record.msg)
            if self._mask_arguments and record.args:
                arguments = record.args if isinstance(record.args, tuple) else (record.args,)
                record.args = tuple(scrubber.mask(str(arg)) for arg in arguments)
            elif isinstance(record.args, tuple):
                record.args = tuple(
                    scrubber.mask(str(arg))
                    if index in secret
                    else _scrubbed_argument(scrubber, arg)
                    for index, arg in enumerate(record.args)
                )
            elif isinstance(record.args, dict):
                record.args = _scrubbed_mapping(scrubber, record.args, secret)
            _leave_nothing_secret(scrubber, record, original)
            if record.stack_info:
                record.stack_info = scrubber.text(record.stack_info)
            if record.exc_info:
                # Written from exc_text by logging's Formatter; the live exception, which a
                # handler could format again, is dropped.
                text = record.exc_text or logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
                record.exc_text = scrubber.text(text)
            elif record.exc_text:
                record.exc_text = scrubber.text(record.exc_text)
        except Exception:
            # A record sentinel could not scrub is not written: it may hold the secret.
            self._on_error()
            return False
        return True

    def _admit(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = self._clock()
        with self._lock:
            window = self._windows.setdefault(key, [now, 0.0, 0.0])
            if now - window[0] >= 60.0:
                suppressed = window[2]
                window[:] = [now, 0.0, 0.0]
                if suppressed and isinstance(record.msg, str):
                    record.msg += f" ({int(suppressed)} similar lines suppressed by sentinel)"
            if window[1] >= LINES_PER_MINUTE:
                window[2] += 1
                return False
            window[1] += 1
            if len(self._windows) > 1024:  # bounded: one entry per message template
                self._windows.pop(next(iter(self._windows)))
        return True


_quoted_failures: list[str] = []
"""The messages of failed lifespans whose exception sentinel reported, each left out of the
server's log once (a few at most: a server runs one lifespan)."""
_quoted_lock = threading.Lock()


def leave_out_once(message: str) -> None:
    """Leave the server's next ERROR line that is exactly ``message`` out: the text of a
    ``lifespan.startup.failed`` (or ``shutdown.failed``) message whose exception sentinel
    reported (Starlette sends the traceback as that text, and uvicorn logs it)."""
    with _quoted_lock:
        _quoted_failures.append(message)
        del _quoted_failures[:-8]


def _reported_lifespan_failure(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a server's copy of a failed lifespan's message whose exception
    sentinel reported (see :func:`leave_out_once`): only that exact text, once."""
    if (
        not _quoted_failures
        or record.name not in SERVER_LOGGERS
        or record.levelno < logging.ERROR
        or record.args
        or not isinstance(record.msg, str)
    ):
        return False
    with _quoted_lock:
        if record.msg not in _quoted_failures:
            return False
        _quoted_failures.remove(record.msg)
    return True


def scrub_log_text(scrubber: Scrubber, text: str) -> str:
    """``text`` from a log line, with a request target's query string scrubbed by key and
    value, and secret-looking substrings masked."""
    path, sep, query = text.partition("?")
    if not sep or " " in path.strip():
        return _scrubbed_path(scrubber, text)
    # A request target ("/p?x=1", possibly followed by more of the line after a space).
    query, space, rest = query.partition(" ")
    scrubbed = scrubber.query_string(query)  # as sent, but for what it masks
    return (
        f"{_scrubbed_path(scrubber, path)}?{scrubbed}{space}{scrubber.text(rest) if rest else ''}"
    )


def _scrubbed_path(scrubber: Scrubber, path: str) -> str:
    # A path segment can carry a percent-encoded URL or query ("/cb%3Ftoken%3D..."): what
    # decoding shows is scrubbed, and shown decoded when that masked something (in any
    # text of a log line: a request line quotes the path too).
    scrubbed = scrubber.text(path)
    decoded = unquote(path)
    if decoded == path:
        return scrubbed
    decoded_scrubbed = scrubber.text(decoded)
    if decoded_scrubbed == decoded:
        return scrubbed
    # What decoding showed stays encoded where it would cut the line (a newline would start
    # a forged line of its own).
    return _CONTROL.sub(lambda match: quote(match.group()), decoded_scrubbed)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?(?P<conversion>.)"
)
_PROBE = "SentinelProbeValue"
"""Put where an argument goes, to ask the scrubber whether that place reads as a secret."""
_templates: weakref.WeakKeyDictionary[Scrubber, dict[str, tuple[str, frozenset[int | str]]]] = (
    weakref.WeakKeyDictionary()
)
"""Each scrubber's answers (its keys and hash are its own), by template."""
_MAX_TEMPLATES = 1024


def _template(scrubber: Scrubber, template: str) -> tuple[str, frozenset[int | str]]:
    """``template`` with its text scrubbed around its placeholders (each kept whole: a
    placeholder after a secret-looking key, ``code: %s``, is no value to mask), and the
    places (argument indexes, or mapping keys) whose argument reads as a secret there: the
    scrubber masks a probe value put in its place (``token=%s``, ``Bearer %s``). Remembered
    per template: a logger has few."""
    answers = _templates.get(scrubber)
    if answers is None:
        answers = _templates.setdefault(scrubber, {})
    known = answers.get(template)
    if known is not None:
        return known
    if len(template) > 2 * MAX_ARGUMENT_CHARS:  # no logger's template: cut, as any text
        return _bounded(scrubber, template), frozenset()
    parts: list[str] = []
    secret: set[int | str] = set()
    start = index = 0
    for match in _PLACEHOLDER.finditer(template):
        if "*" in match.group(0):  # widths from the arguments: no places to tell
            return _bounded(scrubber, template), frozenset()
        parts.append(_template_text(scrubber, template[start : match.start()]))
        parts.append(match.group(0))
        start = match.end()
        if match.group("conversion") == "%":
            continue
        place: int | str = match.group("key") if match.group("key") is not None else index
        index += match.group("key") is None
        tail = template[max(0, match.start() - 64) : match.start()]
        if match.group("conversion") in "sra" and (
            (isinstance(place, str) and scrubber.is_secret_key(place))
            or _PROBE not in scrub_log_text(scrubber, tail + _PROBE)
        ):
            secret.add(place)
    parts.append(_template_text(scrubber, template[start:]))
    result = ("".join(parts), frozenset(secret))
    if len(answers) < _MAX_TEMPLATES:
        answers[template] = result
    return result


def _template_text(scrubber: Scrubber, text: str) -> str:
    """Text of a template between two placeholders, scrubbed: a ``%`` the scrubbing wrote
    (a masked URL's value is percent-encoded) is escaped, or it would start a placeholder."""
    scrubbed = scrub_log_text(scrubber, text) if text else ""
    return scrubbed.replace("%", "%%") if scrubbed != text else text


_ATOM = re.compile(r"\{(?P<name>[^}]*)\}[ieo]")
"""A header or environment variable among an access logger's arguments (hypercorn's and
gunicorn's atoms: ``{authorization}i``, ``{database_url}e``)."""


def _scrubbed_mapping(
    scrubber: Scrubber, arguments: dict[Any, Any], secret: frozenset[int | str]
) -> dict[Any, Any]:
    """A line's mapping of arguments, scrubbed, of its own type: hypercorn's atoms answer a
    header missing from the request (``%({X-Forwarded-For}i)s``) with "-", where a plain dict
    would raise and logging would print the arguments whole. A header or variable whose name
    the scrubber masks is masked whatever its value looks like."""
    try:
        scrubbed: dict[Any, Any] = copy.copy(arguments)
        scrubbed.update(arguments)  # writable? (werkzeug's ImmutableDict is not)
    except Exception:
        scrubbed = dict(arguments)
    # hypercorn lower-cases its header atoms; the template names them as the user wrote them.
    secret_atoms = {place.lower() for place in secret if isinstance(place, str)}
    for key, value in arguments.items():
        atom = _ATOM.fullmatch(key) if isinstance(key, str) else None
        if (
            key in secret
            or (atom is not None and key.lower() in secret_atoms)
            or (atom is not None and scrubber.is_secret_key(atom.group("name")))
        ):
            scrubbed[key] = scrubber.mask(str(value))
        else:
            scrubbed[key] = _scrubbed_argument(scrubber, value)
    return scrubbed


def _scrubbed_argument(scrubber: Scrubber, argument: object) -> object:
    """A string argument scrubbed and bounded; an exception (an HTTP client's error quotes
    the URL) as its scrubbed text; anything else as it is, so %d and %r still format it."""
    if isinstance(argument, str):
        return _bounded(scrubber, argument)
    if isinstance(argument, BaseException):
        return _bounded(scrubber, str(argument))
    return argument


def _bounded(scrubber: Scrubber, text: str, limit: int = MAX_ARGUMENT_CHARS) -> str:
    if len(text) <= limit:
        return scrub_log_text(scrubber, text)
    # Scrubbed with a limit (past it the text is masked whole, and no token is cut in two:
    # a URL's password cut from its "@" looks harmless), then cut: no mask is cut open.
    return cut_scrubbed(scrubber.text(text, limit=2 * limit), limit, _cut_marker(len(text)))


def _cut_marker(length: int) -> str:
    return f"...[{length} characters, cut by sentinel]"


def _formatted(msg: object, args: Any) -> str | None:
    """The line logging would write for ``msg`` and ``args``; None when it cannot."""
    try:
        text = str(msg)
        return text % args if args else text
    except Exception:
        return None


_SHORTEST_SECRET = 4
"""Masked values shorter than this are not looked for in a line (they occur by chance)."""
_PARTS = re.compile(r"""[\s:@/=&,;'"()\[\]{}]+""")


def _masked_spans(line: str, scrubbed: str) -> list[tuple[int, int]] | None:
    """Where the values of ``line`` are that the scrubber masked in ``scrubbed`` (each mask
    says its value's length); None when ``scrubbed`` is not ``line`` with values replaced
    by masks."""
    spans: list[tuple[int, int]] = []
    position = start = 0
    for mask in MASKED.finditer(scrubbed):
        kept = scrubbed[start : mask.start()]
        if not line.startswith(kept, position):
            return None
        position += len(kept)
        if line.startswith(mask.group(0), position):  # masked before: kept as it was
            position += len(mask.group(0))
        else:
            length = int(mask.group("length"))
            spans.append((position, position + length))
            position += length
        start = mask.end()
    if line[position:] != scrubbed[start:]:
        return None
    return spans


def _places(template: str, arguments: Any, line: str) -> list[tuple[int, int, Any]] | None:
    """Where each argument is in ``line``, the template formatted: (start, end, index or
    key); None when that cannot be told (widths from the arguments)."""
    places: list[tuple[int, int, Any]] = []
    written = start = index = 0
    try:
        for match in _PLACEHOLDER.finditer(template):
            written += match.start() - start  # text between placeholders holds no "%"
            start = match.end()
            if match.group("conversion") == "%":
                written += 1
                continue
            if "*" in match.group(0):
                return None
            key = match.group("key")
            if key is None:
                text = match.group(0) % (arguments[index],)
                key, index = index, index + 1
            else:
                text = match.group(0) % arguments
            places.append((written, written + len(text), key))
            written += len(text)
    except Exception:
        return None
    return places if written + len(template) - start == len(line) else None


def _holds_none(scrubber: Scrubber, line: str | None, secrets: list[str]) -> bool:
    """Whether ``line`` formats, holds none of ``secrets`` (the masks' own text aside: a
    value "hash" is not in "hash=...") and nothing the scrubber would mask."""
    if line is None:
        return False
    bare = MASKED.sub("\0", line)
    return not any(secret in bare for secret in secrets) and scrubber.text(line) == line


def _leave_nothing_secret(
    scrubber: Scrubber, record: logging.LogRecord, original: tuple[object, Any]
) -> None:
    """Make sure the record now formats to a line that holds none of the values the
    scrubber masks in its original whole line (nor their parts), nor anything it would
    mask now. Scrubbing the template and each argument apart keeps what readers of the
    arguments need, but misses a secret only the whole line shows: a key in one argument
    and its value in the next (``"%s=%s", ("password", x)``), a password before the ``@``
    the template adds, a dict or an object whose text holds one, a non-string message.

    An argument a masked value reaches into must have been changed; failing that, every
    string argument is masked whole (none of those values reaching into a number), then
    every argument (the placeholders made ``%s``); failing that, the record formats to its
    whole line scrubbed, its arguments masked and formatted to nothing (``%.0s``), so that
    formatters that read them (uvicorn's access formatter unpacks five) still can."""
    message, arguments = original
    line = _formatted(message, arguments)
    if line is None:  # logging would fail and print the arguments: the message alone
        scrubbed = scrubber.text(str(message))
    else:
        scrubbed = scrubber.text(line)
        if scrubbed == line and (record.msg, record.args) == original:
            return  # nothing to mask, and nothing changed
        spans = _masked_spans(line, scrubbed)
        if spans is not None and isinstance(message, str) and isinstance(record.msg, str):
            places = _places(message, arguments, line) if arguments else []
            if places is not None and _kept_masked(
                scrubber, record, line, spans, places, arguments
            ):
                return
    _whole_line(scrubber, record, scrubbed, arguments)


def _kept_masked(
    scrubber: Scrubber,
    record: logging.LogRecord,
    line: str,
    spans: list[tuple[int, int]],
    places: list[tuple[int, int, Any]],
    before: Any,
) -> bool:
    """Whether the record, or it with its arguments masked (see
    :func:`_leave_nothing_secret`), holds nothing secret; the record is left so."""
    secrets: list[str] = []
    reached: set[Any] = set()
    for begin, end in spans:
        value = line[begin:end]
        secrets += [p for p in {value, *_PARTS.split(value)} if len(p) >= _SHORTEST_SECRET]
        reached.update(key for start, stop, key in places if start < end and begin < stop)
    arguments = record.args
    changed = all(_differ(_argument(arguments, key), _argument(before, key)) for key in reached)
    if changed and _holds_none(scrubber, _formatted(record.msg, arguments), secrets):
        return True
    if not arguments:
        return False
    numbers_reached = any(isinstance(_argument(arguments, key), int | float) for key in reached)
    for numbers in (False, True):
        if not numbers and numbers_reached:
            continue
        # (the arguments as they came: one masked already would be masked again)
        masked = _masked_arguments(scrubber, before, numbers=numbers)
        template = _all_strings(record.msg) if numbers else record.msg
        if (
            masked is not None
            and template is not None
            and _holds_none(scrubber, _formatted(template, masked), secrets)
        ):
            if template != record.msg:
                record.__dict__.pop("color_message", None)  # its placeholders are the old
            record.msg, record.args = template, masked
            return True
    return False


def _differ(now: object, before: object) -> bool:
    """Whether scrubbing changed an argument (one whose comparison raises: taken as not)."""
    try:
        return bool(now != before)
    except Exception:
        return False


def _argument(arguments: Any, key: Any) -> object:
    """The argument at ``key`` (an index or a mapping key); None when there is none."""
    try:
        return arguments[key]
    except Exception:
        return None


def _whole_line(
    scrubber: Scrubber, record: logging.LogRecord, scrubbed: str, arguments: Any
) -> None:
    """The record formats to ``scrubbed`` (cut), with its original ``arguments`` masked."""
    text = cut_scrubbed(scrubbed, 4 * MAX_ARGUMENT_CHARS, _cut_marker(len(scrubbed)))
    record.__dict__.pop("color_message", None)
    if isinstance(arguments, tuple) and arguments:
        record.msg = text.replace("%", "%%") + "%.0s" * len(arguments)
        record.args = _masked_arguments(scrubber, arguments, numbers=True)
    elif isinstance(arguments, Mapping) and arguments:
        record.msg = text.replace("%", "%%")
        record.args = _masked_arguments(scrubber, arguments, numbers=True)
    else:
        record.msg, record.args = text, ()


def _all_strings(template: str) -> str | None:
    """``template`` with each placeholder ``%s`` (``%(key)s``), so that masks can take the
    place of numbers; None when a width or precision is an argument (``%*d``)."""

    def as_string(match: re.Match[str]) -> str:
        if match.group("conversion") == "%":
            return match.group(0)
        if "*" in match.group(0):
            raise ValueError(match.group(0))
        key = match.group("key")
        return "%s" if key is None else f"%({key})s"

    try:
        return _PLACEHOLDER.sub(as_string, template)
    except ValueError:
        return None


def _masked_arguments(scrubber: Scrubber, arguments: Any, *, numbers: bool) -> Any:
    """``arguments`` with each one masked whole (numbers too, when told); None when they
    cannot be."""

    def masked(argument: object) -> object:
        if isinstance(argument, int | float) and not numbers:
            return argument
        try:
            return scrubber.mask(str(argument))
        except Exception:  # its __str__ raised: what it is stands for it
            return scrubber.mask(type(argument).__name__)

    if isinstance(arguments, tuple):
        return tuple(masked(argument) for argument in arguments)
    if isinstance(arguments, Mapping):
        try:
            copied: Any = copy.copy(arguments)
            for key, value in arguments.items():
                copied[key] = masked(value)
        except Exception:  # read-only, or not copyable: a plain dict of the same items
            return {key: masked(value) for key, value in arguments.items()}
        return copied
    return None


_filters: list[tuple[logging.Logger, ScrubbingFilter]] = []
_install_lock = threading.Lock()


def install_log_scrubbing(
    scrubber: Callable[[], Scrubber | None], on_error: Callable[[], None]
) -> None:
    """Add the filters to the server and library loggers, once per process."""
    with _install_lock:
        if _filters:
            return
        for names, rate_limited, mask in (
            (SERVER_LOGGERS, False, False),
            (LIBRARY_LOGGERS, True, False),
            (HEADER_LOGGERS, True, True),
        ):
            for name in names:
                logger = logging.getLogger(name)
                log_filter = ScrubbingFilter(
                    scrubber, rate_limited=rate_limited, on_error=on_error, mask_arguments=mask
                )
                logger.addFilter(log_filter)
                _filters.append((logger, log_filter))


def log_scrubbing_installed() -> bool:
    """Whether :func:`install_log_scrubbing` put filters on loggers (not removed since)."""
    return bool(_filters)


def uninstall_log_scrubbing() -> None:
    """Remove the filters (for tests)."""
    with _install_lock:
        for logger, log_filter in _filters:
            logger.removeFilter(log_filter)
        _filters.clear()
