"""The app factory `sentinel run` hands to uvicorn: each worker installs sentinel, imports
the app (reporting an import-time error) and wraps it."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ._middleware import SentinelMiddleware, find_sentinel
from ._runtime import Sentinel, install
from .types import ASGIApp

TARGET_VARIABLE = "SENTINEL_RUN_TARGET"
FACTORY_VARIABLE = "SENTINEL_RUN_FACTORY"


class TargetError(ValueError):
    """The MODULE:APP argument is malformed or does not name an ASGI app."""


def parse_target(target: str) -> tuple[str, str]:
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        msg = f'the app must be given as "MODULE:APP", e.g. "mypkg.main:app": {target!r}'
        raise TargetError(msg)
    return module, attribute


def load_target(target: str, *, factory: bool) -> Any:
    """Import ``MODULE:APP`` (and call it when it is a factory); import errors propagate."""
    module_name, attribute = parse_target(target)
    module = importlib.import_module(module_name)
    app: Any = module
    for part in attribute.split("."):
        app = getattr(app, part)
    if factory:
        app = app()
    if not callable(app):
        msg = f"{target!r} is not an ASGI callable: {type(app).__name__}"
        raise TargetError(msg)
    return app


def load_and_report(sentinel: Sentinel, target: str, *, factory: bool) -> Any:
    """Load the app; an exception while importing it is reported with phase ``import``."""
    try:
        return load_target(target, factory=factory)
    except BaseException as exc:
        sentinel.reporter.report(exc, "import", sync=True)
        raise


def create_app() -> ASGIApp:
    """Called by uvicorn in each worker: install sentinel, import the app, wrap it (unless
    the app brings its own sentinel: one per app, so every request is counted once)."""
    target = os.environ[TARGET_VARIABLE]
    sentinel = install(service_fallback=parse_target(target)[0])
    factory = os.environ.get(FACTORY_VARIABLE) == "1"
    try:
        app = load_and_report(sentinel, target, factory=factory)
    except BaseException:
        sentinel.close()
        raise SystemExit(1) from None
    if find_sentinel(app) is not None:
        return app  # type: ignore[no-any-return]
    return SentinelMiddleware(app, sentinel=sentinel)
