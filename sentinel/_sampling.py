"""The per-location tail sampler: which requests keep their detailed record and trace.

Decided after the response status is known. Each location has its own budget, so a noisy
location cannot starve a quiet one. Within a location, each status class has a target of
kept records per second, shared by its keys (status code, method, route) in the way
Honeycomb's dynamic samplers do it: every key's share grows with the logarithm of its
traffic, so a rare key keeps (nearly) everything while a busy one is sampled hard. Rates
are recomputed every window from the traffic just seen, so they follow changes within
seconds.

Every kept record carries ``sample_rate``, the number of requests it stands for: summing
it over kept records estimates the true count. Each request adds one credit to its key;
a record kept at rate ``r`` spends ``r`` credits, a record kept for another reason spends
one, so the estimate stays exact up to the credit a key holds at any moment.

A rate set while a key was quiet (keep everything) would keep every record of a burst that
follows until the window ends: thousands of records in a second when traffic ramps up
after a deploy or a quiet night, or an error storm begins. So a key that sees
:data:`BURST_MULTIPLE` times the requests its rate was set for (plus
:data:`BURST_ALLOWANCE`) within a window is rated again at once, from its traffic since the
window began taken at that pace, against what the other keys of its class were rated for
(as Honeycomb's samplers do on a burst). Other keys keep their rates, so each key's
decisions depend on its own requests only, in whatever order the keys' requests are decided.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ._config import Config
from ._vocabulary import status_class

MAX_TENANTS_REMEMBERED = 4096
"""Tenants whose first 5xx was kept, remembered (oldest forgotten first)."""
OVERFLOW_ROUTE = "<overflow>"
"""The route of the key that stands for every key beyond ``max_sampling_keys``."""
BURST_MULTIPLE = 2.0
"""A key's requests within a window, in multiples of those its rate was set for, that
make a burst: the key is rated again at once."""
BURST_ALLOWANCE = 16
"""Requests a key may see within a window beyond ``BURST_MULTIPLE`` times its last
window's before it is a burst: a new or quiet key's first few are not one."""


class Decision(NamedTuple):
    """Keep the request's record and trace? With the weight and the reason."""

    keep: bool
    sample_rate: float
    reason: str


DROP = Decision(False, 0.0, "sampled_out")
DROP_BY_HOOK = Decision(False, 0.0, "hook")
NEW_KEY = Decision(True, 1.0, "new_key")
KEEP_UNSAMPLED = Decision(True, 1.0, "unsampled")
"""For requests sampling does not apply to (websockets) or could not decide."""


class _Key:
    __slots__ = ("burst", "count", "credit", "expected", "last_seen", "rate", "status_class")

    def __init__(self, status_class: str, now: float) -> None:
        self.status_class = status_class
        self.count = 0  # requests this window
        self.credit = 0.0
        self.rate = 0.0  # 0: not computed yet (provisional)
        self.last_seen = now
        self.expected = 0.0  # requests per window its rate was set for, at the last roll
        self.burst = BURST_ALLOWANCE  # requests this window that make a burst


class _Location:
    __slots__ = ("keys", "window_start")

    def __init__(self, now: float) -> None:
        self.keys: dict[tuple[int, str, str], _Key] = {}
        self.window_start = now


class Sampler:
    """Per-location dynamic sampler; see the module docstring.

    ``decide`` is called once per request with the time it ended (any monotonic clock in
    seconds); the replay tests drive it with simulated time.
    """

    def __init__(self, config: Config) -> None:
        self._targets = dict(config.records_per_second)
        self._window = config.sampling_window_seconds
        self._idle = config.sampling_idle_seconds
        self._max_keys = config.max_sampling_keys
        # Locations come bounded from the middleware; this bound holds whatever calls us.
        # An allow-list is named whatever its length; the process's own location and
        # ``other`` come on top.
        self._max_locations = max(config.max_locations, len(config.locations)) + 2
        self._locations: dict[str, _Location] = {}
        self._lock = threading.Lock()
        self._tenants_with_error: OrderedDict[str, None] = OrderedDict()

    def first_tenant_error(self, tenant: str) -> bool:
        """Whether this is the first 5xx of the tracked ``tenant`` (kept in full, whatever
        the rate): True once per tenant, for the last :data:`MAX_TENANTS_REMEMBERED`."""
        seen = self._tenants_with_error
        if tenant in seen:
            return False
        with self._lock:
            if tenant in seen:
                return False
            seen[tenant] = None
            if len(seen) > MAX_TENANTS_REMEMBERED:
                seen.popitem(last=False)
        return True

    def decide(self, location: str, status: int, method: str, route: str, now: float) -> Decision:
        """Keep the record of a request of this key that ended at ``now``?"""
        # No lock on this path: ASGI apps decide from one event-loop thread, and where
        # threads do share a sampler the worst a race does is miscount one request. The
        # window roll, which rebuilds rates, is serialised.
        state = self._location(location, now)
        return self._decide_one(state, (status, method, route), status, now)

    def kept_among(
        self, location: str, status: int, method: str, route: str, ends: Sequence[float]
    ) -> list[tuple[int, Decision]]:
        """:meth:`decide` for requests of one key in the order they ended (``ends``): the
        ``(index, decision)`` of each request whose record is kept (the rest are dropped),
        exactly as one :meth:`decide` per request gives them. Requests that fall in one
        sampling window (nearly every run) cost a few operations each: the key is looked
        up once and only its credit is carried from request to request."""
        if not ends:
            return []
        state = self._location(location, ends[0])
        key = (status, method, route)
        kept: list[tuple[int, Decision]] = []
        entry = self._entry(state, key, status)
        if (
            max(ends) - state.window_start >= self._window
            or entry is None
            or entry.rate == 0.0
            or entry.count + len(ends) > entry.burst
        ):
            # A window rolls inside the run (rates rebuilt, idle keys forgotten), the key is
            # new or provisional, or may burst (rated again): one request at a time, as
            # decide does it.
            for index, now in enumerate(ends):
                decision = self._decide_one(state, key, status, now)
                if decision.keep:
                    kept.append((index, decision))
            return kept
        rate, credit = entry.rate, entry.credit
        sampled = Decision(True, rate, "sampled")
        for index in range(len(ends)):
            credit += 1.0
            if credit >= rate:
                credit -= rate
                kept.append((index, sampled))
        entry.credit = credit
        entry.count += len(ends)
        entry.last_seen = ends[-1]
        return kept

    def cursor(self, location: str, status: int, method: str, route: str) -> KeyCursor:
        """A handle that decides this key's requests one at a time, as :meth:`decide` does,
        for a caller that decides the same key again and again."""
        return KeyCursor(self, location, status, (status, method, route))

    def _location(self, location: str, now: float) -> _Location:
        state = self._locations.get(location)
        if state is None:
            with self._lock:
                if len(self._locations) >= self._max_locations:
                    location = "other"
                state = self._locations.get(location)
                if state is None:
                    state = self._locations[location] = _Location(now)
        return state

    def _entry(self, state: _Location, key: tuple[int, str, str], status: int) -> _Key | None:
        """The key's entry, or the overflow key's once the location has too many keys."""
        entry = state.keys.get(key)
        if entry is None and len(state.keys) >= self._max_keys:
            entry = state.keys.get((status, key[1], OVERFLOW_ROUTE))
        return entry

    def _new_entry(
        self, state: _Location, key: tuple[int, str, str], status: int, now: float
    ) -> None:
        slot = key if len(state.keys) < self._max_keys else (status, key[1], OVERFLOW_ROUTE)
        entry = state.keys[slot] = _Key(status_class(status), now)
        entry.count = 1

    def _decide_one(
        self, state: _Location, key: tuple[int, str, str], status: int, now: float
    ) -> Decision:
        if now - state.window_start >= self._window:
            with self._lock:
                if now - state.window_start >= self._window:
                    self._recompute(state, now)
        entry = self._entry(state, key, status)
        if entry is not None and entry.count >= entry.burst:
            with self._lock:
                if entry.count >= entry.burst:
                    self._rate_burst(state, entry, now)
        if entry is None:
            self._new_entry(state, key, status, now)
            return NEW_KEY  # the first occurrence, in full
        entry.count += 1
        entry.last_seen = now
        entry.credit += 1.0
        rate = entry.rate
        if rate == 0.0:
            return self._provisional(entry)
        if entry.credit >= rate:
            entry.credit -= rate
            return Decision(True, rate, "sampled")
        return DROP

    def note_forced(self, location: str, status: int, method: str, route: str) -> None:
        """Spend the one credit a force-kept record stands for, keeping estimates exact."""
        self._adjust_credit(location, status, method, route, -1.0)

    def note_vetoed(
        self, location: str, status: int, method: str, route: str, sample_rate: float
    ) -> None:
        """A kept record was dropped after all (the user's hook): its weight goes back to the
        key, to be carried by the next record kept."""
        self._adjust_credit(location, status, method, route, sample_rate)

    def _adjust_credit(
        self, location: str, status: int, method: str, route: str, amount: float
    ) -> None:
        with self._lock:
            state = self._locations.get(location) or self._locations.get("other")
            if state is None:
                return
            entry = state.keys.get((status, method, route)) or state.keys.get(
                (status, method, OVERFLOW_ROUTE)
            )
            if entry is not None:
                entry.credit += amount

    @staticmethod
    def _provisional(entry: _Key) -> Decision:
        # Before the key's rate is known (new, or quiet last window): errors are all kept;
        # otherwise the first few, then the 8th, 16th, 32nd, ... request, each standing
        # for the ones since the last kept.
        count = entry.count
        if entry.status_class == "5xx" or count <= 4 or count & (count - 1) == 0:
            weight = entry.credit
            entry.credit = 0.0
            return Decision(True, weight, "provisional")
        return DROP

    def _recompute(self, state: _Location, now: float) -> None:
        window = max(now - state.window_start, self._window)
        pace = self._window / window  # a window's count, as requests per window
        by_class: dict[str, list[_Key]] = {}
        for key, entry in list(state.keys.items()):
            if entry.count == 0 and now - entry.last_seen > self._idle:
                del state.keys[key]
                continue
            by_class.setdefault(entry.status_class, []).append(entry)
        for klass, entries in by_class.items():
            budget = self._targets[klass] * window
            for entry, rate in zip(
                entries, _allocate([float(e.count) for e in entries], budget), strict=True
            ):
                entry.expected = entry.count * pace
                entry.burst = int(BURST_MULTIPLE * entry.expected) + BURST_ALLOWANCE
                # A key that was quiet this window starts over as provisional: a rate set
                # during yesterday's storm must not drop today's lone 5xx.
                entry.rate = rate if entry.count else 0.0
                entry.count = 0
        state.window_start = now

    def _rate_burst(self, state: _Location, entry: _Key, now: float) -> None:
        """Rate a bursting key at once: its requests since the window began, taken at that
        pace for a whole window, against what its class's other keys were rated for."""
        # Taken over at least a thousandth of a window: a run of requests ending at one
        # instant (a coarse clock) is not an infinite pace. Too low a pace corrects itself
        # (the key bursts again); too high a one would drop its records until the window ends.
        pace = self._window / max(now - state.window_start, self._window / 1000)
        expected = entry.count * pace
        others = [
            other.expected
            for other in state.keys.values()
            if other is not entry and other.status_class == entry.status_class
        ]
        budget = self._targets[entry.status_class] * self._window
        entry.rate = _allocate([expected, *others], budget)[0]
        entry.burst = int(BURST_MULTIPLE * expected) + BURST_ALLOWANCE

    def state_size(self) -> tuple[int, int]:
        """(locations, keys) currently held, for the memory bound."""
        with self._lock:
            return len(self._locations), sum(len(s.keys) for s in self._locations.values())


class KeyCursor:
    """One key's decisions, each :meth:`Sampler.decide`'s for the same request, with the
    key's entry looked up once per window instead of once per request.

    Deciding a request of a rated key inside the window its entry was found in, with no
    burst, is then a few operations on the entry; anything else (a window to roll, a new,
    provisional or bursting key) goes through the sampler's own one-request path, and the
    entry is looked up again after it. A roll is what removes entries (and frees slots a key
    on the overflow key may then take), and every roll moves the window's start: while the
    start is the one the entry was found in, the entry is the one the sampler would use.
    """

    __slots__ = (
        "_entry",
        "_key",
        "_location",
        "_sampler",
        "_state",
        "_status",
        "_window",
        "_window_start",
    )

    def __init__(self, sampler: Sampler, location: str, status: int, key: tuple[int, str, str]):
        self._sampler = sampler
        self._window = sampler._window
        self._location = location
        self._status = status
        self._key = key
        self._state: _Location | None = None
        self._entry: _Key | None = None
        self._window_start = 0.0

    def decide(self, now: float) -> Decision:
        """Keep the record of this key's request that ended at ``now``?"""
        entry, state = self._entry, self._state
        if (
            entry is not None
            and state is not None
            and state.window_start == self._window_start  # no roll since: still the entry
            and now - self._window_start < self._window  # none due (_decide_one's test)
            and entry.count < entry.burst
            and entry.rate != 0.0
        ):
            # _decide_one's steps for this case, in its order (the same float arithmetic).
            entry.count += 1
            entry.last_seen = now
            entry.credit += 1.0
            rate = entry.rate
            if entry.credit >= rate:
                entry.credit -= rate
                return Decision(True, rate, "sampled")
            return DROP
        sampler = self._sampler
        state = sampler._location(self._location, now)
        decision = sampler._decide_one(state, self._key, self._status, now)
        self._state, self._window_start = state, state.window_start
        self._entry = sampler._entry(state, self._key, self._status)
        return decision


def _allocate(counts: list[float], budget: float) -> list[float]:
    """Sample rates (>= 1) so that about ``budget`` records are kept in all, each key's share
    proportional to log10(count + 1); keys needing less than their share keep everything
    and leave the rest to the busier ones."""
    rates = [1.0] * len(counts)
    if sum(counts) <= budget:
        return rates  # the whole class fits: keep everything
    order = sorted(range(len(counts)), key=counts.__getitem__)
    remaining_budget = budget
    remaining_weight = sum(math.log10(count + 1) for count in counts)
    for index in order:
        count = counts[index]
        if count == 0:
            continue
        weight = math.log10(count + 1)
        share = remaining_budget * weight / remaining_weight if remaining_weight else 0.0
        remaining_weight -= weight
        if count <= share:
            remaining_budget -= count
            continue
        # At least one record per busy key and window: rare keys keep a higher rate.
        rates[index] = max(1.0, min(float(count), count / max(share, 1e-9)))
        remaining_budget -= count / rates[index]
    return rates


SamplingHook = Callable[[dict[str, object]], bool | None]
"""A user rule: given the request's fields, True keeps, False drops, None leaves it be."""
