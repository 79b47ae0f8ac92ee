"""The gate's Prometheus client against a stand-in HTTP server on loopback: what it sends,
how it reads an instant vector, and that every way a query can fail is a PrometheusError
that names the URL and the cause (never an empty answer that would read as health)."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
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
    values, NaN included (whether it means no data to divide or a broken count is the
    caller's to say)."""
    url, answer = stand_in
    answer.body = (
        b'{"status":"success","data":{"resultType":"vector","result":['
        b'{"metric":{"location":"fra","version":"v2"},"value":[1700000000.5,"1234"]},'
        b'{"metric":{"location":"iad","version":"v2"},"value":[1700000000.5,"NaN"]},'
        b'{"metric":{},"value":[1700000000.5,"0.25"]}]}}'
    )
    client = PrometheusClient(f"{url}/prometheus/", timeout=5)
    samples = client.query('sum by (location, version) (up{job="a b"})', at=1700000000.5)
    fra, iad, unlabelled = samples
    assert fra == Sample({"location": "fra", "version": "v2"}, 1234.0)
    assert iad.labels == {"location": "iad", "version": "v2"} and math.isnan(iad.value)
    assert unlabelled == Sample({}, 0.25)
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
        # nested deeper than the JSON parser goes: RecursionError, reported as sentinel's bug
        (200, b"[" * 100_000, "answered something that is not JSON: b'[[[["),
        (503, b"[" * 100_000, "answered HTTP 503: '[[[["),
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


@pytest.mark.parametrize("trickled", ["headers", "body"])
def test_an_answer_trickling_in_is_cut_at_the_timeout(trickled: str) -> None:
    """A server that sends its answer one byte every 0.2 s never trips a socket timeout of
    1 s (each read gets its byte in time), and its 130-odd bytes would take half a minute:
    the timeout bounds the whole query, so it is an error naming the timeout after about
    1 s, with the headers trickling or, once they came at once, the body."""
    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection, contextlib.suppress(OSError):  # the client cut it
            _read_request(connection)
            slow = head + body
            if trickled == "body":
                connection.sendall(head)
                slow = body
            for byte in slow:
                if stop.is_set():
                    return
                connection.sendall(bytes([byte]))
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(PrometheusError) as raised:
            PrometheusClient(url, timeout=1).query("up")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert str(raised.value) == (
        f"cannot reach Prometheus at {url}: timed out: no whole answer within 1s, the time all "
        "of its queries share (a slower Prometheus needs a longer timeout)"
    )
    assert 0.9 < elapsed < 3


def test_the_timeout_bounds_every_query_of_a_client_together(
    stand_in: tuple[str, Answer],
) -> None:
    """A Prometheus that takes 0.4 s per answer, and a client with a 1 s timeout: its first
    two queries are answered, the third is cut when the second (not its own) second is up,
    and any after it fails at once, so that a gate asking seven or fourteen questions takes
    at most its timeout in all, not each."""
    url, answer = stand_in
    answer.delay = 0.4
    client = PrometheusClient(url, timeout=1)
    started = time.monotonic()
    assert client.query("up") == [] and client.query("up") == []
    with pytest.raises(PrometheusError, match="timed out: no whole answer within 1s, the time"):
        client.query("up")
    assert time.monotonic() - started < 1.3
    with pytest.raises(PrometheusError, match="timed out"):
        client.query("up")
    assert len(answer.requests) == 3


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


@pytest.fixture
def replying() -> Iterator[Callable[[bytes], str]]:
    """Loopback servers that read a whole request (headers and body) and answer it with the
    given bytes, then close the connection; each call starts one and returns its URL."""
    listeners: list[socket.socket] = []

    def start(reply: bytes) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def answer() -> None:
            with contextlib.suppress(OSError):  # closed by the fixture
                while True:
                    connection, _ = listener.accept()
                    with connection:
                        _read_request(connection)
                        connection.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()


def _read_request(connection: socket.socket) -> None:
    """Read a request to its end, so that closing the connection is no reset."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while len(body) < (int(length.group(1)) if length else 0):
        body += connection.recv(65536)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            b"SSH-2.0-OpenSSH_8.9\r\n",
            "answered no whole HTTP response: BadStatusLine('SSH-2.0-OpenSSH_8.9\\r\\n')",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n100\r\n{"status":',
            "answered no whole HTTP response: IncompleteRead(",
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"100\r\nService Unav",
            "answered HTTP 503: (a body that could not be read: IncompleteRead(",
        ),
    ],
    ids=["not-http", "cut-chunked-body", "cut-error-body"],
)
def test_an_answer_that_is_not_whole_http_is_an_error(
    replying: Callable[[bytes], str], reply: bytes, message: str
) -> None:
    """Another service on the port (an SSH banner) or a chunked body cut short, of an answer
    or of an HTTP error: PrometheusError naming the URL and what arrived, never an
    http.client exception (which would end the gate with a traceback and exit 1, "stop")."""
    url = replying(reply)
    with pytest.raises(PrometheusError) as raised:
        PrometheusClient(url, timeout=5).query("up")
    assert f"Prometheus at {url} {message}" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "timeout", "message"),
    [
        ("prometheus:9090", 10.0, "must be http(s)://HOST[:PORT][/PATH]: 'prometheus:9090'"),
        ("ftp://prometheus", 10.0, "'ftp://prometheus'"),
        ("http://", 10.0, "'http://'"),
        ("http://127.0.0.1:abc", 10.0, "HOST[:PORT][/PATH]: 'http://127.0.0.1:abc'"),
        ("http://127.0.0.1:99999", 10.0, "HOST[:PORT][/PATH]: 'http://127.0.0.1:99999'"),
        ("http://127.0.0.1:0", 10.0, "HOST[:PORT][/PATH]: 'http://127.0.0.1:0'"),
        ("http://[::1", 10.0, "HOST[:PORT][/PATH]: 'http://[::1'"),
        ("http://prom etheus:9090", 10.0, "HOST[:PORT][/PATH]: 'http://prom etheus:9090'"),
        ("http://prometheus:9090\n", 10.0, "HOST[:PORT][/PATH]: 'http://prometheus:9090\\n'"),
        (
            "http://admin:s3cret@prometheus:9090",
            10.0,
            "no user or password: 'http://***@prometheus:9090'",
        ),
        # a token as the user, in a query, or in a URL refused for its scheme
        ("https://glpat-s3cret@prometheus:9090", 10.0, "'https://***@prometheus:9090'"),
        ("ftp://admin:s3cret@prometheus", 10.0, "PATH]: 'ftp://***@prometheus'"),
        ("http://ci:s3cr/et@prometheus:9090", 10.0, "'http://***@prometheus:9090'"),
        ("http://ci:s3?cret@prometheus:9090", 10.0, "'http://***@prometheus:9090'"),
        ("http://ci:s3#cret@prometheus:9090", 10.0, "'http://***@prometheus:9090'"),
        ("ci:s3cret@prometheus:9090", 10.0, "PATH]: '***@prometheus:9090'"),
        ("http:ci:s3cret@prometheus", 10.0, "PATH]: '***@prometheus'"),
        (
            "http://prometheus:9090/?apikey=s3cret",
            10.0,
            "no query or fragment: 'http://prometheus:9090/?***'",
        ),
        ("http://prometheus:9090", 0.0, "positive number of seconds: 0.0"),
        ("http://prometheus:9090", float("nan"), "nan"),
        ("http://prometheus:9090", 1e308, "must be at most 3600 seconds (an hour): 1e+308"),
        ("http://prometheus:9090", 3600.5, "must be at most 3600 seconds (an hour): 3600.5"),
    ],
)
def test_a_bad_url_or_timeout_is_refused(url: str, timeout: float, message: str) -> None:
    """The client refuses what it could not query (a port that is not one, an IPv6 address
    without its "]", spaces, a password it would not send) and a timeout that is no number
    of seconds or longer than an hour (1e308 overflowed a timer thread), with the value in
    the message (what may hold a credential masked: a user and password, a token as the
    user, a query)."""
    with pytest.raises(ValueError) as raised:
        PrometheusClient(url, timeout=timeout)
    assert message in str(raised.value)
    assert "s3cret" not in str(raised.value) and "cret" not in str(raised.value)
