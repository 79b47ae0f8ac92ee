"""The PromQL every generator shares: what an error is, and the names and expressions of the
recording rules. Rules, dashboards and the gate build their queries from these functions,
so the same string is never typed twice.

Levels follow the ``level:metric:operations`` convention: ``location:`` sums by the job and
location labels (one location of one service), ``job:`` by the job label (the whole
service), ``location_version:`` by job, location and the app's release.
"""

from __future__ import annotations

import re
from typing import Literal

from ._config import MonitoringConfig, parse_duration

Level = Literal["job", "location"]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

REQUESTS = "sentinel_http_requests_total"
DURATION = "sentinel_http_request_duration_seconds"
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


def by_labels(config: MonitoringConfig, level: Level) -> str:
    """The ``by (...)`` labels of a level."""
    if level == "job":
        return config.job_label
    return f"{config.job_label}, {config.location_label}"


def series(config: MonitoringConfig, metric: str, *matchers: str) -> str:
    """``metric{selector, matchers}``."""
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


def error_ratio_expr(level: Level, window: str) -> str:
    """The error ratio over ``window`` from the recordings (errors / requests)."""
    return f"{errors_record(level, window)} / {requests_record(level, window)}"


# -- per-process counters: what every rate of the rules is computed from ----------------------
#
# The rules read the raw request series once per evaluation, at one instant: summed per
# process, location and status code into one counter each (a few hundred series, however
# many routes and methods there are); requests, errors and 5xx are sums of those. Selecting
# the raw series is what costs (about 10 us a series on a small machine), so it happens once.
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
    """The ``by (...)`` labels of one process in one location: job, instance, location."""
    return f"{config.job_label}, {config.instance_label}, {config.location_label}"


def version_labels(config: MonitoringConfig) -> str:
    """The ``by (...)`` labels of one release in one location: job, location, version."""
    return f"{config.job_label}, {config.location_label}, {VERSION}"


def requests_by_code_counter_record() -> str:
    """``instance_location_code:sentinel_http_requests_total:sum``: requests served by one
    process in one location with one status code, as one counter (the one raw read)."""
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
    """The expression of :func:`requests_by_code_counter_record` (the raw series, read at one
    instant)."""
    by = f"{instance_location_labels(config)}, code"
    return f"sum by ({by}) ({series(config, REQUESTS)})"


def requests_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`requests_counter_record` (from the per-code counters)."""
    return f"sum by ({instance_location_labels(config)}) ({requests_by_code_counter_record()})"


def _zero_filled(expr: str) -> str:
    """``expr``, or 0 where the process served requests but ``expr`` has no series yet."""
    return f"{expr} or 0 * {requests_counter_record()}"


def errors_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`errors_counter_record` (reads :func:`requests_counter_record`
    for the 0 of a process that has served no error yet)."""
    failed = (
        f"{requests_by_code_counter_record()}{{{SERVER_ERROR_CODES}}}"
        f" or {series(config, EXCEPTIONS, FAILED_MID_STREAM)}"
    )
    return _zero_filled(f"sum by ({instance_location_labels(config)}) ({failed})")


def responses_5xx_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`responses_5xx_counter_record` (from the per-code counters)."""
    selected = f"{requests_by_code_counter_record()}{{{SERVER_ERRORS_5XX}}}"
    return _zero_filled(f"sum by ({instance_location_labels(config)}) ({selected})")


def kept_5xx_records_counter_expr(config: MonitoringConfig) -> str:
    """The expression of :func:`kept_5xx_records_counter_record`."""
    selected = series(config, RECORDS_KEPT, 'status_class="5xx"')
    return _zero_filled(f"sum by ({instance_location_labels(config)}) ({selected})")


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
    return f"sum by ({by_labels(config, 'location')}) ({operation}({counter}[{window}]))"


def job_total_expr(config: MonitoringConfig, location_record: str) -> str:
    """A location-level record summed to the whole service (``sum by (job)``)."""
    return f"sum by ({by_labels(config, 'job')}) ({location_record})"


def recorded_windows(config: MonitoringConfig) -> tuple[str, ...]:
    """Every (scaled) window the rules record requests, errors and error ratios for at the
    ``location`` and ``job`` levels, shortest first: the burn-rate windows, the outlier
    window and the rate interval."""
    durations = {config.window(config.rate_interval), config.window(config.outlier_window)}
    for burn in config.burn_windows:
        durations.update((config.window(burn.long), config.window(burn.short)))
    by_seconds = {parse_duration(duration): duration for duration in durations}
    return tuple(by_seconds[seconds] for seconds in sorted(by_seconds))


def recent_increase_expr(selector: str, window: str) -> str:
    """How much the counter series ``selector`` rose over ``window``, counting a series that
    appeared within the window (at 1, say) by its whole value: increase() alone sees no
    rise in a series whose first sample is its only one."""
    return f"({selector} unless {selector} offset {window}) or increase({selector}[{window}])"


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
    version)."""
    on = f"{config.job_label}, {config.instance_label}"
    info = series(config, BUILD_INFO)
    return f"{per_instance} * on ({on}) group_left ({VERSION}) max by ({on}, {VERSION}) ({info})"


def version_rate_from_counter_expr(config: MonitoringConfig, counter: str, window: str) -> str:
    """The rate of a per-process counter record per (job, location, version)."""
    joined = version_join_expr(config, f"rate({counter}[{window}])")
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
    ratio is above ``regression_min_ratio``, above ``regression_factor`` times the ratio of
    every other version there together, and it served at least
    ``regression_min_requests`` requests in the window."""
    by = by_labels(config, "location")
    errors, requests = _operand(errors), _operand(requests)
    ratio = f"{errors} / {requests}"
    rest_errors = f"sum by ({by}) ({errors}) - on ({by}) {_group_right(errors)}"
    rest_requests = f"sum by ({by}) ({requests}) - on ({by}) {_group_right(requests)}"
    seconds = parse_duration(window)
    return (
        f"{ratio} > {number(config.regression_min_ratio)}\n"
        f"and {ratio} > {number(config.regression_factor)} * (\n"
        f"  ({rest_errors})\n  / ({rest_requests})\n)\n"
        f"and {requests} * {number(seconds)} >= {config.regression_min_requests}"
    )


def _operand(expr: str) -> str:
    """``expr`` as the operand of a binary operator: a name as it is, anything else in ()."""
    return expr if _NAME_RE.match(expr) else f"({expr})"


def _group_right(operand: str) -> str:
    # A "(" right after group_right opens its label list: an empty one first, then "(...)".
    return f"group_right () {operand}" if operand.startswith("(") else f"group_right {operand}"


def number(value: float) -> str:
    """A number as PromQL text, without float noise (``0.0144``, not ``0.014400000000000001``)."""
    return f"{value:.12g}"


def rest_of_fleet_error_ratio_expr(config: MonitoringConfig, window: str) -> str:
    """Per location, the error ratio of every other location of the same job together (the
    service's sum minus the location itself), from the records over ``window``."""
    job = config.job_label
    errors = (
        f"{errors_record('job', window)} - on ({job}) group_right "
        f"{errors_record('location', window)}"
    )
    requests = (
        f"{requests_record('job', window)} - on ({job}) group_right "
        f"{requests_record('location', window)}"
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
    record = exceptions_by_type_record()
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
    return f"{exceptions_by_type_record()}\nunless on ({on}) {exceptions_seen_record(config, hold)}"


def mutations_record(window: str) -> str:
    """``location_route_target:sentinel_global_mutations:increase<window>``."""
    return record_name("location_route_target", "sentinel_global_mutations", f"increase{window}")


def mutations_expr(config: MonitoringConfig, window: str) -> str:
    """Global-state mutations per (job, location, route, target) over ``window``, the first
    one of a series included."""
    by = f"{by_labels(config, 'location')}, route, target"
    return f"sum by ({by}) ({recent_increase_expr(series(config, MUTATIONS), window)})"
