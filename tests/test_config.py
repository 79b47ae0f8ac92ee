"""Config: keyword arguments, the environment, and errors that show the bad value."""

from __future__ import annotations

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
        ({"SENTINEL_MUTATION_WARMUP_SECONDS": "-1"}, "-1.0"),
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
