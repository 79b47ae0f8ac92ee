"""sentinel's configuration: one frozen object, built from keyword arguments or the environment.

Each field has one rule, applied alike to a keyword argument and to a value read from the
environment. An error is one sentence fit to print as is: it names the keyword
(``"metrics_port"``) or the variable (``SENTINEL_METRICS_PORT``) and shows the value as it
was given. :data:`ENVIRONMENT` says which variables set which field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import ipaddress
import itertools
import math
import os
import re
from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, Unpack
from urllib.parse import unquote

from ._scrub import Scrubber
from ._vocabulary import STATUS_CLASSES

MUTATION_MODES = ("report", "raise", "isolate", "off")
# Errors are rare and precious, successes plentiful: per location and second.
DEFAULT_RECORD_TARGETS = (("5xx", 20.0), ("4xx", 5.0), ("3xx", 2.0), ("2xx", 2.0))
DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_MAX_SERIES = 2000
"""Series per budgeted family before new label sets are folded (the OpenTelemetry SDKs'
default cardinality limit per metric is 2000 too)."""
MAX_MAX_TENANTS = 1000
"""The most ``max_tenants`` may be: 4,004 tenant series per process, and about 7 MB of
tracker (its candidates grow 21-fold with it); ten times more takes 70 MB and a burn-rate
alert over 40,000 series, where a per-tenant view has stopped being a view."""
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
LOG_FORMATS = ("json", "console")

# Location values end up as Prometheus label values and in every log line, so they are
# restricted to a conservative alphabet; anything else is treated as hostile.
_LOCATION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
_HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# ASCII only, and strict: int() and float() also take other scripts' digits, "1_000",
# "nan" and "inf".
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACE = " \t\n\r\f\v"
"""Stripped around variables' values; only ASCII, so a look-alike space is refused."""
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


TenantOf = Callable[[Any], Any]
"""``tenant(scope)``: the request's tenant as text (or bytes), or None for none."""

BeforeReport = Callable[[dict[str, Any], BaseException], dict[str, Any] | None]
"""``before_report(report, exception)``: the report to write (amended or not), or None to
drop it."""


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message is one sentence that names the setting (the keyword argument, or the
    environment variable the value came from) and shows the value as given.
    """


OTHER_LOCATION = "other"
"""The location of every value beyond the bound (and of invalid ones): no location's own."""


def is_valid_location(value: str) -> bool:
    """Whether ``value`` may be used as a location label value."""
    return _LOCATION_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything sentinel can be told. Defaults are chosen for production use."""

    service: str = "unknown_service"
    """Service name on every signal (``SENTINEL_SERVICE``, else ``OTEL_SERVICE_NAME``)."""
    version: str = "unknown"
    """The app's release, on every report and on ``sentinel_build_info{version}``
    (``SENTINEL_VERSION`` or ``service.version``)."""
    environment: str = "unknown"
    """The deployment environment (``production``, ``staging``...), on
    ``sentinel_build_info{environment}`` (``SENTINEL_ENVIRONMENT`` or
    ``deployment.environment``)."""
    location: str = "unknown"
    """This process's location (``SENTINEL_LOCATION``)."""
    location_header: str | None = None
    """Trusted request header that carries the location (``SENTINEL_LOCATION_HEADER``); one
    the scrubber masks is refused, as for :data:`tenant_header`."""
    locations: tuple[str, ...] = ()
    """Allow-list of locations; empty means the first ``max_locations`` distinct values."""
    max_locations: int = 64
    """Bound on distinct locations when there is no allow-list; the rest become ``other``."""
    request_id_header: str | None = None
    """Trusted header carrying the request id; otherwise one is generated. One the scrubber
    masks is refused, as for :data:`tenant_header`."""
    tenant_header: str | None = None
    """Trusted request header that carries the tenant, the customer a request is for
    (``SENTINEL_TENANT_HEADER``); see :data:`tenant` for what happens to its value. A header
    the scrubber masks (``x-api-key``, ``authorization``, any name with a ``scrub_keys``
    entry) is refused: its value would be the tenant label, unmasked."""
    tenant: TenantOf | None = None
    """``tenant(scope)``: the tenant of a request, a customer id and never a credential, or
    None; a synchronous callable (``async def`` is refused: it runs at the request's start,
    where nothing awaits it). Called after ``tenant_header`` is read (whose value it
    overrides when it returns one). A value is used when it is 1 to 64 letters, digits or
    ``_.:-`` and does not look like a credential to the scrubber; anything else is counted
    by reason in ``sentinel_tenants_rejected_total`` and the request has no tenant. If it
    raises (any exception but KeyboardInterrupt and SystemExit), returns something else
    than text (``str``, ``bytes``, ``bytearray``) or None, or takes longer than
    ``tenant_time_budget_seconds``, the request has no tenant and
    ``sentinel_internal_errors_total{component="tenant"}`` counts it."""
    tenant_time_budget_seconds: float = 0.001
    """How long one ``tenant`` call may take (1 ms, a hundred times a header lookup): a
    slower call's result is not used. It cannot be interrupted (it runs on the request path),
    so after 5 slow calls in a row it is not called for 10 seconds: each request meanwhile
    has no tenant, and is counted as one more internal error of the ``tenant`` component."""
    max_tenants: int = 50
    """How many tenants are counted by name in ``sentinel_tenant_requests_total``
    (``SENTINEL_MAX_TENANTS``, at most :data:`MAX_MAX_TENANTS`); the rest, and requests
    without a tenant, are ``other``. 50 tracked tenants are 204 series per process."""
    metrics_port: int = 9464
    """Port of the sidecar metrics endpoint (``SENTINEL_METRICS_PORT``; 0 turns it off)."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics endpoint binds (``SENTINEL_METRICS_HOST``): an IPv4 or IPv6
    address, or ``localhost`` (any other name is more likely a typo than a host to resolve).
    All interfaces by default, since Prometheus scrapes from outside the process's host or
    pod."""
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    """Buckets of the per-location request duration histogram
    (``sentinel_location_request_duration_seconds``), in seconds (web latency: 5 ms to 10 s)."""
    max_series: int = DEFAULT_MAX_SERIES
    """Series each request, exception and mutation family may expose by name
    (``SENTINEL_MAX_SERIES``; a label set of the per-route duration histogram is 7 series):
    later new label sets keep their location (and code, exception type, phase or target)
    with route folded to ``<other>`` and method to ``other``, counted in
    ``sentinel_series_overflow_total{metric}``. Counts stay exact."""
    traces: bool = False
    """Export a server span per request; on when the OTel variables name an exporter or an
    OTLP endpoint (``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or both, ``none`` for
    off; ``OTEL_EXPORTER_OTLP_ENDPOINT``). On by keyword, OTLP is used when the variable
    names no exporter."""
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
    log_format: str | None = None
    """How records are written (``SENTINEL_LOG_FORMAT``): ``json``, one JSON line per record
    for machines, or ``console``, for people (structlog's ConsoleRenderer; an exception
    report shows its culprit, then a rich traceback). None, the default, chooses ``console``
    when the output stream is a terminal and ``json`` otherwise."""
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
    ignore_exceptions: tuple[type[BaseException] | str, ...] = ()
    """Exceptions counted in the metrics but never written in full: classes, or dotted names
    such as ``mypkg.errors.Expected`` (``ValueError`` for builtins), each with its
    subclasses (``SENTINEL_IGNORE_EXCEPTIONS``, comma-separated names)."""
    before_report: BeforeReport | None = None
    """Called on the writer's thread with a copy of each exception report about to be
    written, and the exception: returns the report to write (amended or not) or None to drop
    it (counted as ``sentinel_reports_dropped_total{reason="before_report"}``). If it raises,
    returns something else or takes longer than ``before_report_time_budget_seconds``, the
    report is written unchanged and ``sentinel_internal_errors_total{component=
    "before_report"}`` counts it."""
    before_report_time_budget_seconds: float = 0.1
    """How long one report waits for ``before_report``; it runs on a helper thread, so a
    hook that hangs holds up no report (later ones are written unchanged meanwhile)."""
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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check(f'"{field.name}"', _RULES[field.name], value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        # The identity headers' own rules know the built-in secret names; these are the
        # ``scrub_keys`` the reports' scrubber adds to them.
        if self.scrub_keys:
            scrubber = Scrubber(self.scrub_keys)
            for name, becomes in _IDENTITY_HEADERS.items():
                header = getattr(self, name)
                if header is not None and scrubber.is_secret_key(header):
                    msg = f'"{name}" {_secret_header(becomes)}: {_shown(header)}'
                    raise ConfigError(msg)

    def replace(self, **changes: Unpack[ConfigOptions]) -> Config:
        """A copy with ``changes`` applied (validated like the original); a name that is no
        setting is a :class:`ConfigError` that suggests the closest one."""
        check_setting_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        service_fallback: str | None = None,
        **overrides: Unpack[ConfigOptions],
    ) -> Config:
        """Build a Config from the :data:`ENVIRONMENT` variables; keyword arguments win.

        ``environ`` defaults to ``os.environ`` read at call time (never at import time);
        ``service_fallback`` names the service when no variable does (the app's module).
        A variable that is empty or only blanks counts as unset, as in the OTel SDK; a
        variable a keyword overrides is not read. With traces on, the trace exporter
        variables are checked too. A keyword that is no setting is a :class:`ConfigError`
        that suggests the closest one.
        """
        check_setting_names(overrides)
        env = os.environ if environ is None else environ
        values = {field: value for field, (value, _) in _read(env, skip=overrides).items()}
        if service_fallback and "service" not in values:
            values["service"] = service_fallback
        values.update(overrides)
        config = cls(**values)
        if config.traces:
            trace_exporters(env)
        return config


class ConfigOptions(TypedDict, total=False):
    """:class:`Config`'s fields as keyword arguments, for ``**overrides`` (PEP 692): how
    ``instrument(app, location="fra")`` and ``app.add_middleware(SentinelMiddleware, ...)``
    are type-checked field by field. Kept equal to the fields by a test."""

    service: str
    version: str
    environment: str
    location: str
    location_header: str | None
    locations: tuple[str, ...]
    max_locations: int
    request_id_header: str | None
    tenant_header: str | None
    tenant: TenantOf | None
    tenant_time_budget_seconds: float
    max_tenants: int
    metrics_port: int
    metrics_host: str
    latency_buckets: tuple[float, ...]
    max_series: int
    traces: bool
    mutation_mode: str
    mutation_warmup_seconds: float
    mutation_allow: tuple[str, ...]
    log_format: str | None
    log_locals: bool
    locals_max_chars: int
    locals_time_budget_seconds: float
    fold_window_seconds: float
    fold_full_reports: int
    max_fingerprints: int
    max_report_bytes: int
    report_queue_size: int
    max_frames: int
    app_modules: tuple[str, ...]
    scrub_keys: tuple[str, ...]
    ignore_exceptions: tuple[type[BaseException] | str, ...]
    before_report: BeforeReport | None
    before_report_time_budget_seconds: float
    task_grace_seconds: float
    drop_warning_interval_seconds: float
    records_per_second: tuple[tuple[str, float], ...]
    sampling_window_seconds: float
    max_sampling_keys: int
    sampling_idle_seconds: float
    keep_header: str | None
    keep_slower_than_seconds: float | None
    max_buffered_spans: int
    max_spans_per_trace: int
    max_export_queue: int


SETTINGS: frozenset[str] = frozenset(field.name for field in dataclasses.fields(Config))
"""The names of :class:`Config`'s fields: every setting a keyword argument may give."""


def check_setting_names(names: Iterable[str], *, also: Collection[str] = ()) -> None:
    """A :class:`ConfigError` naming each of ``names`` that is no setting, with the closest
    setting as a suggestion (or the closest of ``also``, the caller's other keywords, such
    as the collaborators ``registry`` and ``sinks``); nothing when every name is one."""
    unknown = sorted(name for name in names if name not in SETTINGS)
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, [*SETTINGS, *also], n=1)
        parts.append(f'"{name}"' + (f' (did you mean "{close[0]}"?)' if close else ""))
    noun = "setting" if len(parts) == 1 else "settings"
    msg = f"unknown {noun} {', '.join(parts)}: the settings are the fields of sentinel.Config"
    raise ConfigError(msg)


class _Rule(NamedTuple):
    """What a field accepts."""

    requirement: str
    """What a valid value is, worded to follow the setting's name."""
    valid: Callable[[Any], bool]
    entries: bool = False
    """The field is a tuple (a list is taken too) and ``valid`` applies to each entry."""
    normalize: Callable[[Any], Any] | None = None
    """Applied to a valid value (header names are lower-cased)."""
    refusal: Callable[[Any], str | None] | None = None
    """For a value ``valid`` accepts: a requirement more specific than ``requirement`` that
    it fails (worded the same way), or None when it is accepted."""


def _check(setting: str, rule: _Rule, value: Any, shown: object = None) -> Any:
    """``value``, normalized, if ``rule`` accepts it; else ConfigError naming ``setting``.

    The error shows ``shown`` (the text a variable held) if given, else the value, or for a
    tuple the entry at fault.
    """
    if rule.entries:
        if not isinstance(value, tuple | list):
            msg = f"{setting} must be a tuple or list: {_shown(value)}"
            raise ConfigError(msg)
        for entry in value:
            requirement = _unmet(rule, entry)
            if requirement is not None:
                msg = f"{setting} entries {requirement}: {_shown(entry)}"
                raise ConfigError(msg)
        value = tuple(value)
    else:
        requirement = _unmet(rule, value)
        if requirement is not None:
            msg = f"{setting} {requirement}: {_shown(value if shown is None else shown)}"
            raise ConfigError(msg)
    return value if rule.normalize is None else rule.normalize(value)


def _unmet(rule: _Rule, value: Any) -> str | None:
    """The requirement of ``rule`` that ``value`` fails, or None."""
    if not rule.valid(value):
        return rule.requirement
    return None if rule.refusal is None else rule.refusal(value)


def _shown(value: object) -> str:
    """A bad value as an error message shows it: its repr, scrubbed. A variable the error
    quotes can hold a secret beside the mistake (``OTEL_RESOURCE_ATTRIBUTES`` with a
    repository URL and its credentials), and the message is printed, logged, reported."""
    try:
        text = repr(value)
    except Exception as error:
        return f"<repr() failed: {type(error).__name__}>"
    return _error_scrubber().text(text, limit=_MAX_SHOWN_CHARS)


_MAX_SHOWN_CHARS = 2048


@functools.cache
def _error_scrubber() -> Scrubber:
    # Made on the first bad value (or tenant header), not at import. Config errors come
    # before any sentinel (and its scrub_keys) exists: the default secret names apply.
    return Scrubber()


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float; not a bool, which Python counts as an int."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_integer(value)


def _integer(low: int, high: int | None = None) -> _Rule:
    if high is None:
        return _Rule(f"must be an integer >= {low}", lambda v: _is_integer(v) and v >= low)
    return _Rule(
        f"must be an integer between {low} and {high}",
        lambda v: _is_integer(v) and low <= v <= high,
    )


def _seconds(*, positive: bool = False, optional: bool = False) -> _Rule:
    def valid(value: Any) -> bool:
        if value is None:
            return optional
        return _is_number(value) and (value > 0 if positive else value >= 0)

    return _Rule(f"must be a number of seconds {'> 0' if positive else '>= 0'}", valid)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != "" and value.isprintable()


def _is_header(value: object) -> bool:
    return value is None or (isinstance(value, str) and _HEADER_RE.fullmatch(value) is not None)


def _is_bind_address(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_IDENTITY_HEADERS = {
    "location_header": (
        "the location label of metrics, records and spans, unmasked; use a header that "
        "carries the location"
    ),
    "request_id_header": (
        "the request_id of records, reports and spans, unmasked; use a header that carries "
        "a request id"
    ),
    "tenant_header": (
        "the tenant label of metrics, records and spans, unmasked; use a header that "
        'carries the customer id, or a "tenant" callable that maps the credential to a '
        "customer id"
    ),
}
"""The headers whose values sentinel exports as they are, and what each value becomes."""


def _secret_header(becomes: str) -> str:
    return (
        f"must not name a header the scrubber masks as a credential (its value would be {becomes})"
    )


def _secret_header_refusal(name: str) -> Callable[[str | None], str | None]:
    becomes = _IDENTITY_HEADERS[name]

    def refusal(value: str | None) -> str | None:
        # The rule the reports' scrubber applies to header names (without ``scrub_keys``,
        # which Config checks once it has them).
        if value is not None and _error_scrubber().is_secret_key(value):
            return _secret_header(becomes)
        return None

    return refusal


def _is_async_callable(value: object) -> bool:
    """Whether calling ``value`` gives a coroutine or an async generator: an ``async def``
    function or method, an object whose ``__call__`` is one, or a ``functools.partial`` of
    either."""
    while isinstance(value, functools.partial):
        value = value.func
    if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
        return True
    if isinstance(value, type):
        return False  # calling a class makes an instance
    call = getattr(type(value), "__call__", None)  # noqa: B004 -- the method, not callable()
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _tenant_refusal(value: object) -> str | None:
    if value is not None and _is_async_callable(value):
        return (
            "must be a synchronous callable taking the ASGI scope (it is called at the "
            "request's start, where nothing awaits it: write it with def, not async def)"
        )
    return None


def _is_module(value: object) -> bool:
    return isinstance(value, str) and all(part.isidentifier() for part in value.split("."))


def _is_exception_reference(value: object) -> bool:
    if isinstance(value, type):
        return issubclass(value, BaseException)
    return isinstance(value, str) and value != "" and _is_module(value)


def _are_buckets(value: object) -> bool:
    if not isinstance(value, tuple | list) or not value:
        return False
    if not all(_is_number(bucket) and bucket > 0 for bucket in value):
        return False
    return all(low < high for low, high in itertools.pairwise(value))


def _record_targets(value: Any) -> tuple[tuple[str, float], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple((status_class, rate) for status_class, rate in pairs)


def _are_record_targets(value: object) -> bool:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    if not isinstance(value, tuple | list):
        return False
    if not all(isinstance(pair, tuple | list) and len(pair) == 2 for pair in value):
        return False
    classes = [status_class for status_class, _ in value]
    if not all(isinstance(status_class, str) for status_class in classes):
        return False
    return sorted(classes) == sorted(STATUS_CLASSES) and all(
        _is_number(rate) and rate > 0 for _, rate in value
    )


_NAME = _Rule(
    "must be 1 to 128 printable characters",
    lambda v: _is_text(v) and len(v) <= 128,
)
_LOCATION = _Rule(
    "must be 1 to 63 letters, digits or _.:- starting with a letter or digit",
    lambda v: isinstance(v, str) and is_valid_location(v),
    refusal=lambda v: (
        f"must not be {OTHER_LOCATION!r}, where the values beyond the bound go"
        if v == OTHER_LOCATION
        else None
    ),
)
_HEADER = _Rule(
    "must be an HTTP header name",
    _is_header,
    normalize=lambda v: v if v is None else v.lower(),
)
_SWITCH = _Rule("must be True or False", lambda v: isinstance(v, bool))
_PATTERN = _Rule(
    "must be printable and without spaces",
    lambda v: _is_text(v) and " " not in v,
    entries=True,
)
_RULES: dict[str, _Rule] = {
    "service": _NAME,
    "version": _NAME,
    "environment": _NAME,
    "location": _LOCATION,
    "location_header": _HEADER._replace(refusal=_secret_header_refusal("location_header")),
    "locations": _LOCATION._replace(entries=True),
    "max_locations": _integer(1),
    "request_id_header": _HEADER._replace(refusal=_secret_header_refusal("request_id_header")),
    "tenant_header": _HEADER._replace(refusal=_secret_header_refusal("tenant_header")),
    "tenant": _Rule(
        "must be a synchronous callable taking the ASGI scope, or None",
        lambda v: v is None or callable(v),
        refusal=_tenant_refusal,
    ),
    "tenant_time_budget_seconds": _seconds(positive=True),
    "max_tenants": _integer(1, MAX_MAX_TENANTS),
    "metrics_port": _integer(0, 65535),
    "metrics_host": _Rule("must be an IP address or localhost", _is_bind_address),
    "max_series": _integer(1),
    "latency_buckets": _Rule("must be increasing positive seconds", _are_buckets, normalize=tuple),
    "traces": _SWITCH,
    # Words from a fixed set are taken in any case, as from a variable, and kept lower-case.
    "mutation_mode": _Rule(
        f"must be one of {', '.join(MUTATION_MODES)}",
        lambda v: isinstance(v, str) and v.lower() in MUTATION_MODES,
        normalize=str.lower,
    ),
    "mutation_warmup_seconds": _seconds(),
    "mutation_allow": _PATTERN,
    "log_format": _Rule(
        f"must be one of {', '.join(LOG_FORMATS)}",
        lambda v: v is None or (isinstance(v, str) and v.lower() in LOG_FORMATS),
        normalize=lambda v: v if v is None else v.lower(),
    ),
    "log_locals": _SWITCH,
    "locals_max_chars": _integer(1),
    "locals_time_budget_seconds": _seconds(),
    "fold_window_seconds": _seconds(),
    "fold_full_reports": _integer(1),
    "max_fingerprints": _integer(1),
    "max_report_bytes": _integer(4096),
    "report_queue_size": _integer(1),
    "max_frames": _integer(1),
    "app_modules": _Rule(
        "must be module names such as mypkg or mypkg.api", _is_module, entries=True
    ),
    "scrub_keys": _Rule("must be printable text", _is_text, entries=True),
    "ignore_exceptions": _Rule(
        "must be exception classes or dotted names such as mypkg.errors.Expected",
        _is_exception_reference,
        entries=True,
    ),
    "before_report": _Rule(
        "must be a callable taking (report, exception), or None",
        lambda v: v is None or callable(v),
    ),
    "before_report_time_budget_seconds": _seconds(positive=True),
    "task_grace_seconds": _seconds(),
    "drop_warning_interval_seconds": _seconds(),
    "records_per_second": _Rule(
        f"must give a positive rate for each of {', '.join(STATUS_CLASSES)}",
        _are_record_targets,
        normalize=_record_targets,
    ),
    "sampling_window_seconds": _seconds(positive=True),
    "max_sampling_keys": _integer(1),
    "sampling_idle_seconds": _seconds(positive=True),
    "keep_header": _HEADER,
    "keep_slower_than_seconds": _seconds(positive=True, optional=True),
    "max_buffered_spans": _integer(1),
    "max_spans_per_trace": _integer(1),
    "max_export_queue": _integer(1),
}


def unmet_requirement(setting: str, value: object) -> str | None:
    """What ``value`` must be to be accepted as ``setting`` (its rule's requirement, "must
    be ..."), or None when it is: how another part of sentinel (the gate) takes exactly the
    values sentinel itself reports."""
    return _unmet(_RULES[setting], value)


class _Unparsable(Exception):
    """A variable's text is not a value of its kind; ``requirement`` replaces the field's."""

    def __init__(self, requirement: str | None = None) -> None:
        super().__init__(requirement)
        self.requirement = requirement


def _integer_text(text: str) -> int:
    if _INTEGER_RE.fullmatch(text) is None:
        raise _Unparsable
    try:
        return int(text)
    except ValueError:  # more digits than int() converts
        raise _Unparsable from None


def _number_text(text: str) -> float:
    if _NUMBER_RE.fullmatch(text) is None:
        raise _Unparsable
    return float(text)  # "1e999" is inf, which the field's rule refuses


def _switch_text(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise _Unparsable("must be one of 1/0, true/false, yes/no, on/off")


def _list_text(text: str) -> tuple[str, ...]:
    entries = tuple(part.strip(_SPACE) for part in text.split(","))
    if not any(entries):
        raise _Unparsable("must be a comma-separated list")
    return tuple(entry for entry in entries if entry)


def _resource_text(text: str) -> dict[str, str]:
    # The OTel SDK's format: comma-separated key=value pairs, values percent-encoded.
    attributes: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip(_SPACE):
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip(_SPACE):
            raise _Unparsable("must be comma-separated key=value pairs")
        attributes[key.strip(_SPACE)] = unquote(value.strip(_SPACE))
    return attributes


_OTLP_NAMES = {"otlp": None, "otlp_proto_grpc": "grpc", "otlp_proto_http": "http/protobuf"}
"""OTEL_TRACES_EXPORTER's OTLP names (the last two are the Python SDK's), and their protocol
when the name fixes it."""
_EXPORTER_HINTS = {
    "zipkin": "sentinel has no Zipkin exporter; send otlp to an OpenTelemetry Collector "
    "and use its zipkin exporter",
    "jaeger": "Jaeger receives OTLP itself; use otlp",
    "logging": "console is what logging was renamed to",
}


def _exporter_text(text: str) -> tuple[str, ...]:
    """OTEL_TRACES_EXPORTER's exporter names, lower-cased, each once; () for none."""
    names = tuple(dict.fromkeys(part.strip(_SPACE).lower() for part in text.split(",")))
    if names == ("none",):
        return ()
    for name in names:
        if name != "console" and name not in _OTLP_NAMES:
            hints = [hint for prefix, hint in _EXPORTER_HINTS.items() if name.startswith(prefix)]
            requirement = "must be otlp, console, both (otlp,console) or none"
            raise _Unparsable(f"{requirement} ({hints[0]})" if hints else requirement)
    return names


_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Variable:
    """An environment variable :meth:`Config.from_env` reads, and the field it sets."""

    name: str
    field: str
    parse: Callable[[str], Any]
    """From the variable's text (surrounding whitespace stripped) to a value for the field;
    raises :class:`_Unparsable`."""
    key: str | None = None
    """For a variable of key=value pairs: the key whose value the field takes."""

    @property
    def label(self) -> str:
        """How messages name this source: the variable, or the key in it."""
        return self.name if self.key is None else f"{self.key} in {self.name}"

    def read(self, environ: Mapping[str, str]) -> Any:
        """The field's value in ``environ``, checked, or ``_UNSET``; ConfigError names it."""
        raw = environ.get(self.name, "")
        if not raw.strip(_SPACE):
            return _UNSET  # an empty (or blank) variable is an unset one (the OTel rule)
        rule = _RULES[self.field]
        try:
            value = self.parse(raw.strip(_SPACE))
        except _Unparsable as error:
            msg = f"{self.name} {error.requirement or rule.requirement}: {_shown(raw)}"
            raise ConfigError(msg) from None
        if value is _UNSET:
            return _UNSET  # a value that sets nothing (OTEL_SDK_DISABLED=false)
        if self.key is None:
            return _check(self.name, rule, value, shown=raw)
        if self.key not in value:
            return _UNSET
        return _check(self.label, rule, value[self.key], shown=value[self.key])


def _sdk_disabled_text(text: str) -> Any:
    """OTEL_SDK_DISABLED: ``true`` (any case) turns traces off; any other value is false,
    as the OTel SDK reads it, and leaves the field to the next variable."""
    return False if text.lower() == "true" else _UNSET


def _endpoint_text(text: str) -> bool:
    """True (traces on) for an endpoint the OTLP exporter can be given."""
    if not text or not text.isprintable() or " " in text:
        raise _Unparsable("must be a URL such as http://collector:4318")
    return True


ENVIRONMENT: tuple[Variable, ...] = (
    Variable("SENTINEL_SERVICE", "service", str),
    Variable("OTEL_SERVICE_NAME", "service", str),
    Variable("OTEL_RESOURCE_ATTRIBUTES", "service", _resource_text, key="service.name"),
    Variable("SENTINEL_VERSION", "version", str),
    Variable("OTEL_RESOURCE_ATTRIBUTES", "version", _resource_text, key="service.version"),
    Variable("SENTINEL_ENVIRONMENT", "environment", str),
    # The semantic conventions' name since 1.27, before the older one it replaces.
    Variable(
        "OTEL_RESOURCE_ATTRIBUTES",
        "environment",
        _resource_text,
        key="deployment.environment.name",
    ),
    Variable(
        "OTEL_RESOURCE_ATTRIBUTES",
        "environment",
        _resource_text,
        key="deployment.environment",
    ),
    Variable("SENTINEL_LOCATION", "location", str),
    Variable("SENTINEL_LOCATION_HEADER", "location_header", str),
    Variable("SENTINEL_LOCATIONS", "locations", _list_text),
    Variable("SENTINEL_REQUEST_ID_HEADER", "request_id_header", str),
    Variable("SENTINEL_TENANT_HEADER", "tenant_header", str),
    Variable("SENTINEL_MAX_TENANTS", "max_tenants", _integer_text),
    Variable("SENTINEL_MAX_SERIES", "max_series", _integer_text),
    Variable("SENTINEL_METRICS_PORT", "metrics_port", _integer_text),
    Variable("SENTINEL_METRICS_HOST", "metrics_host", str),
    # The whole SDK switched off: no traces, whatever exporter or endpoint is named.
    Variable("OTEL_SDK_DISABLED", "traces", _sdk_disabled_text),
    Variable("OTEL_TRACES_EXPORTER", "traces", lambda text: bool(_exporter_text(text))),
    Variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "traces", _endpoint_text),
    Variable("OTEL_EXPORTER_OTLP_ENDPOINT", "traces", _endpoint_text),
    Variable("SENTINEL_MUTATION_MODE", "mutation_mode", str.lower),
    Variable("SENTINEL_MUTATION_WARMUP_SECONDS", "mutation_warmup_seconds", _number_text),
    Variable("SENTINEL_MUTATION_ALLOW", "mutation_allow", _list_text),
    Variable("SENTINEL_LOG_FORMAT", "log_format", str.lower),
    Variable("SENTINEL_LOG_LOCALS", "log_locals", _switch_text),
    Variable("SENTINEL_IGNORE_EXCEPTIONS", "ignore_exceptions", _list_text),
    Variable("SENTINEL_KEEP_HEADER", "keep_header", str),
    Variable("SENTINEL_KEEP_SLOWER_THAN_SECONDS", "keep_slower_than_seconds", _number_text),
)
"""Every variable :meth:`Config.from_env` reads; of several for one field, the first set
wins (``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn traces off
whatever endpoint is set)."""


def _read(environ: Mapping[str, str], skip: Container[str] = ()) -> dict[str, tuple[Any, Variable]]:
    """Each field set in ``environ`` (but those in ``skip``): its value and its variable."""
    found: dict[str, tuple[Any, Variable]] = {}
    for variable in ENVIRONMENT:
        if variable.field in found or variable.field in skip:
            continue
        value = variable.read(environ)
        if value is not _UNSET:
            found[variable.field] = (value, variable)
    return found


def value_sources(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where :meth:`Config.from_env` takes each field from: field name to variable.

    Fields left at their default are absent. ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    return {field: variable.label for field, (_, variable) in _read(env).items()}


def traces_configured(environ: Mapping[str, str]) -> bool:
    """Whether the OTel variables ask for traces (an exporter or an OTLP endpoint is set)."""
    for variable in ENVIRONMENT:
        if variable.field == "traces":
            value = variable.read(environ)
            if value is not _UNSET:
                return bool(value)
    return False


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol of traces: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf`` (the OTel default)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = environ.get(name, "")
        if not raw.strip(_SPACE):
            continue
        protocol = raw.strip(_SPACE).lower()
        if protocol in OTLP_PROTOCOLS:
            return protocol
        hint = " (the Python OTLP exporters have no http/json)" if protocol == "http/json" else ""
        msg = f"{name} must be grpc or http/protobuf{hint}: {_shown(raw)}"
        raise ConfigError(msg)
    return "http/protobuf"


def trace_exporters(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` asks for, each once: ``"console"``, and
    OTLP named by its protocol (``"grpc"``, ``"http/protobuf"``).

    OTLP when the variable is unset; () for ``none``. ConfigError for a value sentinel
    cannot export to (``zipkin``, ``jaeger``, unknown names) or an unknown OTLP protocol.
    """
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    try:
        names = _exporter_text(raw.strip(_SPACE)) if raw.strip(_SPACE) else ("otlp",)
    except _Unparsable as error:
        msg = f"OTEL_TRACES_EXPORTER {error.requirement}: {_shown(raw)}"
        raise ConfigError(msg) from None
    kinds = [
        "console" if name == "console" else _OTLP_NAMES[name] or otlp_protocol(environ)
        for name in names
    ]
    return tuple(dict.fromkeys(kinds))
