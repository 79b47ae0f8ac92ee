"""Every sentinel metric, defined once with its labels and the bounds on their values."""

from __future__ import annotations

import asyncio
import threading
import weakref
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import groupby, islice
from operator import itemgetter
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ._config import DEFAULT_LATENCY_BUCKETS, DEFAULT_MAX_SERIES
from ._location import SharedAdmissions, admissions_file, shared_directory
from ._tenants import OTHER_TENANT, TENANT_PROBLEMS, Counts, TenantTracker
from ._version import __version__
from ._vocabulary import STATUS_CLASSES, Component, DropReason, Phase, StatusClass, status_class

STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER = "other"
HTTP_STATUSES = frozenset(range(100, 600))
"""The response statuses counted as themselves (ints only: check the type first)."""
INVALID_STATUS = 0
"""Stands for a response status that is not an HTTP status (not an int from 100 to 599)."""
INVALID_CODE = "invalid"
"""The ``code`` label of such responses: one bounded value, in the 5xx status class."""
_running_loop = asyncio.events._get_running_loop
MAX_EXCEPTION_TYPES = 256
"""Distinct ``exception_type`` label values before new ones are counted as ``other``; in the
workers of a multiprocess server, the first ones of all of them (:class:`SharedAdmissions`)."""
EXCEPTION_TYPES_ADMITTED = "exception_type"
"""``<what>`` of the shared file of exception types (:func:`admissions_file`)."""
REQUEST_BATCH = 64
"""Requests whose count and duration are applied together; every collect applies the rest."""
_ACCOUNT_OF = itemgetter(0)
"""The accounting function a waiting request carries (``settling`` holds
``(account, request, status, end)``)."""
MAX_CACHED_LABEL_SETS = 65_536
"""Request label sets (location, route, method, status) whose children are cached."""
FOLDED_ROUTE = "<other>"
"""The ``route`` of label sets folded once their family reached its ``max_series`` budget
(``<`` cannot start a route template, so it never names a real route)."""
COARSE_LATENCY_BUCKETS = (0.05, 0.25, 1.0, 5.0)
"""Buckets of ``sentinel_http_request_duration_seconds{location, route, method}``: enough to
tell a fast route from a slow one (and for an apdex-style ratio) at 7 lines per label set;
percentiles come from the fine ``sentinel_location_request_duration_seconds{location}``."""
REQUESTS = "sentinel_http_requests_total"
DURATION = "sentinel_http_request_duration_seconds"
LOCATION_DURATION = "sentinel_location_request_duration_seconds"
UNHANDLED = "sentinel_unhandled_exceptions_total"
HANDLED = "sentinel_handled_exceptions_total"
MUTATIONS = "sentinel_global_mutations_total"


class _Counter(Counter):
    """A counter without the ``_created`` series (one more line per label set that no
    sentinel rule or dashboard reads; Prometheus sees resets without it)."""

    def _child_samples(self) -> Iterable[Sample]:
        return (Sample("_total", {}, self._value.get(), None, None),)


class _Histogram(Histogram):
    """A histogram without the ``_created`` series."""

    def _child_samples(self) -> Iterable[Sample]:
        return tuple(s for s in super()._child_samples() if s.name != "_created")


def fold_route_method(labels: tuple[str, ...]) -> tuple[str, ...]:
    """(location, route, method, ...rest) with route and method folded."""
    return (labels[0], FOLDED_ROUTE, OTHER, *labels[3:])


def fold_route(labels: tuple[str, ...]) -> tuple[str, ...]:
    """(location, route, ...rest) with the route folded."""
    return (labels[0], FOLDED_ROUTE, *labels[2:])


SERIES_PER_LABEL_SET = {DURATION: len(COARSE_LATENCY_BUCKETS) + 3}
"""Series one label set of a budgeted family exposes, when not 1: a histogram's buckets,
``+Inf``, ``_count`` and ``_sum``. The budget counts series, as Prometheus does."""
FOLDED_LABELS: dict[str, tuple[tuple[str, str], ...]] = {
    "sentinel_http_requests": (("method", OTHER), ("route", FOLDED_ROUTE)),
    DURATION: (("method", OTHER), ("route", FOLDED_ROUTE)),
    UNHANDLED.removesuffix("_total"): (("route", FOLDED_ROUTE),),
    HANDLED.removesuffix("_total"): (("route", FOLDED_ROUTE),),
    MUTATIONS.removesuffix("_total"): (("route", FOLDED_ROUTE),),
}
"""The same folds by family name and label name, for the merged multiprocess view."""
EXPOSED_NAMES = {
    "sentinel_http_requests": REQUESTS,
    DURATION: DURATION,
    UNHANDLED.removesuffix("_total"): UNHANDLED,
    HANDLED.removesuffix("_total"): HANDLED,
    MUTATIONS.removesuffix("_total"): MUTATIONS,
}
FOLDS: dict[str, Callable[[tuple[str, ...]], tuple[str, ...]]] = {
    REQUESTS: fold_route_method,
    DURATION: fold_route_method,
    UNHANDLED: fold_route,
    HANDLED: fold_route,
    MUTATIONS: fold_route,
}
"""How each budgeted family folds a label set over its budget; by exposed name. Every other
label (location, code, exception type, phase, target) already has a bounded value set."""
BUDGETED_LABELS = {
    REQUESTS: ("location", "route", "method", "code"),
    DURATION: ("location", "route", "method"),
    UNHANDLED: ("location", "route", "exception_type", "phase"),
    HANDLED: ("location", "route", "exception_type"),
    MUTATIONS: ("location", "route", "target"),
}
"""The labels of each budgeted family, in the order its label sets are admitted; by exposed
name."""
LOCATION_FAMILIES = frozenset({*FOLDED_LABELS, LOCATION_DURATION, "sentinel_records_kept"})
"""sentinel's families (as prometheus_client's files name them) with a ``location`` label:
the merged multiprocess view folds the locations beyond the bound into ``other`` in each."""
INTERNAL_ERRORS_HELP = "Failures inside sentinel itself, by component; the app was not affected."


class SeriesBudget:
    """Which label sets of one family are named in full: the first ones, as long as their
    series (:data:`SERIES_PER_LABEL_SET`) fit in ``limit``.

    Later new label sets are folded (:data:`FOLDS`) into one of a bounded set of label sets,
    which do not count against the budget: a family exposes at most ``limit`` series plus
    the folded ones (locations x the other labels' values).

    In a worker of a multiprocess server (``shared``: a :class:`SharedAdmissions` file in
    the multiprocess directory) the first label sets are the first of all the workers
    sharing the directory, recycled ones included: every worker names the same label sets
    and folds the same others, so a label set the merged view names counts every one of
    its observations, from every worker. The file is read only when a label set is new to
    this process (once per label set, never per request) until the budget is spent.
    """

    def __init__(
        self,
        metric: str,
        limit: int,
        on_first_fold: Callable[[str], None],
        shared: SharedAdmissions | None = None,
    ) -> None:
        self.metric = metric
        self.limit = limit
        self.named: set[tuple[str, ...]] = set()
        self.folded = False
        self._fold = FOLDS[metric]
        self.cost = SERIES_PER_LABEL_SET.get(metric, 1)
        self._on_first_fold = on_first_fold
        self._shared = shared
        self._lock = threading.Lock()

    def admit(self, labels: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
        """The label set to count under, and whether it was folded."""
        named = self.named
        if labels in named:
            return labels, False
        with self._lock:
            if labels in named:
                return labels, False
            if (len(named) + 1) * self.cost <= self.limit and self._admitted(labels):
                named.add(labels)
                return labels, False
            first = not self.folded
            self.folded = True
        if first:
            self._on_first_fold(self.metric)
        folded = self._fold(labels)
        return folded, folded != labels

    def _admitted(self, labels: tuple[str, ...]) -> bool:
        """Whether ``labels``, new to this process while its budget has room, is named:
        always alone; in a worker, when the workers named it or have room (with the lock)."""
        shared = self._shared
        if shared is None:
            return True
        named = self.named
        try:
            with shared.locked(self.limit) as new:
                # What the other workers named first takes its places: once the budget is
                # spent, this process's set is the whole shared one.
                named.update(entry for entry in new if isinstance(entry, tuple))
                if labels in named:
                    return True
                if (len(named) + 1) * self.cost > self.limit:
                    return False
                shared.append(labels)
        except OSError:
            pass  # the file cannot be used: this process's own budget
        return True


class _FoldedChild:
    """What ``labels()`` returns for a folded label set: counts under the folded labels and
    in ``sentinel_series_overflow_total``."""

    __slots__ = ("_child", "_overflow")

    def __init__(self, child: Any, overflow: Any) -> None:
        self._child = child
        self._overflow = overflow

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)
        self._overflow.inc(amount)


class BudgetedCounter(Collector):
    """A labelled counter whose label sets are bounded by a :class:`SeriesBudget`;
    ``labels(...)`` is used as prometheus-client's."""

    def __init__(self, counter: Counter, budget: SeriesBudget, overflow: Any) -> None:
        self.counter = counter
        self.budget = budget
        self._overflow = overflow

    def labels(self, *values: str) -> Any:
        labels, folded = self.budget.admit(values)
        child = self.counter.labels(*labels)
        return _FoldedChild(child, self._overflow) if folded else child

    def describe(self) -> Iterable[Metric]:
        return self.counter.describe()

    def collect(self) -> Iterable[Metric]:
        return self.counter.collect()


class LiveLabelSet:
    """A label set whose requests are counted as they end: its children, its status class,
    the durations waiting to be applied, and whether it is in ``Metrics.ready`` (or about to
    be). See :meth:`Metrics.durations_for`."""

    __slots__ = ("children", "durations", "klass", "queued")

    def __init__(self, children: Any, klass: StatusClass) -> None:
        self.children = children
        self.klass = klass
        self.durations: list[float] = []
        self.queued = False


class Metrics:
    """The metric families of one registry. Use :func:`metrics_for` to share them."""

    def __init__(
        self,
        registry: CollectorRegistry,
        buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        self.registry = registry
        self.overflow_listener: Callable[[str, int], None] | None = None
        """Told (metric, max_series) once, when a family first folds a label set."""
        directory = shared_directory()
        self.budgets = {
            metric: SeriesBudget(
                metric,
                max_series,
                self._first_fold,
                SharedAdmissions(admissions_file(directory, metric)) if directory else None,
            )
            for metric in FOLDS
        }
        self.series_overflow = _Counter(
            "sentinel_series_overflow",
            "Observations counted under folded labels (route <other>, method other) because "
            "their family had max_series series already, by family.",
            ("metric",),
            registry=None,  # registered after the request families, which apply the batch
        )
        self._overflow = {metric: self.series_overflow.labels(metric) for metric in FOLDS}
        # The per-request families (requests, durations, kept records) are registered
        # through RequestFamilies, which accounts for every request served before each
        # collect: a scrape is always exact.
        self.http_requests = _Counter(
            "sentinel_http_requests",
            "HTTP requests served, by the status code actually sent.",
            BUDGETED_LABELS[REQUESTS],
            registry=None,
        )
        self.http_request_duration = _Histogram(
            DURATION,
            "Time from receiving a request to the end of its response, in coarse buckets "
            "(percentiles: sentinel_location_request_duration_seconds).",
            BUDGETED_LABELS[DURATION],
            buckets=COARSE_LATENCY_BUCKETS,
            registry=None,
        )
        self.location_request_duration = _Histogram(
            LOCATION_DURATION,
            "Time from receiving a request to the end of its response, by location, in fine "
            "buckets (latency_buckets) for percentiles.",
            ("location",),
            buckets=buckets,
            registry=None,
        )
        self.pending: deque[tuple[Any, list[float], StatusClass | None]] = deque()
        """(children, durations, status class) of served requests of one label set not yet
        applied to the families; the class is set for requests without a tenant, counted as
        ``other`` with the batch."""
        self.live: dict[tuple[str, str, str, int], LiveLabelSet] = {}
        """By label set, the requests counted as they end (see :meth:`durations_for`),
        applied with ``pending``."""
        self.ready: deque[LiveLabelSet] = deque()
        """The live label sets whose durations may wait: what an apply goes through, not
        every label set. Whoever appends to a label set that is not ``queued`` marks it and
        adds it here; an apply unmarks each before it takes the durations. A label set may be
        here twice (two threads that both found it unmarked), never missing while durations
        wait."""
        self.batch = REQUEST_BATCH
        self.apply_at_next_turn: bool = getattr(values.ValueClass, "_multiprocess", False)
        """Worker processes write their values to files the sidecar reads at any moment, not
        at a collect of theirs: they apply what waits at the loop's next turn (see
        :meth:`settle_soon`), so a scrape sees a request as soon as without batches."""
        self._settle_scheduled = False
        self.records_kept = _Counter(
            "sentinel_records_kept",
            "Request records written to the detailed log.",
            ("location", "status_class"),
            registry=None,
        )
        self.count_lock = threading.RLock()
        """Held while a request is counted (requests and its tenant) and while a collect reads
        the counts, so the tenant counts sum to the request counts at every scrape."""
        self.tenants = TenantTracker(50, secret=self._tenant_secret)
        """Which tenants are counted by name; see :meth:`use_tenants`."""
        self._secret: Callable[[str], bool] | None = None
        registry.register(
            RequestFamilies(
                self.flush,
                (
                    self.http_requests,
                    self.http_request_duration,
                    self.location_request_duration,
                    self.records_kept,
                ),
                self.apply,
                self.count_lock,
                self.tenant_counts,
                self.tenant_rejections,
            )
        )
        registry.register(self.series_overflow)
        self.unhandled_exceptions = self._budgeted(
            UNHANDLED,
            "Unhandled exceptions, every occurrence (never sampled).",
            BUDGETED_LABELS[UNHANDLED],
        )
        self.handled_exceptions = self._budgeted(
            HANDLED,
            "Exceptions the app handled and reported with sentinel.capture_exception(), every "
            "occurrence (never sampled).",
            BUDGETED_LABELS[HANDLED],
        )
        self.global_mutations = self._budgeted(
            MUTATIONS,
            "Writes to process-global state made while handling a request.",
            BUDGETED_LABELS[MUTATIONS],
        )
        registry.register(RequestTotals(self._collect_requests))
        self.reports_dropped = _Counter(
            "sentinel_reports_dropped",
            "Reports sentinel could not write, by reason.",
            ("reason",),
            registry=registry,
        )
        self.internal_errors = _Counter(
            "sentinel_internal_errors",
            INTERNAL_ERRORS_HELP,
            ("component",),
            registry=registry,
        )
        self.build_info = Gauge(
            "sentinel_build_info",
            "Always 1; labels name the service, the app's release (version), sentinel's own "
            "version and the deployment environment.",
            ("service", "version", "sentinel_version", "environment"),
            registry=registry,
            multiprocess_mode="max",
        )
        self.event_loop_lag = Gauge(
            "sentinel_event_loop_lag_seconds",
            "How late the event loop runs a callback, measured from sentinel's own thread; "
            "keeps growing while the loop is stuck.",
            registry=registry,
            multiprocess_mode="all",
        )
        self._exception_types: set[str] = set()
        self._shared_types = (
            SharedAdmissions(admissions_file(directory, EXCEPTION_TYPES_ADMITTED))
            if directory
            else None
        )
        self._lock = threading.Lock()
        self.settling: deque[tuple[Callable[..., Any], Any, int, float]] = deque()
        """(account, request, status, end) of requests served but not yet accounted for;
        a request stays here until it has been (see :meth:`settle`)."""
        self._settle_lock = threading.RLock()
        self._settle_running = False
        self.label_children: dict[tuple[Any, ...], Any] = {}
        self._folded_metrics: list[str] = []

    def _budgeted(self, metric: str, documentation: str, labels: tuple[str, ...]) -> Any:
        counter = _Counter(metric.removesuffix("_total"), documentation, labels, registry=None)
        family = BudgetedCounter(counter, self.budgets[metric], self._overflow[metric])
        self.registry.register(family)
        return family

    def set_max_series(self, max_series: int) -> None:
        """The budget of each family, in series, from now on (label sets named so far stay
        named)."""
        for budget in self.budgets.values():
            budget.limit = max_series

    def listen_for_overflow(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(metric, max_series)`` once per family that folds, including the
        families that folded before it was set."""
        with self._lock:
            self.overflow_listener = listener
            already = list(self._folded_metrics)
        for metric in already:
            listener(metric, self.budgets[metric].limit)

    def _first_fold(self, metric: str) -> None:
        with self._lock:
            self._folded_metrics.append(metric)
            listener = self.overflow_listener
        if listener is not None:
            try:
                listener(metric, self.budgets[metric].limit)
            except Exception:
                self.internal_error("metrics")

    def use_tenants(self, max_tenants: int, secret: Callable[[str], bool] | None) -> TenantTracker:
        """The tenant tracker for a sentinel with this ``max_tenants`` and credential rule.

        One per registry, like the request counter, so their sums agree. A sentinel with
        another ``max_tenants`` gets a new tracker that starts with every request counted so
        far in ``other`` (as if every tracked tenant had been evicted), and counts its
        rejections with the old one's: a sentinel still holding the old one (to validate its
        requests' tenants) counts where the registry's collector reads.
        """
        with self.count_lock:
            self._secret = secret
            tracker = self.tenants
            if tracker.max_tenants != max_tenants:
                replacement = TenantTracker(
                    max_tenants, secret=self._tenant_secret, rejections=tracker.rejections
                )
                totals = [sum(column) for column in zip(*tracker.counts().values(), strict=True)]
                for status_class_name, total in zip(STATUS_CLASSES, totals, strict=True):
                    if total:
                        replacement.observe(None, status_class_name, total)
                self.tenants = replacement
            return self.tenants

    def _tenant_secret(self, value: str) -> bool:
        secret = self._secret
        return secret is not None and secret(value)

    def tenant_counts(self) -> dict[str, Counts]:
        """The tracker's counts (call with ``count_lock`` held to match the request counter)."""
        return self.tenants.counts()

    def tenant_rejections(self) -> dict[str, int]:
        """Tenant values refused so far, by reason."""
        return {str(reason): count for reason, count in self.tenants.rejected().items()}

    def set_build_info(self, service: str, version: str, environment: str) -> None:
        self.build_info.labels(
            service=service,
            version=version,
            sentinel_version=__version__,
            environment=environment,
        ).set(1)

    def exception_type_label(self, exception_type: str) -> str:
        """``exception_type`` while it is among the first :data:`MAX_EXCEPTION_TYPES` types
        (of all the workers sharing a multiprocess directory), else ``other``."""
        named = self._exception_types
        if exception_type in named:
            return exception_type
        with self._lock:
            if exception_type in named:
                return exception_type
            if len(named) >= MAX_EXCEPTION_TYPES:
                return OTHER
            shared = self._shared_types
            if shared is not None:
                try:
                    with shared.locked(MAX_EXCEPTION_TYPES) as new:
                        # The types the other workers named first take their places, so a
                        # type is named (or folded) alike in every worker.
                        named.update(entry for entry in new if isinstance(entry, str))
                        if exception_type in named:
                            return exception_type
                        if len(named) >= MAX_EXCEPTION_TYPES:
                            return OTHER
                        shared.append(exception_type)
                except OSError:
                    pass  # the file cannot be used: this process's own first types
            named.add(exception_type)
        return exception_type

    def count_exception(self, location: str, route: str, exception_type: str, phase: Phase) -> None:
        label = self.exception_type_label(exception_type)
        self.unhandled_exceptions.labels(location, route, label, phase).inc()

    def count_handled(self, location: str, route: str, exception_type: str) -> None:
        label = self.exception_type_label(exception_type)
        self.handled_exceptions.labels(location, route, label).inc()

    def request_children(self, location: str, route: str, method: str, status: int) -> Any:
        """(requests, duration, records kept, location duration, overflow...) children for
        one label set, looked up once and reused by every later request with the same
        labels; over a family's budget, the folded labels' children."""
        key = (location, route, method, status)
        children = self.label_children.get(key)
        if children is None:
            klass = status_class(status)
            code = str(status) if status != INVALID_STATUS else INVALID_CODE
            counted, folded_count = self.budgets[REQUESTS].admit((location, route, method, code))
            timed, folded_time = self.budgets[DURATION].admit((location, route, method))
            overflow = self._overflow
            children = (
                self.http_requests.labels(*counted),
                self.http_request_duration.labels(*timed),
                self.records_kept.labels(location, klass),
                self.location_request_duration.labels(location),
                overflow[REQUESTS] if folded_count else None,
                overflow[DURATION] if folded_time else None,
            )
            # Every part of the key has a bounded value set; the cap keeps the cache small
            # even so (a key not cached is admitted again, which gives the same children).
            if len(self.label_children) < MAX_CACHED_LABEL_SETS:
                self.label_children[key] = children
        return children

    def count_request(
        self, children: Any, duration: float, tenant: str | None, klass: StatusClass
    ) -> str:
        """Count one served request and its tenant together; the tenant's label (its name
        when tracked, else ``other``)."""
        if tenant is None:
            # Counted as ``other`` with its batch (in _apply, under the count lock, as the
            # request counter is): one tracker call per batch and label set, not per request.
            self.count_untenanted(children, [duration], klass)
            return OTHER_TENANT
        with self.count_lock:
            self.count_later(children, duration)
            return self.tenants.observe(tenant, klass)

    def count_untenanted(self, children: Any, durations: list[float], klass: StatusClass) -> None:
        """Count requests of one label set and no tenant (``other``), one duration each;
        applied with the next batch or collect."""
        self.pending.append((children, durations, klass))
        if len(self.pending) >= self.batch:
            self.apply()

    def durations_for(self, key: tuple[str, str, str, int]) -> LiveLabelSet | None:
        """Label set ``key`` (location, route, method, status) for requests counted as they
        end: its children, status class, and the list its requests with no tenant
        (``other``) wait in. The caller appends each duration (an append is atomic, from any
        thread) and then, if the label set is not ``queued``, marks it and adds it to
        ``ready``; an apply takes what waits and empties the list. One per label set,
        whichever middleware serves it; None beyond :data:`MAX_CACHED_LABEL_SETS` of them
        (the caller then counts the request the general way)."""
        found = self.live.get(key)
        if found is None:
            with self.count_lock:
                found = self.live.get(key)
                if found is None:
                    if len(self.live) >= MAX_CACHED_LABEL_SETS:
                        return None
                    location, route, method, status = key
                    children = self.request_children(location, route, method, status)
                    found = self.live[key] = LiveLabelSet(children, status_class(status))
        return found

    def count_later(self, children: Any, duration: float) -> None:
        """Count one served request (``children`` from :meth:`request_children`); applied
        with the next batch or collect."""
        self.pending.append((children, [duration], None))
        if len(self.pending) >= self.batch:
            self.apply()

    def settle(self) -> None:
        """Account for the requests served and not yet counted or decided, in order.

        Each waits in ``settling`` with the function that accounts for it (its middleware's),
        so requests are never lost with the middleware that served them.
        """
        settling = self.settling
        with self._settle_lock:
            if self._settle_running:  # an accounting function of this thread's settle
                return
            self._settle_running = True
            try:
                while settling:
                    # Copied in C, as many as are waiting now (a request appended meanwhile,
                    # from another thread, waits for the next pass), and taken off only once
                    # accounted for: until then a request ending on the loop sees them wait
                    # and queues behind them, so each sampling key is decided in the order
                    # its requests ended, and never from two threads at once.
                    waiting = list(settling)
                    try:
                        self._account_all(waiting)
                    finally:
                        deque(islice(iter(settling.popleft, None), len(waiting)), maxlen=0)
            finally:
                self._settle_running = False

    def _account_all(self, waiting: list[tuple[Callable[..., Any], Any, int, float]]) -> None:
        # A run of requests with the same accounting function goes to it at once when it
        # takes batches (RequestAccounting.account_batch).
        for account, same in groupby(waiting, _ACCOUNT_OF):
            run = list(same)
            try:
                account_batch = getattr(getattr(account, "__self__", None), "account_batch", None)
                if account_batch is not None:
                    account_batch(run)
                else:
                    for _, request, status, end in run:
                        account(request, status, end, None)
            except Exception:  # they guard their own work; counted, never raised
                self.internal_error("metrics")

    def flush(self) -> None:
        """Account for every request served so far, then apply them to the request counter
        and the duration histogram."""
        self.settle()
        self.apply()

    def settle_soon(self) -> None:
        """In a worker process: account for the finished requests and apply them at the
        running event loop's next turn (at once without an asyncio loop), one flush for
        every request that finishes in this turn."""
        if self._settle_scheduled:
            return
        loop = _running_loop()
        if loop is not None:
            self._settle_scheduled = True
            try:
                loop.call_soon(self._scheduled_settle)
                return
            except RuntimeError:  # the loop is closing
                self._settle_scheduled = False
        self.flush()

    def _scheduled_settle(self) -> None:
        self._settle_scheduled = False
        try:
            self.flush()
        except Exception:
            self.internal_error("metrics")

    def apply(self) -> None:
        """Apply every pending request to the request counter and the duration histogram.

        Safe from any thread: each pending request is taken exactly once. Requests with the
        same labels are applied together: one increment per counter and histogram bucket.
        """
        with self.count_lock:
            self._apply()

    def _apply(self) -> None:
        pending = self.pending
        groups: dict[int, tuple[Any, list[float]]] = {}
        untenanted: dict[StatusClass, int] = {}
        while True:
            try:
                children, durations, klass = pending.popleft()
            except IndexError:
                break
            group = groups.get(id(children))
            if group is None:
                group = groups[id(children)] = (children, [])
            group[1].extend(durations)
            if klass is not None:
                untenanted[klass] = untenanted.get(klass, 0) + len(durations)
        ready = self.ready
        for _ in range(len(ready)):
            live = ready.popleft()
            # Unmarked before the durations are taken: an append that found it marked came
            # before, and is taken now; one that comes after finds it unmarked and queues it.
            live.queued = False
            waiting = live.durations
            count = len(waiting)
            if count:
                durations = waiting[:count]
                del waiting[:count]
                children = live.children
                group = groups.get(id(children))
                if group is None:
                    group = groups[id(children)] = (children, [])
                group[1].extend(durations)
                untenanted[live.klass] = untenanted.get(live.klass, 0) + count
            if waiting and not live.queued:  # appended to meanwhile: for the next apply
                live.queued = True
                ready.append(live)
        for klass, count in untenanted.items():
            self.tenants.observe(None, klass, count)
        for children, durations in groups.values():
            count = len(durations)
            children[0].inc(count)
            observe_all(children[1], durations)
            observe_all(children[3], durations)
            if children[4] is not None:
                children[4].inc(count)
            if children[5] is not None:
                children[5].inc(count)

    def _collect_requests(self) -> Iterable[Metric]:
        self.flush()
        return self.http_requests.collect()

    def internal_error(self, component: Component) -> None:
        self.internal_errors.labels(component).inc()

    def dropped(self, reason: DropReason, count: int = 1) -> None:
        self.reports_dropped.labels(reason).inc(count)


def observe_all(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for each value, with one increment per bucket touched.

    Uses the child's bucket values as prometheus-client's own ``observe`` does (they are
    plain or multiprocess values alike); tests check the exposition is the same.
    """
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:  # a prometheus-client without them: the public way
        for value in values:
            histogram.observe(value)
        return
    if len(values) == 1:
        histogram.observe(values[0])
        return
    total.inc(sum(values))
    if len(values) <= len(bounds):
        counts = [0] * len(bounds)
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe does
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
        return
    # Many values (a busy label set between two scrapes): sorted in C, each bucket's count
    # is then one bisection per bound instead of one per value.
    ordered = sorted(values)
    below, last = 0, len(ordered)
    for index, bound in enumerate(bounds):
        upto = bisect_right(ordered, bound)  # the values <= bound, as observe counts them
        if upto > below:
            buckets[index].inc(upto - below)
            below = upto
            if upto == last:
                break


class RequestFamilies(Collector):
    """The request counter and duration histogram, collected after the pending batch, and
    the tenant counts read under the same lock as the request counter (the first family):
    per status class they sum to the requests in the same scrape."""

    def __init__(
        self,
        flush: Callable[[], None],
        families: tuple[Any, ...],
        apply: Callable[[], None],
        lock: Any,
        tenant_counts: Callable[[], dict[str, Counts]],
        tenant_rejections: Callable[[], dict[str, int]],
    ) -> None:
        self._flush = flush
        self._families = families
        self._apply = apply
        self._lock = lock
        self._tenant_counts = tenant_counts
        self._tenant_rejections = tenant_rejections

    def describe(self) -> list[Metric]:
        return [
            *(metric for family in self._families for metric in family.describe()),
            tenant_family({}),
            rejected_family({}),
        ]

    def collect(self) -> Iterator[Metric]:
        # Settled outside the lock (accounting takes the lock inside the settle lock); each
        # request is counted with its tenant under the lock, so what was accounted since is
        # pending, applied here.
        self._flush()
        with self._lock:
            self._apply()
            requests = list(self._families[0].collect())
            tenants = self._tenant_counts()
        yield from requests
        # The rest lazily: a reader that stops early (get_sample_value) collects no more.
        for family in self._families[1:]:
            yield from family.collect()
        yield tenant_family(tenants)
        yield rejected_family(self._tenant_rejections())


def tenant_family(counts: dict[str, Counts]) -> CounterMetricFamily:
    """``sentinel_tenant_requests_total``: every label with all four status classes, so a
    tenant's error ratio has its denominator from its first scrape."""
    family = CounterMetricFamily(
        "sentinel_tenant_requests",
        "HTTP requests by tenant: the tracked tenants (the busiest and the failing ones, "
        "at most max_tenants) by name, everything else as other.",
        labels=("tenant", "status_class"),
    )
    for tenant in sorted(counts, key=lambda name: (name == OTHER_TENANT, name)):
        for status_class_name, value in zip(STATUS_CLASSES, counts[tenant], strict=True):
            family.add_metric([tenant, status_class_name], value)
    return family


def rejected_family(rejected: Mapping[str, int]) -> CounterMetricFamily:
    """``sentinel_tenants_rejected_total{reason}``: tenant values refused, every reason."""
    family = CounterMetricFamily(
        "sentinel_tenants_rejected",
        "Tenant values refused (the request is counted as other), by reason.",
        labels=("reason",),
    )
    for reason in TENANT_PROBLEMS:
        family.add_metric([reason], rejected.get(reason, 0))
    return family


class RequestTotals(Collector):
    """Families derived from the request counter when scraped, at no cost per request.

    - ``sentinel_records_seen_total{location, status_class}``: every HTTP request is
      considered for the detailed log, so it equals the requests by status class.
    - ``sentinel_location_requests_total{location, code}``: the request counter summed over
      route and method, so the generated rules read one series per location and code rather
      than every route and method (what a rule evaluation costs is the series it reads).

    ``source`` yields the request counter's families (its own collect(), or a multiprocess
    collector's merged view).
    """

    def __init__(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [self._seen_family(), self._location_family()]

    def collect(self) -> Iterator[Metric]:
        by_code: dict[tuple[str, str], float] = {}
        for family in self._source():
            if family.name != "sentinel_http_requests":
                continue
            for sample in family.samples:
                if sample.name != "sentinel_http_requests_total":
                    continue
                key = (sample.labels.get("location", ""), sample.labels.get("code", ""))
                by_code[key] = by_code.get(key, 0.0) + sample.value
        by_class: dict[tuple[str, str], float] = {}
        location_family = self._location_family()
        for (location, code), value in sorted(by_code.items()):
            location_family.add_metric([location, code], value)
            klass: StatusClass = status_class(int(code)) if code.isdigit() else "5xx"
            by_class[location, klass] = by_class.get((location, klass), 0.0) + value
        seen_family = self._seen_family()
        for (location, class_label), value in sorted(by_class.items()):
            seen_family.add_metric([location, class_label], value)
        yield seen_family
        yield location_family

    @staticmethod
    def _seen_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "sentinel_records_seen",
            "Request records considered for the detailed log (every HTTP request).",
            labels=("location", "status_class"),
        )

    @staticmethod
    def _location_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "sentinel_location_requests",
            "HTTP requests by location and status code: sentinel_http_requests_total summed "
            "over route and method (what the generated rules read).",
            labels=("location", "code"),
        )


_by_registry: weakref.WeakValueDictionary[int, Metrics] = weakref.WeakValueDictionary()
"""Each registry's Metrics, kept alive by the registry alone (its request families hold
them): a test suite's many registries, and the sentinels their metrics call back, go with
their registries."""
_by_registry_lock = threading.Lock()


def metrics_for(
    registry: CollectorRegistry | None = None,
    buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS,
    max_series: int | None = None,
) -> Metrics:
    """The :class:`Metrics` registered in ``registry`` (default: prometheus_client's global).

    Families are created once per registry; ``buckets`` applies to that first creation,
    ``max_series`` (when given) to every label set admitted from now on.
    """
    registry = REGISTRY if registry is None else registry
    with _by_registry_lock:
        metrics = _by_registry.get(id(registry))
        if metrics is None or metrics.registry is not registry:
            metrics = Metrics(registry, buckets, max_series or DEFAULT_MAX_SERIES)
            _by_registry[id(registry)] = metrics
        elif max_series is not None:
            metrics.set_max_series(max_series)
        return metrics
