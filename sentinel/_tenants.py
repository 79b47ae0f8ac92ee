"""Which tenants are counted by name: a bounded heavy-hitter set over traffic and errors.

A tenant id is an unbounded value, so ``sentinel_tenant_requests_total{tenant}`` names at
most ``max_tenants`` tenants at a time and counts everything else, requests without a tenant
included, as ``other``. :class:`TenantTracker` chooses the named (*tracked*) tenants:

- **Score.** Every request adds one to its tenant's score. Scores decay with
  ``half_life_seconds`` (60), so the set follows what happens now and yesterday's heavy
  hitters make room. Decay is forward decay (Cormode et al., 2009): new weights grow as
  ``exp(rate * (now - landmark))`` instead of every score shrinking; a rescale every 40
  half-lives keeps the floats finite.
- **Errors** are counted apart, over ``error_half_life_seconds`` (1800, the tenant page's
  30-minute short window): each tenant's 5xx and its requests, for the tracked tenants in
  their entries and for the others in a second space-saving summary of ``failing_capacity``
  counters (``max(64, 4 * max_tenants)``: 200 for 50) fed by 5xx. A tenant is *failing*
  when it has had ``errors_to_promote`` (3) 5xx or so within that half-life (decayed: at
  least ``errors_to_promote - 1/2``), its 5xx ratio is at least ``failing_factor`` (2) times
  the rest of the service's, and that many 5xx at the rest's ratio would have odds below
  ``failing_odds`` (1e-3; a candidate's count starts at its first 5xx, which is left out):
  one stray 5xx, a busy tenant's 5xx at the service's own ratio, or a service failing as a
  whole make no tenant failing, at any request rate. The odds matter at scale: hundreds of
  tenants a minute reach three 5xx by chance, and must not take the busiest tenants' places.
- **Candidates.** Untracked tenants live in a space-saving summary (Metwally et al., 2005)
  of ``capacity`` counters: a tenant without one takes the lowest counter and inherits its
  value as its possible error. Memory is ``max_tenants + capacity + failing_capacity``
  entries (about 350 KB for 50) however many distinct ids arrive, each call costs at most a
  heap operation, and a tenant whose share of the decayed total exceeds ``1 / capacity``
  always has a counter. The default ``capacity = max(256, 16 * max_tenants)`` (800 for 50)
  keeps that error under a sixteenth of an average tracked tenant's share.
- **Promotion** is decided on the request itself, never by a timer. Free slots go to the
  first tenants seen, so a small service has every tenant named exactly from its first
  request. Once the set is full, a candidate whose *guaranteed* score (its counter minus
  what it inherited) exceeds ``promotion_ratio`` (1.5) times the weakest tracked tenant's
  score takes that tenant's place, and a failing candidate takes, at its 5xx, the place of
  the weakest tracked tenant that is not failing, whatever their scores; the request that
  tipped it over is the first one counted under its name. A tenant failing at 20% far from
  the top by traffic enters at its third 5xx, one failing at 1-3% with a few requests a
  minute at its third to seventh.
- **Failing tenants keep their places.** A tracked tenant failing at a 5xx (the same test,
  its own first 5xx counted in the odds) is no candidate's victim by traffic
  until five of its mean gaps between 5xx (Poisson gaps run longer 0.7% of the time) have
  passed without one: at least ``min_dwell_seconds``, at most two error half-lives; a 5xx
  that finds it no longer failing ends that at once. So a tenant that keeps failing keeps
  its name, however small, and gives it up a few of its own gaps after its errors end. When
  every tracked tenant is failing (more tenants fail than there are places), a failing
  candidate takes the place of the one with the fewest 5xx above what the rest of the
  service's ratio gives its requests, if it has ``promotion_ratio`` times as many
  (``override_ratio`` within that one's dwell): the set stays at ``max_tenants``, held by
  the failing tenants with the most such 5xx, and it settles (a 1.5-fold change in half-hour
  5xx counts is needed to swap two); the busiest healthy tenants are then ``other``.
- **Hysteresis.** A tracked tenant younger than ``min_dwell_seconds`` (300, longer than any
  sensible scrape interval) gives way only to a candidate ``override_ratio`` (2) times its
  score. Noise at the boundary never swaps two tenants back and forth (swapping back within
  a dwell would take a fourfold change in their relative traffic). Tenants of equal traffic
  never swap.

Counting is exact from the moment a tenant is tracked: the tracker keeps the counts
(:meth:`TenantTracker.counts`), and on eviction folds the tenant's counts into ``other``. At
every moment the labels sum to the requests observed per status class, ``other`` never
decreases, and a tracked label never decreases. In Prometheus a promotion is a new series;
``rate()`` and ``increase()`` count it from its first scrape (they give a value from the
second on), so up to one scrape interval of its first requests are only in the raw value
(unless the exposition carries ``_created`` and the server ingests created timestamps). An
eviction ends the series (stale after the next scrape) and ``other`` steps up by the
tenant's whole count: for one range window ``rate(...{tenant="other"})`` includes that step,
so the traffic outside the named tenants is best read as the service total minus the named
tenants. An evicted tenant that a scrape has seen (:meth:`TenantTracker.counts` was read
while it was tracked) cannot come back for ``return_after_seconds`` (60, longer than a
sensible scrape interval), so its series is absent from at least one scrape before it starts
again from 0 (which ``rate()`` over a window spanning both reads as a counter reset): at the
boundary of the smallest tracked tenants, where one request can swap two of them, no series
goes down between two scrapes. One evicted before any read saw it (the churn of the first
requests after a start, when the first tenants seen fill the free slots and busier ones
displace them) had no series, and may come back as soon as it earns it: a tenant that fails
from the start is not held back for a minute by a place it held for a few milliseconds. Nor
is a seen tenant that comes back by a 5xx once a read has seen it gone: its series ended in
that scrape (a second scraper that missed the gap reads a counter reset, which ``rate()``
handles). Removing the evicted series rather than freezing it is what keeps a scrape at
``max_tenants + 1`` tenant values per status class for the life of the process (a frozen
series would stay until exit, one more per eviction) with sums that stay exact.

:class:`TenantFold` folds the cumulative counts of many processes (each with its own
tracker) into one set with the same bounds, for the sidecar of a multi-process server.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Literal, NamedTuple

from ._vocabulary import STATUS_CLASSES

OTHER_TENANT: Final = "other"
"""The label of every request not counted under a tracked tenant's name."""
MAX_TENANT_LENGTH: Final = 64
"""Longest tenant value (characters) used as a label; a UUID takes 36."""

TenantProblem = Literal[
    "not_text",
    "empty",
    "too_long",
    "not_utf8",
    "not_printable",
    "bad_character",
    "reserved",
    "secret",
]
"""Why a tenant value was refused: not a ``str``, ``bytes`` or ``bytearray`` (a tenant
callable's result); empty; longer than :data:`MAX_TENANT_LENGTH`; bytes that are not UTF-8
or a string with lone surrogates; control or other unprintable characters; printable but
outside the label alphabet; the reserved word ``other``; a credential by the tracker's
``secret`` rule."""

TENANT_PROBLEMS: Final[tuple[TenantProblem, ...]] = (
    "not_text",
    "empty",
    "too_long",
    "not_utf8",
    "not_printable",
    "bad_character",
    "reserved",
    "secret",
)

Counts = tuple[int, int, int, int]
"""Requests per status class, in the order of :data:`STATUS_CLASSES` (2xx, 3xx, 4xx, 5xx)."""

# The location alphabet (see _config.is_valid_location): ids, UUIDs, account numbers and
# slugs fit; spaces, slashes, quotes and anything that could be markup do not.
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_CLASS_INDEX: Final[dict[str, int]] = {name: index for index, name in enumerate(STATUS_CLASSES)}
_ERROR_INDEX: Final = _CLASS_INDEX["5xx"]
_RESCALE_HALF_LIVES: Final = 40.0
"""Forward decay rescales after this many half-lives: weights stay below 2**40."""


def tenant_problem(value: object) -> TenantProblem | None:
    """Why ``value`` cannot be a tenant label, or None when it can.

    Bytes (a raw header value) must be UTF-8. Cheap checks come first, so an overlong
    value costs no more than its length.
    """
    return _parse(value)[1]


def valid_tenant(value: object) -> str | None:
    """``value`` as a tenant label (bytes decoded), or None when :func:`tenant_problem`
    refuses it."""
    return _parse(value)[0]


def _parse(value: object) -> tuple[str | None, TenantProblem | None]:
    if isinstance(value, bytes | bytearray):
        if not value:
            return None, "empty"
        if len(value) > MAX_TENANT_LENGTH:
            return None, "too_long"
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_utf8"
    elif not isinstance(value, str):
        return None, "not_text"
    if not value:
        return None, "empty"
    if len(value) > MAX_TENANT_LENGTH:
        return None, "too_long"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, "not_utf8"
    if not value.isprintable():
        return None, "not_printable"
    if _TENANT_RE.fullmatch(value) is None:
        return None, "bad_character"
    if value == OTHER_TENANT:
        return None, "reserved"
    return value, None


class TenantChange(NamedTuple):
    """A change of the tracked set, as :meth:`TenantTracker.drain_changes` reports it."""

    kind: Literal["promoted", "evicted"]
    tenant: str
    at: float
    """The tracker's clock when it happened."""
    folded: Counts
    """For an eviction, the counts that moved from the tenant's label into ``other``."""


_NO_COUNTS: Final[Counts] = (0, 0, 0, 0)


def _frozen(counts: list[int]) -> Counts:
    return counts[0], counts[1], counts[2], counts[3]


class TenantRejections:
    """How many tenant values were refused, by reason: one per registry, shared by the
    trackers that replace one another there (:meth:`TenantTracker.validate` of an old one
    still counts here), so the exported counter never goes down and misses nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[TenantProblem, int] = dict.fromkeys(TENANT_PROBLEMS, 0)

    def add(self, problem: TenantProblem) -> None:
        with self._lock:
            self._counts[problem] += 1

    def counts(self) -> dict[TenantProblem, int]:
        """Every reason with its count so far."""
        with self._lock:
            return dict(self._counts)


class _Tracked:
    __slots__ = (
        "counts",
        "error",
        "exposures",
        "failures",
        "promoted_at",
        "protected_until",
        "requests",
        "score",
    )

    def __init__(self, score: float, error: float, promoted_at: float, exposures: int) -> None:
        self.counts = [0, 0, 0, 0]
        self.score = score  # forward-decayed requests: grows with the landmark's age
        self.error = error  # what the score may overstate (inherited as a candidate)
        self.failures = 0.0  # forward-decayed 5xx over the error half-life, since known
        self.requests = 0.0  # forward-decayed requests over the error half-life, likewise
        self.protected_until = -math.inf  # failing: no candidate by traffic displaces it
        self.promoted_at = promoted_at
        self.exposures = exposures  # the tracker's reads of its counts when promoted


class _Counter:
    """One counter of a space-saving summary."""

    __slots__ = ("count", "error", "live", "tenant")

    def __init__(self, tenant: str, count: float, error: float) -> None:
        self.tenant = tenant
        self.count = count  # what it counted, plus what it inherited
        self.error = error  # what it inherited
        self.live = True  # False once promoted or replaced: its heap item is stale


class _Failures(_Counter):
    """An untracked tenant's 5xx (``count``) and its requests since it took the counter."""

    __slots__ = ("requests",)

    def __init__(self, tenant: str, count: float, error: float, requests: float) -> None:
        super().__init__(tenant, count, error)
        self.requests = requests


_Heap = list[tuple[float, int, _Counter]]


def _observation_problem(status_class: object, count: object) -> str:
    if status_class not in _CLASS_INDEX:
        return f'"status_class" must be one of {", ".join(STATUS_CLASSES)}: {status_class!r}'
    return f'"count" must be a positive integer: {count!r}'


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f'"{name}" must be a positive number: {value!r}')
    if not math.isfinite(value):
        raise ValueError(f'"{name}" must be finite: {value!r}')
    return float(value)


def _positive_integer(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'"{name}" must be a positive integer: {value!r}')
    return value


def _log_poisson_tail(count: float, mean: float) -> float:
    """The log of the odds of at least ``count`` events where ``mean`` are expected (a
    Poisson tail, for a real ``count``: the regularized lower incomplete gamma function)."""
    if count <= 0.0:
        return 0.0
    if mean <= 0.0:
        return -math.inf
    if mean >= count:
        return 0.0  # at least about even: never below any odds asked for
    # P(count, mean) = mean**count e**-mean / Gamma(count + 1) * sum of mean**n / ((count +
    # 1) ... (count + n)): the terms shrink at least as fast as mean / count.
    term = total = 1.0
    step = 1.0
    while term > 1e-12 * total:
        term *= mean / (count + step)
        total += term
        step += 1.0
    return count * math.log(mean) - mean - math.lgamma(count + 1.0) + math.log(total)


_PROTECT_GAPS: Final = 5.0
"""A failing tenant keeps its place this many of its own mean gaps between 5xx after its last
one (Poisson gaps run longer 0.7% of the time), at least a dwell, at most two error
half-lives."""


class TenantTracker:
    """The tracked tenants and the exact per-status-class counts of every label.

    Feed it one :meth:`observe` per finished request; it returns the label the request was
    counted under and keeps the counts (:meth:`counts`), so a collector can expose them
    as they are. Thread-safe (one lock; a call costs 1-3 microseconds). ``clock`` is
    any monotonic clock in seconds; the tests drive it by hand.
    """

    def __init__(
        self,
        max_tenants: int = 50,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_dwell_seconds: float = 300.0,
        half_life_seconds: float = 60.0,
        error_half_life_seconds: float = 1800.0,
        errors_to_promote: float = 3.0,
        failing_factor: float = 2.0,
        failing_odds: float = 1e-3,
        promotion_ratio: float = 1.5,
        override_ratio: float = 2.0,
        return_after_seconds: float = 60.0,
        capacity: int | None = None,
        failing_capacity: int | None = None,
        max_changes: int = 1024,
        secret: Callable[[str], bool] | None = None,
        rejections: TenantRejections | None = None,
    ) -> None:
        self.max_tenants = _positive_integer("max_tenants", max_tenants)
        self.min_dwell_seconds = _positive("min_dwell_seconds", min_dwell_seconds)
        self.half_life_seconds = _positive("half_life_seconds", half_life_seconds)
        self.error_half_life_seconds = _positive("error_half_life_seconds", error_half_life_seconds)
        self.errors_to_promote = _positive("errors_to_promote", errors_to_promote)
        if self.errors_to_promote <= 0.5:
            raise ValueError(f'"errors_to_promote" must be more than 0.5: {errors_to_promote!r}')
        self.failing_factor = _positive("failing_factor", failing_factor)
        self.failing_odds = _positive("failing_odds", failing_odds)
        self._log_failing_odds = math.log(min(1.0, self.failing_odds))
        self.promotion_ratio = _positive("promotion_ratio", promotion_ratio)
        self.override_ratio = _positive("override_ratio", override_ratio)
        self.return_after_seconds = _positive("return_after_seconds", return_after_seconds)
        if self.promotion_ratio < 1.0 or self.override_ratio < self.promotion_ratio:
            raise ValueError(
                '"promotion_ratio" must be at least 1 and "override_ratio" at least '
                f"promotion_ratio: {promotion_ratio!r}, {override_ratio!r}"
            )
        self.capacity = _positive_integer(
            "capacity", max(256, 16 * max_tenants) if capacity is None else capacity
        )
        self.failing_capacity = _positive_integer(
            "failing_capacity",
            max(64, 4 * max_tenants) if failing_capacity is None else failing_capacity,
        )
        self.rejections = TenantRejections() if rejections is None else rejections
        """The refusals :meth:`validate` counts (pass a replaced tracker's to carry them on)."""
        self._clock = clock
        self._secret = secret
        self._rate = math.log(2.0) / self.half_life_seconds
        self._error_rate = math.log(2.0) / self.error_half_life_seconds
        self._rescale_after = _RESCALE_HALF_LIVES * min(
            self.half_life_seconds, self.error_half_life_seconds
        )
        self._lock = threading.Lock()
        self._now = clock()
        self._landmark = self._now
        # Forward decay's weights of a request now (for the score, and for the 5xx and
        # requests over the error half-life), recomputed every 1/256 half-life (a request
        # weighs at most 0.3% too little until then, alike for every tenant).
        self._growth = 1.0
        self._error_growth = 1.0
        self._growth_at = self._now
        self._growth_step = min(self.half_life_seconds, self.error_half_life_seconds) / 256
        self._tracked: dict[str, _Tracked] = {}
        # When each recently evicted tenant left (and how many reads of the counts there
        # had been), oldest first: it may not come back before return_after_seconds, so
        # Prometheus sees its series end (at least one scrape without it) rather than a
        # counter that went down between two scrapes; with a 5xx, once a read saw it gone.
        self._left: dict[str, tuple[float, int]] = {}
        self._other = [0, 0, 0, 0]
        self._candidates: dict[str, _Counter] = {}
        # A min-heap of (count when pushed, sequence, counter). Counts only grow, so an
        # item may understate its counter's count; it is refreshed when it reaches the
        # top. Items of counters that left are skipped and dropped there.
        self._heap: _Heap = []
        # The same for the summary of untracked tenants' 5xx (over the error half-life).
        self._failing: dict[str, _Failures] = {}
        self._failing_heap: _Heap = []
        self._sequence = itertools.count()
        # The score a candidate must beat to be promoted, a lower bound of the true bar
        # until `_bar_expires` (when a young tenant's dwell or a failing tenant's
        # protection ends and the bar drops): a candidate below it is turned away without
        # looking at the tracked tenants.
        self._bar = -1.0
        self._bar_expires = -math.inf
        self._victim: str | None = None
        # The service's 5xx and requests over the error half-life (a failing tenant's ratio
        # is `failing_factor` times the rest's): re-read from the counts at a 5xx, at most
        # every 1/8 half-life.
        self._baseline_errors = 0.0
        self._baseline_requests = 0.0
        self._baseline_seen = (0, 0)
        self._baseline_at = self._now
        self._baseline_refresh_at = self._now
        self._errors_needed = self.errors_to_promote - 0.5
        self._error_mean_life = 1.0 / self._error_rate  # mean age of a decayed 5xx
        self._protect_least = self.min_dwell_seconds
        self._protect_most = 2.0 * self.error_half_life_seconds
        self._changes: deque[TenantChange] = deque(maxlen=max_changes)
        # How many times `counts()` was read: a tenant evicted before a read after its
        # promotion was never exposed, and is not held back from returning.
        self._exposures = 0
        # Inside `unexposed()`: the exposed tenants evicted there, which must be seen gone
        # before they come back.
        self._in_scope = False
        self._evicted_in_scope: set[str] = set()
        self.promotions = 0
        """Tenants promoted to the tracked set since the start."""
        self.evictions = 0
        """Tracked tenants evicted (their counts folded into ``other``) since the start."""

    def validate(self, value: object) -> str | None:
        """``value`` as a tenant label, or None (counted by reason in :meth:`rejected`).

        Beyond :func:`tenant_problem`, a value the ``secret`` rule calls a credential (the
        scrubber's value patterns: a token sent as the tenant) is refused as ``secret``.
        """
        tenant, problem = _parse(value)
        if tenant is not None and self._secret is not None and self._secret(tenant):
            tenant, problem = None, "secret"
        if problem is not None:
            self.rejections.add(problem)
        return tenant

    def rejected(self) -> dict[TenantProblem, int]:
        """How many values :meth:`validate` refused, by reason (every reason present)."""
        return self.rejections.counts()

    def observe(self, tenant: str | None, status_class: str, count: int = 1) -> str:
        """Count ``count`` requests of ``tenant`` (a value :meth:`validate` accepted, or
        None) in ``status_class``; return the label they were counted under: the tenant
        when it is tracked (it may have been promoted by this very call), else ``other``."""
        index = _CLASS_INDEX.get(status_class)
        if index is None or count.__class__ is not int or count < 1:
            raise ValueError(_observation_problem(status_class, count))
        now = self._clock()
        with self._lock:
            if now > self._now:
                self._now = now
            else:
                now = self._now  # a clock that steps back counts as standing still
            if tenant is None or tenant == OTHER_TENANT or len(tenant) > MAX_TENANT_LENGTH:
                self._other[index] += count
                return OTHER_TENANT
            if now - self._growth_at >= self._growth_step:
                self._regrow(now)
            weight = count * self._growth
            slow = count * self._error_growth
            failed = index == _ERROR_INDEX
            tracked = self._tracked.get(tenant)
            if tracked is not None:
                tracked.score += weight
                tracked.requests += slow
                tracked.counts[index] += count
                if failed:
                    tracked.failures += slow
                    self._protect_if_failing(tracked, now)
                return tenant
            if len(self._tracked) < self.max_tenants:
                tracked = self._promote(tenant, weight, 0.0, now)
                tracked.requests = slow
                tracked.counts[index] += count
                if failed:
                    tracked.failures = slow
                    self._protect_if_failing(tracked, now)
                return tenant
            candidate = self._count(self._candidates, self._heap, self.capacity, tenant, weight)
            failures = self._failing.get(tenant)
            if failures is not None:
                failures.requests += slow
                if failed:
                    failures.count += slow
            elif failed:
                failures = self._count_failures(tenant, slow, 0.0, slow)
            if (
                failed
                and failures is not None
                and self._try_promote_failing(candidate, failures, now)
            ) or (
                (candidate.count - candidate.error > self._bar or now >= self._bar_expires)
                and self._try_promote(candidate, now, failed)
            ):
                self._tracked[tenant].counts[index] += count
                return tenant
            self._other[index] += count
            return OTHER_TENANT

    def counts(self) -> dict[str, Counts]:
        """The count of every label now exposed: each tracked tenant and ``other``."""
        with self._lock:
            self._exposures += 1
            result = {tenant: _frozen(entry.counts) for tenant, entry in self._tracked.items()}
            result[OTHER_TENANT] = _frozen(self._other)
            return result

    @contextlib.contextmanager
    def unexposed(self) -> Iterator[None]:
        """Observe many counts as one change that no reader of :meth:`counts` sees halfway
        (the caller keeps readers out until it ends): a tenant promoted and evicted inside
        was never exposed, so no scrape can see its series end, and it may come back at once
        instead of after ``return_after_seconds``. :class:`TenantFold` folds the workers'
        publications between two scrapes this way; without it, the first publications of
        four workers (up to 200 labels at once) swapped tenants in and out of the fresh set
        and barred some failing ones for a minute."""
        if self._in_scope:  # nested: the outer one decides
            yield
            return
        self._in_scope = True
        try:
            yield
        finally:
            self._in_scope = False
            self._evicted_in_scope.clear()

    def tracked(self) -> frozenset[str]:
        """The tenants counted under their own name right now."""
        with self._lock:
            return frozenset(self._tracked)

    def failing(self) -> frozenset[str]:
        """The tracked tenants failing now: no candidate by traffic can take their place."""
        now = self._clock()
        with self._lock:
            now = max(now, self._now)
            return frozenset(
                tenant for tenant, entry in self._tracked.items() if now < entry.protected_until
            )

    def drain_changes(self) -> list[TenantChange]:
        """Promotions and evictions since the last call, oldest first (the latest
        ``max_changes`` of them)."""
        with self._lock:
            changes = list(self._changes)
            self._changes.clear()
            return changes

    def scores(self) -> dict[str, float]:
        """Every tracked tenant's decayed score now (its requests over the half-life), for
        diagnostics and tests."""
        with self._lock:
            scale = math.exp(-self._rate * (self._now - self._landmark))
            return {tenant: entry.score * scale for tenant, entry in self._tracked.items()}

    def state_size(self) -> tuple[int, int, int]:
        """(tracked tenants, candidate counters, heap items) held now: with
        :meth:`failing_state_size`, the memory bound."""
        with self._lock:
            return len(self._tracked), len(self._candidates), len(self._heap)

    def failing_state_size(self) -> tuple[int, int]:
        """(counters of untracked tenants' 5xx, their heap items) held now."""
        with self._lock:
            return len(self._failing), len(self._failing_heap)

    def _promote(self, tenant: str, score: float, error: float, now: float) -> _Tracked:
        entry = self._tracked[tenant] = _Tracked(score, error, now, self._exposures)
        self.promotions += 1
        self._changes.append(TenantChange("promoted", tenant, now, _NO_COUNTS))
        self._bar = -1.0  # the set changed: look again at the next candidate
        return entry

    def _count(
        self, summary: dict[str, _Counter], heap: _Heap, capacity: int, tenant: str, weight: float
    ) -> _Counter:
        """Add ``weight`` to the tenant's counter, taking the lowest counter if it has none."""
        counter = summary.get(tenant)
        if counter is not None:
            counter.count += weight
            return counter
        if len(summary) < capacity:
            counter = summary[tenant] = _Counter(tenant, weight, 0.0)
            heapq.heappush(heap, (weight, next(self._sequence), counter))
            return counter
        lowest = self._settle_lowest(heap)
        del summary[lowest.tenant]
        lowest.live = False
        counter = summary[tenant] = _Counter(tenant, lowest.count + weight, lowest.count)
        heapq.heapreplace(heap, (counter.count, next(self._sequence), counter))
        return counter

    def _count_failures(
        self, tenant: str, failures: float, error: float, requests: float
    ) -> _Failures:
        """A counter of the 5xx summary for a tenant that has none, its lowest if full."""
        heap = self._failing_heap
        if len(self._failing) < self.failing_capacity:
            counter = _Failures(tenant, failures, error, requests)
            heapq.heappush(heap, (counter.count, next(self._sequence), counter))
            if len(heap) > 2 * self.failing_capacity:
                self._failing_heap = self._rebuilt(self._failing)
        else:
            lowest = self._settle_lowest(heap)
            del self._failing[lowest.tenant]
            lowest.live = False
            inherited = lowest.count
            counter = _Failures(tenant, inherited + failures, inherited + error, requests)
            heapq.heapreplace(heap, (counter.count, next(self._sequence), counter))
        self._failing[tenant] = counter
        return counter

    def _settle_lowest(self, heap: _Heap) -> _Counter:
        """The counter with the lowest count, whose item is then on top of the heap."""
        # Each item is refreshed at most once before it is either the lowest or below
        # another, and each item of a departed counter is dropped once, so the loop ends
        # within len(heap) + 1 turns.
        for _ in range(len(heap) + 1):
            pushed, _sequence, counter = heap[0]
            if not counter.live:
                heapq.heappop(heap)
            elif counter.count != pushed:
                heapq.heapreplace(heap, (counter.count, next(self._sequence), counter))
            else:
                return counter
        raise AssertionError("space-saving heap did not settle")  # pragma: no cover

    def _barred(self, tenant: str, now: float, failed: bool) -> bool:
        """Whether an evicted tenant may not come back yet (see ``return_after_seconds``)."""
        if tenant in self._evicted_in_scope:  # empty outside `unexposed()`
            return True
        left = self._left.get(tenant)
        if left is not None:
            at, exposures = left
            # A failing tenant comes back by its 5xx once a read has seen it gone: its
            # series ended in that scrape, so it can start again from 0 without going down.
            seen_gone = self._exposures > exposures
            if now - at < self.return_after_seconds and not (failed and seen_gone):
                return True
            del self._left[tenant]
        return False

    def _try_promote(self, candidate: _Counter, now: float, failed: bool) -> bool:
        if self._barred(candidate.tenant, now, failed):
            return False
        self._rescan(now)
        if candidate.count - candidate.error <= self._bar or self._victim is None:
            return False
        self._replace(self._victim, candidate, now)
        return True

    def _try_promote_failing(self, candidate: _Counter, failures: _Failures, now: float) -> bool:
        """Promote a failing candidate by its 5xx: in place of the weakest tracked tenant
        that is not failing, or, when every one is, of the one with the fewest 5xx above
        the service's ratio if it has ``promotion_ratio`` times as many."""
        errors = failures.count - failures.error
        if not self._is_failing(errors, failures.requests, now, promoting=True):
            return False
        if self._barred(candidate.tenant, now, True):
            return False
        self._rescan(now)
        victim = self._victim
        if victim is None:
            excess = self._excess(errors, failures.requests)
            needed = math.inf
            for tenant, entry in self._tracked.items():
                young = now < entry.promoted_at + self.min_dwell_seconds
                ratio = self.override_ratio if young else self.promotion_ratio
                held = ratio * self._excess(entry.failures, entry.requests)
                if held < needed:
                    needed, victim = held, tenant
            if victim is None or excess <= needed:
                return False
        self._replace(victim, candidate, now)
        return True

    def _replace(self, victim: str, candidate: _Counter, now: float) -> None:
        """Evict ``victim`` and promote ``candidate`` in its place."""
        evicted = self._tracked.pop(victim)
        for index, value in enumerate(evicted.counts):
            self._other[index] += value
        self.evictions += 1
        self._changes.append(TenantChange("evicted", victim, now, _frozen(evicted.counts)))
        self._forget_returns(now)
        if evicted.exposures != self._exposures:
            self._left[victim] = (now, self._exposures)  # it was exposed: seen to end
            if self._in_scope:
                self._evicted_in_scope.add(victim)
        # The promoted tenant's counter goes to the evicted one, which stays a candidate
        # with what it had: it can come back when it earns it again (by traffic or by 5xx).
        del self._candidates[candidate.tenant]
        candidate.live = False
        returning = _Counter(victim, evicted.score, evicted.error)
        self._candidates[victim] = returning
        heapq.heappush(self._heap, (returning.count, next(self._sequence), returning))
        if len(self._heap) > 2 * self.capacity:
            self._heap = self._rebuilt(self._candidates)
        failures = self._failing.pop(candidate.tenant, None)
        if failures is not None:
            failures.live = False
        if evicted.failures > 0:  # its 5xx stay evidence: it may come back by them
            self._count_failures(victim, evicted.failures, 0.0, evicted.requests)
        entry = self._promote(candidate.tenant, candidate.count, candidate.error, now)
        if failures is not None:
            entry.failures = failures.count - failures.error
            entry.requests = failures.requests
            self._protect_if_failing(entry, now)

    def _is_failing(self, failures: float, requests: float, now: float, promoting: bool) -> bool:
        """``errors_to_promote`` 5xx or so within the error half-life (decayed: at least
        ``errors_to_promote - 1/2``), at ``failing_factor`` times the ratio of the rest of
        the service (so a busy tenant's stray 5xx, or the service failing as a whole, does
        not make a tenant failing), and more 5xx than the rest's ratio gives its requests
        with odds below ``failing_odds``: hundreds of tenants a minute are tried, and their
        chance 5xx must not take the places of the busiest. A candidate's count starts at a
        5xx, which its odds leave out when ``promoting``."""
        errors = failures / self._error_growth
        if errors < self._errors_needed:
            return False
        if now >= self._baseline_refresh_at:
            self._refresh_baseline(now)
        requests /= self._error_growth
        expected = requests * self._rest_ratio(errors, requests)
        if errors < self.failing_factor * expected:
            return False
        if self.failing_odds >= 1.0:
            return True
        count = errors - 1.0 if promoting else errors
        return _log_poisson_tail(count, expected) < self._log_failing_odds

    def _rest_ratio(self, errors: float, requests: float) -> float:
        """The 5xx ratio of the rest of the service over the error half-life (as last
        re-read), without one tenant's 5xx and requests; one 5xx and one request more, so
        that a service that has served next to nothing yet has no failing tenant."""
        rest_errors = max(0.0, self._baseline_errors - errors)
        rest_requests = max(0.0, self._baseline_requests - requests)
        return (rest_errors + 1.0) / (rest_requests + 1.0)

    def _excess(self, failures: float, requests: float) -> float:
        """A tenant's 5xx above what the rest of the service's ratio would give as many
        requests (decayed)."""
        errors = failures / self._error_growth
        requests /= self._error_growth
        return errors - requests * self._rest_ratio(errors, requests)

    def _protect_if_failing(self, entry: _Tracked, now: float) -> None:
        """At a tracked tenant's 5xx: while it is failing, only a failing candidate with far
        more 5xx can take its place, until ``_PROTECT_GAPS`` of its mean gaps between 5xx
        have passed without one; a 5xx that finds it no longer failing (its ratio back
        near the rest's) ends that at once."""
        if not self._is_failing(entry.failures, entry.requests, now, promoting=False):
            if entry.protected_until > now:
                entry.protected_until = now
                self._bar = -1.0  # a place to take: look again at the next candidate
            return
        gap = self._error_mean_life * self._error_growth / entry.failures
        hold = min(self._protect_most, max(self._protect_least, _PROTECT_GAPS * gap))
        entry.protected_until = now + hold

    def _refresh_baseline(self, now: float) -> None:
        """The service's 5xx ratio, decayed over the error half-life, from the exact counts
        (so no request pays for it)."""
        requests = sum(self._other)
        errors = self._other[_ERROR_INDEX]
        for entry in self._tracked.values():
            requests += sum(entry.counts)
            errors += entry.counts[_ERROR_INDEX]
        seen_requests, seen_errors = self._baseline_seen
        decay = math.exp(-self._error_rate * (now - self._baseline_at))
        self._baseline_requests = self._baseline_requests * decay + requests - seen_requests
        self._baseline_errors = self._baseline_errors * decay + errors - seen_errors
        self._baseline_seen = (requests, errors)
        self._baseline_at = now
        self._baseline_refresh_at = now + self.half_life_seconds / 8

    def _forget_returns(self, now: float) -> None:
        """Drop the departures old enough to come back, and keep at most ``capacity``."""
        left = self._left
        while left:
            tenant, (at, _) = next(iter(left.items()))
            if now - at < self.return_after_seconds and len(left) < self.capacity:
                return
            del left[tenant]

    def _rescan(self, now: float) -> None:
        """Find the tracked tenant a candidate would displace by traffic and the score it
        must beat: the weakest one that is not failing (none when every one is)."""
        bar = math.inf
        victim = None
        expires = math.inf
        dwell = self.min_dwell_seconds
        for tenant, entry in self._tracked.items():
            if now < entry.protected_until:
                expires = min(expires, entry.protected_until)
                continue
            ends = entry.promoted_at + dwell
            if now >= ends:
                needed = entry.score * self.promotion_ratio
            else:
                needed = entry.score * self.override_ratio
                expires = min(expires, ends)
            if needed < bar:
                bar, victim = needed, tenant
        self._bar, self._victim, self._bar_expires = bar, victim, expires

    def _regrow(self, now: float) -> None:
        if now - self._landmark > self._rescale_after:
            self._rescale(now)
        age = now - self._landmark
        self._growth = math.exp(self._rate * age)
        self._error_growth = math.exp(self._error_rate * age)
        self._growth_at = now

    def _rescale(self, now: float) -> None:
        factor = math.exp(-self._rate * (now - self._landmark))
        error_factor = math.exp(-self._error_rate * (now - self._landmark))
        for tracked in self._tracked.values():
            tracked.score *= factor
            tracked.error *= factor
            tracked.failures *= error_factor
            tracked.requests *= error_factor
        for candidate in self._candidates.values():
            candidate.count *= factor
            candidate.error *= factor
        for failures in self._failing.values():
            failures.count *= error_factor
            failures.error *= error_factor
            failures.requests *= error_factor
        self._landmark = now
        self._bar = -1.0
        self._heap = self._rebuilt(self._candidates)
        self._failing_heap = self._rebuilt(self._failing)

    def _rebuilt(self, summary: Mapping[str, _Counter]) -> _Heap:
        heap = [(counter.count, next(self._sequence), counter) for counter in summary.values()]
        heapq.heapify(heap)
        return heap


FOLD_RETURN_AFTER = 1.0
"""Seconds before a tenant the merged view evicted may be named again. The fold changes only
while a scrape is answered, and a tenant evicted there is absent from that scrape whatever
this is; the default minute of a process's own tracker kept failing tenants that the first
seconds of churn had evicted out of the merged view for that whole minute."""
FOLD_ERRORS_TO_PROMOTE = 1.0
"""The merged view's ``errors_to_promote``: a tenant in a worker's counts has passed that
worker's own promotion, so one 5xx counted under its name there is enough evidence. With a
process's default of 3, a failing tenant spread over four workers lost most of the few 5xx
each worker named to the fold's second promotion (``python -m bench.tenants``: the 300th
tenant by traffic kept 5% of its 5xx under its name, against 29% summed over the
processes; with 1, the same 29%)."""


class TenantFold:
    """Folds the cumulative tenant counts of many processes into one bounded set.

    Each process (a worker of a multi-process server) tracks tenants on its own and
    publishes :meth:`TenantTracker.counts` under an id of its own (its pid); the sidecar
    passes every publication to :meth:`update` and serves :meth:`counts`. The result has
    the tracker's bounds: at most ``max_tenants`` tenants plus ``other``, no label
    decreasing while it is named, ``other`` never decreasing, and per status class the sum
    equal to the sum of the processes' totals. A tenant named here collects its counts
    from every process that names it; its requests in processes that count it as
    ``other`` stay in ``other``.

    Publications may be stale or torn (read while a worker was evicting: the tenant already
    gone, ``other`` not yet raised): a process's total that goes down is held at its highest
    value, and the difference is counted once the total passes it again. A publication must
    never be ahead the other way (``other`` raised before the tenant is gone): replace a
    snapshot file atomically. ``process`` must be unique for a process's life (pid plus a
    start token), since a total that restarts from 0 under the same id is held, not counted.
    """

    def __init__(self, tracker: TenantTracker) -> None:
        self._tracker = tracker
        self._lock = threading.RLock()
        self._seen: dict[str, dict[str, list[int]]] = {}
        self._totals: dict[str, list[int]] = {}

    @classmethod
    def of_workers(
        cls, max_tenants: int, clock: Callable[[], float] = time.monotonic
    ) -> TenantFold:
        """The fold a multi-process server's sidecar serves: a tracker with the merged
        view's :data:`FOLD_RETURN_AFTER` and :data:`FOLD_ERRORS_TO_PROMOTE`, and no odds
        asked of a failing tenant's 5xx (the worker that named it asked them)."""
        tracker = TenantTracker(
            max_tenants,
            clock=clock,
            return_after_seconds=FOLD_RETURN_AFTER,
            errors_to_promote=FOLD_ERRORS_TO_PROMOTE,
            failing_odds=1.0,  # the worker that named it has tried its 5xx already
        )
        return cls(tracker)

    @property
    def tracker(self) -> TenantTracker:
        """The tracker that holds the merged view (its changes say what it named)."""
        return self._tracker

    @contextlib.contextmanager
    def publications(self) -> Iterator[None]:
        """Fold the :meth:`update` calls made inside as one change: :meth:`counts` waits
        until they are all done, and a tenant they promote and evict again in passing is
        never exposed (see :meth:`TenantTracker.unexposed`)."""
        with self._lock, self._tracker.unexposed():
            yield

    def update(self, process: str, counts: Mapping[str, Sequence[int]]) -> None:
        """Take ``process``'s cumulative counts (label -> per status class) as they are now."""
        with self.publications():
            seen = self._seen.setdefault(process, {})
            totals = self._totals.setdefault(process, [0, 0, 0, 0])
            for index, status_class in enumerate(STATUS_CLASSES):
                total = sum(
                    max(0, int(values[index])) for values in counts.values() if len(values) > index
                )
                new = total - totals[index]
                if new <= 0:
                    continue  # nothing new, or a torn read: wait until it is passed
                totals[index] = total
                for label, values in counts.items():
                    if label == OTHER_TENANT or len(values) <= index:
                        continue
                    value = max(0, int(values[index]))
                    before = seen.setdefault(label, [0, 0, 0, 0])
                    # Lower than last seen: promoted again in that process, from 0.
                    grown = value - before[index] if value >= before[index] else value
                    before[index] = value
                    amount = min(grown, new)
                    if amount > 0:
                        self._tracker.observe(label, status_class, amount)
                        new -= amount
                if new:
                    self._tracker.observe(None, status_class, new)
            # Forget labels the process no longer names: their counts moved to its other.
            for label in list(seen):
                if label not in counts:
                    del seen[label]

    def counts(self) -> dict[str, Counts]:
        """The folded counts to expose: each tenant named here and ``other``."""
        with self._lock:  # never halfway through an update
            return self._tracker.counts()

    def forget(self, process: str) -> None:
        """Drop what is kept about a process that has exited, after its last :meth:`update`
        (its counts stay folded in)."""
        with self._lock:
            self._seen.pop(process, None)
            self._totals.pop(process, None)

    def processes(self) -> int:
        """How many processes have published (each keeps a bounded record here)."""
        with self._lock:
            return len(self._seen)
