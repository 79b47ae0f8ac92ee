"""sentinel: an observability sidecar and unhandled-exception reporter for ASGI apps.

Importing sentinel has no side effects: it reads no environment, starts no thread and
installs no hook until :func:`install`, :func:`instrument` or the middleware is used.
"""

from __future__ import annotations

from ._capture import capture
from ._config import Config, ConfigError
from ._current import current
from ._middleware import AppProtocolError, SentinelMiddleware, instrument
from ._mutations import GlobalStateMutated
from ._runtime import Sentinel, install
from ._version import __version__
from ._watch import watch


def capture_exception(exc: BaseException, *, phase: str | None = None) -> bool:
    """Report ``exc`` (e.g. one the app handled but wants seen); False if already reported.

    Never raises, also not for an invalid ``SENTINEL_*`` variable (then nothing is reported).
    """
    try:
        sentinel = current() or install()
    except ConfigError:
        return False
    return sentinel.capture_exception(exc, phase)


__all__ = [
    "AppProtocolError",
    "Config",
    "ConfigError",
    "GlobalStateMutated",
    "Sentinel",
    "SentinelMiddleware",
    "__version__",
    "capture",
    "capture_exception",
    "current",
    "install",
    "instrument",
    "watch",
]
