"""The per-request context: what sentinel knows about the request being served, and the
tags and contexts the app attaches to its reports (``sentinel.set_tag``,
``sentinel.set_context``)."""

from __future__ import annotations

import datetime
import decimal
import math
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

from ._routes import UNMATCHED_ROUTE
from ._scrub import Scrubber
from ._vocabulary import Phase
from .types import Scope

MAX_TAGS: Final = 32
"""Tags per request (and for the process); more are refused."""
MAX_TAG_KEY_CHARS: Final = 32
"""Longest tag key; a longer one is refused (a cut key could collide with another)."""
MAX_TAG_VALUE_CHARS: Final = 200
"""Longest tag value; a longer one is cut."""
MAX_CONTEXTS: Final = 8
"""Contexts per request (and for the process); more are refused."""
MAX_CONTEXT_NAME_CHARS: Final = 32
"""Longest context name; a longer one is refused."""
MAX_CONTEXT_CHARS: Final = 2048
"""Text one context holds: its keys and values counted in characters (a number, ``true`` or
``null`` as 4). What does not fit is left out."""
MAX_CONTEXT_DEPTH: Final = 3
"""Nesting of mappings and lists kept in a context; deeper ones are left out."""
_MAX_SCRUB_DEPTH = 32
_TEXT_TYPES = (
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid.UUID,
    decimal.Decimal,
)
"""Exact types whose ``str()`` is the standard library's, taken as text; an object of any
other type is written as ``<TypeName>``: its own ``__str__`` would run the app's code."""


class Annotations:
    """The tags and contexts of one request, or of the process (outside any request), kept
    within the bounds above; ``truncated`` counts what was refused, cut or left out."""

    __slots__ = ("_lock", "contexts", "tags", "truncated")

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.contexts: dict[str, dict[str, Any]] = {}
        self.truncated = 0
        self._lock = threading.Lock()

    @property
    def empty(self) -> bool:
        return not (self.tags or self.contexts or self.truncated)

    def set_tag(self, key: object, value: object) -> None:
        if not isinstance(key, str) or not key or len(key) > MAX_TAG_KEY_CHARS:
            self._truncate()
            return
        key = str.__str__(key)
        with self._lock:
            if value is None:
                self.tags.pop(key, None)
                return
            if key not in self.tags and len(self.tags) >= MAX_TAGS:
                self.truncated += 1
                return
            text = _text(value)
            if len(text) > MAX_TAG_VALUE_CHARS:
                text = _cut(text, MAX_TAG_VALUE_CHARS)
                self.truncated += 1
            self.tags[key] = text

    def set_context(self, name: object, value: object) -> None:
        if not isinstance(name, str) or not name or len(name) > MAX_CONTEXT_NAME_CHARS:
            self._truncate()
            return
        name = str.__str__(name)
        if value is None:
            with self._lock:
                self.contexts.pop(name, None)
            return
        if not isinstance(value, Mapping):
            self._truncate()
            return
        with self._lock:
            if self._no_room_for(name):
                return
        # Converted outside the lock: it runs the mapping's own iteration.
        budget = _Budget(MAX_CONTEXT_CHARS)
        try:
            converted = _plain_mapping(value, 1, budget)
        except Exception:  # the app's mapping failed to iterate
            self._truncate()
            return
        with self._lock:
            if self._no_room_for(name):  # another thread may have added one meanwhile
                return
            self.contexts[name] = converted
            self.truncated += budget.truncated

    def clear(self) -> None:
        """Forget every tag and context (and the count of what was cut)."""
        with self._lock:
            self.tags, self.contexts, self.truncated = {}, {}, 0

    def _truncate(self) -> None:
        with self._lock:
            self.truncated += 1

    def _no_room_for(self, name: str) -> bool:
        """Whether a new context ``name`` would pass MAX_CONTEXTS (counted as truncated);
        call with the lock held."""
        if name not in self.contexts and len(self.contexts) >= MAX_CONTEXTS:
            self.truncated += 1
            return True
        return False


class _Budget:
    """Characters a context may still take; ``truncated`` counts what was cut or left out."""

    __slots__ = ("chars", "truncated")

    def __init__(self, chars: int) -> None:
        self.chars = chars
        self.truncated = 0

    def take(self, chars: int) -> bool:
        """Take ``chars``; False (and nothing left) when they do not fit."""
        if chars > self.chars:
            self.chars = 0
            return False
        self.chars -= chars
        return True


def _text(value: object) -> str:
    """A tag value as text, without running the app's code: str, numbers and a few standard
    library types as themselves, anything else as ``<TypeName>``."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value) if _fits(value) else "<int>"
    if isinstance(value, float):
        return float.__repr__(value)
    if type(value) in _TEXT_TYPES:
        return str(value)
    return f"<{type(value).__name__}>"


def _cut(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` with ``...`` after it, on the request path,
    before it is scrubbed (off it): so the cut falls at the last whitespace before the bound
    and the token it would split is left out. Cut inside, a token could lose what shows it
    to be a secret (a URL cut between its password and ``@``); whitespace ends such a token.
    At most the last 256 characters before the bound are left out that way (the head of a
    longer run stays), as :meth:`Scrubber.text` masks them at its own bound."""
    end = max_chars - 3
    window = max(0, end - _CUT_WINDOW)
    space = max(text.rfind(c, window, end + 1) for c in _SPACES)
    return text[: space if space >= 0 else window] + "..."


_CUT_WINDOW = 256
_SPACES = " \t\r\n\f\v"


def _fits(number: int) -> bool:
    """Whether an int is written as a number (a huge one would be costly, or refused, as
    text)."""
    return int.bit_length(number) <= 64


def _plain(value: object, depth: int, budget: _Budget) -> tuple[bool, Any]:
    """(kept, value as JSON data) for one value of a context, within ``budget``."""
    if value is None or isinstance(value, bool):
        return budget.take(4), value
    if isinstance(value, int):
        return budget.take(4), int.__index__(value) if _fits(value) else "<int>"
    if isinstance(value, float):
        number = float.__float__(value)
        return budget.take(4), number if math.isfinite(number) else float.__repr__(number)
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        if depth >= MAX_CONTEXT_DEPTH or not budget.take(2):
            return False, None
        if isinstance(value, Mapping):
            return True, _plain_mapping(value, depth + 1, budget)
        return True, _plain_items(value, depth + 1, budget)
    text = _text(value)
    if len(text) > budget.chars >= 16:
        text = _cut(text, budget.chars)
        budget.truncated += 1
    return budget.take(len(text)), text


def _plain_mapping(value: Mapping[Any, Any], depth: int, budget: _Budget) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    for key, item in value.items():
        if budget.chars <= 0:
            budget.truncated += 1  # this entry and any after it
            break
        if not isinstance(key, str | int | float):
            budget.truncated += 1
            continue
        name = _text(key)
        kept, plain = _plain(item, depth, budget) if budget.take(len(name)) else (False, None)
        if kept:
            converted[name] = plain
        else:
            budget.truncated += 1
    return converted


def _plain_items(value: Any, depth: int, budget: _Budget) -> list[Any]:
    converted: list[Any] = []
    for item in value:
        if budget.chars <= 0:
            budget.truncated += 1  # this item and any after it
            break
        kept, plain = _plain(item, depth, budget)
        if kept:
            converted.append(plain)
        else:
            budget.truncated += 1
    return converted


class RequestContext:
    """A small, mutable record of one request, shared by the middleware and the reporters.

    Built on every request, so it holds little: what the rare readers need (the route, the
    query string, the headers) is read from the scope when first asked for.
    """

    __slots__ = (
        "_request_id",
        "_resolve",
        "_route",
        "annotations",
        "body_complete",
        "disconnected",
        "env_overlay",
        "forced",
        "kind",
        "location",
        "method",
        "path",
        "response_started",
        "scope",
        "start",
        "status",
    )

    def __init__(
        self,
        scope: Scope,
        method: str,
        location: str,
        start: float,
        request_id: str | None = None,
        resolve: Callable[[Scope], str] | None = None,
    ) -> None:
        self.scope = scope
        self.kind: str = scope["type"]
        self.path: str = scope.get("path", "")  # text_path() where it is written out
        self.method = method
        self.location = location
        self.start = start
        self._request_id = request_id
        self._resolve = resolve
        self._route: str | None = None
        self.response_started = False
        self.body_complete = False
        self.disconnected = False
        self.env_overlay: dict[bytes, bytes | None] | None = None  # isolate mode's writes
        self.forced: str | None = None  # why the record must be kept whatever the sampler says
        self.status: int | None = None
        self.annotations: Annotations | None = None  # set_tag, set_context

    @property
    def route(self) -> str:
        """The route template, resolved on first use: after routing, the router has said."""
        route = self._route
        if route is None:
            route = self._resolve(self.scope) if self._resolve is not None else UNMATCHED_ROUTE
            self._route = route
        return route

    @route.setter
    def route(self, value: str) -> None:
        self._route = value

    @property
    def query_string(self) -> bytes:
        value = self.scope.get("query_string", b"")
        return value if isinstance(value, bytes) else b""

    @property
    def raw_headers(self) -> Any:
        return self.scope.get("headers")

    @property
    def request_id(self) -> str:
        """The trusted incoming id, or one generated on first use (most requests never need it)."""
        if self._request_id is None:
            self._request_id = os.urandom(16).hex()
        return self._request_id


def text_path(path: Any) -> Any:
    """A request's path as written to a report, record or span: a path given as bytes
    (illegal in ASGI, yet some test clients and servers send one) as text (latin-1: any
    bytes decode, one char each); anything else as it is. Applied where the path is written
    rather than as the request starts, which most requests never are."""
    if type(path) is bytes or type(path) is bytearray:
        return bytes(path).decode("latin-1")
    return path


current_request: ContextVar[RequestContext | None] = ContextVar(
    "sentinel_current_request", default=None
)
"""The request being handled in this context (also inherited by tasks the request spawns)."""

current_phase: ContextVar[Phase | None] = ContextVar("sentinel_current_phase", default=None)
"""Set around code whose phase is known but that runs outside a request (lifespan, jobs)."""

process_annotations = Annotations()
"""Tags and contexts set outside any request: they go on every report and record written
after, under the request's own (as in Sentry's global scope)."""


class SavedAnnotations(NamedTuple):
    """The process's tags, contexts and count of what was cut, at one time."""

    tags: dict[str, str]
    contexts: dict[str, dict[str, Any]]
    truncated: int


def save_process_annotations() -> SavedAnnotations:
    """The process's tags and contexts as they are now, for
    :func:`restore_process_annotations` (how ``sentinel.testing`` keeps what one test set
    outside a request out of the next test's reports)."""
    with process_annotations._lock:
        return SavedAnnotations(
            dict(process_annotations.tags),
            dict(process_annotations.contexts),
            process_annotations.truncated,
        )


def restore_process_annotations(saved: SavedAnnotations) -> None:
    """Put back the process's tags and contexts as :func:`save_process_annotations` saw
    them, forgetting what was set since."""
    with process_annotations._lock:
        process_annotations.tags = dict(saved.tags)
        process_annotations.contexts = dict(saved.contexts)
        process_annotations.truncated = saved.truncated


def _annotations_here() -> Annotations:
    request = current_request.get()
    if request is None:
        return process_annotations
    annotations = request.annotations
    if annotations is None:
        annotations = request.annotations = Annotations()
    return annotations


def set_tag(key: str, value: object) -> None:
    """Tag the current request's report and record with ``key: value`` (outside a request:
    every report and record from now on). ``None`` removes the tag.

    Values are written as text: str, numbers, dates, UUIDs and decimals as themselves,
    other objects as ``<TypeName>``. At most 32 tags, keys of at most 32 characters,
    values cut at 200; what is refused or cut is counted in the record's
    ``scope_truncated``. Never raises, and scrubbed like everything sentinel writes.
    """
    try:
        _annotations_here().set_tag(key, value)
    except Exception:
        return


def set_context(name: str, value: Mapping[str, Any] | None) -> None:
    """Attach the mapping ``value`` under ``name`` to the current request's report and
    record (outside a request: every report and record from now on); ``None`` removes it.

    The mapping is copied now, as JSON data: at most 8 contexts, 2048 characters of keys
    and values and 3 levels of nesting each; objects other than str, numbers, dates, UUIDs
    and decimals are written as ``<TypeName>``. What is refused or cut is counted in the
    record's ``scope_truncated``. Never raises, and scrubbed like everything sentinel
    writes (a key that looks secret masks everything under it).
    """
    try:
        _annotations_here().set_context(name, value)
    except Exception:
        return


def annotations_for(request: RequestContext | None) -> dict[str, Any]:
    """The ``tags``, ``contexts`` and ``scope_truncated`` fields for a report or record: the
    process's, with the request's own over them; empty when there are none."""
    own = request.annotations if request is not None else None
    process = process_annotations
    if process.empty and (own is None or own.empty):
        return {}
    tags: dict[str, str] = {}
    contexts: dict[str, dict[str, Any]] = {}
    truncated = 0
    for source in (process, own):
        if source is None:
            continue
        with source._lock:
            tags.update(source.tags)
            contexts.update(source.contexts)
            truncated += source.truncated
    fields: dict[str, Any] = {}
    if tags:
        fields["tags"] = tags
    if contexts:
        fields["contexts"] = contexts
    if truncated:
        fields["scope_truncated"] = truncated
    return fields


def scrub_annotations(fields: dict[str, Any], scrubber: Scrubber) -> None:
    """Scrub the ``tags`` and ``contexts`` of a report or record in place (off the request
    path): by key, as headers are, and by value."""
    tags = fields.get("tags")
    if isinstance(tags, dict):
        fields["tags"] = scrub_data(scrubber, "tags", tags)
    contexts = fields.get("contexts")
    if isinstance(contexts, dict):
        fields["contexts"] = scrub_data(scrubber, "contexts", contexts)


def scrub_data(
    scrubber: Scrubber, key: str, value: Any, secret: bool = False, depth: int = 0
) -> Any:
    """JSON data found under ``key``, scrubbed: every value under a name that looks secret
    is masked whole (numbers included), other text is scrubbed by value."""
    secret = secret or scrubber.is_secret_key(key)
    if depth > _MAX_SCRUB_DEPTH:
        return "<too deep>"
    if isinstance(value, dict):
        return {
            scrubber.text(str(name)): scrub_data(scrubber, str(name), item, secret, depth + 1)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [scrub_data(scrubber, key, item, secret, depth + 1) for item in value]
    if isinstance(value, str):
        return scrubber.mask(value) if secret else scrubber.text(value)
    if secret and isinstance(value, int | float) and not isinstance(value, bool):
        return scrubber.mask(repr(value))
    return value
