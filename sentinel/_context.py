"""The per-request context: what sentinel knows about the request being served."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ._routes import UNMATCHED_ROUTE
from ._vocabulary import Phase
from .types import Scope


class RequestContext:
    """A small, mutable record of one request, shared by the middleware and the reporters.

    Built on every request, so it holds little: what the rare readers need (the route, the
    query string, the headers) is read from the scope when first asked for.
    """

    __slots__ = (
        "_request_id",
        "_resolve",
        "_route",
        "body_complete",
        "disconnected",
        "env_overlay",
        "forced",
        "kind",
        "location",
        "method",
        "path",
        "response_started",
        "scope",
        "start",
        "status",
    )

    def __init__(
        self,
        scope: Scope,
        method: str,
        location: str,
        start: float,
        request_id: str | None = None,
        resolve: Callable[[Scope], str] | None = None,
    ) -> None:
        self.scope = scope
        self.kind: str = scope["type"]
        self.path: str = scope.get("path", "")
        self.method = method
        self.location = location
        self.start = start
        self._request_id = request_id
        self._resolve = resolve
        self._route: str | None = None
        self.response_started = False
        self.body_complete = False
        self.disconnected = False
        self.env_overlay: dict[bytes, bytes | None] | None = None  # isolate mode's writes
        self.forced: str | None = None  # why the record must be kept whatever the sampler says
        self.status: int | None = None

    @property
    def route(self) -> str:
        """The route template, resolved on first use: after routing, the router has said."""
        route = self._route
        if route is None:
            route = self._resolve(self.scope) if self._resolve is not None else UNMATCHED_ROUTE
            self._route = route
        return route

    @route.setter
    def route(self, value: str) -> None:
        self._route = value

    @property
    def query_string(self) -> bytes:
        value = self.scope.get("query_string", b"")
        return value if isinstance(value, bytes) else b""

    @property
    def raw_headers(self) -> Any:
        return self.scope.get("headers")

    @property
    def request_id(self) -> str:
        """The trusted incoming id, or one generated on first use (most requests never need it)."""
        if self._request_id is None:
            self._request_id = os.urandom(16).hex()
        return self._request_id


current_request: ContextVar[RequestContext | None] = ContextVar(
    "sentinel_current_request", default=None
)
"""The request being handled in this context (also inherited by tasks the request spawns)."""

current_phase: ContextVar[Phase | None] = ContextVar("sentinel_current_phase", default=None)
"""Set around code whose phase is known but that runs outside a request (lifespan, jobs)."""
