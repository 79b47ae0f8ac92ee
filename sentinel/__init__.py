"""sentinel: an observability sidecar and unhandled-exception reporter for ASGI apps.

Importing sentinel has no side effects: it reads no environment, starts no thread and
installs no hook until :func:`install`, :func:`instrument` or the middleware is used.
"""

from __future__ import annotations

from ._capture import capture, capture_exception
from ._config import Config, ConfigError, ConfigOptions
from ._context import set_context, set_tag
from ._current import current
from ._middleware import AppProtocolError, SentinelMiddleware, instrument
from ._mutation import GlobalStateMutated, watch
from ._runtime import Sentinel, install
from ._version import __version__

__all__ = [
    "AppProtocolError",
    "Config",
    "ConfigError",
    "ConfigOptions",
    "GlobalStateMutated",
    "Sentinel",
    "SentinelMiddleware",
    "__version__",
    "capture",
    "capture_exception",
    "current",
    "install",
    "instrument",
    "set_context",
    "set_tag",
    "watch",
]
