"""A small client of the Prometheus HTTP API (``/api/v1/query``), on the standard library.

Every way a query can fail (refused connection, timeout, an HTTP error, an answer that is
not HTTP or is cut short, one that is not Prometheus's JSON, ``"status": "error"``) raises
:class:`PrometheusError` with the URL and the cause, so that the gate can say why it cannot
decide instead of reading silence as health.
"""

from __future__ import annotations

import contextlib
import contextvars
import http.client
import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

_MAX_ANSWER_BYTES = 64 * 1024 * 1024
LONGEST_TIMEOUT = 3600.0
"""The longest a client may take (an hour: a gate that waits longer for Prometheus is
stuck, and timers refuse far larger values)."""


class PrometheusError(Exception):
    """Prometheus could not be asked, or its answer was an error or unreadable."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and its value."""

    labels: Mapping[str, str]
    value: float


class PrometheusClient:
    """Instant queries against the Prometheus at ``url`` (e.g. ``http://prometheus:9090``,
    or under a path prefix), all of them together bounded by ``timeout`` seconds from the
    first: connecting, sending and reading each whole answer (a server that trickles it a
    byte at a time included), each query given what is left. One client is one decision's
    queries: the gate's run takes at most ``timeout``, however many it asks. With a custom
    ``opener`` only each socket operation is bounded: its handlers make the connections."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> None:
        parts = _url_parts(url)
        if parts is None:
            msg = f"the Prometheus URL must be http(s)://HOST[:PORT][/PATH]: {_shown(url)!r}"
            raise ValueError(msg)
        if parts.username is not None:
            msg = f"the Prometheus URL must have no user or password: {_shown(url)!r}"
            raise ValueError(msg)
        if parts.query or parts.fragment:
            msg = f"the Prometheus URL must have no query or fragment: {_shown(url)!r}"
            raise ValueError(msg)
        if not (math.isfinite(timeout) and timeout > 0):
            msg = f"the timeout must be a positive number of seconds: {timeout!r}"
            raise ValueError(msg)
        if timeout > LONGEST_TIMEOUT:
            msg = f"the timeout must be at most {LONGEST_TIMEOUT:g} seconds (an hour): {timeout!r}"
            raise ValueError(msg)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = opener or urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)
        self._ends: float | None = None
        """When the time is up (``time.monotonic()``), from the first query on."""

    def query(self, expression: str, at: float | None = None) -> list[Sample]:
        """The instant vector ``expression`` evaluates to at ``at`` (Unix seconds; default:
        Prometheus's now), NaN and infinite values included: what they mean is the
        caller's (a ratio with nothing to divide is NaN; a count that is NaN is no count)."""
        fields = {"query": expression}
        if at is not None:
            fields["time"] = f"{at:.3f}"
        data = self._post("/api/v1/query", fields)
        result = data.get("result")
        if data.get("resultType") != "vector" or not isinstance(result, list):
            msg = (
                f"Prometheus at {self.url} answered a {data.get('resultType')!r}, not an "
                f"instant vector, to {expression!r}"
            )
            raise PrometheusError(msg)
        samples = []
        for item in result:
            try:
                labels = {str(key): str(value) for key, value in item["metric"].items()}
                value = float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                msg = f"Prometheus at {self.url} answered a malformed sample: {item!r:.200}"
                raise PrometheusError(msg) from None
            samples.append(Sample(labels, value))
        return samples

    def _post(self, path: str, fields: Mapping[str, str]) -> Mapping[str, Any]:
        """The ``data`` of Prometheus's answer to a form POST to ``path``, within what is left
        of the timeout (urllib's bounds each socket operation, never the whole answer)."""
        now = time.monotonic()
        if self._ends is None:
            self._ends = now + self.timeout
        left = self._ends - now
        timed_out = (
            f"cannot reach Prometheus at {self.url}: timed out: no whole answer within "
            f"{self.timeout:g}s, the time all of its queries share (a slower Prometheus needs a "
            "longer timeout)"
        )
        if left <= 0:
            raise PrometheusError(timed_out)
        deadline = _Deadline(left)
        token = _DEADLINE.set(deadline)
        body: bytes | None = None
        try:
            with deadline:
                try:
                    body = self._exchange(path, fields, left)
                except PrometheusError:
                    # The socket's own timeout is what is left, too: it may fire a moment
                    # before the deadline does, and is the same timeout.
                    if not deadline.expired and time.monotonic() < self._ends - _SLACK_SECONDS:
                        raise
        finally:
            _DEADLINE.reset(token)
        if deadline.expired or body is None:  # whatever the cut connection raised, or a
            raise PrometheusError(timed_out) from None  # body cut short by it
        return self._data(body)

    def _exchange(self, path: str, fields: Mapping[str, str], timeout: float) -> bytes:
        request = urllib.request.Request(
            self.url + path,
            data=urllib.parse.urlencode(fields).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            method="POST",
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body: bytes = response.read(_MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as error:
            with error:
                try:
                    detail = _error_detail(error.read(64 * 1024))
                except (OSError, ValueError, http.client.HTTPException) as unread:
                    detail = f"(a body that could not be read: {unread!r:.200})"
            msg = f"Prometheus at {self.url} answered HTTP {error.code}: {detail}"
            raise PrometheusError(msg) from None
        except urllib.error.URLError as error:
            msg = f"cannot reach Prometheus at {self.url}: {error.reason}"
            raise PrometheusError(msg) from None
        except (OSError, ValueError) as error:  # timeouts, resets, bad responses
            msg = f"cannot reach Prometheus at {self.url}: {error or type(error).__name__}"
            raise PrometheusError(msg) from None
        except http.client.HTTPException as error:  # another protocol's reply, a cut body
            msg = f"Prometheus at {self.url} answered no whole HTTP response: {error!r:.200}"
            raise PrometheusError(msg) from None
        return body

    def _data(self, body: bytes) -> Mapping[str, Any]:
        if len(body) > _MAX_ANSWER_BYTES:
            msg = f"Prometheus at {self.url} answered more than {_MAX_ANSWER_BYTES} bytes"
            raise PrometheusError(msg)
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):  # nested deeper than the parser goes
            msg = f"Prometheus at {self.url} answered something that is not JSON: {body!r:.200}"
            raise PrometheusError(msg) from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            msg = f"Prometheus at {self.url} answered an error: {_error_detail(body)}"
            raise PrometheusError(msg)
        data = answer.get("data")
        if not isinstance(data, dict):
            msg = f"Prometheus at {self.url} answered without data: {body!r:.200}"
            raise PrometheusError(msg)
        return data


_SLACK_SECONDS = 0.05
"""How close to the end of the time a socket that times out counts as the whole timeout."""


class _Deadline:
    """One query's time limit: when it is up, the query's connections are shut down, so that
    whatever reads from them returns at once (a timeout on the socket bounds each read, and a
    server sending a byte every few seconds never trips it)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            self._sockets.clear()

    def watch(self, connection: socket.socket) -> None:
        """Shut ``connection`` down when the time is up (at once when it already is)."""
        with self._lock:
            self._sockets.append(connection)
            if self.expired:
                _shut_down(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for connection in self._sockets:
                _shut_down(connection)


def _shut_down(connection: socket.socket) -> None:
    """End reads and writes on ``connection`` from another thread (closing it there would
    leave the reader on a descriptor number that may be reused); a TLS socket's raw one."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "sentinel_prometheus_deadline", default=None
)
"""The deadline of the query this thread is making (redirects and proxies included)."""


class _HTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that the current query's deadline can cut."""

    def connect(self) -> None:
        super().connect()
        deadline = _DEADLINE.get()
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that the current query's deadline can cut."""

    def connect(self) -> None:
        super().connect()
        deadline = _DEADLINE.get()
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def do_open(
        self, http_class: Any, req: urllib.request.Request, **http_conn_args: Any
    ) -> http.client.HTTPResponse:
        return super().do_open(_HTTPConnection, req, **http_conn_args)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(
        self, http_class: Any, req: urllib.request.Request, **http_conn_args: Any
    ) -> http.client.HTTPResponse:
        return super().do_open(_HTTPSConnection, req, **http_conn_args)


_USER_INFO = re.compile(r"(?<=//).*@", re.DOTALL)
"""Up to the last "@": a password may hold "/", "?" or "#" where a URL parser stops."""
_ANY_USER_INFO = re.compile(r"^.*@", re.DOTALL)
_QUERY_OR_FRAGMENT = re.compile(r"[?#].*", re.DOTALL)


def _shown(url: object) -> object:
    """``url`` as an error may quote it: what may hold a credential (a user and password, a
    token as the user, a query's ``apikey=``) replaced by ``***`` (CI logs keep errors)."""
    if not isinstance(url, str):
        return url
    if "//" not in url:  # ("user:password@host:9090", "http:user:password@host")
        return _QUERY_OR_FRAGMENT.sub("?***", _ANY_USER_INFO.sub("***@", url))
    return _QUERY_OR_FRAGMENT.sub("?***", _USER_INFO.sub("***@", url))


def _url_parts(url: object) -> urllib.parse.SplitResult | None:
    """``url`` split, or None when it is no http(s) URL the client could connect to (urllib
    would fail on it later, with a message that does not show it)."""
    if not isinstance(url, str) or not all(c.isprintable() and not c.isspace() for c in url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError: not a number from 0 to 65535
    except ValueError:  # also an IPv6 address without its "]"
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        return None
    return parts


def _error_detail(body: bytes) -> str:
    """Prometheus's ``errorType: error`` from an error answer, else the start of the body."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        return f"{answer.get('errorType', 'error')}: {answer['error']}"
    text = body.decode("utf-8", "replace").strip()
    return repr(text[:200]) if text else "(empty body)"
