"""The Grafana dashboards, built with grafana-foundation-sdk from the monitoring config.

Three dashboards share the variables (data source, job, location), the deploy annotations
and the links between them:

- overview: traffic by status class, error ratio per location against the SLO, error
  budget remaining, burn rates, traffic and 4xx shares against their baselines (the traffic
  drop and status shift alerts), latency quantiles, the release each location runs and its
  4xx shares, and the tenants: the tracked tenants failing the most with their traffic, and
  the traffic outside them (``other``);
- exceptions: unhandled exceptions by type, phase, route and location, new types, and
  links from a route to its traces in Tempo;
- health: sentinel's own signals (records seen and kept, drops, internal errors, global
  state mutations, event-loop lag).

Every query is built from :mod:`._promql`, the vocabulary the rules share: request and error
rates, ratios and burn rates read the recordings (at ``rate_interval`` and every burn
window), releases and mutations the recordings of their alerts, so a panel and an alert
read the same series; the rest reads the raw series. Both are narrowed by the config's
selector (the records keep its labels), as the rules read them: where the rules of several
selectors share one Prometheus, each service's dashboards show its own records only.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator, Sequence

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, table, tempo, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, units
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model
from grafana_foundation_sdk.models import tempo as tempo_model

from . import _promql as promql
from ._config import MonitoringConfig
from ._promql import Level

PROMETHEUS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
TEMPO = model.DataSourceRef(type_val="tempo", uid="${tempo}")
ROUTE_ATTRIBUTE = "http.route"
"""The span attribute holding the route template (see sentinel._tracing)."""
UNMATCHED_ROUTE_ATTRIBUTE = "sentinel.route"
"""The span attribute holding the route label of a request no route matched, which has no
``http.route`` (see sentinel._tracing)."""
LOCATION_ATTRIBUTE = "sentinel.location"
"""The span attribute holding the location (see sentinel._tracing)."""
BURN_RATE_UNIT = "suffix:x"
"""Grafana's custom unit: a number followed by "x" (14.4x the budget)."""
_VARIABLE = re.compile(r"(\$\{[^}]*\})")

_Panel = cogbuilder.Builder[model.Panel]


def dashboards(config: MonitoringConfig) -> list[model.Dashboard]:
    """The overview, exceptions and health dashboards for ``config``."""
    return [_overview(config), _exceptions(config), _health(config)]


def render(dashboard: model.Dashboard) -> str:
    """A dashboard as Grafana imports it: JSON with sorted keys, indented, newline-ended."""
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard) + "\n"


def dashboard_files(config: MonitoringConfig) -> dict[str, str]:
    """File name (``<uid>.json``) → JSON text of every dashboard."""
    return {f"{board.uid}.json": render(board) for board in dashboards(config)}


# -- the queries -----------------------------------------------------------------------------


class _Queries:
    """The PromQL of the panels: the shared vocabulary narrowed to the dashboard's $job and
    $location. Rates of requests and errors read the recordings (recorded at the rate
    window and every burn window); what no recording holds reads the raw series."""

    def __init__(self, config: MonitoringConfig) -> None:
        self.config = config
        self.job = config.job_label
        self.location = config.location_label
        self.instance = config.instance_label
        self.window = config.window(config.rate_interval)
        self.job_matcher = f'{self.job}="$job"'
        self.location_matcher = f'{self.location}=~"$location"'

    def by(self, level: Level) -> str:
        return promql.by_labels(self.config, level)

    def recording(self, name: str, level: Level = "location") -> str:
        """A recorded series narrowed to the config's selector (whose labels the records keep)
        and the variables, as the rules read it."""
        if level == "location":
            return promql.series(self.config, name, self.job_matcher, self.location_matcher)
        return promql.series(self.config, name, self.job_matcher)

    def error_ratio(self, level: Level, window: str | None = None) -> str:
        """Errors / requests over ``window`` (default: the rate window), as recorded."""
        return self.recording(promql.error_ratio_record(level, window or self.window), level)

    def budget_remaining(self, level: Level) -> str:
        """The share of the error budget left over the SLO window: 1 - ratio / budget, the
        ratio weighting every recorded rate by its requests."""
        slo_window = self.config.window(self.config.slo_window)
        errors = self.recording(promql.errors_record(level, self.window), level)
        requests = self.recording(promql.requests_record(level, self.window), level)
        ratio = f"sum_over_time({errors}[{slo_window}]) / sum_over_time({requests}[{slo_window}])"
        return f"1 - ({ratio}) / {promql.number(self.config.error_budget)}"

    def burn_rate(self, level: Level, window: str) -> str:
        """The error ratio over ``window`` in units of the error budget."""
        return f"{self.error_ratio(level, window)} / {promql.number(self.config.error_budget)}"

    def raw(self, metric: str, *matchers: str, location: bool = True) -> str:
        """A raw series narrowed to the config's selector and the variables."""
        where = (self.job_matcher, self.location_matcher) if location else (self.job_matcher,)
        return promql.series(self.config, metric, *where, *matchers)

    def rate(self, metric: str, by: str, *matchers: str, location: bool = True) -> str:
        series = self.raw(metric, *matchers, location=location)
        return f"sum by ({self.job}, {by}) (rate({series}[{self.window}]))"

    def increase(self, metric: str, by: str, *matchers: str, location: bool = True) -> str:
        """Occurrences over the rate window by ``by``, a series' first ones included."""
        series = self.raw(metric, *matchers, location=location)
        return f"sum by ({self.job}, {by}) ({promql.recent_increase_expr(series, self.window)})"

    def zero_when_absent(self, expr: str, label: str) -> str:
        """``expr``, or 0 with ``label="none"`` for a job that has no such series: a counter
        with labels exists only after its first increment, and "none" reads better than an
        empty panel, which could also mean the scrape failed."""
        alive = f"sum by ({self.job}) ({self.raw(promql.BUILD_INFO, location=False)})"
        zero = f'label_replace(0 * {alive}, "{label}", "none", "", "")'
        return f"{expr} or on ({self.job}) {zero}"

    def quantile(self, quantile: float) -> str:
        buckets = self.raw(f"{promql.LOCATION_DURATION}_bucket")
        by = f"{self.by('location')}, le"
        return f"histogram_quantile({quantile:g}, sum by ({by}) (rate({buckets}[{self.window}])))"

    def status_classes(self) -> str:
        """Requests per second by status class; ``invalid`` codes count as 5xx and 1xx as 2xx
        (from the per-location counter: no route or method needed)."""
        rates = f"rate({self.raw(promql.LOCATION_REQUESTS)}[{self.window}])"
        classes = f'label_replace({rates}, "status_class", "${{1}}xx", "code", "([1-5])[0-9][0-9]")'
        classes = f'label_replace({classes}, "status_class", "5xx", "code", "invalid")'
        # An informational status counts as the exchange going on, as sentinel counts it.
        classes = f'label_replace({classes}, "status_class", "2xx", "code", "1[0-9][0-9]")'
        return f"sum by ({self.job}, status_class) ({classes})"

    def releases(self) -> str:
        """Requests per second by location and the app's release, as recorded for the
        release-regression alert (over its window)."""
        window = self.config.window(self.config.regression_window)
        return self.recording(promql.version_requests_record(window))

    def traffic_against_baseline(self) -> str:
        """Each location's request rate over the traffic-drop window as a share of its
        baseline, as SentinelTrafficDrop judges it."""
        window = self.config.window(self.config.traffic_drop_window)
        current = self.recording(promql.requests_record("location", window))
        return f"{current} / {self.recording(promql.requests_baseline_record(self.config))}"

    def code_shares(self) -> str:
        """Each 4xx code's share of a location's responses over the status-shift window."""
        window = self.config.window(self.config.status_shift_window)
        return self.recording(promql.code_share_record(window))

    def code_share_baselines(self) -> str:
        """The same codes' shares over the baseline window before it (0 for a new code)."""
        return self.recording(promql.code_share_baseline_record(self.config))

    def release_code_shares(self) -> str:
        """Each release's 4xx shares per location over the regression window."""
        window = self.config.window(self.config.regression_window)
        return self.recording(promql.version_code_share_record(window))

    def new_exception_types(self) -> str:
        """Exception types per route and location present now that were absent one lookback
        ago, with their occurrences since the processes started (the first one shows)."""
        lookback = self.config.window(self.config.new_exception_lookback)
        record = self.recording(promql.exceptions_by_type_record())
        on = f"{self.by('location')}, route, exception_type"
        # Seen at any time in the lookback before (a restart or a quiet day then does not
        # make a type new), in the records or, before the rules were loaded, the raw series.
        raw = self.raw(promql.EXCEPTIONS)
        seen = (
            f"present_over_time({record}[{lookback}] offset {lookback})\n"
            f"or count by ({on}) (last_over_time({raw}[{lookback}] offset {lookback}))"
        )
        return f"{record}\nunless on ({on}) (\n{seen}\n)"

    def mutations(self) -> str:
        """Mutations per target and route over the event window, as recorded for the alert
        (the first one of a series included)."""
        record = self.recording(
            promql.mutations_record(self.config.window(self.config.event_window))
        )
        return f"sum by ({self.job}, target, route) ({record})"

    def tenant_recording(self, name: str) -> str:
        """A tenant-level recording narrowed to the selector and $job (the tenant metric has
        no location: the tenants are the service's, every location together)."""
        return promql.series(self.config, name, self.job_matcher)

    def worst_tenants(self, count: int, factor: int = 1) -> str:
        """The ``count`` tracked tenants with the highest 5xx ratio over the rate window, as
        the tenant burn alerts read it (``other`` is never among them), times ``factor``
        (100: in percent)."""
        ratios = self.tenant_recording(promql.tenant_error_ratio_record(self.window))
        worst = f"topk({count}, {ratios})"
        return f"{worst} * {factor}" if factor != 1 else worst

    def worst_tenants_traffic(self, count: int) -> str:
        """The requests per second of the tenants :meth:`worst_tenants` names."""
        requests = self.tenant_recording(promql.tenant_requests_record(self.window))
        on = promql.tenant_by_labels(self.config)
        return f"{requests} and on ({on}) {self.worst_tenants(count)}"

    def service_traffic(self) -> str:
        """The service's requests per second over the rate window (every location)."""
        return self.recording(promql.requests_record("job", self.window), "job")

    def named_tenants_traffic(self) -> str:
        """Requests per second of the tracked tenants together; 0 when none is tracked."""
        requests = self.tenant_recording(promql.tenant_requests_record(self.window))
        return f"sum by ({self.by('job')}) ({requests}) or 0 * {self.service_traffic()}"

    def other_traffic(self) -> str:
        """Requests per second outside the tracked tenants: the service total minus the
        named tenants. Not the rate of ``tenant="other"`` itself, which steps up by an
        evicted tenant's whole count (sentinel/_tenants.py) and shows that step as traffic
        for one rate window."""
        named = self.named_tenants_traffic()
        return f"clamp_min({self.service_traffic()} - on ({self.by('job')}) ({named}), 0)"

    def other_share(self) -> str:
        """The share of the service's requests outside the tracked tenants."""
        return f"{self.other_traffic()} / ({self.service_traffic()} > 0)"

    def deploys(self) -> str:
        """A release of the job that was not running one rate window ago, while the job
        was: a new value of sentinel_build_info's version label."""
        info = self.raw(promql.BUILD_INFO, location=False)
        now = f"count by ({self.job}, {promql.VERSION}) ({info})"
        before = f"count by ({self.job}, {promql.VERSION}) ({info} offset {self.window})"
        # Only where the job was scraped then: after a gap (a Prometheus restart) every
        # running release would look new.
        scraped = f"count by ({self.job}) ({info} offset {self.window})"
        return f"({now} unless {before}) and on ({self.job}) {scraped}"


# -- building blocks -------------------------------------------------------------------------


def _target(
    expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, table: bool = True
) -> prometheus.Dataquery:
    """A query on the Prometheus variable: over the time range, or (``instant``) at its end,
    as a table, or (not ``table``) as one named value per series for a stat panel (in table
    format Grafana merges a query's series into one frame and drops the legend)."""
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(PROMETHEUS)
    query = query.legend_format(legend) if legend else query
    if instant and table:
        return query.instant().format(prometheus_model.PromQueryFormat.TABLE)
    if instant:
        return query.instant().format(prometheus_model.PromQueryFormat.TIME_SERIES)
    return query.range()


def _shifted_percent(config: MonitoringConfig, baseline: float) -> str:
    return f"{promql.shifted_share(config.status_shift_factor, baseline) * 100:.2g}%"


def _thresholds(*steps: tuple[float, str]) -> builders.ThresholdsConfig:
    """Absolute thresholds; Grafana reads the first step as the base (-Infinity) whatever
    its value, and the schema wants a number there, so it is the lowest value shown."""
    return (
        builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def _tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def _timeseries(
    title: str, description: str, unit: str, *targets: prometheus.Dataquery
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .legend(_legend())
        .tooltip(_tooltip())
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .height(8)
        .span(12)
    )
    return panel.targets(list(targets))


def _dashed(panel: timeseries.Panel, thresholds: builders.ThresholdsConfig) -> timeseries.Panel:
    """``panel`` with its thresholds drawn as dashed lines."""
    return panel.thresholds(thresholds).thresholds_style(
        common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
    )


def _log_scale(panel: timeseries.Panel) -> timeseries.Panel:
    """``panel`` on a log10 scale, so sub-percent ratios stay visible."""
    return panel.scale_distribution(
        common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
    )


def _stat(title: str, description: str, unit: str, *targets: prometheus.Dataquery) -> stat.Panel:
    """One tile per series, coloured by the thresholds, with the series' trend behind it."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(list(targets))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
        .wide_layout(True)
        .show_percent_change(False)
        .percent_change_color_mode(common.PercentChangeColorMode.STANDARD)
        .height(8)
        .span(12)
    )


def _table(
    title: str, description: str, unit: str, value: str, target: prometheus.Dataquery
) -> table.Panel:
    """The labels and value of an instant query, one row per series; the value column is
    named ``value``."""
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .with_target(target)
        .show_header(True)
        .frame_index(0)
        .cell_height(common.TableCellHeight.SM)
        .align(common.FieldTextAlignment.AUTO)
        .inspect(False)
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "__name__": True},
                    "renameByName": {"Value": value},
                },
            )
        )
        .height(8)
        .span(12)
    )


def _traces_link(label: str, location: str | None = None) -> builders.DashboardLink:
    """A data link to Explore with a TraceQL query on Tempo: the traces of the clicked
    route (and location) over the dashboard's time range. ``label`` and ``location`` are
    Grafana's variables for the clicked value's route and location."""
    route = f'"${{{label}:percentencode}}"'
    # An unmatched request's span has no http.route; its route label is in sentinel.route.
    condition = f"(span.{ROUTE_ATTRIBUTE} = {route} || span.{UNMATCHED_ROUTE_ATTRIBUTE} = {route})"
    if location is not None:
        condition += f' && span.{LOCATION_ATTRIBUTE} = "${{{location}:percentencode}}"'
    query = (
        tempo.TempoQuery()
        .ref_id("A")
        .datasource(TEMPO)
        .query_type(tempo_model.TempoQueryType.TRACEQL)
        .query(f"{{ {condition} }}")
        .table_type(tempo_model.SearchTableType.TRACES)
        .limit(20)
        .filters([])
    )
    panes = {
        "traces": {
            "datasource": TEMPO.uid,
            "queries": [query.build()],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
    }
    text = json.dumps(panes, cls=JSONEncoder, sort_keys=True, separators=(",", ":"))
    # Encode the JSON for the URL but leave Grafana's ${...} variables whole: Grafana fills
    # them in (percent-encoding the route, which holds "/", "{" and "}").
    encoded = "".join(
        piece if piece.startswith("${") else urllib.parse.quote(piece, safe="")
        for piece in _VARIABLE.split(text)
    )
    return (
        builders.DashboardLink("Traces of this route (Tempo)")
        .type(model.DashboardLinkType.LINK)
        .url(f"/explore?schemaVersion=1&orgId=1&panes={encoded}")
        .target_blank(True)
    )


def _dashboard(
    config: MonitoringConfig,
    name: str,
    title: str,
    description: str,
    rows: Sequence[tuple[str, Sequence[_Panel]]],
    *,
    traces: bool = False,
) -> model.Dashboard:
    queries = _Queries(config)
    board = (
        builders.Dashboard(title)
        .uid(f"{config.dashboard_uid_prefix}-{name}")
        .description(description)
        .tags(list(config.dashboard_tags))
        .timezone(common.TimeZoneBrowser)
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .editable()
        .link(
            builders.DashboardLink("sentinel")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags(list(config.dashboard_tags))
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .annotation(
            builders.AnnotationQuery()
            .name("Deploys")
            .datasource(PROMETHEUS)
            .enable(True)
            .icon_color("blue")
            .expr(queries.deploys())
        )
    )
    for variable in _variables(config, traces=traces):
        board = board.with_variable(variable)
    for row_title, panels in rows:
        board = board.with_row(builders.Row(row_title))
        for panel in panels:
            board = board.with_panel(panel)
    built = board.build()
    for number, item in enumerate(built.panels or [], 1):
        item.id_val = number
    return built


def _variables(
    config: MonitoringConfig, *, traces: bool
) -> Iterator[cogbuilder.Builder[model.VariableModel]]:
    yield (
        builders.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus")
        .description("The Prometheus that scrapes sentinel's /metrics.")
    )
    if traces:
        yield (
            builders.DatasourceVariable("tempo")
            .label("Tempo")
            .type("tempo")
            .description("The Tempo that receives sentinel's spans (OTLP), for trace links.")
        )
    info = promql.series(config, promql.BUILD_INFO)
    yield (
        builders.QueryVariable("job")
        .label("Service")
        .description(f"The Prometheus {config.job_label} label of the service.")
        .datasource(PROMETHEUS)
        .query(f"label_values({info}, {config.job_label})")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    requests = promql.series(config, promql.LOCATION_REQUESTS, f'{config.job_label}="$job"')
    yield (
        builders.QueryVariable("location")
        .label("Location")
        .description("Locations the service serves requests in.")
        .datasource(PROMETHEUS)
        .query(f"label_values({requests}, {config.location_label})")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


# -- overview --------------------------------------------------------------------------------


def _overview(config: MonitoringConfig) -> model.Dashboard:
    q = _Queries(config)
    slo = config.slo_label
    budget = config.error_budget
    window = q.window
    slo_window = config.window(config.slo_window)
    budget_panel = (
        _stat(
            f"Error budget remaining ({slo_window})",
            f"Share of the error budget ({budget:g} of requests, SLO {slo}%) not yet spent "
            f"over the last {slo_window}, per location and for the whole service. Errors are "
            "5xx and invalid statuses plus responses that failed mid-stream. Below 0: the "
            "objective is missed there.",
            units.PercentUnit,
            _target(
                q.budget_remaining("location"),
                f"{{{{{q.location}}}}}",
                "A",
                instant=True,
                table=False,
            ),
            _target(q.budget_remaining("job"), "whole service", "B", instant=True, table=False),
        )
        .thresholds(_thresholds((-1, "red"), (0, "orange"), (0.25, "green")))
        .decimals(1)
        .graph_mode(common.BigValueGraphMode.NONE)
    )
    ratio = _log_scale(
        _dashed(
            _timeseries(
                "Error ratio by location",
                f"Errors / requests over {window} per location, and for the whole service. The "
                f"dashed line is the SLO's error budget ({budget:g}, SLO {slo}%): a location far "
                "above it can burn the budget while the whole service looks fine. Log scale, so "
                "sub-percent ratios stay visible.",
                units.PercentUnit,
                _target(q.error_ratio("location"), f"{{{{{q.location}}}}}", "A"),
                _target(q.error_ratio("job"), "whole service", "B"),
            ),
            _thresholds((0, "green"), (budget, "red")),
        )
    )
    burn = [
        _stat(
            f"Burn rate over {config.window(w.long)}",
            f"How fast the error budget is spent: the error ratio over {config.window(w.long)} "
            f"divided by the budget ({budget:g}); 1 spends exactly the budget over "
            f"{slo_window}. Red at {w.factor:g}x, where the {w.severity} alert fires when the "
            f"{config.window(w.short)} window is above it too.",
            BURN_RATE_UNIT,
            _target(q.burn_rate("location", config.window(w.long)), f"{{{{{q.location}}}}}", "A"),
            _target(q.burn_rate("job", config.window(w.long)), "whole service", "B"),
        )
        .thresholds(_thresholds((0, "green"), (w.factor, "red")))
        .decimals(2)
        .span(max(6, 24 // len(config.burn_windows)))
        for w in config.burn_windows
    ]
    classes = (
        _timeseries(
            "Requests by status class",
            f"Requests per second over {window} by status class, for the selected locations "
            "(statuses that were not HTTP statuses count as 5xx).",
            units.RequestsPerSecond,
            _target(q.status_classes(), "{{status_class}}", "A"),
        )
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .span(24)
    )
    latency = [
        _timeseries(
            f"Latency p{round(quantile * 100)}",
            f"The {quantile:g} quantile of request duration (receiving the request to the end "
            f"of the response) over {window}, per location.",
            units.Seconds,
            _target(q.quantile(quantile), f"{{{{{q.location}}}}}", "A"),
        ).span(8)
        for quantile in (0.5, 0.9, 0.99)
    ]
    releases = _table(
        "Release per location",
        "The app's release (sentinel_build_info's version: SENTINEL_VERSION, else "
        "service.version) serving each location, with its requests per second over "
        f"{config.window(config.regression_window)} (the release-regression alert's window). "
        "Two rows for one location: a rollout in progress.",
        units.RequestsPerSecond,
        "requests/s",
        _target(q.releases(), "", "A", instant=True),
    ).decimals(2)
    drop_window = config.window(config.traffic_drop_window)
    baseline_window = config.window(config.traffic_drop_baseline_window)
    traffic = _dashed(
        _timeseries(
            "Traffic against its baseline",
            f"Each location's request rate over {drop_window} as a share of its baseline (its "
            f"highest rate over {baseline_window} in the {baseline_window} before). "
            f"SentinelTrafficDrop fires below the dashed line "
            f"({config.traffic_drop_ratio:.0%}) after {config.traffic_drop_for}, and when a "
            "location stops reporting (its line ends). Requests that never arrive raise no "
            "error: this is where they show.",
            units.PercentUnit,
            _target(q.traffic_against_baseline(), f"{{{{{q.location}}}}}", "A"),
        ),
        _thresholds((0, "red"), (config.traffic_drop_ratio, "green")),
    )
    shift_window = config.window(config.status_shift_window)
    shares = _dashed(
        _timeseries(
            "4xx share by code and location",
            f"Each 4xx code's share of a location's responses over {shift_window} (solid), and "
            f"over the {config.window(config.status_shift_baseline_window)} before (baseline, "
            f"0 for a code not answered then). SentinelStatusShift fires when a share's "
            f"odds against the other responses are more than {config.status_shift_factor:g}x "
            f"its baseline's (a 2% code above {_shifted_percent(config, 0.02)}, a 30% one "
            f"above {_shifted_percent(config, 0.3)}) and it is above "
            f"{config.status_shift_min_ratio:.0%} (ticket) or "
            f"{config.status_shift_page_ratio:.0%} (page): a deploy that answers 401 moves no "
            "5xx error budget.",
            units.PercentUnit,
            _target(q.code_shares(), f"{{{{{q.location}}}}} {{{{code}}}}", "A"),
            _target(q.code_share_baselines(), f"{{{{{q.location}}}}} {{{{code}}}} baseline", "B"),
        ),
        _thresholds(
            (0, "green"),
            (config.status_shift_min_ratio, "orange"),
            (config.status_shift_page_ratio, "red"),
        ),
    )
    release_shares = _timeseries(
        "4xx share by release",
        "Each release's 4xx shares per location over "
        f"{config.window(config.regression_window)} (the release-regression alert's window): "
        "a new version answering a code far more often than the previous one in the same "
        f"location ({config.regression_factor:g}x the odds, above "
        f"{config.status_shift_min_ratio:.0%}) fires SentinelReleaseErrorRatioRegression.",
        units.PercentUnit,
        _target(
            q.release_code_shares(),
            f"{{{{{q.location}}}}} {{{{{promql.VERSION}}}}} {{{{code}}}}",
            "A",
        ),
    )
    return _dashboard(
        config,
        "overview",
        "Sentinel / Overview",
        f"Requests, errors against the {slo}% SLO, traffic and 4xx shares against their "
        "baselines, latency and releases per location; the tenants failing the most.",
        [
            ("Service level", [budget_panel, ratio, *burn, classes]),
            ("Traffic and status codes", [traffic, shares]),
            ("Latency", latency),
            ("Releases", [releases, release_shares]),
            ("Tenants", _tenant_panels(config, q)),
        ],
    )


WORST_TENANTS = 10
"""How many tenants the tenants row's table lists, worst 5xx ratio first..."""
WORST_TENANTS_PLOTTED = 5
"""...and how many its graph draws."""


def _tenant_panels(config: MonitoringConfig, q: _Queries) -> list[_Panel]:
    """The tenants row: the tracked tenants failing the most, with their traffic, and how
    much of the traffic is outside the tracked tenants (``other``)."""
    window = q.window
    budget = config.error_budget
    tenant = config.tenant_label
    page = next((w for w in config.burn_windows if w.severity == "page"), config.burn_windows[0])
    every_location = (
        "The tenant metric has no location: these panels show the service's tenants across "
        "every location, whatever the location variable says."
    )
    # One unit for both columns: the Grafana 11.6 JSON Schema the dashboards are checked
    # against types an override's matcher options and values as objects, so a by-name unit
    # override (strings) would not pass it. The ratio is in percent, and its column says so.
    ratio_column, traffic_column = "5xx %", "requests/s"
    worst = (
        table.Panel()
        .title(f"Worst {WORST_TENANTS} tenants by 5xx ratio")
        .description(
            f"The tracked tenants (sentinel_tenant_requests_total's {tenant} label, `other` "
            f"left out) with the highest share of 5xx responses over {window} (in percent), with "
            f"their requests per second. SentinelTenantErrorBudgetBurn pages for a tenant above "
            f"{page.factor:g}x the budget ({page.factor * budget * 100:.6g}%) over "
            f"{config.window(page.long)} and {config.window(page.short)} once it served "
            f"{config.tenant_min_page_requests} requests in {config.window(page.long)}, "
            f"{config.tenant_min_errors} of them failed: a tenant with a handful of requests "
            f"can top this table and page no one. {every_location}"
        )
        .unit(units.Short)
        .datasource(PROMETHEUS)
        .targets(
            [
                _target(q.worst_tenants(WORST_TENANTS, 100), "", "A", instant=True),
                _target(q.worst_tenants_traffic(WORST_TENANTS), "", "B", instant=True),
            ]
        )
        .show_header(True)
        .frame_index(0)
        .cell_height(common.TableCellHeight.SM)
        .align(common.FieldTextAlignment.AUTO)
        .inspect(False)
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "__name__": True},
                    "renameByName": {"Value #A": ratio_column, "Value #B": traffic_column},
                },
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name(ratio_column).desc(True)])
        .decimals(2)
        .height(8)
        .span(12)
    )
    ratios = _log_scale(
        _dashed(
            _timeseries(
                "5xx ratio of the worst tenants",
                f"5xx / requests over {window} of the {WORST_TENANTS_PLOTTED} tracked tenants "
                "failing the most at each moment. The dashed line is the SLO's error budget "
                f"({budget:g}). Log scale. {every_location}",
                units.PercentUnit,
                _target(q.worst_tenants(WORST_TENANTS_PLOTTED), f"{{{{{tenant}}}}}", "A"),
            ),
            _thresholds((0, "green"), (budget, "red")),
        )
    )
    traffic = _timeseries(
        "Traffic of the tracked tenants and of other",
        f"Requests per second over {window}: the tracked tenants together, and everything "
        "else (`other`: tenants not tracked by name, requests without a tenant), computed as "
        f'the service\'s total minus the tracked tenants. The rate of {tenant}="other" itself '
        "would show an evicted tenant's whole count as a burst of traffic: eviction moves it "
        f"into other at once. {every_location}",
        units.RequestsPerSecond,
        _target(q.named_tenants_traffic(), "tracked tenants", "A"),
        _target(q.other_traffic(), "other", "B"),
    ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    share = (
        _stat(
            "Share of traffic in other",
            f"The share of the service's requests over {window} that no tracked tenant served "
            "(the service's total minus the tracked tenants). High: the failing customers "
            "may be among those no panel names; raise SENTINEL_MAX_TENANTS, or check that the "
            f"tenant header reaches the app. {every_location}",
            units.PercentUnit,
            _target(q.other_share(), "other", "A"),
        )
        .thresholds(_thresholds((0, "green"), (0.5, "orange")))
        .decimals(1)
    )
    return [worst, ratios, traffic, share]


# -- exceptions ------------------------------------------------------------------------------


def _exceptions(config: MonitoringConfig) -> model.Dashboard:
    q = _Queries(config)
    window = q.window
    lookback = config.window(config.new_exception_lookback)
    location = f"__data.fields.{q.location}"

    def by(label: str, title: str, what: str, *, traces: bool = False) -> timeseries.Panel:
        panel = _timeseries(
            f"Unhandled exceptions by {title}",
            f"Unhandled exceptions per {window} by {what}: every occurrence counted (never "
            "sampled), the first of a new series included."
            + (" Click a series for the route's traces in Tempo." if traces else ""),
            units.Short,
            _target(q.increase(promql.EXCEPTIONS, label), f"{{{{{label}}}}}", "A"),
        )
        return panel.data_links([_traces_link("__field.labels.route")]) if traces else panel

    new_types = (
        _table(
            "New exception types",
            f"Exception types that appeared in a route and location within the last {lookback}"
            " (not raised there in the lookback before), with their occurrences since the "
            "processes started; a type raised once shows too. Click a row for the route's "
            "traces in Tempo at that location.",
            units.Short,
            "occurrences",
            _target(q.new_exception_types(), "", "A", instant=True),
        )
        .data_links([_traces_link("__data.fields.route", location)])
        .span(24)
    )
    return _dashboard(
        config,
        "exceptions",
        "Sentinel / Exceptions",
        "Unhandled exceptions by type, phase, route and location; new types; links to traces.",
        [
            (
                "Unhandled exceptions",
                [
                    by("exception_type", "type", "exception type"),
                    by("phase", "phase", "phase (request, response, background, ...)"),
                    by("route", "route", "route template", traces=True),
                    by(q.location, "location", "location"),
                ],
            ),
            ("New exception types", [new_types]),
        ],
        traces=True,
    )


# -- sentinel health -------------------------------------------------------------------------


def _health(config: MonitoringConfig) -> model.Dashboard:
    q = _Queries(config)
    window = q.window
    location = q.location
    records = _timeseries(
        "Records seen and kept by location",
        f"Request records per second over {window}: seen (every request) and kept (written to "
        "the detailed log). Counts are exact; only records are sampled.",
        units.CountsPerSecond,
        _target(q.rate(promql.RECORDS_SEEN, location), f"{{{{{location}}}}} seen", "A"),
        _target(q.rate(promql.RECORDS_KEPT, location), f"{{{{{location}}}}} kept", "B"),
    )
    by_class = f"{location}, status_class"
    kept_share = _timeseries(
        "Share of records kept by status class",
        f"Kept / seen over {window} per location and status class. 5xx records are kept "
        "first; a 5xx share near 0 while 5xx are served means error logging is lost.",
        units.PercentUnit,
        _target(
            f"{q.rate(promql.RECORDS_KEPT, by_class)} / {q.rate(promql.RECORDS_SEEN, by_class)}",
            f"{{{{{location}}}}} {{{{status_class}}}}",
            "A",
        ),
    ).max(1)
    dropped = _timeseries(
        "Dropped reports by reason",
        f"Reports sentinel could not write, per {window} and reason, for the whole job "
        "(this counter has no location). none: nothing was dropped.",
        units.Short,
        _target(
            q.zero_when_absent(q.increase(promql.DROPPED, "reason", location=False), "reason"),
            "{{reason}}",
            "A",
        ),
    )
    internal = _timeseries(
        "Internal errors by component",
        f"Failures inside sentinel, caught and counted (the app was not affected), per {window}"
        " and component, for the whole job. none: no failures.",
        units.Short,
        _target(
            q.zero_when_absent(
                q.increase(promql.INTERNAL_ERRORS, "component", location=False), "component"
            ),
            "{{component}}",
            "A",
        ),
    )
    mutations = _timeseries(
        "Global state mutations by target and route",
        "Writes to process-global state made while handling a request, per "
        f"{config.window(config.event_window)} (as SentinelGlobalStateMutated counts them, the "
        "first one included), by target (os.environ, ...) and route.",
        units.Short,
        _target(q.mutations(), "{{target}} {{route}}", "A"),
    )
    mutation_totals = _table(
        "Global state mutations since the processes started",
        "Every (location, route, target) with a mutation and its count since the process "
        "started, the very first one included.",
        units.Short,
        "mutations",
        _target(
            f"sum by ({q.by('location')}, route, target) ({q.raw(promql.MUTATIONS)})",
            "",
            "A",
            instant=True,
        ),
    )
    lag = (
        _timeseries(
            "Event-loop lag",
            "How late each process's event loop runs a callback, measured from sentinel's own "
            "thread (it keeps growing while the loop is stuck). Per process: the gauge has no "
            "location.",
            units.Seconds,
            _target(
                f"max by ({q.job}, {q.instance}) ({q.raw(promql.LOOP_LAG, location=False)})",
                f"{{{{{q.instance}}}}}",
                "A",
            ),
        )
        .thresholds(_thresholds((0, "green"), (0.1, "orange"), (1, "red")))
        .span(24)
    )
    return _dashboard(
        config,
        "health",
        "Sentinel / Health",
        "sentinel's own signals: records seen and kept, drops, internal errors, global state "
        "mutations, event-loop lag.",
        [
            ("Records", [records, kept_share]),
            ("Failures inside sentinel", [dropped, internal]),
            ("Global state", [mutations, mutation_totals]),
            ("Runtime", [lag]),
        ],
    )
