"""Request accounting: every finished HTTP request counted exactly, and its record sampled.

Most requests (no tenant, nothing forcing their record, no hook or latency rule
configured) are accounted for at their end, with :attr:`RequestAccounting.account_now`,
while the request is still in the caches: the sampler decides through the label set's
cursor (its key looked up once per window) and the duration is appended to the label
set's list, which the metrics apply, emptied, with every collect and flush (twice a second
from the writer's thread, at close; in a worker process at the event loop's next turn).

Any other request is handed over with :meth:`RequestAccounting.finish`, one append, and
accounted for in order, in batches (every ``REQUEST_BATCH`` requests, and with every
flush): counted in the request metrics, the sampler decides whether the record is kept, the
always-keep rules and the user's hook may overrule it, and a kept record is queued for the
writer. A request that could be accounted for at its end waits in the batch too while
others do, so a key's requests are decided in the order they ended. With traces on, the
decision is needed while the span is still open, so the middleware calls
:meth:`RequestAccounting.account` at once instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import groupby, repeat
from operator import attrgetter, itemgetter, sub
from typing import Any

from ._config import Config
from ._context import RequestContext, annotations_for, scrub_annotations, text_path
from ._metrics import INVALID_CODE, INVALID_STATUS, LiveLabelSet, Metrics
from ._output import Emitter
from ._sampling import (
    DROP_BY_HOOK,
    KEEP_UNSAMPLED,
    Decision,
    KeyCursor,
    Sampler,
    SamplingHook,
)
from ._scrub import Scrubber
from ._tenants import OTHER_TENANT
from ._vocabulary import status_class
from ._writer import Writer

_now = time.perf_counter
_CLASS_OF_STATUS = {status: status_class(status) for status in (*range(100, 600), INVALID_STATUS)}
"""Every status the middleware hands over, with its class: one lookup, not a call."""
_FIRST, _SECOND, _THIRD, _FOURTH = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_START, _FORCED, _ROUTE = attrgetter("start"), attrgetter("forced"), attrgetter("_route")
_LOCATION, _METHOD = attrgetter("location"), attrgetter("method")


MAX_LABEL_SETS = 4096
"""Label sets whose requests a middleware counts at their end; a request of any other
waits for its batch."""
LABEL_SET_BACKLOG = 4096
"""Durations a label set holds before they are applied at once, wherever the request is."""


class _LabelSet:
    """What counting a label set's requests at their end needs: its metrics' children and
    the list its durations wait in (``live``, see :meth:`Metrics.durations_for`), its
    sampler key's cursor."""

    __slots__ = ("children", "cursor", "durations", "live")

    def __init__(self, live: LiveLabelSet, cursor: KeyCursor) -> None:
        self.live = live
        self.children, self.durations = live.children, live.durations
        self.cursor = cursor


class RequestAccounting:
    """Counts requests and decides which records are kept, for one middleware's hook."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        sampler: Sampler,
        writer: Writer,
        emitter: Emitter,
        scrubber: Scrubber,
        sampling_hook: SamplingHook | None = None,
    ) -> None:
        self._metrics = metrics
        self._sampler = sampler
        self._writer = writer
        self._emitter = emitter
        self._scrubber = scrubber
        self._hook = sampling_hook
        self._keep_slower = config.keep_slower_than_seconds
        # Each waiting request carries the function that accounts for it, so requests are
        # never lost with the middleware (and hook) that served them.
        self._account = self.account
        self._settling = metrics.settling
        self._batch = metrics.batch
        self._label_sets: dict[tuple[str, str, str, int], _LabelSet] = {}
        self._ready = metrics.ready
        self.account_now = (
            self._account_now if sampling_hook is None and self._keep_slower is None else None
        )
        """For a request with no tenant and nothing forcing its record, in a configuration
        with no hook and no latency rule: :meth:`account`, done at the request's end; None
        when the configuration has such a rule (every request then waits for its batch)."""

    def finish(self, request: RequestContext, status: int) -> None:
        """Hand a finished request over to be accounted for with its batch (the hot path)."""
        settling = self._settling
        settling.append((self._account, request, status, _now()))
        if len(settling) >= self._batch:
            self._metrics.settle()

    def _account_now(self, request: RequestContext, status: int, end: float) -> None:
        """Count a finished request and decide its record now, while its object is still in
        the caches: the label set's durations wait in a list applied with the next collect
        or flush (see :meth:`Metrics.durations_for`), and its sampler key is decided
        through a cursor that looks the key up once per window. The same counts and
        decisions as :meth:`account`, which the middleware calls for anything else."""
        try:
            key = (request.location, request._route or request.route, request.method, status)
            label_set = self._label_sets.get(key)
            if label_set is None:
                label_set = self._new_label_set(key)
                if label_set is None:  # beyond the cache's bound: the general way
                    self.account(request, status, end)
                    return
            duration = end - request.start
            durations = label_set.durations
            durations.append(duration)
            live = label_set.live
            if not live.queued:  # the first since the last apply (see Metrics.ready)
                live.queued = True
                self._ready.append(live)
            elif len(durations) >= LABEL_SET_BACKLOG:  # no collect or flush for a while
                self._metrics.apply()
            decision = label_set.cursor.decide(end)
            if decision.keep:
                self._keep(request, status, duration, None, decision, label_set.children)
        except Exception:
            self._metrics.internal_error("metrics")

    def _new_label_set(self, key: tuple[str, str, str, int]) -> _LabelSet | None:
        if len(self._label_sets) >= MAX_LABEL_SETS:
            return None
        live = self._metrics.durations_for(key)
        if live is None:
            return None
        location, route, method, status = key
        label_set = _LabelSet(live, self._sampler.cursor(location, status, method, route))
        self._label_sets[key] = label_set
        return label_set

    def account(
        self, request: RequestContext, status: int, end: float, span: Any | None = None
    ) -> Decision:
        """Count the request (always) and decide whether its record and trace are kept."""
        try:
            location, route, method = request.location, request.route, request.method
            duration = end - request.start
            children = self._metrics.request_children(location, route, method, status)
            tenant: str | None = getattr(request, "tenant", None)
            klass = _CLASS_OF_STATUS.get(status) or status_class(status)
            label = self._metrics.count_request(children, duration, tenant, klass)
            decision = self._sampler.decide(location, status, method, route, end)
            if (
                klass == "5xx"
                and label != OTHER_TENANT
                and self._sampler.first_tenant_error(label)
                and request.forced is None
            ):
                request.forced = "tenant_first_error"
            if (
                request.forced is not None
                or self._hook is not None
                or (self._keep_slower is not None and duration > self._keep_slower)
            ):
                decision = self._apply_rules(request, status, duration, span, decision)
            if decision.keep:
                self._keep(request, status, duration, span, decision, children)
            return decision
        except Exception:
            self._metrics.internal_error("metrics")
            return KEEP_UNSAMPLED

    def account_batch(self, items: Sequence[tuple[Any, RequestContext, int, float]]) -> None:
        """:meth:`account` for each ``(_, request, status, end)`` of a batch, with the
        requests of one label set counted and decided together: one lookup of their metrics
        and sampler key instead of one per request. Within a label set the order is kept (a
        request the always-keep rules or the tenant dimension concern is accounted for on its
        own, in its place), so the decisions are the ones :meth:`account` gives one request
        at a time, but for a sampling window that closes inside the batch: it counts the
        batch's requests label set by label set, not in the order they ended."""
        if self._hook is not None or self._keep_slower is not None:
            for _, request, status, end in items:
                self.account(request, status, end)
            return
        if not self._account_plain_batch(items):
            self._account_grouped(items)

    def _account_plain_batch(self, items: Sequence[tuple[Any, RequestContext, int, float]]) -> bool:
        """The common batch, with its per-request work in C: no request has a tenant or a
        rule to apply, and every route is resolved. Grouped by label set with a stable sort
        (the order within a label set is kept). False, having done nothing, for any other
        batch."""
        count = len(items)
        if not count:
            return True
        requests = list(map(_SECOND, items))
        try:
            if (
                list(map(_FORCED, requests)).count(None) != count
                or list(map(getattr, requests, repeat("tenant"), repeat(None))).count(None) != count
            ):
                return False
            routes = list(map(_ROUTE, requests))
            if None in routes:  # not released yet (another thread settles): resolved one by one
                return False
            keys = list(
                zip(
                    map(_LOCATION, requests),
                    routes,
                    map(_METHOD, requests),
                    map(_THIRD, items),
                    strict=True,
                )
            )
        except Exception:  # not the middleware's requests: the general way, guarded there
            return False
        ends = list(map(_FOURTH, items))
        first = keys[0]
        if keys.count(first) == count:  # one label set, as in most batches of a busy route
            self._account_together(first, requests, ends)
            return True
        try:
            order = sorted(range(count), key=keys.__getitem__)
        except TypeError:  # a route_template that gives something other than text, say
            return False
        for key, indices in groupby(order, keys.__getitem__):
            picked = list(indices)
            self._account_together(
                key, list(map(requests.__getitem__, picked)), list(map(ends.__getitem__, picked))
            )
        return True

    def _account_grouped(self, items: Sequence[tuple[Any, RequestContext, int, float]]) -> None:
        groups: dict[tuple[str, str, str, int], list[tuple[RequestContext, float]]] = {}
        mixed: set[tuple[str, str, str, int]] = set()  # label sets with a rule or a tenant
        for _, request, status, end in items:
            try:
                # The route is resolved when the request ends (release): read it directly.
                route = request._route or request.route
                key = (request.location, route, request.method, status)
                group = groups.get(key)
            except Exception:  # a route_template that raises, or gives a list, say
                self._metrics.internal_error("metrics")
                continue
            if group is None:
                groups[key] = [(request, end)]
            else:
                group.append((request, end))
            if request.forced is not None or getattr(request, "tenant", None) is not None:
                mixed.add(key)
        for key, group in groups.items():
            if key not in mixed:  # the common case: the whole label set together
                self._account_pairs(key, group)
                continue
            plain: list[tuple[RequestContext, float]] = []
            for request, end in group:
                if request.forced is None and getattr(request, "tenant", None) is None:
                    plain.append((request, end))
                    continue
                if plain:
                    self._account_pairs(key, plain)
                    plain = []
                self.account(request, key[3], end)
            if plain:
                self._account_pairs(key, plain)

    def _account_pairs(
        self, key: tuple[str, str, str, int], group: list[tuple[RequestContext, float]]
    ) -> None:
        self._account_together(key, list(map(_FIRST, group)), list(map(_SECOND, group)))

    def _account_together(
        self, key: tuple[str, str, str, int], requests: list[RequestContext], ends: list[float]
    ) -> None:
        """Count and decide requests of one label set (``ends[i]`` is when ``requests[i]``
        ended) with no tenant and no rule to apply."""
        location, route, method, status = key
        try:
            children = self._metrics.request_children(location, route, method, status)
            durations = list(map(sub, ends, map(_START, requests)))  # in C
            klass = _CLASS_OF_STATUS.get(status) or status_class(status)
            self._metrics.count_untenanted(children, durations, klass)
            kept = self._sampler.kept_among(location, status, method, route, ends)
            for index, decision in kept:
                self._keep(requests[index], status, durations[index], None, decision, children)
        except Exception:
            self._metrics.internal_error("metrics")

    def _keep(
        self,
        request: RequestContext,
        status: int,
        duration: float,
        span: Any | None,
        decision: Decision,
        children: Any,
    ) -> None:
        fields = record_fields(request, status, duration, span, decision)
        level = (
            "error"
            if status >= 500 or status == INVALID_STATUS
            else ("warning" if status >= 400 else "info")
        )
        # Counted as kept only once it is on its way: a record the full queue drops is lost
        # logging, which the alert on kept records must see.
        if self._writer.submit(self._write_record, (level, fields), "record_queue_full"):
            children[2].inc()

    def _apply_rules(
        self,
        request: RequestContext,
        status: int,
        duration: float,
        span: Any | None,
        decision: Decision,
    ) -> Decision:
        """Always-keep rules (header, sampled parent, latency) and the user's hook."""
        location, route, method = request.location, request.route, request.method
        forced = request.forced
        if forced is None and self._keep_slower is not None and duration > self._keep_slower:
            forced = "slow"
        if forced is not None and decision.reason != forced:
            if decision.keep:
                # The sampler kept it too: it says why it is kept on purpose (the Collector
                # keeps traces by that), stands for itself, and gives its weight back to
                # the key, for the next record kept by rate to carry.
                self._sampler.note_vetoed(location, status, method, route, decision.sample_rate)
            decision = Decision(True, 1.0, forced)
            self._sampler.note_forced(location, status, method, route)
        if self._hook is not None:
            try:
                fields = record_fields(request, status, duration, span, decision)
                verdict = self._hook(fields)
            except Exception:
                # The user's rule failed: count it and let the sampler's decision stand.
                self._metrics.internal_error("sampling_hook")
                verdict = None
            if verdict is True and not decision.keep:
                decision = Decision(True, 1.0, "hook")
                self._sampler.note_forced(location, status, method, route)
            elif verdict is False:
                if decision.keep and decision.reason != "hook":
                    self._sampler.note_vetoed(location, status, method, route, decision.sample_rate)
                decision = DROP_BY_HOOK
        return decision

    def _write_record(self, record: tuple[str, dict[str, Any]]) -> None:
        # On the writer's thread: the path, tags and contexts are scrubbed off the request
        # path.
        level, fields = record
        fields["path"] = self._scrubber.text(fields["path"])
        if "tenant" in fields:  # refused at the door when it looked secret; checked anyway
            fields["tenant"] = self._scrubber.identifier(fields["tenant"])
        scrub_annotations(fields, self._scrubber)
        self._emitter.emit(level, "request", **fields)


def record_fields(
    request: RequestContext, status: int, duration: float, span: Any | None, decision: Decision
) -> dict[str, Any]:
    """The fields of a request record (before scrubbing, which happens on the writer): with
    the tags and contexts of the request (and of the process) when there are any."""
    trace_id = None
    if span is not None:
        span_context = span.get_span_context()
        if span_context.is_valid:
            trace_id = format(span_context.trace_id, "032x")
    fields = {
        "location": request.location,
        "method": request.method,
        "route": request.route,
        "path": text_path(request.path),
        "status": status if status != INVALID_STATUS else INVALID_CODE,
        "duration_ms": round(duration * 1000, 3),
        "request_id": request.request_id,
        "trace_id": trace_id,
        "sample_rate": decision.sample_rate,
        "reason": decision.reason,
    }
    tenant = getattr(request, "tenant", None)
    if tenant is not None:
        fields["tenant"] = tenant  # the customer's id, tracked by name or not
    fields.update(annotations_for(request))  # tags and contexts (set_tag, set_context)
    return fields
