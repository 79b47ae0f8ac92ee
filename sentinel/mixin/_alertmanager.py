"""Alertmanager routing for sentinel's alerts, generated from the monitoring config.

The route tree (``group_by`` alertname, job, slo, severity, so that the per-location pages
of one SLO reach the on-call person as one notification listing the locations, and the
tenants' pages of one SLO as one notification listing the tenants):

- ``SentinelWatchdog`` goes to ``sentinel-watchdog``, a dead man's switch: notified again
  every minute while the alerting pipeline works, so its receiver can page when that stops;
- ``severity="page"`` goes to ``sentinel-page``: burn pages, a location's traffic drop
  (``SentinelTrafficDrop``), a 4xx code shifting to a large share of a location's responses
  (``SentinelStatusShift``, a deploy that answers 401), a release regression, lost error
  records, a tracked tenant's burn (``SentinelTenantErrorBudgetBurn``);
- ``severity="ticket"``, and anything else (so that no alert is dropped), to
  ``sentinel-ticket``.

Inhibitions (an alert that a more urgent one already covers is held back, not lost: it is
notified if it still fires when the other one resolves):

- a global page (``scope="global"``) holds back the same SLO's per-location burn alerts,
  its global ticket, its ``SentinelLocationErrorRatioOutlier`` alerts and its tenants' burn
  tickets (``equal`` job and slo), not its tenants' pages: one customer failing can be why
  the whole service burns, and its page names it (one notification lists every tenant that
  pages);
- a tenant's page holds back that tenant's tickets (``equal`` job, slo and tenant); a
  location's pages do not hold back tenants' alerts (a tenant's requests span locations);
- a location's page holds back that location's tickets (``equal`` job and location), the
  ticket of a ``SentinelStatusShift`` whose page fires included; a page of one status code
  (a ``SentinelStatusShift`` page, a release's 4xx shift) only the tickets of that code
  (``equal`` job, location and code) and those of no code: a 404 shift that pages does not
  hold back a 401 shift's ticket in the same location, another cause;
- a release's 4xx shift (``SentinelReleaseErrorRatioRegression`` with a ``code``) holds back
  the ``SentinelStatusShift`` of that code in that location (``equal`` job, location and
  code): the release is the cause, and rolling it back the action;
- ``SentinelErrorRecordsMissing`` is never held back: lost error records are a problem of
  their own, whatever else fires; nor are the event tickets (``SentinelUnhandledExceptionNew``,
  ``SentinelGlobalStateMutated``), which fire for ``event_window`` only: held back by a
  longer page, they would never be sent.

Each receiver is a webhook with the config's ``url`` (or ``url_file``, which Alertmanager
0.26 and later reads, so the URL is not written here) and optionally a bearer token read by
Alertmanager from ``credentials_file``. A receiver without a URL is a null receiver: it
exists, so routing works, but notifies no one until a URL is configured.

Every timing is multiplied by the config's ``time_scale`` (1/60 turns the page group
interval of 5m into 5s) for tests and the demo.
"""

from __future__ import annotations

from typing import Any

import yaml

from ._config import MonitoringConfig, Receiver, format_duration
from ._rules import (
    BURN_ALERT,
    MUTATION_ALERT,
    NEW_EXCEPTION_ALERT,
    OUTLIER_ALERT,
    RECORDS_MISSING_ALERT,
    REGRESSION_ALERT,
    STATUS_SHIFT_ALERT,
    TENANT_BURN_ALERT,
    WATCHDOG_ALERT,
)

PAGE_RECEIVER = "sentinel-page"
TICKET_RECEIVER = "sentinel-ticket"
WATCHDOG_RECEIVER = "sentinel-watchdog"

SENTINEL_ALERTS = 'alertname=~"Sentinel.+"'
"""Inhibitions that compare severities apply to sentinel's alerts only, not to others that
share the Alertmanager."""

GROUP_WAIT = "30s"
"""Wait this long after a group's first alert, so alerts of one burst arrive together."""
GROUP_INTERVAL = "5m"
"""Wait this long before notifying a group again about a change (new or resolved alerts)."""
PAGE_REPEAT_INTERVAL = "4h"
"""Remind of a page that still fires (on-call tools escalate by themselves before that)."""
TICKET_REPEAT_INTERVAL = "1d"
WATCHDOG_INTERVAL = "1m"
"""The dead man's switch beats this often; its receiver alarms when beats stop."""


def _watchdog_timings(config: MonitoringConfig) -> dict[str, str]:
    """Alertmanager resends a firing group at a flush (every group_interval) once more than
    repeat_interval has passed since it last sent; the send is logged a moment after the
    flush began, so with both at the interval every beat came two intervals apart. Flushing
    twice an interval, with a repeat interval a tenth short of it, beats once an interval."""
    interval = config.seconds(WATCHDOG_INTERVAL)
    return {
        "group_interval": _milliseconds(interval / 2),
        "repeat_interval": _milliseconds(interval * 0.9),
    }


def _milliseconds(seconds: float) -> str:
    """An Alertmanager duration for ``seconds``: whole seconds as Prometheus writes them,
    else in milliseconds (the demo's scaled minute is one second)."""
    whole = round(seconds)
    if whole >= 1 and abs(seconds - whole) < 1e-9:
        return format_duration(whole)
    return f"{max(1, round(seconds * 1000))}ms"


def alertmanager_config(config: MonitoringConfig) -> dict[str, Any]:
    """The Alertmanager configuration as a mapping, ready for YAML."""
    slo, severity = "slo", "severity"
    job, location, tenant = config.job_label, config.location_label, config.tenant_label
    identity = list(config.alert_identity_labels)

    def timings(repeat_interval: str) -> dict[str, str]:
        return {
            "group_wait": config.window(GROUP_WAIT),
            "group_interval": config.window(GROUP_INTERVAL),
            "repeat_interval": config.window(repeat_interval),
        }

    def global_page() -> list[str]:  # a fresh list each time: PyYAML would write an alias
        return [f'alertname="{BURN_ALERT}"', 'scope="global"', 'severity="page"']

    def location_page(*, code: bool) -> list[str]:
        """A page of one location, of one status code (a 4xx shift) or of none."""
        return [SENTINEL_ALERTS, 'severity="page"', f'{location}=~".+"', _code(present=code)]

    def location_tickets() -> list[str]:
        # Not the event tickets: they fire for event_window only (a new exception type, a
        # global-state write), so held back by a longer page they would never be sent.
        return [
            SENTINEL_ALERTS,
            f'alertname!="{RECORDS_MISSING_ALERT}"',
            f'alertname!="{WATCHDOG_ALERT}"',
            f'alertname!="{NEW_EXCEPTION_ALERT}"',
            f'alertname!="{MUTATION_ALERT}"',
            'severity="ticket"',
            f'{location}=~".+"',
        ]

    route = {
        "receiver": TICKET_RECEIVER,
        "group_by": ["alertname", job, *identity, slo, severity],
        **timings(TICKET_REPEAT_INTERVAL),
        "routes": [
            {
                "receiver": WATCHDOG_RECEIVER,
                "matchers": [f'alertname="{WATCHDOG_ALERT}"'],
                "group_by": ["alertname", job, *identity],
                "group_wait": "0s",
                **_watchdog_timings(config),
            },
            {
                "receiver": PAGE_RECEIVER,
                "matchers": ['severity="page"'],
                **timings(PAGE_REPEAT_INTERVAL),
            },
            {
                "receiver": TICKET_RECEIVER,
                "matchers": ['severity="ticket"'],
                **timings(TICKET_REPEAT_INTERVAL),
            },
        ],
    }
    inhibit_rules = [
        {
            "source_matchers": global_page(),
            "target_matchers": [f'alertname="{BURN_ALERT}"', 'scope="location"'],
            "equal": [job, *identity, slo],
        },
        {
            "source_matchers": global_page(),
            "target_matchers": [f'alertname="{BURN_ALERT}"', 'scope="global"', 'severity="ticket"'],
            "equal": [job, *identity, slo],
        },
        {
            "source_matchers": global_page(),
            "target_matchers": [f'alertname="{OUTLIER_ALERT}"'],
            "equal": [job, *identity, slo],
        },
        {
            # Tickets only: a tenant's page may name the one customer the whole service burns
            # for (5% of the traffic failing half its requests), which the global page cannot.
            "source_matchers": global_page(),
            "target_matchers": [f'alertname="{TENANT_BURN_ALERT}"', 'severity="ticket"'],
            "equal": [job, *identity, slo],
        },
        {
            "source_matchers": [f'alertname="{TENANT_BURN_ALERT}"', 'severity="page"'],
            "target_matchers": [f'alertname="{TENANT_BURN_ALERT}"', 'severity="ticket"'],
            "equal": [job, *identity, slo, tenant],
        },
        {
            "source_matchers": location_page(code=False),
            "target_matchers": location_tickets(),
            "equal": [job, *identity, location],
        },
        {
            # A page of one code holds back tickets of no code, and of its own code only.
            "source_matchers": location_page(code=True),
            "target_matchers": [*location_tickets(), _code(present=False)],
            "equal": [job, *identity, location],
        },
        {
            "source_matchers": location_page(code=True),
            "target_matchers": [*location_tickets(), _code(present=True)],
            "equal": [job, *identity, location, "code"],
        },
        {
            "source_matchers": [f'alertname="{REGRESSION_ALERT}"', 'code=~".+"'],
            "target_matchers": [f'alertname="{STATUS_SHIFT_ALERT}"'],
            "equal": [job, *identity, location, "code"],
        },
    ]
    receivers = [
        _receiver(PAGE_RECEIVER, config.page_receiver, send_resolved=True),
        _receiver(TICKET_RECEIVER, config.ticket_receiver, send_resolved=True),
        _receiver(WATCHDOG_RECEIVER, config.watchdog_receiver, send_resolved=False),
    ]
    return {"route": route, "inhibit_rules": inhibit_rules, "receivers": receivers}


def _code(*, present: bool) -> str:
    """The matcher of alerts with a ``code`` label (a 4xx shift), or without one."""
    return 'code=~".+"' if present else 'code=""'


def render_alertmanager(config: MonitoringConfig) -> str:
    """The Alertmanager configuration file (YAML), with a header saying where it came from."""
    null = [
        name
        for name, receiver in (
            (PAGE_RECEIVER, config.page_receiver),
            (TICKET_RECEIVER, config.ticket_receiver),
            (WATCHDOG_RECEIVER, config.watchdog_receiver),
        )
        if receiver.url is None and receiver.url_file is None
    ]
    header = [
        "# Alertmanager routing for sentinel's alerts, generated by `sentinel alertmanager`",
        f"# (slo {config.slo_label}, time_scale {config.time_scale:g}); regenerate, do not edit.",
    ]
    if null:
        header.append("# Null receivers (no URL configured, so they notify no one):")
        header.append(f"#   {', '.join(null)}")
    body = yaml.safe_dump(alertmanager_config(config), sort_keys=False, width=100)
    return "\n".join(header) + "\n" + body


def _receiver(name: str, receiver: Receiver, *, send_resolved: bool) -> dict[str, Any]:
    if receiver.url is None and receiver.url_file is None:
        return {"name": name}
    webhook: dict[str, Any] = (
        {"url": receiver.url} if receiver.url is not None else {"url_file": receiver.url_file}
    )
    webhook["send_resolved"] = send_resolved
    if receiver.credentials_file is not None:
        webhook["http_config"] = {"authorization": {"credentials_file": receiver.credentials_file}}
    return {"name": name, "webhook_configs": [webhook]}
