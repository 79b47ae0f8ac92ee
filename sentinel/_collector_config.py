"""An OpenTelemetry Collector configuration whose tail sampling applies sentinel's policy.

In one process sentinel decides per request which records and traces to keep. Traces that
cross services are complete only at the collector, so ``sentinel collector-config`` prints
a configuration for its ``tail_sampling`` processor that expresses the same policy for the
whole fleet:

- every trace with an error span is kept (``status_code`` ERROR: sentinel marks 5xx server
  spans as errors);
- every trace slower than the latency threshold is kept (``latency``);
- every trace sentinel kept on purpose rather than by rate is kept: its server span's
  ``sentinel.keep_reason`` says why (the first request of a rare key, a caller that asked
  for the trace, the keep header, the sampling hook, a slow request, a tenant's first
  error), which is how the collector honours the per-key allocation and the W3C parent it
  cannot see for itself;
- the rest is rate-limited per location (``sentinel.location`` on the server spans), so a
  noisy location cannot use up a quiet one's budget: one ``and`` policy per listed location,
  and one more shared by every location not listed (and by traces without the attribute).
  A trace draws on its location's budget when any of its spans ended without an error (the
  processor's ``status_code`` policy matches when any span does): a failed request's lone
  server span draws on none, but a failed request with healthy child spans does, so in an
  error storm across services a location's healthy traces get a smaller share (every
  error trace is kept by the first policy all the same).

The configuration needs collector-contrib 0.116 or later: from 0.104 to 0.115 an ``and``
policy holding an inverted match (the unlisted locations' budget) could drop every other
location's traces, errors included (upstream issue 34085).

``rate_limiting`` (collector-contrib before its token-bucket version) keeps a trace while
the spans kept in the current second plus the trace's own stay below ``spans_per_second``,
so a budget is sized for its traces per second plus one trace's spans: a trace of that many
spans or more is kept only as an error, a slow trace or on purpose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ._config import Config, ConfigError, is_valid_location
from ._tracing import KEEP_REASON_ATTRIBUTE, LOCATION_ATTRIBUTE
from ._version import __version__

DEFAULT_LATENCY_THRESHOLD_MS = 2000
"""Keep traces slower than this when ``keep_slower_than_seconds`` is unset: slower than
almost any healthy web request, and well inside the default decision wait."""
DEFAULT_SPANS_PER_TRACE = 10
"""Estimated spans of one trace across services; turns traces/s into spans/s."""
DEFAULT_EXPORTER_ENDPOINT = "tempo:4317"
"""Where the collector sends kept traces (OTLP over gRPC, e.g. Grafana Tempo)."""
DEFAULT_DECISION_WAIT_SECONDS = 10.0
"""How long the collector waits for a trace's spans before deciding (upstream: 30 s)."""
EXPECTED_NEW_TRACES_PER_SECOND = 1000
"""Allocation hint for the processor; ``num_traces`` holds twice a decision wait of it."""
MIN_NUM_TRACES = 50_000
"""The processor's own default for traces held in memory; never go below it."""
DELIBERATE_KEEP_REASONS = (
    "new_key",
    "parent_sampled",
    "keep_header",
    "hook",
    "slow",
    "tenant_first_error",
    "exception",
)
"""The ``sentinel.keep_reason`` values of a trace kept on purpose, not by rate: the collector
keeps them all (``sampled``, ``provisional`` and ``unsampled`` share the budgets)."""


UNLISTED_POLICY = "rate-limit-unlisted-locations"
"""The name of the budget shared by the locations not listed."""


def _location_policy(location: str) -> str:
    return f"rate-limit-{location}"


def collector_config(
    config: Config,
    *,
    locations: Sequence[str] = (),
    latency_threshold_ms: int | None = None,
    spans_per_trace: int = DEFAULT_SPANS_PER_TRACE,
    exporter_endpoint: str = DEFAULT_EXPORTER_ENDPOINT,
    decision_wait_seconds: float = DEFAULT_DECISION_WAIT_SECONDS,
) -> dict[str, Any]:
    """The collector configuration as nested dicts and lists, ready for :func:`render_yaml`.

    Each keyword is the ``sentinel collector-config`` option of the same name. Locations
    come from ``locations``, else ``config.locations``, else ``config.location``; the
    latency threshold from ``latency_threshold_ms``, else ``config.keep_slower_than_seconds``,
    else :data:`DEFAULT_LATENCY_THRESHOLD_MS`. Raises :class:`ConfigError` for a bad value.
    """
    plan = _plan(
        config,
        locations,
        latency_threshold_ms,
        spans_per_trace,
        exporter_endpoint,
        decision_wait_seconds,
    )
    policies: list[dict[str, Any]] = [
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "slow", "type": "latency", "latency": {"threshold_ms": plan.threshold_ms}},
        {
            "name": "kept-by-sentinel",
            "type": "string_attribute",
            "string_attribute": {
                "key": KEEP_REASON_ATTRIBUTE,
                "values": list(DELIBERATE_KEEP_REASONS),
            },
        },
    ]
    for location in plan.locations:
        policies.append(
            _location_budget(_location_policy(location), [location], False, plan.spans_per_second)
        )
    policies.append(_location_budget(UNLISTED_POLICY, plan.locations, True, plan.spans_per_second))
    num_traces = max(
        MIN_NUM_TRACES, math.ceil(2 * EXPECTED_NEW_TRACES_PER_SECOND * decision_wait_seconds)
    )
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": "0.0.0.0:4317"},
                    "http": {"endpoint": "0.0.0.0:4318"},
                }
            }
        },
        "processors": {
            "tail_sampling": {
                "decision_wait": _duration(decision_wait_seconds),
                "num_traces": num_traces,
                "expected_new_traces_per_sec": EXPECTED_NEW_TRACES_PER_SECOND,
                "policies": policies,
            },
            "batch": {},
        },
        "exporters": {
            # "otlp" is OTLP over gRPC; collectors from v0.144 also call it "otlp_grpc".
            "otlp": {"endpoint": exporter_endpoint, "tls": {"insecure": True}},
            "debug": {"verbosity": "basic"},
        },
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["tail_sampling", "batch"],
                    "exporters": ["otlp", "debug"],
                }
            }
        },
    }


def header_comment(
    config: Config,
    *,
    locations: Sequence[str] = (),
    latency_threshold_ms: int | None = None,
    spans_per_trace: int = DEFAULT_SPANS_PER_TRACE,
    exporter_endpoint: str = DEFAULT_EXPORTER_ENDPOINT,
    decision_wait_seconds: float = DEFAULT_DECISION_WAIT_SECONDS,
) -> str:
    """YAML comment lines that say what :func:`collector_config` made of the same arguments."""
    plan = _plan(
        config,
        locations,
        latency_threshold_ms,
        spans_per_trace,
        exporter_endpoint,
        decision_wait_seconds,
    )
    lines = [
        "OpenTelemetry Collector configuration from `sentinel collector-config` "
        f"(sentinel {__version__}, service {config.service}).",
        "Tail sampling with sentinel's policy: keep every trace with an error, keep every",
        f"trace slower than {plan.threshold_ms} ms, keep every trace sentinel kept on purpose",
        f"({KEEP_REASON_ATTRIBUTE} {', '.join(DELIBERATE_KEEP_REASONS)}),",
        f"and rate-limit the rest per location ({LOCATION_ATTRIBUTE}):",
        f"{plan.spans_per_second} spans/s (~{plan.traces_per_second:g} traces of "
        f"{spans_per_trace} spans) each for {', '.join(plan.locations)},",
        "and as much again for all other locations together; a trace of "
        f"{plan.spans_per_second} spans or more",
        "is kept only as an error, a slow trace or on purpose.",
        "All spans of a trace must reach the same collector: with several collectors, put",
        "the loadbalancing exporter (routing_key: traceID) in front of them.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def render_yaml(document: object) -> str:
    """``document`` as block-style YAML, keys in their given order.

    PyYAML's safe dumper: it quotes any string a parser would read as another type, and
    refuses objects that are not plain data.
    """
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    """Indents a list under its key, as the Collector's documentation does."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, indentless=False)


# PyYAML quotes what YAML 1.1 reads as another type. The Collector reads with Go's yaml.v3,
# which also takes 0o17, 0X1F, 08 and 1e3 for numbers, and other YAML 1.1 readers take y and
# n for booleans: a location such as "08" must not become 8.
_READ_AS_NUMBER_OR_BOOLEAN_RE = re.compile(r"[-+.]?[0-9]|[yYnN]$")


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    if _READ_AS_NUMBER_OR_BOOLEAN_RE.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
    return dumper.represent_str(value)


_Dumper.add_representer(str, _represent_str)


@dataclass(frozen=True, slots=True)
class _Plan:
    locations: list[str]
    threshold_ms: int
    traces_per_second: float
    spans_per_second: int


def _plan(
    config: Config,
    locations: Sequence[str],
    latency_threshold_ms: int | None,
    spans_per_trace: int,
    exporter_endpoint: str,
    decision_wait_seconds: float,
) -> _Plan:
    """The checked options, with their fallbacks to ``config`` resolved."""
    for location in locations:
        if not is_valid_location(location):
            msg = f'"--location" must be letters, digits and _.:- (at most 63): {location!r}'
            raise ConfigError(msg)
    chosen = list(dict.fromkeys(locations or config.locations or (config.location,)))
    for location in chosen:
        if _location_policy(location) == UNLISTED_POLICY:
            msg = (
                f"a location cannot be named {location!r}: its budget would share the name of "
                f"the budget of the unlisted locations ({UNLISTED_POLICY}), which the "
                "Collector refuses"
            )
            raise ConfigError(msg)
    if latency_threshold_ms is not None:
        if latency_threshold_ms < 1:
            msg = f'"--latency-threshold-ms" must be >= 1: {latency_threshold_ms!r}'
            raise ConfigError(msg)
        threshold_ms = latency_threshold_ms
    elif config.keep_slower_than_seconds is not None:
        threshold_ms = max(1, round(config.keep_slower_than_seconds * 1000))
    else:
        threshold_ms = DEFAULT_LATENCY_THRESHOLD_MS
    if spans_per_trace < 1:
        msg = f'"--spans-per-trace" must be >= 1: {spans_per_trace!r}'
        raise ConfigError(msg)
    if not math.isfinite(decision_wait_seconds) or decision_wait_seconds <= 0:
        msg = f'"--decision-wait-seconds" must be > 0: {decision_wait_seconds!r}'
        raise ConfigError(msg)
    if decision_wait_seconds * 1000 <= threshold_ms:
        msg = (
            '"--decision-wait-seconds" must be longer than the latency threshold '
            f"({threshold_ms} ms), or slow traces are decided before they end: "
            f"{decision_wait_seconds!r}"
        )
        raise ConfigError(msg)
    if not exporter_endpoint or not all(
        c.isprintable() and not c.isspace() for c in exporter_endpoint
    ):
        msg = (
            '"--exporter-endpoint" must be a host:port or URL without spaces: '
            f"{exporter_endpoint!r}"
        )
        raise ConfigError(msg)
    # What is left of a location's traffic gets the 2xx target: errors and slow traces
    # are kept by their own policies, whatever the budget.
    traces_per_second = dict(config.records_per_second)["2xx"]
    # rate_limiting counts spans, not traces: a trace takes as many tokens as it has spans,
    # and is kept only while the second's spans plus its own stay below the limit: room for
    # the target's traces, and one trace's spans more.
    spans_per_second = math.ceil(traces_per_second * spans_per_trace) + spans_per_trace
    return _Plan(chosen, threshold_ms, traces_per_second, spans_per_second)


def _location_budget(
    name: str, locations: Sequence[str], invert: bool, spans_per_second: int
) -> dict[str, Any]:
    # The tests come first: "and" stops at the first sub-policy that does not sample, so
    # other locations' traces, and traces with an error (kept by their own policy), never
    # draw on this location's rate limiter.
    match: dict[str, Any] = {"key": LOCATION_ATTRIBUTE, "values": list(locations)}
    if invert:
        match["invert_match"] = True
    return {
        "name": name,
        "type": "and",
        "and": {
            "and_sub_policy": [
                {"name": f"{name}-location", "type": "string_attribute", "string_attribute": match},
                {
                    "name": f"{name}-no-error",
                    "type": "status_code",
                    "status_code": {"status_codes": ["OK", "UNSET"]},
                },
                {
                    "name": f"{name}-budget",
                    "type": "rate_limiting",
                    "rate_limiting": {"spans_per_second": spans_per_second},
                },
            ]
        },
    }


def _duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"
