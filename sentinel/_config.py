"""sentinel's configuration: one frozen object, built from keyword arguments or the environment."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MUTATION_MODES = ("report", "raise", "isolate", "off")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# Errors are rare and precious, successes plentiful: per location and second.
DEFAULT_RECORD_TARGETS = (("5xx", 20.0), ("4xx", 5.0), ("3xx", 2.0), ("2xx", 2.0))
DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Location values end up as Prometheus label values and in every log line, so they are
# restricted to a conservative alphabet; anything else is treated as hostile.
_LOCATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting and shows the value."""


def is_valid_location(value: str) -> bool:
    """Whether ``value`` may be used as a location label value."""
    return _LOCATION_RE.match(value) is not None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything sentinel can be told. Defaults are chosen for production use."""

    service: str = "unknown_service"
    """Service name on every signal (``SENTINEL_SERVICE``, else ``OTEL_SERVICE_NAME``)."""
    version: str = "unknown"
    """The app's version on every report (``SENTINEL_VERSION`` or ``service.version``)."""
    location: str = "unknown"
    """This process's location (``SENTINEL_LOCATION``)."""
    location_header: str | None = None
    """Trusted request header that carries the location (``SENTINEL_LOCATION_HEADER``)."""
    locations: tuple[str, ...] = ()
    """Allow-list of locations; empty means the first ``max_locations`` distinct values."""
    max_locations: int = 64
    """Bound on distinct locations when there is no allow-list; the rest become ``other``."""
    request_id_header: str | None = None
    """Trusted header carrying the request id; otherwise one is generated."""
    metrics_port: int = 9464
    """Port of the sidecar metrics endpoint (``SENTINEL_METRICS_PORT``; 0 turns it off)."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics endpoint binds (``SENTINEL_METRICS_HOST``); all interfaces by
    default, since Prometheus scrapes from outside the process's host or pod."""
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    """Histogram buckets of request duration, in seconds (web latency: 5 ms to 10 s)."""
    traces: bool = False
    """Export a server span per request over OTLP; on when the OTel variables name an
    exporter or endpoint (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
    mutation_mode: str = "report"
    """How writes to process-global state made by requests are handled
    (``SENTINEL_MUTATION_MODE``): report, raise, isolate (the environment) or off."""
    mutation_warmup_seconds: float = 0.0
    """Writes in this many seconds after the first request are not reported (lazy set-up on
    first use); writes before the first request, and in lifespan, never are
    (``SENTINEL_MUTATION_WARMUP_SECONDS``)."""
    mutation_allow: tuple[str, ...] = ()
    """Known-harmless writes, never reported: ``target`` or ``target:key`` patterns in
    fnmatch syntax, e.g. ``os.environ:MY_CACHE_*`` (``SENTINEL_MUTATION_ALLOW``,
    comma-separated)."""
    log_locals: bool = False
    """Capture local variables in exception reports (``SENTINEL_LOG_LOCALS``)."""
    locals_max_chars: int = 256
    """Longest repr kept for one local variable."""
    locals_time_budget_seconds: float = 0.01
    """Time one report may spend on reprs of locals; the rest are marked as skipped."""
    fold_window_seconds: float = 60.0
    """Window in which repeats of one fingerprint are folded into a summary."""
    fold_full_reports: int = 10
    """Full reports of one fingerprint per window before folding starts."""
    max_fingerprints: int = 10_000
    """Size of the fingerprint table (least recently seen entries are evicted)."""
    max_report_bytes: int = 65_536
    """Cap on one serialized report; larger ones are truncated and marked."""
    report_queue_size: int = 1_000
    """Reports waiting to be built off the request path; overflow is counted as dropped."""
    max_frames: int = 64
    """Frames kept per exception (the innermost ones, where the error is)."""
    app_modules: tuple[str, ...] = ()
    """Module prefixes whose frames are the app's; empty means not stdlib or site-packages."""
    scrub_keys: tuple[str, ...] = ()
    """Extra key substrings whose values are scrubbed, in addition to the built-in ones."""
    task_grace_seconds: float = 0.25
    """How long a failed asyncio task or future may wait for someone to retrieve its error
    before sentinel reports it as unhandled."""
    drop_warning_interval_seconds: float = 60.0
    """At most one stderr warning about dropped reports per this many seconds."""
    records_per_second: tuple[tuple[str, float], ...] = DEFAULT_RECORD_TARGETS
    """Kept request records (and traces) per second and location, per status class."""
    sampling_window_seconds: float = 1.0
    """How often sample rates are recomputed from the traffic just seen."""
    max_sampling_keys: int = 200
    """Keys (status, method, route) tracked per location; more share one overflow key."""
    sampling_idle_seconds: float = 60.0
    """A key unseen this long is forgotten (its next request counts as new again)."""
    keep_header: str | None = None
    """A request header whose presence keeps the request's record and trace (debugging)."""
    keep_slower_than_seconds: float | None = None
    """Requests slower than this are always kept."""
    max_buffered_spans: int = 20_000
    """Spans held while their request's keep/drop decision is pending; more are dropped."""
    max_spans_per_trace: int = 512
    """Spans buffered for one request's trace; more are dropped (and counted)."""
    max_export_queue: int = 2048
    """Spans handed to the exporter and not yet exported; more are dropped (and counted)."""

    def __post_init__(self) -> None:
        _check_name("service", self.service)
        if not is_valid_location(self.location):
            msg = f'"location" must match {_LOCATION_RE.pattern}: {self.location!r}'
            raise ConfigError(msg)
        for location in self.locations:
            if not is_valid_location(location):
                msg = f'"locations" entries must match {_LOCATION_RE.pattern}: {location!r}'
                raise ConfigError(msg)
        for name in ("location_header", "request_id_header"):
            value = getattr(self, name)
            if value is not None and not _HEADER_RE.match(value):
                msg = f'"{name}" must be an HTTP header name: {value!r}'
                raise ConfigError(msg)
            if value is not None and value != value.lower():
                object.__setattr__(self, name, value.lower())
        if self.max_locations < 1:
            msg = f'"max_locations" must be >= 1: {self.max_locations!r}'
            raise ConfigError(msg)
        if not 0 <= self.metrics_port <= 65535:
            msg = f'"metrics_port" must be between 0 and 65535: {self.metrics_port!r}'
            raise ConfigError(msg)
        targets = dict(self.records_per_second)
        if set(targets) != set(STATUS_CLASSES) or any(t <= 0 for t in targets.values()):
            msg = f'"records_per_second" needs a positive rate for each of 2xx..5xx: {targets!r}'
            raise ConfigError(msg)
        if self.keep_header is not None:
            if not _HEADER_RE.match(self.keep_header):
                msg = f'"keep_header" must be an HTTP header name: {self.keep_header!r}'
                raise ConfigError(msg)
            object.__setattr__(self, "keep_header", self.keep_header.lower())
        if self.keep_slower_than_seconds is not None and self.keep_slower_than_seconds <= 0:
            msg = f'"keep_slower_than_seconds" must be > 0: {self.keep_slower_than_seconds!r}'
            raise ConfigError(msg)
        for name in (
            "max_sampling_keys",
            "max_buffered_spans",
            "max_spans_per_trace",
            "max_export_queue",
        ):
            if getattr(self, name) < 1:
                msg = f'"{name}" must be >= 1: {getattr(self, name)!r}'
                raise ConfigError(msg)
        if self.sampling_window_seconds <= 0 or self.sampling_idle_seconds <= 0:
            msg = (
                '"sampling_window_seconds" and "sampling_idle_seconds" must be > 0: '
                f"{self.sampling_window_seconds!r}, {self.sampling_idle_seconds!r}"
            )
            raise ConfigError(msg)
        buckets = self.latency_buckets

        if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            msg = f'"latency_buckets" must be increasing positive seconds: {buckets!r}'
            raise ConfigError(msg)
        if not self.metrics_host:
            msg = f'"metrics_host" must be an address: {self.metrics_host!r}'
            raise ConfigError(msg)
        if self.mutation_warmup_seconds < 0:
            msg = f'"mutation_warmup_seconds" must be >= 0: {self.mutation_warmup_seconds!r}'
            raise ConfigError(msg)
        if self.mutation_mode not in MUTATION_MODES:
            choices = ", ".join(MUTATION_MODES)
            msg = f'"mutation_mode" must be one of {choices}: {self.mutation_mode!r}'
            raise ConfigError(msg)
        for name in (
            "fold_full_reports",
            "max_fingerprints",
            "report_queue_size",
            "max_frames",
            "locals_max_chars",
        ):
            if getattr(self, name) < 1:
                msg = f'"{name}" must be >= 1: {getattr(self, name)!r}'
                raise ConfigError(msg)
        if self.max_report_bytes < 4096:
            msg = f'"max_report_bytes" must be >= 4096: {self.max_report_bytes!r}'
            raise ConfigError(msg)
        for name in (
            "fold_window_seconds",
            "locals_time_budget_seconds",
            "task_grace_seconds",
            "drop_warning_interval_seconds",
        ):
            if getattr(self, name) < 0:
                msg = f'"{name}" must be >= 0: {getattr(self, name)!r}'
                raise ConfigError(msg)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated like the original)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        service_fallback: str | None = None,
        **overrides: Any,
    ) -> Config:
        """Build a Config from ``SENTINEL_*`` and ``OTEL_*`` variables; keyword arguments win.

        ``environ`` defaults to ``os.environ`` read at call time (never at import time);
        ``service_fallback`` names the service when no variable does (the app's module).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        resource = _parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
        service = (
            env.get("SENTINEL_SERVICE")
            or env.get("OTEL_SERVICE_NAME")
            or resource.get("service.name")
            or service_fallback
        )
        if service:
            values["service"] = service
        version = env.get("SENTINEL_VERSION") or resource.get("service.version")
        if version:
            values["version"] = version
        if env.get("SENTINEL_LOCATION"):
            values["location"] = env["SENTINEL_LOCATION"].strip()
        if env.get("SENTINEL_LOCATION_HEADER"):
            values["location_header"] = env["SENTINEL_LOCATION_HEADER"].strip()
        if env.get("SENTINEL_LOCATIONS"):
            values["locations"] = tuple(
                part.strip() for part in env["SENTINEL_LOCATIONS"].split(",") if part.strip()
            )
        if env.get("SENTINEL_REQUEST_ID_HEADER"):
            values["request_id_header"] = env["SENTINEL_REQUEST_ID_HEADER"].strip()
        if "SENTINEL_METRICS_PORT" in env:
            values["metrics_port"] = _parse_int("SENTINEL_METRICS_PORT", env)
        if traces_configured(env):
            values["traces"] = True
        if env.get("SENTINEL_KEEP_HEADER"):
            values["keep_header"] = env["SENTINEL_KEEP_HEADER"].strip()
        if env.get("SENTINEL_KEEP_SLOWER_THAN_SECONDS"):
            values["keep_slower_than_seconds"] = _parse_float(
                "SENTINEL_KEEP_SLOWER_THAN_SECONDS", env
            )
        if env.get("SENTINEL_METRICS_HOST"):
            values["metrics_host"] = env["SENTINEL_METRICS_HOST"].strip()
        if env.get("SENTINEL_MUTATION_MODE"):
            values["mutation_mode"] = env["SENTINEL_MUTATION_MODE"].strip().lower()
        if env.get("SENTINEL_MUTATION_WARMUP_SECONDS"):
            values["mutation_warmup_seconds"] = _parse_float(
                "SENTINEL_MUTATION_WARMUP_SECONDS", env
            )
        if env.get("SENTINEL_MUTATION_ALLOW"):
            values["mutation_allow"] = tuple(
                part.strip() for part in env["SENTINEL_MUTATION_ALLOW"].split(",") if part.strip()
            )
        if "SENTINEL_LOG_LOCALS" in env:
            values["log_locals"] = _parse_bool("SENTINEL_LOG_LOCALS", env)
        values.update(overrides)
        return cls(**values)


def traces_configured(environ: Mapping[str, str]) -> bool:
    """Whether the OTel variables ask for traces (an exporter or an OTLP endpoint is set)."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _check_name(name: str, value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable():
        msg = f'"{name}" must be 1 to 128 printable characters: {value!r}'
        raise ConfigError(msg)


def _parse_int(name: str, env: Mapping[str, str]) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        msg = f'"{name}" must be an integer: {raw!r}'
        raise ConfigError(msg) from None


def _parse_float(name: str, env: Mapping[str, str]) -> float:
    raw = env[name]
    try:
        return float(raw.strip())
    except ValueError:
        msg = f'"{name}" must be a number: {raw!r}'
        raise ConfigError(msg) from None


def _parse_bool(name: str, env: Mapping[str, str]) -> bool:
    raw = env[name].strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    msg = f'"{name}" must be one of 1/0, true/false, yes/no, on/off: {env[name]!r}'
    raise ConfigError(msg)


def _parse_resource_attributes(raw: str) -> dict[str, str]:
    # The OTel SDK's format: comma-separated key=value pairs, values percent-encoded.
    from urllib.parse import unquote

    attributes: dict[str, str] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    return attributes
