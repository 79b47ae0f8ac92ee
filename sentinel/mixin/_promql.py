"""The PromQL every generator shares: what an error is, and the names and expressions of the
recording rules. Rules, dashboards and the gate build their queries from these functions,
so the same string is never typed twice.

Levels follow the ``level:metric:operations`` convention: ``location:`` sums by the job and
location labels (one location of one service), ``job:`` by the job label (the whole
service), ``location_version:`` by job, location and the app's release.
"""

from __future__ import annotations

from typing import Literal

from ._config import MonitoringConfig

Level = Literal["job", "location"]

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
