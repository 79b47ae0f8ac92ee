"""The monitoring config: one object from which every rule, route, panel and gate threshold
is generated, so that they can never disagree (the monitoring-mixin shape).

Load it from a small YAML or TOML file (:meth:`MonitoringConfig.load`), override fields
from command-line flags (:meth:`MonitoringConfig.replace`), and hand it to the generators.
Every value is checked where it is set; an error names the key and shows the bad value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit

import yaml

Severity = Literal["page", "ticket"]
Duration = Annotated[str, "a duration such as 5m, 1h or 3d"]
"""A Prometheus duration (a str; the type check of the config describes it so)."""

_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_MATCHER_RE = re.compile(r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*""")
_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")


class MonitoringConfigError(ValueError):
    """A monitoring config value is invalid; the message names the key and shows the value."""


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1h``, ``30m``, ``1d12h``."""
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if not text or match is None or not any(match.groups()):
        msg = f"must be a duration such as 5m, 1h or 3d: {text!r}"
        raise MonitoringConfigError(msg)
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    return float(days * 86400 + hours * 3600 + minutes * 60 + seconds)


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for ``seconds`` (rounded to whole seconds, >= 1s)."""
    total = max(1, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            count, total = divmod(total, size)
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """``job="api", env!~"dev.*"`` as (label, operator, value) matchers; empty is none."""
    matchers: list[tuple[str, str, str]] = []
    rest = text.strip()
    while rest:
        match = _MATCHER_RE.match(rest)
        if match is None:
            msg = f'must be PromQL label matchers such as job="api": {text!r}'
            raise MonitoringConfigError(msg)
        label, operator, value = match.groups()
        matchers.append((label, operator, value))
        rest = rest[match.end() :]
        if rest.startswith(","):
            rest = rest[1:]
        elif rest:
            msg = f'must be PromQL label matchers such as job="api": {text!r}'
            raise MonitoringConfigError(msg)
    return matchers


@dataclass(frozen=True)
class BurnWindow:
    """One multi-window burn-rate condition: the error ratio over both ``long`` and
    ``short`` is above ``factor`` times the error budget (1 - SLO)."""

    long: Duration
    short: Duration
    factor: float
    severity: Severity


DEFAULT_BURN_WINDOWS = (
    # The SRE workbook's for a 30-day SLO: 2% of the budget in 1h, 5% in 6h (pages),
    # 10% in 1d, 10% in 3d (tickets); the short window is 1/12 of the long one.
    BurnWindow("1h", "5m", 14.4, "page"),
    BurnWindow("6h", "30m", 6.0, "page"),
    BurnWindow("1d", "2h", 3.0, "ticket"),
    BurnWindow("3d", "6h", 1.0, "ticket"),
)


@dataclass(frozen=True)
class Receiver:
    """Where Alertmanager sends one kind of notification: a webhook ``url``, or ``url_file``,
    a file holding it (read by Alertmanager 0.26 and later), and optionally
    ``credentials_file``, a file holding a bearer token. Alertmanager reads the files, so no
    secret is written into the generated configuration. Neither URL: a null receiver."""

    url: str | None = None
    url_file: str | None = None
    credentials_file: str | None = None


@dataclass(frozen=True)
class MonitoringConfig:
    """Selectors, label names, the SLO and every threshold of sentinel's alerts, routes,
    dashboards and rollout gate. Defaults suit a production service with a 99.9% SLO."""

    selector: str = ""
    """PromQL label matchers that pick sentinel's series, e.g. ``job="api"`` (empty: all), on
    labels that tell services apart (job, namespace, cluster), not on the labels the rules
    sum over (instance, location, tenant, code, ...). Every record keeps the selector's
    labels and every rule reads only the series it selects, so that rule files generated for
    different selectors can share one Prometheus."""
    job_label: str = "job"
    """The target label naming the service (the whole-service ``scope="global"`` level)."""
    instance_label: str = "instance"
    """The target label naming one process (joins request metrics with build info)."""
    location_label: str = "location"
    """sentinel's location label (rename it here if relabelling changed it)."""
    alert_identity_labels: tuple[str, ...] = ()
    """Labels that tell apart the Prometheus servers sharing one Alertmanager, e.g.
    ``("cluster",)`` when each server sets ``external_labels: {cluster: ...}``: added to the
    routing's grouping and to every inhibition's ``equal``, so one cluster's page neither
    holds back nor groups with another cluster's alerts of the same job."""
    tenant_label: str = "tenant"
    """The tenant label of ``sentinel_tenant_requests_total`` (rename it here if relabelling
    changed it). Its value ``other`` (every tenant not tracked by name) is never alerted on."""
    slo: float = 99.9
    """Objective in percent of requests that are not server errors, in (0, 100)."""
    slo_window: Duration = "30d"
    """The period the objective (and the error budget) is defined over."""
    burn_windows: tuple[BurnWindow, ...] = DEFAULT_BURN_WINDOWS
    """Multi-window burn-rate conditions, fastest first."""
    min_page_requests: int = 1000
    """Low-traffic guard: a page needs this many requests in its long window, so one 5xx
    among a handful of requests cannot page (a quiet place is still covered by tickets)."""
    min_ticket_requests: int = 100
    """Low-traffic guard of the tickets (their windows are longer)."""
    min_page_errors: int = 3
    """Count guard: a page needs this many errors in its long window, so that one or two 5xx
    cannot page where the request guard alone would let them (at 99.99%, one 5xx among
    1,000-1,600 requests is above the 6h page's 0.06%); at 99.9% the request guard already
    asks for 7 or more."""
    min_ticket_errors: int = 3
    """...and a ticket this many: one 5xx among the few hundred requests a day of a quiet
    location is above the 1d ticket's 0.3%, and is no trend to file a ticket for."""
    tenant_min_page_requests: int = 100
    """SentinelTenantErrorBudgetBurn's low-traffic guard: a tenant's page needs this many of
    its requests in the long window. Lower than a location's: a tenant is a small part of a
    location's traffic, and a tenant tracked from the start of an incident has only the
    requests since then."""
    tenant_min_ticket_requests: int = 100
    """...and a tenant's ticket this many."""
    tenant_min_errors: int = 10
    """Count guard: a tenant's alert needs this many 5xx in its long window, so that two or
    three stray 5xx of a tenant with a few hundred requests an hour (a 1% burst for a
    moment) page no one, while a tenant failing at 20% has them within 50 requests."""
    tenant_outlier_factor: float = 2.0
    """A tenant's alert also needs its error ratio over the long window to be this many times
    the rest of the service's (its requests less the tenant's): when the service burns, its
    own page says so, and every customer failing only as much as the rest would page with it
    (30 in the compose stack, the one failing customer among them); a tenant failing at 20%
    while the rest fails 1% still pages, and so does one that is most of the traffic."""
    outlier_factor: float = 5.0
    """A location is an outlier when its error ratio is this many times the rest's."""
    outlier_min_ratio: float = 0.01
    """...and at least this error ratio (1%): a ratio of 0.02% is no outlier, whatever the
    rest's."""
    outlier_window: Duration = "10m"
    regression_factor: float = 5.0
    """Release regression: the new version's odds of failing (errors / successes) are more
    than this many times the previous version's in the same location (also the gate's
    threshold), or its odds of answering one 4xx code are more than this many times the
    previous version's for that code. For ratios of a few percent the odds are the ratio
    (0.1% -> 0.5%); for common ones they leave room below 100% (30% -> 68%)."""
    regression_min_ratio: float = 0.002
    """...and the new version's error ratio is above this (0.2%): up to it no release is a
    regression, whatever the previous one's ratio. Low enough for a 5x regression of a 0.1%
    baseline (0.5%); ``regression_min_errors`` keeps noise out."""
    regression_window: Duration = "10m"
    regression_min_requests: int = 200
    """The new version needs this many requests in the window to be judged."""
    regression_min_errors: int = 10
    """Count guard: the new version served at least this many errors in the window (for a
    4xx shift: responses with that code), and the other versions served enough requests to
    have failed this many times at 1/``regression_factor`` of its odds, so that neither the
    first few errors of a new version nor a handful of requests without errors on the old
    one make a regression by chance."""
    regression_confidence: float = 0.99
    """The rollout gate's confidence: it stops a healthy rollout (over all locations), or
    lets a regression of ``regression_factor`` through (per location), at most 1 - this
    often."""
    status_shift_window: Duration = "5m"
    """SentinelStatusShift: the window of one 4xx code's current share of a location's
    responses..."""
    status_shift_baseline_window: Duration = "1d"
    """...compared with the code's share there over this window before it (the location's
    own baseline; a code it did not answer there has a baseline of 0)."""
    status_shift_factor: float = 5.0
    """A code's share shifted when it is at least this many times its baseline..."""
    status_shift_min_ratio: float = 0.02
    """...and above this share of the location's responses (2%: a ticket). Also the floor of
    a release's 4xx shift (SentinelReleaseErrorRatioRegression)."""
    status_shift_page_ratio: float = 0.1
    """A shift to above this share (10%) pages: a deploy that answers 401 to a tenth of the
    requests is an outage for those clients."""
    status_shift_min_requests: int = 200
    """Low-traffic guard: the location served this many requests in the window."""
    status_shift_min_responses: int = 20
    """Count guard: the code was answered at least this many times in the window, so that a
    handful of 404s in a quiet location is no shift."""
    traffic_drop_window: Duration = "5m"
    """SentinelTrafficDrop: the window of a location's current request rate..."""
    traffic_drop_baseline_window: Duration = "1h"
    """...compared with its baseline: the highest request rate over this window among those
    ending in this window before the current one. Recent enough that a daily cycle of +-40%
    stays far from the threshold; the highest, so that a drop that lasts keeps firing for
    about this long before it becomes the baseline."""
    traffic_drop_ratio: float = 0.5
    """The alert fires when the current rate is below this share of the baseline (losing
    more than half of the traffic), or when the location stopped reporting."""
    traffic_drop_min_requests: int = 100
    """Low-traffic guard: at its baseline rate the location serves at least this many
    requests in ``traffic_drop_window``; below that, a drop cannot be told from noise (and a
    quiet location going silent pages no one)."""
    traffic_drop_for: Duration = "2m"
    """How long the drop lasts before the alert fires (0s: at once), so that a restart of a
    location's processes is not a page."""
    traffic_drop_dark_hold: Duration = "1d"
    """Once SentinelTrafficDrop fires, it holds while the location stays dark (it serves
    fewer than ``traffic_drop_min_requests`` in ``traffic_drop_window``, or reports
    nothing) for up to this long after it began, however far its baseline has faded since:
    a black-holed location keeps paging until its traffic is back or someone silences it,
    and a location closed for good resolves by itself after this. 0s: no hold (the alert
    then resolves once the baseline has forgotten the traffic, about twice
    ``traffic_drop_baseline_window`` after the location went dark)."""
    new_exception_lookback: Duration = "7d"
    """An exception type is new when its series was not seen in this long."""
    records_missing_window: Duration = "10m"
    event_window: Duration = "10m"
    """How long SentinelUnhandledExceptionNew and SentinelGlobalStateMutated stay firing
    after the occurrence that raised them (the mutation alert counts over this window)."""
    rate_interval: Duration = "5m"
    """Window of the rates the dashboards plot."""
    evaluation_interval: Duration = "1m"
    time_scale: float = 1.0
    """Every window is multiplied by this (``1/60`` turns 1h into 1m): for tests and the
    demo, never a hand-written rule file."""
    runbook_url: str = "https://github.com/sentinel-asgi/sentinel/blob/main/docs/runbooks.md"
    """Base URL of the runbooks; each alert links to its section (``#alert-name``)."""
    dashboard_uid_prefix: str = "sentinel"
    dashboard_tags: tuple[str, ...] = ("sentinel",)
    page_receiver: Receiver = field(default_factory=Receiver)
    ticket_receiver: Receiver = field(default_factory=Receiver)
    watchdog_receiver: Receiver = field(default_factory=Receiver)

    def __post_init__(self) -> None:
        _check_types(self)  # first: the value checks below may assume the declared types
        if not 0 < self.slo < 100 or not math.isfinite(self.slo):
            _fail("slo", self.slo, "must be a percentage between 0 and 100 (exclusive)")
        for name in ("job_label", "instance_label", "location_label", "tenant_label"):
            if not _LABEL_RE.match(getattr(self, name)):
                _fail(name, getattr(self, name), "must be a Prometheus label name")
        if self.tenant_label in (self.job_label, self.instance_label, self.location_label):
            _fail(
                "tenant_label",
                self.tenant_label,
                "must differ from job_label, instance_label and location_label",
            )
        taken = (self.job_label, self.location_label, self.tenant_label, "alertname")
        for label in self.alert_identity_labels:
            if not _LABEL_RE.match(label) or label in taken:
                _fail(
                    "alert_identity_labels",
                    self.alert_identity_labels,
                    "must be Prometheus label names other than alertname, job_label, "
                    "location_label and tenant_label",
                )
        if len(set(self.alert_identity_labels)) != len(self.alert_identity_labels):
            _fail("alert_identity_labels", self.alert_identity_labels, "must not repeat a label")
        try:
            matchers = parse_selector(self.selector)
        except MonitoringConfigError as error:
            raise MonitoringConfigError(f'"selector" {error}') from None
        summed = {self.instance_label, self.location_label, self.tenant_label, *_SERIES_LABELS}
        summed -= {self.job_label, *_TARGET_LABEL_NAMES}
        for label, _, _ in matchers:
            if label in summed:
                _fail(
                    "selector",
                    self.selector,
                    f"must match labels that tell services apart ({self.job_label}, namespace, "
                    f"cluster, ...), not {label}, a label the rules sum over or read",
                )
        for name in (*_ROUNDED_WINDOWS, "traffic_drop_for", "traffic_drop_dark_hold"):
            _duration(name, getattr(self, name))
        for current, baseline in (
            ("status_shift_window", "status_shift_baseline_window"),
            ("traffic_drop_window", "traffic_drop_baseline_window"),
        ):
            seconds = _duration(current, getattr(self, current))
            if seconds <= 0:
                _fail(current, getattr(self, current), "must be longer than 0s")
            if seconds >= _duration(baseline, getattr(self, baseline)):
                _fail(baseline, getattr(self, baseline), f"must be longer than {current}")
        if not self.burn_windows:
            _fail("burn_windows", self.burn_windows, "must have at least one window")
        previous = 0.0
        for index, window in enumerate(self.burn_windows):
            key = f"burn_windows[{index}]"
            long, short = (
                _duration(f"{key}.long", window.long),
                _duration(f"{key}.short", window.short),
            )
            if short >= long:
                _fail(key, window, "must have a short window shorter than its long window")
            if long <= previous:
                _fail(key, window, "must come after a shorter long window (fastest first)")
            if long > _duration("slo_window", self.slo_window):
                _fail(key, window, "must have a long window within slo_window")
            if not (math.isfinite(window.factor) and window.factor > 0):
                _fail(f"{key}.factor", window.factor, "must be a positive number")
            previous = long
        self._check_burn_windows_can_fire()
        for name in (
            "min_page_requests",
            "min_ticket_requests",
            "min_page_errors",
            "min_ticket_errors",
            "tenant_min_page_requests",
            "tenant_min_ticket_requests",
            "tenant_min_errors",
            "regression_min_requests",
            "regression_min_errors",
            "status_shift_min_requests",
            "status_shift_min_responses",
            "traffic_drop_min_requests",
        ):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be a whole number >= 0")
        for name in (
            "outlier_factor",
            "tenant_outlier_factor",
            "regression_factor",
            "status_shift_factor",
        ):
            value = getattr(self, name)
            if not _number(value) or value <= 1:
                _fail(name, value, "must be a number > 1")
        for name in ("outlier_min_ratio", "regression_min_ratio", "status_shift_min_ratio"):
            value = getattr(self, name)
            if not _number(value) or not 0 <= value < 1:
                _fail(name, value, "must be a ratio from 0 to 1")
        page_ratio = self.status_shift_page_ratio
        if not _number(page_ratio) or not self.status_shift_min_ratio <= page_ratio <= 1:
            _fail(
                "status_shift_page_ratio",
                page_ratio,
                f"must be a ratio from status_shift_min_ratio ({self.status_shift_min_ratio!r})"
                " to 1",
            )
        if not _number(self.traffic_drop_ratio) or not 0 < self.traffic_drop_ratio < 1:
            _fail("traffic_drop_ratio", self.traffic_drop_ratio, "must be a ratio in (0, 1)")
        if not _number(self.regression_confidence) or not 0.5 < self.regression_confidence < 1:
            _fail("regression_confidence", self.regression_confidence, "must be in (0.5, 1)")
        if not _number(self.time_scale) or not 0 < self.time_scale <= 1:
            _fail("time_scale", self.time_scale, "must be a number in (0, 1]")
        self._check_windows_stay_apart()
        if not _UID_RE.match(self.dashboard_uid_prefix):
            _fail(
                "dashboard_uid_prefix",
                self.dashboard_uid_prefix,
                "must be 1 to 20 letters, digits, _ or -",
            )
        if not self.runbook_url.startswith(("http://", "https://")):
            _fail("runbook_url", self.runbook_url, "must be an http(s) URL")
        for name in ("page_receiver", "ticket_receiver", "watchdog_receiver"):
            _check_receiver(name, getattr(self, name))

    def _check_burn_windows_can_fire(self) -> None:
        """Refuse an SLO whose error budget times a burn factor is 100% or more: the error
        ratio can never be above it, so that window's alerts could never fire."""
        budget = self.error_budget
        dead = [w for w in self.burn_windows if w.factor * budget >= 1]
        if not dead:
            return
        named = ", ".join(
            f"the {w.long}/{w.short} {w.severity}'s (factor {w.factor:g}) "
            f"{w.factor * budget * 100:.6g}%"
            for w in dead
        )
        lowest_slo = 100 * (1 - 1 / max(w.factor for w in dead))
        _fail(
            "slo",
            self.slo,
            f"must leave every burn window's threshold (its factor x the error budget) below "
            f"100%, or its alerts can never fire: with a {budget * 100:.6g}% budget, {named}; "
            f"raise slo above {lowest_slo:.6g} or lower those factors in burn_windows below "
            f"{1 / budget:.6g}",
        )

    def _check_windows_stay_apart(self) -> None:
        """Refuse a ``time_scale`` at which two distinct windows round to the same whole
        second (1e-9 makes every window 1s): their recording rules would be the same rules
        twice, and promtool refuses the file."""
        seconds = sorted(
            {parse_duration(getattr(self, name)) for name in _ROUNDED_WINDOWS}
            | {parse_duration(w.long) for w in self.burn_windows}
            | {parse_duration(w.short) for w in self.burn_windows}
        )
        seconds = [value for value in seconds if value > 0]
        collision = _collision(seconds, self.time_scale)
        if collision is not None:
            shorter, longer = collision
            smallest = _smallest_scale(seconds)
            what = (
                f"the smallest scale that keeps them apart is {smallest}"
                if _collision(seconds, float(smallest)) is None
                else f"any scale above {smallest} keeps them apart"
            )
            _fail(
                "time_scale",
                self.time_scale,
                f"must keep distinct windows apart ({format_duration(shorter)} and "
                f"{format_duration(longer)} would both be "
                f"{format_duration(shorter * self.time_scale)}): {what} "
                f"({float(smallest):.6g})",
            )

    # -- derived values the generators share --------------------------------------------------

    @property
    def error_budget(self) -> float:
        """The allowed error ratio, 1 - SLO (0.001 for 99.9%)."""
        return round((100 - self.slo) / 100, 12)

    @property
    def slo_label(self) -> str:
        """The ``slo`` label value, e.g. ``99.9``."""
        return f"{self.slo:g}"

    def window(self, duration: str) -> str:
        """``duration`` scaled by :attr:`time_scale`, as a Prometheus duration."""
        return format_duration(parse_duration(duration) * self.time_scale)

    def seconds(self, duration: str) -> float:
        """``duration`` scaled by :attr:`time_scale`, in seconds."""
        return parse_duration(duration) * self.time_scale

    def matchers(self, *extra: str) -> str:
        """The selector plus ``extra`` matchers, as the inside of ``{...}``."""
        parts = [
            f'{label}{operator}"{value}"'
            for label, operator, value in parse_selector(self.selector)
        ]
        parts.extend(extra)
        return ",".join(parts)

    # -- loading ------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> MonitoringConfig:
        """A copy with ``changes`` applied (checked like the original)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> MonitoringConfig:
        """Build from a mapping (a parsed file); unknown keys are refused by name."""
        if not isinstance(values, Mapping):
            msg = f"{source}: must be a mapping of settings: {values!r:.200}"
            raise MonitoringConfigError(msg)
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                choices = ", ".join(sorted(known))
                msg = f"{source}: unknown key {key!r} (known keys: {choices})"
                raise MonitoringConfigError(msg)
            kwargs[key] = _convert(key, value, source)
        try:
            return cls(**kwargs)
        except MonitoringConfigError as error:
            raise MonitoringConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> MonitoringConfig:
        """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file."""
        path = Path(path)
        language = "TOML" if path.suffix == ".toml" else "YAML"
        try:
            data = path.read_bytes()
        except OSError as error:
            msg = f"{path}: cannot read the monitoring config: {error.strerror}"
            raise MonitoringConfigError(msg) from None
        try:
            text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is no text
        except UnicodeDecodeError as error:
            near = data[max(0, error.start - 8) : error.start + 8]
            msg = (
                f"{path}: the monitoring config must be UTF-8 text (byte {error.start} is not: "
                f"{near!r}); save it as UTF-8, e.g. with iconv -t UTF-8"
            )
            raise MonitoringConfigError(msg) from None
        try:
            if path.suffix == ".toml":
                values: Any = tomllib.loads(text)
            else:
                values = yaml.safe_load(text) or {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
            msg = f"{path}: not valid {language}: {error}"
            raise MonitoringConfigError(msg) from None
        except RecursionError:
            msg = f"{path}: not a monitoring config: {language} nested too deeply to read"
            raise MonitoringConfigError(msg) from None
        return cls.from_mapping(values, str(path))


def _convert(key: str, value: Any, source: str) -> Any:
    if key == "burn_windows":
        if not isinstance(value, list):
            msg = f"{source}: burn_windows must be a list of windows: {value!r:.200}"
            raise MonitoringConfigError(msg)
        windows = []
        for index, item in enumerate(value):
            names = {"long", "short", "factor", "severity"}
            if not isinstance(item, Mapping) or set(item) != names:
                msg = (
                    f"{source}: burn_windows[{index}] must have exactly long, short, factor "
                    f"and severity: {item!r:.200}"
                )
                raise MonitoringConfigError(msg)
            windows.append(BurnWindow(**item))
        return tuple(windows)
    if key.endswith("_receiver"):
        parts = {"url", "url_file", "credentials_file"}
        if not isinstance(value, Mapping) or not set(value) <= parts:
            msg = f"{source}: {key} may have url, url_file and credentials_file: {value!r:.200}"
            raise MonitoringConfigError(msg)
        return Receiver(**value)
    if key in ("dashboard_tags", "alert_identity_labels"):
        if not isinstance(value, list):
            msg = f"{source}: {key} must be a list of strings: {value!r:.200}"
            raise MonitoringConfigError(msg)
        return tuple(value)  # each entry's type is checked with the other fields'
    return value


_TYPE_NAMES: dict[type, str] = {str: "a string", int: "a whole number", float: "a number"}
_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """The type of each field of the dataclass ``cls``, resolved from its annotations (strings,
    under ``from __future__ import annotations``) once per class."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls, include_extras=True)
        _FIELD_TYPES[cls] = {item.name: hints[item.name] for item in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _check_types(instance: object, prefix: str = "") -> None:
    """Refuse, by key and value, any field of the dataclass ``instance`` (nested ones too)
    whose value does not have the field's declared type."""
    for name, expected in _field_types(type(instance)).items():
        _check_type(f"{prefix}{name}", getattr(instance, name), expected)


def _check_type(name: str, value: Any, expected: Any) -> None:
    """Refuse ``value`` unless it has the type ``expected``: a bool is no number (though it is
    an int in Python), and an int is a float (``slo: 99``)."""
    description = None
    if typing.get_origin(expected) is Annotated:  # Duration: a str described by its metadata
        expected, description = typing.get_args(expected)[:2]
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Literal:
        if not any(type(value) is type(choice) and value == choice for choice in args):
            _fail(name, value, f"must be {' or '.join(str(choice) for choice in args)}")
    elif origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        if value is not None:  # X | None: None, or an X
            _check_type(name, value, args[0] if args[1] is type(None) else args[1])
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, tuple):
            _fail(name, value, "must be a tuple")
        for index, item in enumerate(value):
            _check_type(f"{name}[{index}]", item, args[0])
    elif isinstance(expected, type) and dataclasses.is_dataclass(expected):
        if not isinstance(value, expected):
            _fail(name, value, f"must be a {expected.__name__}")
        _check_types(value, f"{name}.")
    elif expected in _TYPE_NAMES:
        allowed = (int, float) if expected is float else expected
        if isinstance(value, bool) or not isinstance(value, allowed):
            _fail(name, value, f"must be {description or _TYPE_NAMES[expected]}")
    else:  # a field of a type added without teaching this function about it
        msg = f"cannot check {name!r}: unsupported field type {expected!r}"
        raise TypeError(msg)


_SERIES_LABELS = (
    "__name__",
    "location",
    "route",
    "method",
    "code",
    "exception_type",
    "phase",
    "target",
    "status_class",
    "reason",
    "component",
    "tenant",
    "le",
    "service",
    "version",
    "sentinel_version",
    "environment",
)
"""The labels sentinel's own metrics carry (and ``__name__``): a selector on one would pick
some series of a metric or none, and the rules sum most of them away."""
_TARGET_LABEL_NAMES = ("service", "environment")
"""Labels only ``sentinel_build_info`` carries, which a scrape config may also attach to
every series as target labels (kube-prometheus's ``service``; Prometheus then names the
metric's own ``exported_service``): a selector on them is taken, for such setups."""

_ROUNDED_WINDOWS = (
    "slo_window",
    "outlier_window",
    "regression_window",
    "new_exception_lookback",
    "records_missing_window",
    "event_window",
    "rate_interval",
    "evaluation_interval",
    "status_shift_window",
    "status_shift_baseline_window",
    "traffic_drop_window",
    "traffic_drop_baseline_window",
)
"""The windows :meth:`MonitoringConfig.window` scales and rounds to whole seconds (with the
burn-rate windows; ``traffic_drop_for`` and ``traffic_drop_dark_hold`` are scaled unrounded)."""


def _collision(seconds: list[float], scale: float) -> tuple[float, float] | None:
    """Two neighbouring windows of ``seconds`` (ascending) that ``scale`` rounds to the same
    Prometheus duration, or None."""
    for shorter, longer in itertools.pairwise(seconds):
        if format_duration(shorter * scale) == format_duration(longer * scale):
            return shorter, longer
    return None


def _smallest_scale(seconds: list[float]) -> Fraction:
    """The smallest time_scale from which on the windows ``seconds`` (distinct, ascending,
    whole) round to distinct whole seconds (format_duration: round half to even, at least
    1s). Two windows d1 < d2 share the rounded value k where both scaled values fall in k's
    cell: scales from (k - 1/2)/d1 to (k + 1/2)/d2, which exist while k < (d1 + d2) /
    (2 (d2 - d1)); value 1's cell reaches down to 0. Only neighbours can collide (rounding
    keeps the order), so the answer is the highest cell top over the neighbouring pairs."""
    highest = Fraction(0)
    for shorter, longer in itertools.pairwise(int(value) for value in seconds):
        cells = Fraction(shorter + longer, 2 * (longer - shorter))
        k = max(1, math.ceil(cells) - 1)
        highest = max(highest, Fraction(2 * k + 1, 2 * longer))
    return highest


def _duration(name: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except MonitoringConfigError as error:
        raise MonitoringConfigError(f'"{name}" {error}') from None


def _check_receiver(name: str, receiver: Receiver) -> None:
    for part in ("url", "url_file", "credentials_file"):
        value = getattr(receiver, part)
        if value is not None and not value.strip():
            _fail(f"{name}.{part}", value, "must be a non-empty string")
    if receiver.url is not None:
        try:
            address = urlsplit(receiver.url)
            usable = address.scheme in ("http", "https") and bool(address.hostname)
        except ValueError:
            usable = False
        if not usable or any(character.isspace() for character in receiver.url):
            _fail(f"{name}.url", receiver.url, "must be an http(s) URL")
        if address.password is not None:
            shown = receiver.url.replace(f":{address.password}@", ":***@")
            _fail(f"{name}.url", shown, "must not carry a password (use credentials_file)")
    if receiver.url is not None and receiver.url_file is not None:
        _fail(name, receiver, "must have url or url_file, not both")
    if receiver.credentials_file is not None and receiver.url is None and receiver.url_file is None:
        _fail(f"{name}.credentials_file", receiver.credentials_file, "needs a url or url_file")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value: Any, requirement: str) -> NoReturn:
    msg = f'"{name}" {requirement}: {value!r}'
    raise MonitoringConfigError(msg)
