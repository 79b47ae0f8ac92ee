"""The per-request context: what sentinel knows about the request being served."""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any


class RequestContext:
    """A small, mutable record of one request, shared by the middleware and the reporters."""

    __slots__ = (
        "_request_id",
        "body_complete",
        "disconnected",
        "forced",
        "kind",
        "location",
        "method",
        "path",
        "query_string",
        "raw_headers",
        "response_started",
        "route",
        "start",
        "status",
    )

    def __init__(
        self,
        kind: str,
        method: str,
        path: str,
        route: str,
        location: str,
        start: float,
        request_id: str | None,
        query_string: bytes,
        raw_headers: Any,
    ) -> None:
        self.kind = kind
        self.method = method
        self.path = path
        self.route = route
        self.location = location
        self.start = start
        self._request_id = request_id
        self.query_string = query_string
        self.raw_headers = raw_headers
        self.response_started = False
        self.body_complete = False
        self.disconnected = False
        self.forced: str | None = None  # why the record must be kept whatever the sampler says
        self.status: int | None = None

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

current_phase: ContextVar[str | None] = ContextVar("sentinel_current_phase", default=None)
"""Set around code whose phase is known but that runs outside a request (lifespan, jobs)."""
