"""Config: keyword arguments, the environment, and errors that show the bad value."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import pytest

from sentinel import Config, ConfigError


def test_defaults_are_usable_without_any_environment() -> None:
    """A Config built from an empty environment has the documented defaults."""
    config = Config.from_env({})
    assert config.service == "unknown_service"
    assert config.location == "unknown"
    assert config.metrics_port == 9464
    assert config.mutation_mode == "report"
    assert config.log_locals is False
    assert config.fold_window_seconds == 60.0
    assert config.fold_full_reports == 10
    assert config.max_report_bytes == 65536


def test_sentinel_variables_are_read() -> None:
    """Every fixed SENTINEL_* variable reaches its field."""
    config = Config.from_env(
        {
            "SENTINEL_SERVICE": "kv",
            "SENTINEL_LOCATION": "fra",
            "SENTINEL_LOCATION_HEADER": "X-Edge-Location",
            "SENTINEL_LOCATIONS": "fra, iad ,,sin",
            "SENTINEL_METRICS_PORT": "0",
            "SENTINEL_MUTATION_MODE": "ISOLATE",
            "SENTINEL_LOG_LOCALS": "yes",
            "SENTINEL_MUTATION_WARMUP_SECONDS": "30",
            "SENTINEL_MUTATION_ALLOW": "os.environ:CACHE_*, random.seed,",
        }
    )
    assert config.service == "kv"
    assert config.location == "fra"
    assert config.location_header == "x-edge-location"
    assert config.locations == ("fra", "iad", "sin")
    assert config.metrics_port == 0
    assert config.mutation_mode == "isolate"
    assert config.log_locals is True
    assert config.mutation_warmup_seconds == 30.0
    assert config.mutation_allow == ("os.environ:CACHE_*", "random.seed")


def test_service_falls_back_through_otel_variables() -> None:
    """SENTINEL_SERVICE, then OTEL_SERVICE_NAME, then service.name, then the fallback."""
    assert Config.from_env({"OTEL_SERVICE_NAME": "otel-name"}).service == "otel-name"
    resource = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=res%20name,service.version=1.2.3"}
    from_resource = Config.from_env(resource)
    assert from_resource.service == "res name"
    assert from_resource.version == "1.2.3"
    both = {"SENTINEL_SERVICE": "mine", "OTEL_SERVICE_NAME": "theirs"}
    assert Config.from_env(both).service == "mine"
    assert Config.from_env({}, service_fallback="mypkg.app").service == "mypkg.app"


def test_log_format_is_json_or_console_and_unset_by_default() -> None:
    """SENTINEL_LOG_FORMAT takes json or console (any case); unset, the format is None,
    which leaves the choice to the stream (console on a terminal, else JSON)."""
    assert Config().log_format is None
    assert Config.from_env({}).log_format is None
    assert Config.from_env({"SENTINEL_LOG_FORMAT": ""}).log_format is None
    assert Config.from_env({"SENTINEL_LOG_FORMAT": " Console "}).log_format == "console"
    assert Config.from_env({"SENTINEL_LOG_FORMAT": "JSON"}).log_format == "json"
    assert Config(log_format="console").log_format == "console"
    assert Config.from_env({"SENTINEL_LOG_FORMAT": "json"}, log_format="console").log_format == (
        "console"
    )


def test_keyword_arguments_win_over_the_environment() -> None:
    """Explicit arguments override variables."""
    config = Config.from_env({"SENTINEL_LOCATION": "fra"}, location="iad")
    assert config.location == "iad"


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"SENTINEL_METRICS_PORT": "http"}, "'http'"),
        ({"SENTINEL_METRICS_PORT": "70000"}, "70000"),
        ({"SENTINEL_MUTATION_MODE": "yolo"}, "'yolo'"),
        ({"SENTINEL_LOG_LOCALS": "maybe"}, "'maybe'"),
        ({"SENTINEL_MUTATION_WARMUP_SECONDS": "soon"}, "'soon'"),
        ({"SENTINEL_MUTATION_WARMUP_SECONDS": "-1"}, "'-1'"),
        ({"SENTINEL_LOCATION": "eu west"}, "'eu west'"),
        ({"SENTINEL_LOCATIONS": "fra,x\u0000y"}, "'x\\x00y'"),
        ({"SENTINEL_LOCATION_HEADER": "bad header"}, "'bad header'"),
    ],
)
def test_invalid_values_name_the_setting_and_show_the_value(
    env: dict[str, str], shown: str
) -> None:
    """Every validation error shows the offending value."""
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    assert shown in str(error.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_locations", 0),
        ("fold_full_reports", 0),
        ("max_fingerprints", 0),
        ("report_queue_size", 0),
        ("max_report_bytes", 100),
        ("fold_window_seconds", -1.0),
        ("service", ""),
    ],
)
def test_invalid_keyword_arguments(field: str, value: object) -> None:
    """Keyword arguments are validated like variables, with the field name in the message."""
    with pytest.raises(ConfigError, match=f'"{field}"'):
        Config(**{field: value})  # type: ignore[arg-type]


def test_config_is_frozen_and_replace_validates() -> None:
    """Config cannot be mutated; replace() returns a validated copy."""
    config = Config()
    with pytest.raises(AttributeError):
        config.location = "x"  # type: ignore[misc]
    assert config.replace(location="sin").location == "sin"
    with pytest.raises(ConfigError):
        config.replace(max_locations=-1)


@pytest.mark.parametrize(
    ("variable", "raw", "requirement"),
    [
        ("SENTINEL_METRICS_PORT", "nan", "must be an integer between 0 and 65535"),
        ("SENTINEL_METRICS_PORT", "inf", "must be an integer between 0 and 65535"),
        ("SENTINEL_METRICS_PORT", "\u0669\u0664\u0666\u0664", "must be an integer between"),
        ("SENTINEL_METRICS_PORT", "\uff19\uff14\uff16\uff14", "must be an integer between"),
        ("SENTINEL_METRICS_PORT", "9_464", "must be an integer between 0 and 65535"),
        ("SENTINEL_METRICS_PORT", "9464.0", "must be an integer between 0 and 65535"),
        ("SENTINEL_METRICS_PORT", "\u00a09464", "must be an integer between 0 and 65535"),
        ("SENTINEL_METRICS_PORT", "-1", "must be an integer between 0 and 65535"),
        ("SENTINEL_MUTATION_WARMUP_SECONDS", "nan", "must be a number of seconds >= 0"),
        ("SENTINEL_MUTATION_WARMUP_SECONDS", "inf", "must be a number of seconds >= 0"),
        ("SENTINEL_MUTATION_WARMUP_SECONDS", "-inf", "must be a number of seconds >= 0"),
        ("SENTINEL_MUTATION_WARMUP_SECONDS", "1e999", "must be a number of seconds >= 0"),
        ("SENTINEL_MUTATION_WARMUP_SECONDS", "\u0663\u0660", "must be a number of seconds"),
        ("SENTINEL_KEEP_SLOWER_THAN_SECONDS", "NaN", "must be a number of seconds > 0"),
        ("SENTINEL_KEEP_SLOWER_THAN_SECONDS", "Infinity", "must be a number of seconds > 0"),
        ("SENTINEL_KEEP_SLOWER_THAN_SECONDS", "\uff10.5", "must be a number of seconds > 0"),
        ("SENTINEL_KEEP_SLOWER_THAN_SECONDS", "0", "must be a number of seconds > 0"),
    ],
)
def test_numbers_from_the_environment_are_ascii_and_finite(
    variable: str, raw: str, requirement: str
) -> None:
    """Only ASCII digits make a number; nan and inf are refused. The message names the
    variable (not the field) and shows its text as given, in one printable sentence."""
    with pytest.raises(ConfigError) as error:
        Config.from_env({variable: raw})
    message = str(error.value)
    assert message.startswith(f"{variable} {requirement}")
    assert message.endswith(f": {raw!r}")
    assert "\n" not in message


def test_the_port_error_reads_as_one_sentence() -> None:
    """The exact wording printed at startup for a bad port."""
    with pytest.raises(ConfigError) as error:
        Config.from_env({"SENTINEL_METRICS_PORT": "nan"})
    assert str(error.value) == "SENTINEL_METRICS_PORT must be an integer between 0 and 65535: 'nan'"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SENTINEL_METRICS_PORT": "70000"},
            "SENTINEL_METRICS_PORT must be an integer between 0 and 65535: '70000'",
        ),
        (
            {"SENTINEL_LOCATION": "eu west"},
            "SENTINEL_LOCATION must be 1 to 63 letters, digits or _.:- "
            "starting with a letter or digit: 'eu west'",
        ),
        ({"SENTINEL_LOCATIONS": "fra,bad loc"}, "SENTINEL_LOCATIONS entries must be 1 to 63"),
        ({"SENTINEL_LOCATIONS": " , "}, "SENTINEL_LOCATIONS must be a comma-separated list"),
        ({"SENTINEL_LOCATION_HEADER": "x loc"}, "SENTINEL_LOCATION_HEADER must be an HTTP"),
        ({"SENTINEL_KEEP_HEADER": "x:keep"}, "SENTINEL_KEEP_HEADER must be an HTTP header"),
        ({"SENTINEL_MUTATION_MODE": "yolo"}, "SENTINEL_MUTATION_MODE must be one of report"),
        (
            {"SENTINEL_LOG_FORMAT": "pretty"},
            "SENTINEL_LOG_FORMAT must be one of json, console: 'pretty'",
        ),
        (
            {"SENTINEL_LOG_FORMAT": "auto"},
            "SENTINEL_LOG_FORMAT must be one of json, console: 'auto'",
        ),
        ({"SENTINEL_SERVICE": "shop\x1b[31m"}, "SENTINEL_SERVICE must be 1 to 128 printable"),
        ({"OTEL_SERVICE_NAME": "a" * 129}, "OTEL_SERVICE_NAME must be 1 to 128 printable"),
        ({"SENTINEL_VERSION": "1.2\n3"}, "SENTINEL_VERSION must be 1 to 128 printable"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.version=1%0A2"},
            "service.version in OTEL_RESOURCE_ATTRIBUTES must be 1 to 128 printable "
            "characters: '1\\n2'",
        ),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name"},
            "OTEL_RESOURCE_ATTRIBUTES must be comma-separated key=value pairs: 'service.name'",
        ),
        (
            {"SENTINEL_MUTATION_ALLOW": "os.environ:A B"},
            "SENTINEL_MUTATION_ALLOW entries must be printable and without spaces: "
            "'os.environ:A B'",
        ),
    ],
)
def test_variables_are_checked_and_named_in_the_error(env: dict[str, str], message: str) -> None:
    """Control characters and malformed lists are refused, and the error names the variable
    the value came from (a value of blanks only is an unset variable: see
    test_variables_of_blanks_count_as_unset)."""
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "host",
    ["lots", "example.com", "127.0.0.1:9464", "256.0.0.1", "\u0661\u0662\u0667.0.0.1", "*"],
)
def test_metrics_host_must_be_an_address(host: str) -> None:
    """A name other than localhost is refused (most likely a typo), from both sources."""
    with pytest.raises(ConfigError) as from_env:
        Config.from_env({"SENTINEL_METRICS_HOST": host})
    assert str(from_env.value) == (
        f"SENTINEL_METRICS_HOST must be an IP address or localhost: {host!r}"
    )
    with pytest.raises(ConfigError, match=r'^"metrics_host" must be an IP address'):
        Config(metrics_host=host)


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("::", "::"),
        ("localhost", "localhost"),
        (" 127.0.0.1\n", "127.0.0.1"),
    ],
)
def test_metrics_host_takes_ip_literals_and_localhost(raw: str, host: str) -> None:
    """IPv4 and IPv6 literals and localhost are accepted, surrounding whitespace stripped."""
    assert Config.from_env({"SENTINEL_METRICS_HOST": raw}).metrics_host == host


def test_good_values_are_still_accepted() -> None:
    """ASCII numbers with surrounding whitespace, signs and decimals parse as before."""
    config = Config.from_env(
        {
            "SENTINEL_METRICS_PORT": " 9464 ",
            "SENTINEL_MUTATION_WARMUP_SECONDS": "+1.5e1",
            "SENTINEL_KEEP_SLOWER_THAN_SECONDS": ".25",
            "SENTINEL_LOG_LOCALS": "OFF",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=shop,,deployment.environment=prod,",
        }
    )
    assert config.metrics_port == 9464
    assert config.mutation_warmup_seconds == 15.0
    assert config.keep_slower_than_seconds == 0.25
    assert config.log_locals is False
    assert config.service == "shop"


def test_empty_variables_count_as_unset() -> None:
    """An empty variable is an unset one, as the OTel SDK defines it: the default applies."""
    empty = {
        "SENTINEL_METRICS_PORT": "",
        "SENTINEL_SERVICE": "",
        "SENTINEL_LOCATION": "",
        "SENTINEL_LOG_LOCALS": "",
        "OTEL_TRACES_EXPORTER": "",
    }
    assert Config.from_env(empty) == Config()


def test_a_variable_a_keyword_overrides_is_not_read() -> None:
    """Keyword arguments win, so a bad variable they replace does not stop the process."""
    config = Config.from_env({"SENTINEL_METRICS_PORT": "lots"}, metrics_port=0)
    assert config.metrics_port == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("metrics_port", True, '"metrics_port" must be an integer between 0 and 65535: True'),
        ("metrics_port", 9464.0, '"metrics_port" must be an integer between 0 and 65535: 9464.0'),
        ("max_locations", False, '"max_locations" must be an integer >= 1: False'),
        ("max_frames", "64", "\"max_frames\" must be an integer >= 1: '64'"),
        ("fold_window_seconds", math.nan, '"fold_window_seconds" must be a number of seconds'),
        ("task_grace_seconds", math.inf, '"task_grace_seconds" must be a number of seconds'),
        ("sampling_window_seconds", True, '"sampling_window_seconds" must be a number of'),
        ("keep_slower_than_seconds", math.nan, '"keep_slower_than_seconds" must be a number'),
        ("mutation_warmup_seconds", -math.inf, '"mutation_warmup_seconds" must be a number'),
        ("latency_buckets", (0.1, math.inf), '"latency_buckets" must be increasing positive'),
        ("latency_buckets", (0.5, 0.1), '"latency_buckets" must be increasing positive'),
        (
            "records_per_second",
            (("5xx", math.nan), ("4xx", 5.0), ("3xx", 2.0), ("2xx", 2.0)),
            '"records_per_second" must give a positive rate',
        ),
        ("log_locals", "no", "\"log_locals\" must be True or False: 'no'"),
        ("log_format", "yaml", "\"log_format\" must be one of json, console: 'yaml'"),
        ("log_format", "", "\"log_format\" must be one of json, console: ''"),
        ("traces", 1, '"traces" must be True or False: 1'),
        ("locations", "fra", "\"locations\" must be a tuple or list: 'fra'"),
        ("location", "fra\n", '"location" must be 1 to 63 letters'),
        ("location_header", "x-location\n", '"location_header" must be an HTTP header name'),
        ("version", "", "\"version\" must be 1 to 128 printable characters: ''"),
        ("scrub_keys", ("",), "\"scrub_keys\" entries must be printable text: ''"),
        ("app_modules", ("my pkg",), '"app_modules" entries must be module names'),
        (
            "ignore_exceptions",
            (int,),
            '"ignore_exceptions" entries must be exception classes or dotted names such as '
            "mypkg.errors.Expected: <class 'int'>",
        ),
        ("ignore_exceptions", ("my errors.X",), '"ignore_exceptions" entries must be'),
        ("ignore_exceptions", ("",), '"ignore_exceptions" entries must be exception classes'),
        ("ignore_exceptions", "ValueError", '"ignore_exceptions" must be a tuple or list'),
        ("before_report", "drop", '"before_report" must be a callable taking (report, excep'),
        ("before_report_time_budget_seconds", 0, '"before_report_time_budget_seconds" must be'),
    ],
)
def test_keyword_arguments_are_strictly_typed(field: str, value: object, message: str) -> None:
    """A bool or float is no integer, nan and inf are no seconds, a string is no switch or
    tuple; the message names the keyword and shows the value."""
    with pytest.raises(ConfigError) as error:
        Config(**{field: value})  # type: ignore[arg-type]
    assert str(error.value).startswith(message)


def test_lists_and_mappings_are_stored_as_tuples() -> None:
    """A list (or a mapping of rates) is accepted and stored as a tuple, so Config hashes."""
    config = Config(
        locations=["fra", "iad"],  # type: ignore[arg-type]
        latency_buckets=[0.1, 1],  # type: ignore[arg-type]
        records_per_second={"5xx": 1.0, "4xx": 1.0, "3xx": 1.0, "2xx": 1},  # type: ignore[arg-type]
    )
    assert config.locations == ("fra", "iad")
    assert config.latency_buckets == (0.1, 1)
    assert config.records_per_second == (("5xx", 1.0), ("4xx", 1.0), ("3xx", 1.0), ("2xx", 1))
    assert isinstance(hash(config), int)  # a list left in a field would raise TypeError


@pytest.mark.parametrize(
    ("exporter", "shown"),
    [
        ("zipkin", "send otlp to an OpenTelemetry Collector and use its zipkin exporter"),
        ("otlp,zipkin", "zipkin exporter"),
        ("jaeger", "Jaeger receives OTLP itself; use otlp"),
        ("logging", "console is what logging was renamed to"),
        ("prometheus", "must be otlp, console, both (otlp,console) or none"),
        ("otlp,none", "must be otlp, console, both (otlp,console) or none"),
        ("otlp,", "must be otlp, console, both (otlp,console) or none"),
    ],
)
def test_trace_exporters_sentinel_cannot_use_are_refused(exporter: str, shown: str) -> None:
    """OTEL_TRACES_EXPORTER values other than otlp, console and none are refused (they
    exported OTLP silently before), with what to use instead."""
    with pytest.raises(ConfigError) as error:
        Config.from_env({"OTEL_TRACES_EXPORTER": exporter})
    message = str(error.value)
    assert message.startswith("OTEL_TRACES_EXPORTER must be otlp, console")
    assert shown in message
    assert message.endswith(f": {exporter!r}")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf "
            "(the Python OTLP exporters have no http/json): 'http/json'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf: 'udp'",
        ),
    ],
)
def test_unknown_otlp_protocols_are_refused_when_traces_are_on(
    env: dict[str, str], message: str
) -> None:
    """The OTLP protocol variables are checked once traces are on (they fell back to
    HTTP silently before); with traces off they are not sentinel's business."""
    with pytest.raises(ConfigError) as error:
        Config.from_env({"OTEL_TRACES_EXPORTER": "otlp", **env})
    assert str(error.value) == message
    assert Config.from_env(env).traces is False


def test_supported_trace_exporters_turn_traces_on() -> None:
    """otlp, console and both (in any case) turn traces on; none turns them off."""
    from sentinel._config import trace_exporters

    for value in ("otlp", "console", "otlp,console", " OTLP , Console "):
        assert Config.from_env({"OTEL_TRACES_EXPORTER": value}).traces is True
    assert Config.from_env({"OTEL_TRACES_EXPORTER": "none"}).traces is False
    assert trace_exporters({"OTEL_TRACES_EXPORTER": "console,otlp,console"}) == (
        "console",
        "http/protobuf",
    )
    grpc = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "GRPC"}
    assert trace_exporters(grpc) == ("grpc",)
    assert trace_exporters({"OTEL_TRACES_EXPORTER": "otlp_proto_grpc"}) == ("grpc",)
    assert trace_exporters({}) == ("http/protobuf",)
    assert trace_exporters({"OTEL_TRACES_EXPORTER": "none"}) == ()


def test_sources_say_which_variable_set_each_field() -> None:
    """One table maps variables to fields; value_sources says where each value came from."""
    from sentinel._config import ENVIRONMENT, value_sources

    env = {
        "OTEL_SERVICE_NAME": "shop",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,service.version=2.0",
        "SENTINEL_METRICS_PORT": "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
    }
    assert value_sources(env) == {
        "service": "OTEL_SERVICE_NAME",
        "version": "service.version in OTEL_RESOURCE_ATTRIBUTES",
        "metrics_port": "SENTINEL_METRICS_PORT",
        "traces": "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
    fields = {field.name for field in dataclasses.fields(Config)}
    assert {variable.field for variable in ENVIRONMENT} <= fields


def test_exception_filters_and_the_report_hook() -> None:
    """ignore_exceptions takes classes and dotted names (a list too, stored as a tuple) and
    SENTINEL_IGNORE_EXCEPTIONS comma-separated names; before_report takes any callable,
    which only a keyword can give."""

    def keep(report: dict[str, object], exception: BaseException) -> dict[str, object]:
        return report

    config = Config(
        ignore_exceptions=[ConnectionError, "mypkg.errors.Expected"],  # type: ignore[arg-type]
        before_report=keep,
        before_report_time_budget_seconds=0.5,
    )
    assert config.ignore_exceptions == (ConnectionError, "mypkg.errors.Expected")
    assert config.before_report is keep
    assert config.before_report_time_budget_seconds == 0.5
    assert (Config().ignore_exceptions, Config().before_report) == ((), None)
    from_env = Config.from_env({"SENTINEL_IGNORE_EXCEPTIONS": " KeyError, mypkg.errors.Expected ,"})
    assert from_env.ignore_exceptions == ("KeyError", "mypkg.errors.Expected")
    with pytest.raises(ConfigError) as error:
        Config.from_env({"SENTINEL_IGNORE_EXCEPTIONS": "KeyError, not a name"})
    assert str(error.value) == (
        "SENTINEL_IGNORE_EXCEPTIONS entries must be exception classes or dotted names such as "
        "mypkg.errors.Expected: 'not a name'"
    )


def test_tenant_settings_from_keywords_and_environment() -> None:
    """SENTINEL_TENANT_HEADER (lower-cased) and SENTINEL_MAX_TENANTS set their fields; the
    tenant callable and its time budget are keywords only."""
    config = Config.from_env({"SENTINEL_TENANT_HEADER": "X-Tenant", "SENTINEL_MAX_TENANTS": "7"})
    assert config.tenant_header == "x-tenant" and config.max_tenants == 7
    assert Config().max_tenants == 50 and Config().tenant is None

    def tenant_of(scope: object) -> str | None:
        return None

    assert Config(tenant=tenant_of, tenant_time_budget_seconds=0.01).tenant is tenant_of


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_tenants": 0}, '"max_tenants" must be an integer between 1 and 1000: 0'),
        (
            {"tenant_header": "x tenant"},
            "\"tenant_header\" must be an HTTP header name: 'x tenant'",
        ),
        (
            {"tenant": "acme"},
            "\"tenant\" must be a synchronous callable taking the ASGI scope, or None: 'acme'",
        ),
        (
            {"tenant_time_budget_seconds": 0},
            '"tenant_time_budget_seconds" must be a number of seconds > 0: 0',
        ),
    ],
)
def test_bad_tenant_settings_name_the_setting_and_show_the_value(
    changes: dict[str, object], message: str
) -> None:
    """Each tenant setting is checked; the error shows the value given."""
    with pytest.raises(ConfigError) as error:
        Config(**changes)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_bad_max_tenants_variable_shows_its_text() -> None:
    """SENTINEL_MAX_TENANTS must be an integer from 1 to 1000, shown as written."""
    with pytest.raises(ConfigError, match=r"SENTINEL_MAX_TENANTS must be an integer between"):
        Config.from_env({"SENTINEL_MAX_TENANTS": "0"})
    with pytest.raises(ConfigError, match=r"SENTINEL_MAX_TENANTS .*: 'fifty'"):
        Config.from_env({"SENTINEL_MAX_TENANTS": "fifty"})


def test_max_tenants_has_an_upper_bound() -> None:
    """max_tenants is at most 1000 (4,004 series and about 7 MB of tracker per process), by
    keyword as by variable; 1000 itself is taken."""
    assert Config(max_tenants=1000).max_tenants == 1000
    assert Config.from_env({"SENTINEL_MAX_TENANTS": "1000"}).max_tenants == 1000
    with pytest.raises(ConfigError) as error:
        Config.from_env({"SENTINEL_MAX_TENANTS": "10000000"})
    assert str(error.value) == (
        "SENTINEL_MAX_TENANTS must be an integer between 1 and 1000: '10000000'"
    )
    with pytest.raises(ConfigError, match=r'"max_tenants" must be .* and 1000: 1001$'):
        Config(max_tenants=1001)


_SECRET_HEADER = (
    "must not name a header the scrubber masks as a credential (its value would be the tenant "
    "label of metrics, records and spans, unmasked; use a header that carries the customer id, "
    'or a "tenant" callable that maps the credential to a customer id)'
)


@pytest.mark.parametrize("header", ["x-api-key", "Authorization", "X-Auth-Token", "cookie"])
def test_a_tenant_header_the_scrubber_masks_is_refused(header: str) -> None:
    """A tenant header whose name the scrubber treats as a credential's (its value masked in
    every report) would put that credential, unmasked, in the tenant label: refused, by
    keyword and by variable, with what to do instead."""
    with pytest.raises(ConfigError) as error:
        Config(tenant_header=header)
    assert str(error.value) == f'"tenant_header" {_SECRET_HEADER}: {header!r}'
    with pytest.raises(ConfigError) as error:
        Config.from_env({"SENTINEL_TENANT_HEADER": f" {header} "})
    assert str(error.value) == f"SENTINEL_TENANT_HEADER {_SECRET_HEADER}: ' {header} '"


@pytest.mark.parametrize(
    ("setting", "becomes"),
    [
        ("location_header", "the location label of metrics, records and spans"),
        ("request_id_header", "the request_id of records, reports and spans"),
    ],
)
@pytest.mark.parametrize("header", ["x-api-key", "Authorization", "x-session-id"])
def test_a_location_or_request_id_header_the_scrubber_masks_is_refused(
    setting: str, becomes: str, header: str
) -> None:
    """The location and request-id headers' values are exported as they are, like the
    tenant header's: one the scrubber masks in reports (a random API key has no shape the
    value screen knows) is refused, by keyword, by variable and through scrub_keys."""
    variable = f"SENTINEL_{setting.upper()}"
    with pytest.raises(ConfigError) as error:
        Config(**{setting: header})  # type: ignore[arg-type]
    message = str(error.value)
    assert message.startswith(f'"{setting}" must not name a header the scrubber masks')
    assert becomes in message and message.endswith(f"): {header!r}")
    with pytest.raises(ConfigError, match=f"^{variable} must not name a header"):
        Config.from_env({variable: header})
    with pytest.raises(ConfigError, match=f'^"{setting}" must not name'):
        Config(**{setting: "x-corr-id", "scrub_keys": ("corr",)})  # type: ignore[arg-type]
    assert getattr(Config(**{setting: "x-corr-id"}), setting) == "x-corr-id"  # type: ignore[arg-type]


def test_other_is_no_location_of_its_own() -> None:
    """``other`` is where the values beyond the bound go: refused as the process's location
    and in the allow-list, by keyword and by variable."""
    reason = "must not be 'other', where the values beyond the bound go"
    with pytest.raises(ConfigError) as error:
        Config(location="other")
    assert str(error.value) == f"\"location\" {reason}: 'other'"
    with pytest.raises(ConfigError) as error:
        Config(locations=("fra", "other"))
    assert str(error.value) == f"\"locations\" entries {reason}: 'other'"
    with pytest.raises(ConfigError) as error:
        Config.from_env({"SENTINEL_LOCATIONS": "fra,other"})
    assert str(error.value).startswith(f"SENTINEL_LOCATIONS entries {reason}")
    assert Config(location="others", locations=("other-1",)).location == "others"


def test_a_tenant_header_made_secret_by_scrub_keys_is_refused() -> None:
    """The same rule with the scrubber's extra keys: scrub_keys=("customer",) masks
    x-customer in reports, so it cannot be the tenant header; a header no key names can."""
    with pytest.raises(ConfigError) as error:
        Config(tenant_header="X-Customer", scrub_keys=("customer",))
    assert str(error.value) == f"\"tenant_header\" {_SECRET_HEADER}: 'x-customer'"
    assert Config(tenant_header="x-customer").tenant_header == "x-customer"
    assert Config(tenant_header="x-tenant-id", scrub_keys=("customer",)).tenant_header


async def _async_tenant(scope: object) -> str:
    return "acme"


async def _async_generator_tenant(scope: object) -> typing.AsyncIterator[str]:
    yield "acme"


class _AsyncCall:
    async def __call__(self, scope: object) -> str:
        return "acme"

    async def method(self, scope: object) -> str:
        return "acme"


class _SyncCall:
    def __call__(self, scope: object) -> str:
        return "acme"


@pytest.mark.parametrize(
    "tenant",
    [
        _async_tenant,
        _async_generator_tenant,
        _AsyncCall(),
        _AsyncCall().method,
        functools.partial(_async_tenant),
        functools.partial(functools.partial(_AsyncCall())),
    ],
    ids=["async-def", "async-generator", "async-call", "async-method", "partial", "partial-call"],
)
def test_an_async_tenant_callable_is_refused(tenant: object) -> None:
    """tenant(scope) is called at the request's start and never awaited: a coroutine function
    (itself, as an object's __call__, a method, or under functools.partial) is refused with
    the value shown, rather than accepted and every request's tenant dropped."""
    with pytest.raises(ConfigError) as error:
        Config(tenant=tenant)  # type: ignore[arg-type]
    assert str(error.value) == (
        '"tenant" must be a synchronous callable taking the ASGI scope (it is called at the '
        "request's start, where nothing awaits it: write it with def, not async def): "
        f"{tenant!r}"
    )


@pytest.mark.parametrize(
    "tenant",
    [_SyncCall(), functools.partial(_SyncCall()), lambda scope: None, str, _AsyncCall],
    ids=["call", "partial", "lambda", "builtin", "a-class"],
)
def test_synchronous_tenant_callables_are_taken(tenant: object) -> None:
    """Synchronous callables of every kind stay accepted (a class is called to make an
    instance, whatever its own __call__)."""
    assert Config(tenant=tenant).tenant is tenant  # type: ignore[arg-type]


def test_max_series_from_keyword_and_variable() -> None:
    """max_series defaults to 2000, SENTINEL_MAX_SERIES sets it, and a bad value is shown as
    given, for the keyword and for the variable."""
    assert Config().max_series == 2000
    assert Config.from_env({"SENTINEL_MAX_SERIES": " 500 "}).max_series == 500
    with pytest.raises(ConfigError, match=r'"max_series" must be an integer >= 1: 0'):
        Config(max_series=0)
    with pytest.raises(ConfigError, match=r"SENTINEL_MAX_SERIES must be an integer >= 1: '2k'"):
        Config.from_env({"SENTINEL_MAX_SERIES": "2k"})


# -- names, words, blanks and the OpenTelemetry variables ---------------------------------------


def test_an_unknown_setting_is_a_config_error_that_suggests_the_closest() -> None:
    """A misspelt keyword to from_env() or replace() (what instrument(), install() and
    capture_reports() use) is a ConfigError naming it and the setting it comes close to,
    never a TypeError that escapes the checks made at startup."""
    with pytest.raises(ConfigError) as error:
        Config.from_env({}, locaton="fra")  # type: ignore[call-arg]
    assert str(error.value).startswith('unknown setting "locaton" (did you mean "location"?)')
    with pytest.raises(ConfigError) as error:
        Config().replace(srvice="shop", frobnicate=1)  # type: ignore[call-arg]
    message = str(error.value)
    assert 'unknown settings "frobnicate", "srvice" (did you mean "service"?)' in message
    assert "did you mean" not in message.split('"frobnicate"')[1].split(",")[0]


def test_the_typed_keywords_are_the_config_fields() -> None:
    """ConfigOptions, the type of instrument()'s and the middleware's ``**overrides``, has
    exactly Config's fields with Config's types: a new field cannot be left untyped."""
    from sentinel._config import ConfigOptions

    fields = {field.name: field for field in dataclasses.fields(Config)}
    options = typing.get_type_hints(ConfigOptions)
    assert list(options) == list(fields)
    assert options == typing.get_type_hints(Config)
    assert ConfigOptions.__total__ is False


def test_words_from_a_fixed_set_are_taken_in_any_case_by_keyword_as_by_variable() -> None:
    """One rule for mutation_mode and log_format: any case, from a keyword as from a
    variable, stored lower-case; other words are refused both ways."""
    assert Config(mutation_mode="RAISE").mutation_mode == "raise"
    assert Config.from_env({"SENTINEL_MUTATION_MODE": "RAISE"}).mutation_mode == "raise"
    assert Config(log_format="JSON").log_format == "json"
    assert Config().replace(log_format="Console").log_format == "console"
    with pytest.raises(ConfigError, match=r"\"mutation_mode\" must be one of .*: 'LOUD'"):
        Config(mutation_mode="LOUD")
    with pytest.raises(ConfigError, match=r"SENTINEL_MUTATION_MODE must be one of .*: 'LOUD'"):
        Config.from_env({"SENTINEL_MUTATION_MODE": "LOUD"})


def test_variables_of_blanks_count_as_unset() -> None:
    """A variable holding only spaces or tabs is unset, like an empty one (a value set to
    " " in a deployment manifest should not stop the process)."""
    blank = {
        "SENTINEL_METRICS_PORT": "   ",
        "SENTINEL_LOCATION": "   ",
        "SENTINEL_SERVICE": " \t",
        "SENTINEL_LOG_LOCALS": " ",
        "OTEL_TRACES_EXPORTER": "  ",
        "OTEL_EXPORTER_OTLP_PROTOCOL": " ",
    }
    assert Config.from_env(blank) == Config()
    assert Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": " \t"}).traces is False
    config = Config.from_env({**blank, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert config.traces is True  # the blank exporter variable names none: OTLP


def test_the_newer_deployment_environment_name_is_honoured_and_wins() -> None:
    """deployment.environment.name (semantic conventions 1.27 on) sets the environment like
    deployment.environment, and wins over it when both are given."""
    newer = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod"}
    assert Config.from_env(newer).environment == "prod"
    both = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=old,deployment.environment.name=new"
    }
    assert Config.from_env(both).environment == "new"
    assert Config.from_env({**both, "SENTINEL_ENVIRONMENT": "mine"}).environment == "mine"


def test_a_disabled_sdk_turns_traces_off() -> None:
    """OTEL_SDK_DISABLED=true (any case) turns traces off whatever endpoint or exporter is
    set (no trace ids on records whose spans are never exported); any other value is
    false, as the OTel SDK reads it; a keyword still wins."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert Config.from_env({**endpoint, "OTEL_SDK_DISABLED": "true"}).traces is False
    disabled = {**endpoint, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}
    assert Config.from_env(disabled).traces is False
    assert Config.from_env({**endpoint, "OTEL_SDK_DISABLED": "false"}).traces is True
    assert Config.from_env({**endpoint, "OTEL_SDK_DISABLED": "no"}).traces is True
    assert Config.from_env({"OTEL_SDK_DISABLED": "true"}, traces=True).traces is True


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        (
            {
                "OTEL_RESOURCE_ATTRIBUTES": (
                    "deployment.environment=prod,vcs.url=postgres://app:hunter2-res-q7@db/shop,oops"
                )
            },
            "must be comma-separated key=value pairs: "
            "'deployment.environment=prod,vcs.url=postgres://[scrubbed len=",
        ),
        (
            {"SENTINEL_METRICS_PORT": "token=hunter2-port-q7"},
            "SENTINEL_METRICS_PORT must be an integer between 0 and 65535: 'token=[scrubbed len=",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "zipkin,password=hunter2-exp-q7"},
            "or none (sentinel has no Zipkin exporter; send otlp to an OpenTelemetry Collector "
            "and use its zipkin exporter): 'zipkin,password=[scrubbed len=",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "token=hunter2-pr-q7"},
            "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf: 'token=[scrubbed len=",
        ),
    ],
)
def test_a_bad_value_is_shown_scrubbed(env: dict[str, str], shown: str) -> None:
    """A configuration error shows the bad value, which `sentinel run`, `sentinel config`
    and a plain uvicorn print: the secret beside the mistake in it is masked, the rest
    stays (the value's repr, scrubbed)."""
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert shown in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_bad_keyword_value_is_shown_scrubbed() -> None:
    """The same for a keyword argument (a mistyped setting holding a URL with credentials),
    while a bad value with no secret is shown as it is."""
    with pytest.raises(ConfigError) as raised:
        Config(location_header="https://ci:hunter2-kw-q7@git.example/shop.git x")
    assert "hunter2" not in str(raised.value)
    assert "'https://[scrubbed len=" in str(raised.value)
    with pytest.raises(ConfigError, match=r": 'abc'$"):
        Config.from_env({"SENTINEL_METRICS_PORT": "abc"})
