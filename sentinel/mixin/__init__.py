"""The operator half: alert and recording rules, Alertmanager routing, Grafana dashboards
and the rollout gate, all generated from one :class:`MonitoringConfig`."""

from __future__ import annotations

from ._config import (
    BurnWindow,
    MonitoringConfig,
    MonitoringConfigError,
    Receiver,
    format_duration,
    parse_duration,
)

__all__ = [
    "BurnWindow",
    "MonitoringConfig",
    "MonitoringConfigError",
    "Receiver",
    "format_duration",
    "parse_duration",
]
