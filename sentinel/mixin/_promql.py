"""The PromQL every generator shares: what an error is, and the names and expressions of the
recording rules. Rules, dashboards and the gate build their queries from these functions,
so the same string is never typed twice.

Levels follow the ``level:metric:operations`` convention: ``location:`` sums by the job and
location labels (one location of one service), ``job:`` by the job label (the whole
service), ``location_version:`` by job, location and the app's release, ``tenant:`` by the
job and tenant labels (one tracked tenant of one service, every location together).

Every level also keeps the labels the config's selector matches on (:func:`scoped_labels`),
and every read of a record is narrowed by the selector as a raw read is (:func:`series`):
rule files generated for different selectors (``job="api"``, ``job="web"``) in one
Prometheus each read and write only their own service's series, never each other's.
"""

from __future__ import annotations

import re
from typing import Literal

from ._config import MonitoringConfig, format_duration, parse_duration, parse_selector

Level = Literal["job", "location"]

_VECTOR_SELECTOR_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^{}]*\})?$")

REQUESTS = "sentinel_http_requests_total"
LOCATION_REQUESTS = "sentinel_location_requests_total"
"""The request counter summed over route and method when scraped (one series per process,
location and code): what the rules read wherever they need neither route nor method."""
LOCATION_DURATION = "sentinel_location_request_duration_seconds"
"""The fine per-location latency histogram: what the percentile panels read."""
EXCEPTIONS = "sentinel_unhandled_exceptions_total"
MUTATIONS = "sentinel_global_mutations_total"
RECORDS_SEEN = "sentinel_records_seen_total"
RECORDS_KEPT = "sentinel_records_kept_total"
DROPPED = "sentinel_reports_dropped_total"
INTERNAL_ERRORS = "sentinel_internal_errors_total"
BUILD_INFO = "sentinel_build_info"
LOOP_LAG = "sentinel_event_loop_lag_seconds"

SERVER_ERROR_CODES = 'code=~"5..|invalid"'
"""Responses that count against the SLO: 5xx, and statuses that were not HTTP statuses."""
FAILED_MID_STREAM = 'phase="response"'
"""Responses that started (2xx, usually) but failed while streaming: the client got a broken
response, which the status code alone does not show."""


def scoped_labels(config: MonitoringConfig, *labels: str) -> str:
    """``labels`` followed by the labels the config's selector matches on that are not among
    them, as the list of a ``by (...)`` or ``on (...)``: what every record keeps, so that
    each record can be read narrowed by the selector (with ``job="api"``, just ``labels``)."""
    names = list(labels)
    for label, _, _ in parse_selector(config.selector):
        if label not in names:
            names.append(label)
    return ", ".join(names)


def by_labels(config: MonitoringConfig, level: Level) -> str:
    """The ``by (...)`` labels of a level (and the selector's)."""
    if level == "job":
        return scoped_labels(config, config.job_label)
    return scoped_labels(config, config.job_label, config.location_label)


def series(config: MonitoringConfig, metric: str, *matchers: str) -> str:
    """``metric{selector, matchers}``: a raw series or a record (which keeps the selector's
    labels), narrowed to the config's selector."""
    inside = config.matchers(*matchers)
    return f"{metric}{{{inside}}}" if inside else metric


def record_name(level: str, metric: str, operation: str) -> str:
    """``level:metric:operation``, e.g. ``location:sentinel_http_requests:rate5m``."""
    return f"{level}:{metric}:{operation}"


def requests_record(level: Level, window: str) -> str:
    return record_name(level, "sentinel_http_requests", f"rate{window}")


def errors_record(level: Level, window: str) -> str:
    return record_name(level, "sentinel_http_errors", f"rate{window}")


def error_ratio_record(level: Level, window: str) -> str:
    return record_name(level, "sentinel_http_error_ratio", f"ratio_rate{window}")


def requests_rate_expr(config: MonitoringConfig, level: Level, window: str) -> str:
    """Requests per second over ``window`` (a scaled duration), summed to ``level``."""
    return f"sum by ({by_labels(config, level)}) (rate({series(config, REQUESTS)}[{window}]))"


def errors_rate_expr(config: MonitoringConfig, level: Level, window: str) -> str:
    """Server errors per second over ``window``: 5xx and invalid statuses, plus responses
    that failed mid-stream; 0 (not absent) where requests were served without errors."""
    by = by_labels(config, level)
    failed = (
        f"rate({series(config, REQUESTS, SERVER_ERROR_CODES)}[{window}])"
        f" or rate({series(config, EXCEPTIONS, FAILED_MID_STREAM)}[{window}])"
    )
    return f"sum by ({by}) ({failed}) or 0 * {requests_rate_expr(config, level, window)}"


def error_ratio_expr(config: MonitoringConfig, level: Level, window: str) -> str:
    """The error ratio over ``window`` from the recordings (errors / requests)."""
    errors = series(config, errors_record(level, window))
    return f"{errors} / {series(config, requests_record(level, window))}"


# -- per-process counters: what every rate of the rules is computed from ----------------------
#
# The rules never read the per-route request series: every process also exports them summed
# over route and method, sentinel_location_requests_total{location, code} (summed when
# scraped, at no cost per request), and the rules read that once per evaluation, at one
# instant, into one counter per process, location and status code (a few hundred series,
# however many routes and methods there are); requests, errors and 5xx are sums of those.
# Selecting series is what a rule costs (about 10 us a series on a small machine): the
# per-route series are 400 times as many with 100 routes and 4 methods. The record keeps
# the name it had when it summed sentinel_http_requests_total itself: it is the same sum
# (taken by the process instead of by Prometheus), and a new name would start the day of
# history the status-shift baseline reads from nothing.
# All counters of one process restart together, so each sum is itself a counter and rate()
# over it is exact, over any window, at the cost of the few summed series. Series that appear
# for the first time (a first 5xx) raise the sum by their first value, which a rate over the
# raw series would miss; the error sums are 0 (not absent) where requests were served, so
# the first error is an increase from 0.

INSTANCE_LOCATION = "instance_location"
VERSION = "version"
"""The label of ``sentinel_build_info`` that holds the app's release."""
SERVER_ERRORS_5XX = 'code=~"5.."'
"""Responses with a 5xx status: what the error records are checked against."""


def instance_location_labels(config: MonitoringConfig) -> str:
    """The ``by (...)`` labels of one process in one location: job, instance, location (and
    the selector's)."""
    return scoped_labels(config, config.job_label, config.instance_label, config.location_label)


def version_labels(config: MonitoringConfig) -> str:
    """The ``by (...)`` labels of one release in one location: job, location, version (and
    the selector's)."""
    return scoped_labels(config, config.job_label, config.location_label, VERSION)


def requests_by_code_counter_record() -> str:
    """``instance_location_code:sentinel_http_requests_total:sum``: requests served by one
    process in one location with one status code (every route and method), as one counter
    (the one read of the request counters)."""
    return record_name("instance_location_code", "sentinel_http_requests_total", "sum")


def requests_counter_record() -> str:
    """``instance_location:sentinel_http_requests_total:sum``: requests served by one
    process in one location, as one counter."""
    return record_name(INSTANCE_LOCATION, "sentinel_http_requests_total", "sum")


def errors_counter_record() -> str:
    """``instance_location:sentinel_http_errors_total:sum``: the SLO's errors (5xx, invalid
    statuses, responses failed mid-stream) of one process in one location, as one counter."""
    return record_name(INSTANCE_LOCATION, "sentinel_http_errors_total", "sum")


def responses_5xx_counter_record() -> str:
    """``instance_location:sentinel_http_5xx_responses_total:sum``: 5xx responses only."""
    return record_name(INSTANCE_LOCATION, "sentinel_http_5xx_responses_total", "sum")


def kept_5xx_records_counter_record() -> str:
    """``instance_location:sentinel_records_kept_5xx_total:sum``: kept 5xx log records."""
    return record_name(INSTANCE_LOCATION, "sentinel_records_kept_5xx_total", "sum")


def requests_by_code_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`requests_by_code_counter_record`: the per-location counter
    (:data:`LOCATION_REQUESTS`), read at one instant, its target's other labels dropped."""
    by = f"{instance_location_labels(config)}, code"
    return f"sum by ({by}) ({series(config, LOCATION_REQUESTS)})"


def requests_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`requests_counter_record` (from the per-code counters)."""
    by_code = series(config, requests_by_code_counter_record())
    return f"sum by ({instance_location_labels(config)}) ({by_code})"


def _zero_filled(config: MonitoringConfig, expr: str) -> str:
    """``expr``, or 0 where the process served requests but ``expr`` has no series yet."""
    return f"{expr} or 0 * {series(config, requests_counter_record())}"


def errors_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`errors_counter_record` (reads :func:`requests_counter_record`
    for the 0 of a process that has served no error yet)."""
    failed = (
        f"{series(config, requests_by_code_counter_record(), SERVER_ERROR_CODES)}"
        f" or {series(config, EXCEPTIONS, FAILED_MID_STREAM)}"
    )
    return _zero_filled(config, f"sum by ({instance_location_labels(config)}) ({failed})")


def responses_5xx_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`responses_5xx_counter_record` (from the per-code counters)."""
    selected = series(config, requests_by_code_counter_record(), SERVER_ERRORS_5XX)
    return _zero_filled(config, f"sum by ({instance_location_labels(config)}) ({selected})")


def kept_5xx_records_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`kept_5xx_records_counter_record`."""
    selected = series(config, RECORDS_KEPT, 'status_class="5xx"')
    return _zero_filled(config, f"sum by ({instance_location_labels(config)}) ({selected})")


def responses_5xx_record(window: str) -> str:
    """``location:sentinel_http_5xx_responses:increase<window>``: 5xx responses served."""
    return record_name("location", "sentinel_http_5xx_responses", f"increase{window}")


def kept_5xx_records_record(window: str) -> str:
    """``location:sentinel_records_kept_5xx:increase<window>``: 5xx log records kept."""
    return record_name("location", "sentinel_records_kept_5xx", f"increase{window}")


def rate_from_counter_expr(
    config: MonitoringConfig, counter: str, window: str, operation: str = "rate"
) -> str:
    """``sum by (job, location) (rate(counter[window]))`` over a per-process counter record
    (``operation="increase"`` for counts)."""
    read = f"{operation}({series(config, counter)}[{window}])"
    return f"sum by ({by_labels(config, 'location')}) ({read})"


def job_total_expr(config: MonitoringConfig, location_record: str) -> str:
    """A location-level record summed to the whole service (``sum by (job)``)."""
    return f"sum by ({by_labels(config, 'job')}) ({series(config, location_record)})"


def recorded_windows(config: MonitoringConfig) -> tuple[str, ...]:
    """Every (scaled) window the rules record requests, errors and error ratios for at the
    ``location`` and ``job`` levels, shortest first: the burn-rate windows, the outlier
    window, the rate interval, the traffic-drop windows and the status-shift baseline (with
    the defaults, all of them burn-rate windows already)."""
    durations = {
        config.window(config.rate_interval),
        config.window(config.outlier_window),
        config.window(config.traffic_drop_window),
        config.window(config.traffic_drop_baseline_window),
        config.window(config.status_shift_baseline_window),
    }
    for burn in config.burn_windows:
        durations.update((config.window(burn.long), config.window(burn.short)))
    by_seconds = {parse_duration(duration): duration for duration in durations}
    return tuple(by_seconds[seconds] for seconds in sorted(by_seconds))


NEW_SERIES_LOOKBACK = "1h"
"""How long before a window :func:`recent_increase_expr` looks for a counter series that has
no sample at the window's start: far longer than a scrape outage the counts should ride
out, and cheap beside the day of the same 4xx records the status-shift baseline reads. Not
scaled by ``time_scale``: outages are not."""

PROCESS_START = "process_start_time_seconds"
"""When a process started (Unix seconds), as prometheus_client's default registry exports it
(its process collector; sentinel's multiprocess sidecar does not): what tells a process
Prometheus first scraped within a window (a Prometheus started on empty storage, a target
discovered late) from one that started within it."""


def recent_increase_expr(selector: str, window: str, config: MonitoringConfig | None = None) -> str:
    """How much the counter series ``selector`` rose over ``window``, counting a series that
    counts from 0 within the window from 0: increase() alone misses what came before a
    series' first sample in the window (a series that appears at 1 rises by 0).

    Such a series has no sample at the window's start and either none in the
    :data:`NEW_SERIES_LOOKBACK` before it (new: a new process, the first 401 of a code) or
    a higher one (a process restarted while it was not scraped). It counts by its value, or,
    when it reset within the window (a process that restarts again, a crash loop), by
    increase() where that is more: increase() adds what it counted before each reset (all
    but what came before its first sample, which it extrapolates). A series that only
    missed a scrape at the window's start (a staleness marker, which hides it from
    ``offset``) rose from its last value: increase() counts it, never its whole lifetime.

    With ``config``, a series of a process that Prometheus first scraped within the window
    (none of its ``sentinel_build_info`` samples in the lookback before the window's start)
    but that started before it (:data:`PROCESS_START`) counts by increase() too: its value
    holds what it served before the window (a Prometheus started on empty storage, a target
    discovered late). A process that does not export its start time is taken for one that
    started within the window."""
    increase = f"increase({selector}[{window}])"
    before = f"last_over_time({selector}[{NEW_SERIES_LOOKBACK}] offset {window})"
    counted = f"{selector} offset {window} or {before} <= {selector}"
    new = f"({selector} unless ({counted}))"
    if config is not None:
        process = f"{config.job_label}, {config.instance_label}"
        new = f"({new} unless on ({process}) ({scraped_late_expr(config, window)}))"
    # A new series: its value, exact unless it reset within the window, and then the larger
    # of it and increase() (whose extrapolation can exceed the value of a young series that
    # never reset); increase() for every other series.
    reset = f"({new} and resets({selector}[{window}]) > 0)"
    return f"({increase} > {reset}) or {new} or {increase}"


def scraped_before_expr(config: MonitoringConfig, window: str) -> str:
    """The processes (job, instance) in scope with a ``sentinel_build_info`` sample in the
    :data:`NEW_SERIES_LOOKBACK` before the ``window`` that ends now: those whose series
    :func:`recent_increase_expr` may take for new (Prometheus was scraping them). Counted
    over two ranges that end now, not with ``offset``, so that an expression of it answers
    from the first samples of a new Prometheus."""
    info = series(config, BUILD_INFO)
    longer = format_duration(parse_duration(window) + parse_duration(NEW_SERIES_LOOKBACK))
    process = f"{config.job_label}, {config.instance_label}"
    scraped = f"count_over_time({info}[{longer}]) > count_over_time({info}[{window}])"
    return f"max by ({process}) ({scraped})"


def scraped_late_expr(config: MonitoringConfig, window: str) -> str:
    """The processes (job, instance) in scope that started before the ``window`` that ends
    now but that Prometheus did not scrape in the lookback before it: their counters hold
    what they served before the window."""
    process = f"{config.job_label}, {config.instance_label}"
    started = f"max by ({process}) ({series(config, PROCESS_START)})"
    window_start = f"time() - {number(parse_duration(window))}"
    return f"{started} < {window_start} unless on ({process}) {scraped_before_expr(config, window)}"


# -- status codes: one 4xx code's share of a location's responses (SentinelStatusShift) -------
#
# The share over the short window counts every response of the window, a code's first ones
# included (a deploy that answers 401 when the app never did before), from the per-process
# counters; the baseline is the code's share over the long window before it, and 0 (not
# absent) for a code the location did not answer there, as long as the location itself has
# a baseline.

CLIENT_ERROR_CODES = 'code=~"4.."'
"""The responses whose share per code SentinelStatusShift and a release's 4xx shift judge."""


def client_errors_by_code_record(window: str) -> str:
    """``location_code:sentinel_http_4xx_responses:increase<window>``: responses with each 4xx
    code per (job, location, code), the first ones of a new code included."""
    return record_name("location_code", "sentinel_http_4xx_responses", f"increase{window}")


def requests_increase_record(window: str) -> str:
    """``location:sentinel_http_requests:increase<window>``: requests per (job, location),
    counted as the 4xx responses are (a new process's first ones included)."""
    return record_name("location", "sentinel_http_requests", f"increase{window}")


def code_share_record(window: str) -> str:
    """``location_code:sentinel_http_4xx_share:ratio_increase<window>``: one 4xx code's share
    of a location's responses over ``window``."""
    return record_name("location_code", "sentinel_http_4xx_share", f"ratio_increase{window}")


def code_share_baseline_record(config: MonitoringConfig) -> str:
    """``location_code:sentinel_http_4xx_share:ratio_rate1d_offset5m`` (default windows): the
    code's share over the status-shift baseline window before the current window."""
    window = config.window(config.status_shift_window)
    baseline = config.window(config.status_shift_baseline_window)
    return record_name(
        "location_code", "sentinel_http_4xx_share", f"ratio_rate{baseline}_offset{window}"
    )


def client_errors_by_code_expr(config: MonitoringConfig, window: str) -> str:
    """The expression of :func:`client_errors_by_code_record`."""
    counter = series(config, requests_by_code_counter_record(), CLIENT_ERROR_CODES)
    by = f"{by_labels(config, 'location')}, code"
    return f"sum by ({by}) (\n  {recent_increase_expr(counter, window, config)}\n)"


def requests_increase_expr(config: MonitoringConfig, window: str) -> str:
    """The expression of :func:`requests_increase_record`."""
    increase = recent_increase_expr(series(config, requests_counter_record()), window, config)
    return f"sum by ({by_labels(config, 'location')}) (\n  {increase}\n)"


def code_share_expr(config: MonitoringConfig, window: str) -> str:
    """The expression of :func:`code_share_record`."""
    by = by_labels(config, "location")
    return (
        f"{series(config, client_errors_by_code_record(window))}\n"
        f"/ on ({by}) group_left\n{series(config, requests_increase_record(window))}"
    )


def code_share_baseline_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`code_share_baseline_record`: 4xx responses per code over the
    baseline window ending where the current window starts, over the location's requests
    then (recorded at that window); a code seen now but not then has 0, in a location that
    served requests then (a new location has no baseline at all)."""
    window = config.window(config.status_shift_window)
    baseline = config.window(config.status_shift_baseline_window)
    by = by_labels(config, "location")
    counter = series(config, requests_by_code_counter_record(), CLIENT_ERROR_CODES)
    requests = f"{series(config, requests_record('location', baseline))} offset {window}"
    return (
        f"sum by ({by}, code) (rate({counter}[{baseline}] offset {window}))\n"
        f"/ on ({by}) group_left\n{requests}\n"
        f"or (0 * {series(config, code_share_record(window))} and on ({by}) {requests})"
    )


def shifted_share(factor: float, baseline: float) -> float:
    """What :func:`shifted_share_expr` computes, for one baseline share."""
    return factor * baseline / (1 + (factor - 1) * baseline)


def shifted_share_expr(config: MonitoringConfig) -> str:
    """The share a 4xx code must exceed to have shifted from its baseline share ``b``:
    ``k * b / (1 + (k - 1) * b)`` for ``status_shift_factor`` ``k``, where the code's odds
    (share / rest) are ``k`` times its baseline's odds. Close to ``k * b`` for a rare code
    (2% -> 9.3% at 5x), and still below 100% for a common one (30% -> 68%), which a plain
    ``k * b`` never is once ``b`` reaches ``1 / k``; a code that was all responses cannot
    shift."""
    baseline = series(config, code_share_baseline_record(config))
    return shifted_expr(config.status_shift_factor, baseline)


def shifted_expr(factor: float, baseline: str) -> str:
    """PromQL of :func:`shifted_share` over ``baseline``, an expression of shares: the share
    whose odds are ``factor`` times those of the baseline's."""
    baseline = _operand(baseline)
    return f"{number(factor)} * {baseline} / (1 + {number(factor - 1)} * {baseline})"


# -- traffic: a location's request rate against its own recent baseline (SentinelTrafficDrop)


def requests_baseline_record(config: MonitoringConfig) -> str:
    """``location:sentinel_http_requests:max_over_time1h_rate1h_offset5m`` (default windows):
    the location's baseline request rate, the highest rate over the baseline window among
    those ending in the baseline window before the current window."""
    window = config.window(config.traffic_drop_window)
    baseline = config.window(config.traffic_drop_baseline_window)
    return record_name(
        "location",
        "sentinel_http_requests",
        f"max_over_time{baseline}_rate{baseline}_offset{window}",
    )


def requests_baseline_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`requests_baseline_record`."""
    window = config.window(config.traffic_drop_window)
    baseline = config.window(config.traffic_drop_baseline_window)
    requests = series(config, requests_record("location", baseline))
    return f"max_over_time({requests}[{baseline}] offset {window})"


# -- release (version) level: the regression alert and `sentinel gate` share these ----------


def version_requests_record(window: str) -> str:
    """``location_version:sentinel_http_requests:rate<window>``."""
    return record_name("location_version", "sentinel_http_requests", f"rate{window}")


def version_errors_record(window: str) -> str:
    """``location_version:sentinel_http_errors:rate<window>``."""
    return record_name("location_version", "sentinel_http_errors", f"rate{window}")


def version_error_ratio_record(window: str) -> str:
    """``location_version:sentinel_http_error_ratio:ratio_rate<window>``."""
    return record_name("location_version", "sentinel_http_error_ratio", f"ratio_rate{window}")


def version_join_expr(config: MonitoringConfig, per_instance: str) -> str:
    """``per_instance`` (labelled by job and instance) with the app's release of each process
    added as ``version``, joined from ``sentinel_build_info`` (the request metrics carry no
    version).

    A process counts for one release. One that reports two at once (the merged view of a
    sidecar whose workers run two releases during a rollout) counts for the newer: the one
    it has reported for the shorter time within :data:`NEW_SERIES_LOOKBACK` (for either, the
    same each evaluation, when both were reported all along). Its requests carry no release,
    so they cannot be split; counted for the newer, the new release's errors are not
    credited to the old one, whose ratio the regression alert compares with."""
    process = scoped_labels(config, config.job_label, config.instance_label)
    info = series(config, BUILD_INFO)
    samples = f"count_over_time({info}[{NEW_SERIES_LOOKBACK}]) and {info}"
    reported = f"max by ({process}, {VERSION}) ({samples})"
    newest = f"group by ({process}, {VERSION}) (bottomk by ({process}) (1, {reported}))"
    return f"{per_instance} * on ({process}) group_left ({VERSION}) {newest}"


def version_rate_from_counter_expr(config: MonitoringConfig, counter: str, window: str) -> str:
    """The rate of a per-process counter record per (job, location, version)."""
    joined = version_join_expr(config, f"rate({series(config, counter)}[{window}])")
    return f"sum by ({version_labels(config)}) ({joined})"


def version_requests_rate_expr(config: MonitoringConfig, window: str) -> str:
    """Requests per second per (job, location, version) over ``window``, from the raw series
    (needs no recording rules: what ``sentinel gate`` asks Prometheus)."""
    per_instance = (
        f"sum by ({instance_location_labels(config)}) (rate({series(config, REQUESTS)}[{window}]))"
    )
    return f"sum by ({version_labels(config)}) ({version_join_expr(config, per_instance)})"


def version_errors_rate_expr(config: MonitoringConfig, window: str) -> str:
    """The SLO's errors per second per (job, location, version) over ``window``, from the
    raw series; 0 where a release served requests without errors."""
    by = instance_location_labels(config)
    failed = (
        f"rate({series(config, REQUESTS, SERVER_ERROR_CODES)}[{window}])"
        f" or rate({series(config, EXCEPTIONS, FAILED_MID_STREAM)}[{window}])"
    )
    per_instance = (
        f"(sum by ({by}) ({failed})"
        f" or 0 * sum by ({by}) (rate({series(config, REQUESTS)}[{window}])))"
    )
    return f"sum by ({version_labels(config)}) ({version_join_expr(config, per_instance)})"


def version_error_ratio_expr(config: MonitoringConfig, window: str) -> str:
    """The error ratio per (job, location, version) over ``window``, from the raw series."""
    errors = version_errors_rate_expr(config, window)
    requests = version_requests_rate_expr(config, window)
    return f"({errors}) / ({requests})"


def regression_expr(config: MonitoringConfig, errors: str, requests: str, window: str) -> str:
    """The release-regression condition, from ``errors`` and ``requests``: two expressions of
    rates per (job, location, version) over ``window`` (the records, or the raw
    :func:`version_errors_rate_expr` and :func:`version_requests_rate_expr`).

    A version is selected, with its error ratio as the value, when in its location its
    ratio is above ``regression_min_ratio``, its odds of failing (errors / successes) are
    more than ``regression_factor`` times those of every other version there together (for
    ratios of a few percent, the same as the ratio being that many times theirs; unlike a
    plain multiple, a version failing everything is a regression of one failing a quarter),
    it served at least ``regression_min_requests`` requests and ``regression_min_errors``
    errors in the window, and the other versions served enough requests to tell: at odds
    1/``regression_factor`` of its own they would have failed ``regression_min_errors``
    times (a handful of requests without errors on the version being replaced is no
    baseline)."""
    by = by_labels(config, "location")
    errors, requests = _operand(errors), _operand(requests)
    ratio = f"{errors} / {requests}"
    rest_errors = f"sum by ({by}) ({errors}) - on ({by}) {_group_right(errors)}"
    rest_requests = f"sum by ({by}) ({requests}) - on ({by}) {_group_right(requests)}"
    seconds = number(parse_duration(window))
    rest_ratio = f"\n  ({rest_errors})\n  / ({rest_requests})\n"
    return (
        f"{ratio} > {number(config.regression_min_ratio)}\n"
        f"and {ratio} > {shifted_expr(config.regression_factor, rest_ratio)}\n"
        f"and {requests} * {seconds} >= {config.regression_min_requests}\n"
        f"and {errors} * {seconds} >= {config.regression_min_errors}\n"
        f"and ({rest_requests}) * {seconds} * {_unshifted(config, ratio)} "
        f">= {config.regression_min_errors}"
    )


def _unshifted(config: MonitoringConfig, share: str) -> str:
    """The share whose odds are 1/``regression_factor`` of ``share``'s: the other versions'
    requests times it must reach ``regression_min_errors``, so that at that ratio they would
    have shown that many errors."""
    factor = config.regression_factor
    return f"{share} / ({number(factor)} - {number(factor - 1)} * {share})"


def version_client_errors_by_code_record(window: str) -> str:
    """``location_version_code:sentinel_http_4xx_responses:increase<window>``."""
    return record_name("location_version_code", "sentinel_http_4xx_responses", f"increase{window}")


def version_requests_increase_record(window: str) -> str:
    """``location_version:sentinel_http_requests:increase<window>``."""
    return record_name("location_version", "sentinel_http_requests", f"increase{window}")


def version_code_share_record(window: str) -> str:
    """``location_version_code:sentinel_http_4xx_share:ratio_increase<window>``."""
    return record_name(
        "location_version_code", "sentinel_http_4xx_share", f"ratio_increase{window}"
    )


def version_client_errors_by_code_expr(config: MonitoringConfig, window: str) -> str:
    """4xx responses per (job, location, version, code) over ``window``, from the
    per-process counters (a new code's or a new process's first ones included)."""
    counter = series(config, requests_by_code_counter_record(), CLIENT_ERROR_CODES)
    joined = version_join_expr(config, f"({recent_increase_expr(counter, window, config)})")
    return f"sum by ({version_labels(config)}, code) (\n  {joined}\n)"


def version_requests_increase_expr(config: MonitoringConfig, window: str) -> str:
    """Requests per (job, location, version) over ``window``, counted as the 4xx responses
    are."""
    increase = recent_increase_expr(series(config, requests_counter_record()), window, config)
    joined = version_join_expr(config, f"({increase})")
    return f"sum by ({version_labels(config)}) (\n  {joined}\n)"


def version_code_share_expr(config: MonitoringConfig, window: str) -> str:
    """The expression of :func:`version_code_share_record`."""
    return (
        f"{series(config, version_client_errors_by_code_record(window))}\n"
        f"/ on ({version_labels(config)}) group_left\n"
        f"{series(config, version_requests_increase_record(window))}"
    )


def status_regression_expr(
    config: MonitoringConfig, responses: str, requests: str, share: str | None = None
) -> str:
    """The release-regression condition of a 4xx shift, from ``responses``, counts per (job,
    location, version, code), and ``requests``, counts per (job, location, version), over
    one window (the records, or other expressions of the same counts).

    A version and code are selected, with the code's share of the version's responses as
    the value, when in its location that share is above ``status_shift_min_ratio``, its odds
    (the code's responses against the rest) are more than ``regression_factor`` times the
    code's odds among every other version's responses there together (0 when they never
    answered it; so a code at 30% there shifts at 68%, where a plain 5x never could), the
    version served at least ``regression_min_requests`` requests and
    ``regression_min_errors`` responses with that code in the window, and the other versions
    served enough requests to tell (see :func:`regression_expr`). ``share``: a record of
    responses / requests, if there is one."""
    by = by_labels(config, "location")
    version = version_labels(config)
    responses, requests = _operand(responses), _operand(requests)
    share = share or f"{responses} / on ({version}) {_group_left(requests)}"
    rest_responses = (
        f"sum by ({by}, code) ({responses}) - on ({by}, code) {_group_right(responses)}"
    )
    rest_requests = f"sum by ({by}) ({requests}) - on ({by}) {_group_right(requests)}"
    rest_share = f"\n  ({rest_responses})\n  / on ({version}) group_left () ({rest_requests})\n"
    return (
        f"{share} > {number(config.status_shift_min_ratio)}\n"
        f"and {share} > {shifted_expr(config.regression_factor, rest_share)}\n"
        f"and on ({version}) {requests} >= {config.regression_min_requests}\n"
        f"and {responses} >= {config.regression_min_errors}\n"
        f"and {_unshifted(config, share)} * on ({version}) group_left () ({rest_requests}) "
        f">= {config.regression_min_errors}"
    )


def _operand(expr: str) -> str:
    """``expr`` as the operand of a binary operator: a name (with its matchers) as it is,
    anything else in ()."""
    return expr if _VECTOR_SELECTOR_RE.match(expr) else f"({expr})"


def _group_right(operand: str) -> str:
    # A "(" right after group_right opens its label list: an empty one first, then "(...)".
    return f"group_right () {operand}" if operand.startswith("(") else f"group_right {operand}"


def _group_left(operand: str) -> str:
    return f"group_left () {operand}" if operand.startswith("(") else f"group_left {operand}"


def number(value: float) -> str:
    """A number as PromQL text, without float noise (``0.0144``, not ``0.014400000000000001``)."""
    return f"{value:.12g}"


def rest_of_fleet_error_ratio_expr(config: MonitoringConfig, window: str) -> str:
    """Per location, the error ratio of every other location of the same job together (the
    service's sum minus the location itself), from the records over ``window``."""
    job = by_labels(config, "job")
    errors = (
        f"{series(config, errors_record('job', window))} - on ({job}) group_right "
        f"{series(config, errors_record('location', window))}"
    )
    requests = (
        f"{series(config, requests_record('job', window))} - on ({job}) group_right "
        f"{series(config, requests_record('location', window))}"
    )
    return f"({errors})\n  / ({requests})"


# -- first occurrences: new exception types, global-state mutations ---------------------------


def exceptions_by_type_record() -> str:
    """``location_route_type:sentinel_unhandled_exceptions_total:sum``: unhandled exceptions
    per (job, location, route, exception_type), all processes and phases together."""
    return record_name("location_route_type", "sentinel_unhandled_exceptions_total", "sum")


def exceptions_by_type_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`exceptions_by_type_record`."""
    by = f"{by_labels(config, 'location')}, route, exception_type"
    return f"sum by ({by}) ({series(config, EXCEPTIONS)})"


def exceptions_seen_record(config: MonitoringConfig, hold: str) -> str:
    """The exception types already seen before the last ``hold``, e.g.
    ``location_route_type:sentinel_unhandled_exceptions_total:present_over_time7d_offset10m``."""
    lookback = config.window(config.new_exception_lookback)
    return record_name(
        "location_route_type",
        "sentinel_unhandled_exceptions_total",
        f"present_over_time{lookback}_offset{hold}",
    )


def exceptions_seen_expr(config: MonitoringConfig, hold: str) -> str:
    """The expression of :func:`exceptions_seen_record`: the types in the records of the
    lookback (``new_exception_lookback``) before the last ``hold``, or in the raw series
    ``hold`` ago (so that types older than the records, when the rules are new, are not
    new)."""
    record = series(config, exceptions_by_type_record())
    lookback = config.window(config.new_exception_lookback)
    by = f"{by_labels(config, 'location')}, route, exception_type"
    return (
        f"present_over_time({record}[{lookback}] offset {hold})"
        f" or count by ({by}) ({series(config, EXCEPTIONS)} offset {hold})"
    )


def new_exception_types_expr(config: MonitoringConfig, hold: str) -> str:
    """The exception types (per job, location, route) seen now but not before the last
    ``hold``; the value is how many occurred. Selected for ``hold`` after the first
    occurrence, also when its series appears at 1 (where increase() sees nothing)."""
    on = f"{by_labels(config, 'location')}, route, exception_type"
    seen = series(config, exceptions_seen_record(config, hold))
    return f"{series(config, exceptions_by_type_record())}\nunless on ({on}) {seen}"


def mutations_record(window: str) -> str:
    """``location_route_target:sentinel_global_mutations:increase<window>``."""
    return record_name("location_route_target", "sentinel_global_mutations", f"increase{window}")


def mutations_expr(config: MonitoringConfig, window: str) -> str:
    """Global-state mutations per (job, location, route, target) over ``window``, the first
    one of a series included."""
    by = f"{by_labels(config, 'location')}, route, target"
    return f"sum by ({by}) ({recent_increase_expr(series(config, MUTATIONS), window, config)})"


# -- tenants: per tracked tenant (SentinelTenantErrorBudgetBurn) -------------------------------
#
# sentinel_tenant_requests_total{tenant, status_class} names a bounded set of tracked tenants
# and counts everything else as `other` (sentinel/_tenants.py). A tenant's series appear
# when it is promoted (all four status classes together, counting from 0), and end when it is
# evicted (its counts move to `other`); promoted again, they count from 0. So per process and
# tenant the classes summed are one counter that restarts as a whole, and rate() over the sum
# reads promotions, evictions and re-promotions like process restarts. `other` is never
# summed with the named tenants: it steps up by an evicted tenant's whole count, so the
# traffic outside the named tenants is the service total minus the named tenants, which the
# dashboard computes from the request counters. The tenant metric has no location label:
# the tenant level is (job, tenant), every location together.

TENANT_REQUESTS = "sentinel_tenant_requests_total"
OTHER_TENANT = "other"
"""The tenant label value of every request not counted under a tracked tenant's name (the
same as sentinel._tenants.OTHER_TENANT)."""


def tenant_by_labels(config: MonitoringConfig) -> str:
    """The ``by (...)`` labels of one tenant of one service: job, tenant (and the
    selector's)."""
    return scoped_labels(config, config.job_label, config.tenant_label)


def instance_tenant_labels(config: MonitoringConfig) -> str:
    """The ``by (...)`` labels of one tenant in one process: job, instance, tenant (and the
    selector's)."""
    return scoped_labels(config, config.job_label, config.instance_label, config.tenant_label)


def named_tenants(config: MonitoringConfig) -> str:
    """The matcher that leaves ``other`` out: ``tenant!="other"``."""
    return f'{config.tenant_label}!="{OTHER_TENANT}"'


def tenant_requests_counter_record() -> str:
    """``instance_tenant:sentinel_tenant_requests_total:sum``: requests of one tracked tenant
    served by one process, as one counter (the read of the raw series)."""
    return record_name("instance_tenant", "sentinel_tenant_requests_total", "sum")


def tenant_errors_counter_record() -> str:
    """``instance_tenant:sentinel_tenant_errors_total:sum``: 5xx responses of one tracked
    tenant served by one process, as one counter."""
    return record_name("instance_tenant", "sentinel_tenant_errors_total", "sum")


def tenant_requests_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`tenant_requests_counter_record`."""
    selected = series(config, TENANT_REQUESTS, named_tenants(config))
    return f"sum by ({instance_tenant_labels(config)}) ({selected})"


def tenant_errors_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`tenant_errors_counter_record`; 0 (not absent) for a tenant
    whose 5xx series is missing while its others are there."""
    selected = series(config, TENANT_REQUESTS, named_tenants(config), 'status_class="5xx"')
    return (
        f"sum by ({instance_tenant_labels(config)}) ({selected})"
        f" or 0 * {series(config, tenant_requests_counter_record())}"
    )


def tenant_requests_record(window: str) -> str:
    """``tenant:sentinel_tenant_requests:rate<window>``: a tracked tenant's requests per
    second, every process and location together."""
    return record_name("tenant", "sentinel_tenant_requests", f"rate{window}")


def tenant_errors_record(window: str) -> str:
    """``tenant:sentinel_tenant_errors:rate<window>``: a tracked tenant's 5xx per second."""
    return record_name("tenant", "sentinel_tenant_errors", f"rate{window}")


def tenant_error_ratio_record(window: str) -> str:
    """``tenant:sentinel_tenant_error_ratio:ratio_rate<window>``: 5xx / requests."""
    return record_name("tenant", "sentinel_tenant_error_ratio", f"ratio_rate{window}")


def tenant_rate_expr(config: MonitoringConfig, counter: str, window: str) -> str:
    """``sum by (job, tenant) (rate(counter[window]))`` over a per-process tenant counter."""
    return f"sum by ({tenant_by_labels(config)}) (rate({series(config, counter)}[{window}]))"


def tenant_error_ratio_expr(config: MonitoringConfig, window: str) -> str:
    """The tenant's error ratio over ``window`` from the recordings; absent (not NaN) for a
    tenant that served no request in the window."""
    errors = series(config, tenant_errors_record(window))
    return f"{errors} / ({series(config, tenant_requests_record(window))} > 0)"


AVERAGED_FROM = 12
"""A tenant window more than this many times the base window (the shortest burn window) is
recorded as the average of the base window's rates over it, not as rate() over the
per-process counters: those are one series per process and tenant (a fleet of 64 processes
with 50 tenants each holds 3,200), and a rate over six hours of them reads 1.2 million
samples each evaluation, 64 times what the average of the per-tenant base rates reads.
The average lags by half the base window (2.5 minutes with the defaults), at most 1/24 of
the window it stands for; the windows where minutes matter (the fastest page's, 1h and 5m)
stay exact."""

COARSE_FROM = 24
"""A tenant window at least this many times the coarse step (the fastest page's long
window, 1h with the defaults) and a whole number of steps (the tickets' 1d and 3d) is
recorded as the sum of the step's rates sampled once a step (see
:func:`tenant_sampled_record`), over the steps it holds: 72 samples a tenant for 3 days
instead of 4,320 of the 5-minute rate. The hours tile the window exactly, but it ends at
the last whole step: it lags by up to one step (at most 1/24 of the window) and moves once
a step. A ticket of those windows fires when its short window (2h, 6h, evaluated every
minute) confirms, so the lag delays a ticket by at most an hour on a time to fire of 12
hours or more (a ratio high enough to fire sooner pages first), and a tenant's pages stay
exact. An hour whose sampling evaluation did not run (Prometheus down in that minute)
counts as 0 in the requests and the 5xx alike: the ratio is that of the other hours."""


def tenant_base_window(config: MonitoringConfig) -> str:
    """The shortest (scaled) burn window: the tenant rate the longer windows average."""
    windows = [config.window(burn.short) for burn in config.burn_windows]
    return min(windows, key=parse_duration)


def tenant_step_window(config: MonitoringConfig) -> str:
    """The coarse step: the shortest (scaled) long window of a page (of any burn window if
    none pages), whose exact rate the longest windows sum once a step."""
    pages = [burn for burn in config.burn_windows if burn.severity == "page"]
    windows = [config.window(burn.long) for burn in pages or config.burn_windows]
    return min(windows, key=parse_duration)


def tenant_window_is_sampled(config: MonitoringConfig, window: str) -> bool:
    """Whether the tenant rates over ``window`` sum the once-a-step samples of the step's
    rate (see :data:`COARSE_FROM`)."""
    seconds, step = parse_duration(window), parse_duration(tenant_step_window(config))
    steps = seconds / step
    return steps >= COARSE_FROM and abs(steps - round(steps)) < 1e-9


def tenant_window_is_averaged(config: MonitoringConfig, window: str) -> bool:
    """Whether the tenant rates over ``window`` average the base window's (see
    :data:`AVERAGED_FROM`)."""
    if tenant_window_is_sampled(config, window):
        return False
    return parse_duration(window) > AVERAGED_FROM * parse_duration(tenant_base_window(config))


def tenant_averaged_rate_expr(config: MonitoringConfig, base_record: str, window: str) -> str:
    """The rate over ``window`` as the average of ``base_record`` (a tenant rate over the base
    window, recorded every evaluation) over it, a missing sample (the tenant not tracked
    then) counting as 0: the sum over the window divided by the evaluations it holds."""
    evaluations = parse_duration(window) / parse_duration(config.window(config.evaluation_interval))
    return f"sum_over_time({series(config, base_record)}[{window}]) / {number(evaluations)}"


def tenant_sampled_record(rate_record: str, step: str) -> str:
    """``tenant:sentinel_tenant_requests:rate1h_every1h`` (from ``...:rate1h``, default
    windows): the step's rate, recorded at one evaluation a step only."""
    return f"{rate_record}_every{step}"


def tenant_sampled_expr(config: MonitoringConfig, rate_record: str, step: str) -> str:
    """The expression of :func:`tenant_sampled_record`: ``rate_record`` at the one evaluation
    in each step (of evaluations every interval) that falls in the step's first interval, so
    consecutive samples are exactly one step apart and their rates tile time; at the other
    evaluations the record has no sample (a staleness marker, which no range reads)."""
    seconds = number(parse_duration(step))
    interval = number(parse_duration(config.window(config.evaluation_interval)))
    return f"{series(config, rate_record)} and on () vector(time() % {seconds}) < {interval}"


def tenant_sampled_rate_expr(config: MonitoringConfig, sampled_record: str, window: str) -> str:
    """The rate over ``window`` as the sum of the once-a-step samples of the step's rate over
    it, divided by the steps it holds, a missing sample (the tenant not tracked then)
    counting as 0. Prometheus 2 ranges include both ends, so at the evaluation that takes a
    sample the window holds one step more (the oldest): both the requests and the 5xx gain
    it, and the ratio is that of one step more."""
    steps = parse_duration(window) / parse_duration(tenant_step_window(config))
    return f"sum_over_time({series(config, sampled_record)}[{window}]) / {number(steps)}"


def tenant_recorded_windows(config: MonitoringConfig) -> tuple[str, ...]:
    """Every (scaled) window the tenant rates are recorded for, shortest first: the
    burn-rate windows and the dashboards' rate interval."""
    durations = {config.window(config.rate_interval)}
    for burn in config.burn_windows:
        durations.update((config.window(burn.long), config.window(burn.short)))
    by_seconds = {parse_duration(duration): duration for duration in durations}
    return tuple(by_seconds[seconds] for seconds in sorted(by_seconds))
