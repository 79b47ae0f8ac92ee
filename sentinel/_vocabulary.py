"""The words sentinel's signals share: phases, status classes, components, drop reasons.

Each bounded label value is spelled once here, as a ``Literal`` type where code passes it
around, so mypy catches a typo and a new value is added in one place (and then appears in
docs/metrics.md's tables and the runbooks that describe it).
"""

from __future__ import annotations

from typing import Final, Literal

Phase = Literal[
    "request", "response", "lifespan", "background", "task", "thread", "process", "import"
]
"""Where an exception was raised (the ``phase`` label and report field)."""

StatusClass = Literal["2xx", "3xx", "4xx", "5xx"]
"""The ``status_class`` label: 1xx counts as 2xx (the exchange went on), and anything that
is not a valid status (sentinel's ``invalid`` code) as 5xx."""

STATUS_CLASSES: Final[tuple[StatusClass, ...]] = ("2xx", "3xx", "4xx", "5xx")

Component = Literal[
    "before_report",
    "log_filter",
    "logging",
    "metrics",
    "middleware",
    "mutations",
    "output",
    "render",
    "reporter",
    "sampling_hook",
    "sidecar",
    "sink",
    "tenant",
    "tracing",
    "writer",
]
"""The ``component`` label of ``sentinel_internal_errors_total``: the part of sentinel that
failed (and caught its failure)."""

DropReason = Literal[
    "before_report",
    "queue_full",
    "record_queue_full",
    "build_failed",
    "write_failed",
    "span_buffer_full",
    "span_undecided",
    "export_failed",
    "export_queue_full",
    "export_shutdown",
]
"""The ``reason`` label of ``sentinel_reports_dropped_total``: ``before_report`` is a report the
user's hook dropped on purpose, the others are losses."""

NO_ROUTE: Final = "<none>"
"""The route of what happened outside any request (lifespan, threads, import...)."""

_CLASS_OF_HUNDREDS: Final[dict[int, StatusClass]] = {
    1: "2xx",
    2: "2xx",
    3: "3xx",
    4: "4xx",
    5: "5xx",
}


def status_class(status: int) -> StatusClass:
    """The class of an HTTP status: ``503`` is ``5xx``; what is not a status counts as 5xx."""
    return _CLASS_OF_HUNDREDS.get(status // 100, "5xx")
