"""The bundled example app behaves as the Quick start describes, each failure reported."""

from __future__ import annotations

import contextlib

import httpx

from sentinel import instrument
from sentinel.example.app import app
from sentinel.testing import Captured, serve


def test_example_routes_and_their_reports(captured: Captured) -> None:
    """Each demo route produces its documented status and phase."""
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/items/3").json() == {"id": 3, "name": "item 3"}
        assert httpx.get(f"{url}/items/-1").status_code == 404
        assert httpx.get(f"{url}/boom").status_code == 500
        assert httpx.get(f"{url}/background").status_code == 200
        assert httpx.get(f"{url}/handled").status_code == 503
        # The stream breaks off mid-response, as designed.
        with httpx.Client() as client, contextlib.suppress(httpx.HTTPError):
            client.get(f"{url}/stream")
    phases = {report["route"]: report["phase"] for report in captured.reports}
    assert phases == {
        "/boom": "request",
        "/background": "background",
        "/handled": "request",
        "/stream": "response",
    }
