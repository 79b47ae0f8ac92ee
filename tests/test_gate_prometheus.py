"""The gate's Prometheus client against a stand-in HTTP server on loopback: what it sends,
how it reads an instant vector, and that every way a query can fail is a PrometheusError
that names the URL and the cause (never an empty answer that would read as health)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import free_port

from sentinel.gate import PrometheusClient, PrometheusError, Sample


@dataclass
class Answer:
    status: int = 200
    body: bytes = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    delay: float = 0.0
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)


@pytest.fixture
def stand_in() -> Iterator[tuple[str, Answer]]:
    """A loopback HTTP server answering every POST with ``answer`` and recording the
    requests (path, content type, form fields)."""
    answer = Answer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            fields = urllib.parse.parse_qs(self.rfile.read(length).decode())
            answer.requests.append((self.path, self.headers.get("Content-Type", ""), fields))
            time.sleep(answer.delay)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout test)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_instant_vector_is_read_with_its_labels(stand_in: tuple[str, Answer]) -> None:
    """A query is a form POST to /api/v1/query (under the URL's path prefix) with the
    expression and the evaluation time; the samples come back with their labels and float
    values, and NaN samples (no data to divide) are left out."""
    url, answer = stand_in
    answer.body = (
        b'{"status":"success","data":{"resultType":"vector","result":['
        b'{"metric":{"location":"fra","version":"v2"},"value":[1700000000.5,"1234"]},'
        b'{"metric":{"location":"iad","version":"v2"},"value":[1700000000.5,"NaN"]},'
        b'{"metric":{},"value":[1700000000.5,"0.25"]}]}}'
    )
    client = PrometheusClient(f"{url}/prometheus/", timeout=5)
    samples = client.query('sum by (location, version) (up{job="a b"})', at=1700000000.5)
    assert samples == [Sample({"location": "fra", "version": "v2"}, 1234.0), Sample({}, 0.25)]
    ((path, content_type, fields),) = answer.requests
    assert path == "/prometheus/api/v1/query"
    assert content_type == "application/x-www-form-urlencoded"
    assert fields == {
        "query": ['sum by (location, version) (up{job="a b"})'],
        "time": ["1700000000.500"],
    }


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            b'{"status":"error","errorType":"bad_data","error":"parse error at char 4"}',
            "answered HTTP 400: bad_data: parse error at char 4",
        ),
        (503, b"<html>Service Unavailable</html>", "answered HTTP 503: '<html>Service Unav"),
        (502, b"", "answered HTTP 502: (empty body)"),
        (200, b"<html>login</html>", "answered something that is not JSON: b'<html>login"),
        (
            200,
            b'{"status":"error","errorType":"timeout","error":"query timed out"}',
            "answered an error: timeout: query timed out",
        ),
        (
            200,
            b'{"status":"success","data":{"resultType":"matrix","result":[]}}',
            "answered a 'matrix', not an instant vector",
        ),
        (
            200,
            b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}',
            "answered a malformed sample: {'metric': {}}",
        ),
        (200, b'{"status":"success"}', "answered without data"),
    ],
)
def test_error_answers_are_errors(
    stand_in: tuple[str, Answer], status: int, body: bytes, message: str
) -> None:
    """An HTTP error (with Prometheus's JSON error or any other body), a body that is not
    JSON (a login page of a proxy), status "error", a range vector or a malformed sample:
    PrometheusError naming the URL and what was wrong."""
    url, answer = stand_in
    answer.status, answer.body = status, body
    with pytest.raises(PrometheusError) as raised:
        PrometheusClient(url, timeout=5).query("up")
    assert f"Prometheus at {url} {message}" in str(raised.value)


def test_a_slow_prometheus_times_out(stand_in: tuple[str, Answer]) -> None:
    """A Prometheus slower than the timeout is an error after about the timeout, not a
    hang."""
    url, answer = stand_in
    answer.delay = 2.0
    started = time.monotonic()
    with pytest.raises(PrometheusError, match=f"cannot reach Prometheus at {url}: .*timed out"):
        PrometheusClient(url, timeout=0.3).query("up")
    assert time.monotonic() - started < 1.5


def test_an_unreachable_prometheus_is_an_error() -> None:
    """Nothing listening on the port: "cannot reach" with the URL and the refusal."""
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusError, match=f"cannot reach Prometheus at {url}: .*refused"):
        PrometheusClient(url, timeout=2).query("up")


def test_a_connection_closed_without_an_answer_is_an_error() -> None:
    """A server that accepts and closes without answering: PrometheusError, not a crash."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def close_at_once() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()

    thread = threading.Thread(target=close_at_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(PrometheusError, match=f"cannot reach Prometheus at {url}: "):
            PrometheusClient(url, timeout=2).query("up")
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    ("url", "timeout", "message"),
    [
        ("prometheus:9090", 10.0, "must be http(s)://HOST[:PORT][/PATH]: 'prometheus:9090'"),
        ("ftp://prometheus", 10.0, "'ftp://prometheus'"),
        ("http://", 10.0, "'http://'"),
        (
            "http://prometheus:9090/?x=1",
            10.0,
            "no query or fragment: 'http://prometheus:9090/?x=1'",
        ),
        ("http://prometheus:9090", 0.0, "positive number of seconds: 0.0"),
        ("http://prometheus:9090", float("nan"), "nan"),
    ],
)
def test_a_bad_url_or_timeout_is_refused(url: str, timeout: float, message: str) -> None:
    """The client refuses what it could not query, with the value in the message."""
    with pytest.raises(ValueError) as raised:
        PrometheusClient(url, timeout=timeout)
    assert message in str(raised.value)
