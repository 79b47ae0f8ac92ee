"""A small client of the Prometheus HTTP API (``/api/v1/query``), on the standard library.

Every way a query can fail (refused connection, timeout, an HTTP error, an answer that is
not HTTP or is cut short, one that is not Prometheus's JSON, ``"status": "error"``) raises
:class:`PrometheusError` with the URL and the cause, so that the gate can say why it cannot
decide instead of reading silence as health.
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_MAX_ANSWER_BYTES = 64 * 1024 * 1024


class PrometheusError(Exception):
    """Prometheus could not be asked, or its answer was an error or unreadable."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and its value."""

    labels: Mapping[str, str]
    value: float


class PrometheusClient:
    """Instant queries against the Prometheus at ``url`` (e.g. ``http://prometheus:9090``,
    or under a path prefix), each bounded by ``timeout`` seconds."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> None:
        parts = _url_parts(url)
        if parts is None:
            msg = f"the Prometheus URL must be http(s)://HOST[:PORT][/PATH]: {url!r}"
            raise ValueError(msg)
        if parts.username is not None:
            shown = url.replace(f":{parts.password}@", ":***@") if parts.password else url
            msg = f"the Prometheus URL must have no user or password: {shown!r}"
            raise ValueError(msg)
        if parts.query or parts.fragment:
            msg = f"the Prometheus URL must have no query or fragment: {url!r}"
            raise ValueError(msg)
        if not (math.isfinite(timeout) and timeout > 0):
            msg = f"the timeout must be a positive number of seconds: {timeout!r}"
            raise ValueError(msg)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = opener or urllib.request.build_opener()

    def query(self, expression: str, at: float | None = None) -> list[Sample]:
        """The instant vector ``expression`` evaluates to at ``at`` (Unix seconds; default:
        Prometheus's now). Samples whose value is NaN or infinite are left out."""
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
            if math.isfinite(value):
                samples.append(Sample(labels, value))
        return samples

    def _post(self, path: str, fields: Mapping[str, str]) -> Mapping[str, Any]:
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
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read(_MAX_ANSWER_BYTES + 1)
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
        if len(body) > _MAX_ANSWER_BYTES:
            msg = f"Prometheus at {self.url} answered more than {_MAX_ANSWER_BYTES} bytes"
            raise PrometheusError(msg)
        try:
            answer = json.loads(body)
        except ValueError:
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
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        return f"{answer.get('errorType', 'error')}: {answer['error']}"
    text = body.decode("utf-8", "replace").strip()
    return repr(text[:200]) if text else "(empty body)"
