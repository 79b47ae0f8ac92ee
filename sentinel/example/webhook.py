"""A webhook receiver for Alertmanager's notifications: what the demo and the docker stack
point the page, ticket and watchdog receivers at.

``python -m sentinel.example.webhook --host 0.0.0.0 --port 9095`` accepts a notification
(Alertmanager's webhook JSON) posted to any path, the path naming the receiver (``/page``,
``/ticket``, ``/watchdog``), prints each as one JSON line on stdout and keeps the latest
ones in memory, which ``GET /notifications`` returns as a JSON list. In-process::

    with WebhookReceiver() as receiver:  # 127.0.0.1, a free port
        ...  # point Alertmanager at f"{receiver.url}/page"
        receiver.notifications()
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

MAX_NOTIFICATIONS = 1000
"""Notifications kept in memory by default; older ones are forgotten (they were printed)."""
MAX_BODY_BYTES = 1 << 20
"""Largest notification accepted (Alertmanager's are a few KiB; it caps alerts per message)."""


class WebhookReceiver:
    """A webhook receiver on its own thread (a ``ThreadingHTTPServer``).

    Each notification is kept as ``{"path", "received_at", "body"}``: the path it was posted
    to, the time it arrived (seconds since the epoch) and Alertmanager's JSON as sent. The
    newest ``max_notifications`` are kept; each is also written to ``echo`` as one JSON line
    when ``echo`` is given.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_notifications: int = MAX_NOTIFICATIONS,
        echo: TextIO | None = None,
    ) -> None:
        if isinstance(max_notifications, bool) or not isinstance(max_notifications, int):
            msg = f'"max_notifications" must be a whole number >= 1: {max_notifications!r}'
            raise ValueError(msg)
        if max_notifications < 1:
            msg = f'"max_notifications" must be a whole number >= 1: {max_notifications!r}'
            raise ValueError(msg)
        self._kept: deque[dict[str, Any]] = deque(maxlen=max_notifications)
        self._lock = threading.Lock()
        self._echo = echo
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.server_address[:2]
        self.host = str(bound_host)
        self.port = int(bound_port)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:40123`` (append the receiver's path)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> WebhookReceiver:
        """Serve on a background thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="sentinel-webhook",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def notifications(self, path: str | None = None) -> list[dict[str, Any]]:
        """The kept notifications, oldest first (only those posted to ``path`` if given)."""
        with self._lock:
            kept = list(self._kept)
        return [entry for entry in kept if path is None or entry["path"] == path]

    def _receive(self, path: str, body: Any) -> None:
        entry = {"path": path, "received_at": time.time(), "body": body}
        with self._lock:
            self._kept.append(entry)
            if self._echo is not None:
                # Under the lock, so that lines from concurrent requests never interleave.
                self._echo.write(json.dumps(entry, sort_keys=True) + "\n")
                self._echo.flush()


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sentinel-webhook"

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": "a Content-Length is required"})
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                self._answer(413, {"error": f"body must be at most {MAX_BODY_BYTES} bytes"})
                return
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._answer(400, {"error": "body must be JSON (an Alertmanager notification)"})
                return
            receiver._receive(self.path.split("?", 1)[0], body)
            self._answer(200, {"status": "received"})

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/notifications":
                self._answer(200, receiver.notifications())
            else:
                self._answer(404, {"error": "GET /notifications lists what was received"})

        def _answer(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # stdout carries the notifications, one JSON line each; nothing else

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sentinel.example.webhook",
        description="Receive Alertmanager webhook notifications; print each as a JSON line.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=9095, help="port (default: %(default)s)")
    parser.add_argument(
        "--max-notifications",
        type=int,
        default=MAX_NOTIFICATIONS,
        metavar="N",
        help="notifications kept for GET /notifications (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535: {args.port!r}")
    if args.max_notifications < 1:
        parser.error(f"--max-notifications must be >= 1: {args.max_notifications!r}")
    try:
        receiver = WebhookReceiver(
            args.host, args.port, max_notifications=args.max_notifications, echo=sys.stdout
        )
    except OSError as error:
        print(f"webhook: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    receiver.start()
    print(f"webhook: listening on {receiver.url}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
