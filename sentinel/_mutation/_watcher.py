"""What is done about a request's write to process-global state: the policy.

:class:`MutationWatcher` decides whether a write found by ``_detect`` is a request's
mutation, attributes it (exactly, to suspects, or to no request), and reports it once per
code location (``report``), refuses it (``raise``), or keeps it to the request (``isolate``,
which ``_environ`` carries out for the environment).
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from .._context import RequestContext, current_phase, current_request
from .._vocabulary import NO_ROUTE
from ._detect import Note, StateProbe, code_location, compared, importing
from ._render import MAX_CHARS as _MAX_VALUE_CHARS
from ._render import show

if TYPE_CHECKING:
    from .._config import Config
    from .._metrics import Metrics
    from .._scrub import Scrubber
    from .._writer import Writer

EXACT = "exact"
SUSPECTS = "suspects"
UNATTRIBUTED = "unattributed"
WATCH_MODES = ("report", "raise", "off")
"""Modes a single watch can have; ``isolate`` exists for the environment only."""
SEVERAL_ROUTES = "<several>"
"""The route label of a mutation found at a request's end while several routes were in
flight: the suspects are listed in the report, the label stays bounded."""
_MAX_SCRUBBED_CHARS = 4096
_MAX_SEEN = 4096
MAX_KEYS_PER_LINE = 10
"""Keys one code line (in one route and location) writes that are each reported by name;
the writes to further keys are one record, ``more_keys``, and its summary's count: a
request writing 20,000 cache keys into os.environ is 11 records, not 20,000 that crowd
the exceptions' reports out of the queue."""
_MAX_SUSPECTS = 20
_MORE_KEYS = object()
watch_modes: dict[str, str] = {}
"""Modes of opt-in watches that differ from the sentinel's, by target name."""


class GlobalStateMutated(RuntimeError):
    """Raised in ``raise`` mode where a request writes process-global state.

    Raised at the write (which then does not happen) when the write is intercepted, or from
    the response's start when the change is only found at the end of the handler.
    """

    def __init__(self, target: str, key: object, route: str | None) -> None:
        self.target = target
        self.key = key
        self.route = route
        where = f" by {route}" if route else ""
        shown = f" {key!r}" if key is not None else ""
        super().__init__(
            f"process-global state {target}{shown} written{where} (mutation mode raise)"
        )


GlobalStateMutated.__module__ = "sentinel"  # its public home, as reports name it


class _Seen:
    __slots__ = ("fields", "repeats")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.repeats = 0


class MutationWatcher:
    """Decides whether a write is a request's mutation, attributes it, and reports it once
    per (target, key, code location), with the repeats counted."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        writer: Writer,
        scrubber: Scrubber,
        requests: set[RequestContext],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = config.mutation_mode
        self._warmup = config.mutation_warmup_seconds
        self._allow = tuple(pattern for pattern in config.mutation_allow)
        self._location = config.location
        self._window = config.fold_window_seconds
        self._metrics = metrics
        self._writer = writer
        self._scrubber = scrubber
        self._requests = requests
        self._clock = clock
        self._quiet_until: float | None = None  # None: no request served yet (startup)
        self._loop_threads: set[int] = set()  # threads running a loop that serves requests
        self.lifespan_serving = False
        """Lifespan's startup is complete and its shutdown has not begun."""
        self._seen: OrderedDict[tuple[Any, ...], _Seen] = OrderedDict()
        self._keys: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        """Keys reported by name, per (target, location, route, file, line)."""
        self._lock = threading.Lock()
        self._last_summaries = clock()
        self.probe = StateProbe()
        writer.add_summaries(self.due_summaries, "mutations")

    # -- deciding -----------------------------------------------------------------------------

    def serving_started(self) -> None:
        """The first request is being served: from now on (after the warm-up) writes count."""
        self._loop_threads.add(threading.get_ident())
        if self._quiet_until is None:
            self._quiet_until = self._clock() + self._warmup
            # What startup changed is the baseline.
            self.probe.reset()
            for watch in compared:
                watch.resync()

    def _counts(self, request: RequestContext | None) -> bool:
        quiet_until = self._quiet_until
        if quiet_until is None:
            return False
        if request is None:
            phase = current_phase.get()
            if phase is not None and not (phase == "lifespan" and self.lifespan_serving):
                return False  # lifespan's startup or shutdown, a job with its own phase
        return not (self._warmup and self._clock() < quiet_until)

    def _allowed(self, target: str, key: object) -> bool:
        if not self._allow:
            return False
        text = f"{target}:{_text(key)}" if key is not None else target
        return any(
            fnmatch.fnmatchcase(target, pattern) or fnmatch.fnmatchcase(text, pattern)
            for pattern in self._allow
        )

    def intercept(
        self, target: str, key: object, old: object, new: object, frame: FrameType | None
    ) -> Note | None:
        """A watched write is about to happen. None when it is not a request's mutation;
        raises :class:`GlobalStateMutated` (reported) when a request's write must not happen."""
        mode = watch_modes.get(target, self.mode)
        if mode == "off":
            return None
        request = current_request.get()
        if not self._counts(request) or self._allowed(target, key):
            return None
        if importing(frame):
            return None  # a module's own code, imported lazily: import time, as at startup
        suspects: list[RequestContext] = []
        if request is not None:
            attribution = EXACT
        elif not self._requests:
            return None  # nothing is being served: the app's own lifecycle, not a request's
        elif threading.get_ident() in self._loop_threads or current_phase.get() == "lifespan":
            # On the serving loop but in no request's context: a task or callback that no
            # request started (one from lifespan, say), or a thread such a task handed work
            # to (asyncio.to_thread copies the lifespan's context).
            attribution = UNATTRIBUTED
        else:
            # A thread without a request's context (started raw, not through the thread
            # pool) while requests are in flight: any of them may have started it.
            suspects = list(self._requests)[:_MAX_SUSPECTS]
            attribution = SUSPECTS
        note = Note(
            target, key, old, new, request, attribution, suspects, mode, code_location(frame)
        )
        if mode == "raise" and request is not None:
            self.commit(note, action="refused")
            raise GlobalStateMutated(target, key, request.route)
        return note

    def isolating(self, target: str, frame: FrameType | None) -> RequestContext | None:
        """The request whose overlay a write to ``target`` goes to (``isolate`` mode), whether
        or not the write is reported (warm-up, ``mutation_allow``); None when it reaches the
        process: no request is current, or a module is being imported."""
        if watch_modes.get(target, self.mode) != "isolate":
            return None
        request = current_request.get()
        if request is None or importing(frame):
            return None
        return request

    def commit(self, note: Note, action: str | None = None) -> None:
        """The write happened (or was refused, or isolated): count it, report it once."""
        try:
            self._commit(note, action or ("isolated" if note.mode == "isolate" else "reported"))
        except Exception:
            self._metrics.internal_error("mutations")

    def _commit(self, note: Note, action: str) -> None:
        request = note.request
        if request is not None:
            location, route = request.location, request.route
        else:
            routes = {suspect.route for suspect in note.suspects}
            location = self._location
            route = routes.pop() if len(routes) == 1 else SEVERAL_ROUTES if routes else NO_ROUTE
            if note.suspects:
                locations = {suspect.location for suspect in note.suspects}
                location = locations.pop() if len(locations) == 1 else location
        self._metrics.global_mutations.labels(location, route, note.target).inc()
        key_text = _text(note.key)
        if key_text is not None and len(key_text) > _MAX_SCRUBBED_CHARS:
            key_text = key_text[:_MAX_SCRUBBED_CHARS]  # what the record and the once-per keep
        # Once per code location, route and location (bounded labels): every series of the
        # metric has a record, and a summary stands for repeats of its own record only.
        line = (note.target, location, route, note.file, note.line)
        identity: tuple[object, ...] = (*line, key_text)
        more_keys = False
        with self._lock:
            seen = self._seen.get(identity)
            if seen is None and key_text is not None:
                named = self._keys.get(line, 0)
                if named >= MAX_KEYS_PER_LINE:
                    # Past the keys this line names: one record stands for the rest.
                    more_keys = True
                    identity = (*line, _MORE_KEYS)
                    seen = self._seen.get(identity)
                else:
                    self._keys[line] = named + 1
                    self._keys.move_to_end(line)
                    while len(self._keys) > _MAX_SEEN:
                        self._keys.popitem(last=False)
            if seen is not None:
                seen.repeats += 1
                self._seen.move_to_end(identity)
                return
            seen = self._seen[identity] = _Seen({})  # claimed: a racing write is a repeat
            while len(self._seen) > _MAX_SEEN:
                self._seen.popitem(last=False)
        fields = self._fields(note, location, route, None if more_keys else key_text, action)
        if more_keys:
            fields["old"] = fields["new"] = None
            fields["more_keys"] = True
        seen.fields = fields
        self._writer.write("warning", "global_state_mutated", fields)

    def _fields(
        self, note: Note, location: str, route: str, key_text: str | None, action: str
    ) -> dict[str, Any]:
        scrub_key = key_text or note.target
        fields: dict[str, Any] = {
            "location": location,
            "target": note.target,
            "key": None if key_text is None else self._cut(self._scrubber.text(key_text)),
            "old": self._value(scrub_key, note.old),
            "new": self._value(scrub_key, note.new),
            "attribution": note.attribution,
            "route": route,
            "file": note.file,
            "line": note.line,
            "function": note.function,
            "after_response": note.after_response,
            "mode": note.mode,
            "action": action,
        }
        request = note.request
        if request is not None:
            fields["method"] = request.method
            fields["request_id"] = request.request_id
        else:
            fields["method"] = None
            fields["request_id"] = None
        if note.attribution == SUSPECTS:
            fields["suspects"] = sorted(
                {f"{suspect.method} {suspect.route}" for suspect in note.suspects}
            )
        return fields

    def _value(self, key: str, value: object) -> object:
        if value is None:
            return None
        secret = self._scrubber.is_secret_key(key)  # first: a number can be a secret too
        if type(value) in (bool, int, float) and not secret:
            return value
        text = _string(value)
        if text is None:
            # The strings in a container whole (up to what is scrubbed): cut in the middle
            # before scrubbing, a secret's pattern would break and the secret show.
            text = show(value, _MAX_SCRUBBED_CHARS)
        # Scrubbed whole, then cut: a cut can break the pattern that finds a secret.
        text = text[:_MAX_SCRUBBED_CHARS]
        return self._cut(self._scrubber.mask(text) if secret else self._scrubber.text(text))

    @staticmethod
    def _cut(text: str) -> str:
        return text[:_MAX_VALUE_CHARS] + "..." if len(text) > _MAX_VALUE_CHARS else text

    # -- the end of a request -------------------------------------------------------------------

    def changed(self) -> bool:
        """The cheap end-of-request check (each compared watch counts one request);
        :meth:`report_changes` says what changed."""
        found = self.mode != "off" and self.probe.changed()
        for watch in compared:
            if watch.tick():
                found = True
        return found

    def changed_before_response(self) -> bool:
        """The same check when a response starts (``raise`` mode), counting nothing."""
        if self.mode != "off" and self.probe.changed():
            return True
        return any(watch.due and watch.changed() for watch in compared)

    def idle_check(self) -> None:
        """A request starts while none is in flight: what changed meanwhile was no request's
        doing (a background job, say). It is reported as such (``unattributed``) and
        becomes the baseline, so the request starting is not blamed, nor refused."""
        found = self._found(self.probe.changed(), every_request_only=True)
        if found and self._counts(None):
            self._report(found, None, [], refusing=False)

    def before_exact_write(self, part: str) -> None:
        """A wrapped write to a ``part`` the probe compares is about to happen: what no
        wrapper saw in that part (a direct write since the last comparison) is reported
        first, since the wrapped write moves that part's baseline on."""
        try:
            if self.mode != "off" and self.probe.part_changed(part):
                self.report_changes(current_request.get())
        except Exception:
            self._metrics.internal_error("mutations")

    def _found(
        self, probe_changed: bool, *, every_request_only: bool = False
    ) -> list[tuple[str, object, object, object, str]]:
        """What changed, each with the mode it is handled in; every baseline moves on."""
        mode = "report" if self.mode == "isolate" else self.mode
        found: list[tuple[str, object, object, object, str]] = []
        if probe_changed:
            found.extend((*difference, mode) for difference in self.probe.differences())
        for watch in compared:
            # A watch compared every N requests may hold a change of a request that has
            # ended: when a request starts with none in flight it waits for its turn.
            if every_request_only and watch.every != 1:
                continue
            try:
                if watch.changed():
                    found.extend(
                        (*difference, watch.mode or mode) for difference in watch.differences()
                    )
            except Exception:
                self._metrics.internal_error("mutations")
        return found

    def report_changes(
        self, request: RequestContext | None, *, refusing: bool = False
    ) -> Note | None:
        """Report what the probe and the compared watches found. With ``refusing`` (a
        response is starting), returns the first ``raise`` note when ``request`` is the
        only request in flight: the change can only be its own."""
        found = self._found(True)
        if not found or not self._counts(request):
            return None
        suspects = list(self._requests)[:_MAX_SUSPECTS]
        if request is not None and request not in suspects:
            suspects.insert(0, request)
        return self._report(found, request, suspects, refusing=refusing)

    def _report(
        self,
        found: list[tuple[str, object, object, object, str]],
        request: RequestContext | None,
        suspects: list[RequestContext],
        *,
        refusing: bool,
    ) -> Note | None:
        refused: Note | None = None
        for target, key, old, new, mode in found:
            if mode == "off" or self._allowed(target, key):
                continue
            note = Note(
                target,
                key,
                old,
                new,
                None,
                SUSPECTS if suspects else UNATTRIBUTED,
                suspects,
                "report" if mode == "isolate" else mode,
                (None, None, None),
            )
            sole = request is not None and len(suspects) == 1 and suspects[0] is request
            if mode == "raise" and refusing and sole and refused is None:
                refused = note
                self.commit(note, action="refused")
            else:
                self.commit(note)
        return refused

    def after_exact_write(self, part: str) -> None:
        """A wrapper reported a write to a ``part`` the probe also compares (logging,
        warnings, socket): that part's baseline moves on, the rest waits for the probe."""
        self.probe.reset_part(part)

    # -- repeats ----------------------------------------------------------------------------

    def due_summaries(self, everything: bool) -> list[tuple[str, str, dict[str, Any]]]:
        """A summary per reported mutation that repeated, once per window and at shutdown."""
        now = self._clock()
        if not everything and now - self._last_summaries < self._window:
            return []
        self._last_summaries = now
        due = []
        with self._lock:
            for seen in self._seen.values():
                if seen.repeats:
                    fields = {
                        key: seen.fields.get(key)
                        for key in (
                            "location",
                            "target",
                            "key",
                            "route",
                            "attribution",
                            "file",
                            "line",
                            "function",
                        )
                    }
                    if seen.fields.get("more_keys"):
                        fields["more_keys"] = True
                    fields["summary"] = True
                    fields["occurrences"] = seen.repeats
                    fields["window_seconds"] = self._window
                    due.append(("warning", "global_state_mutated", fields))
                    seen.repeats = 0
        return due


def _text(key: object) -> str | None:
    if key is None:
        return None
    text = _string(key)
    return show(key) if text is None else text


def _string(value: object) -> str | None:
    """A str's or bytes' text (of a subclass too, through the base class's own code), up to
    what is scrubbed; None for anything else."""
    kind = type(value)
    if issubclass(kind, str):
        return str.__getitem__(cast(str, value), slice(_MAX_SCRUBBED_CHARS))
    if issubclass(kind, bytes):
        raw = bytes.__getitem__(cast(bytes, value), slice(_MAX_SCRUBBED_CHARS * 4))
        return raw.decode("utf-8", "backslashreplace")
    return None


def check_watch_mode(mode: str | None, allowed: Iterable[str] = WATCH_MODES) -> str | None:
    choices = tuple(allowed)
    if mode is not None and mode not in choices:
        msg = f'"mode" must be one of {", ".join(choices)}: {mode!r}'
        raise ValueError(msg)
    return mode
