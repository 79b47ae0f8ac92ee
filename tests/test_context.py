"""Tags and contexts (``sentinel.set_tag``, ``sentinel.set_context``): on the request's own
report and record only, bounded, scrubbed, never raised into the app; outside a request, the
process's."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from helpers import request_context
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import sentinel
from sentinel import _context
from sentinel._context import (
    MAX_CONTEXT_CHARS,
    MAX_CONTEXTS,
    MAX_TAG_VALUE_CHARS,
    MAX_TAGS,
    Annotations,
    annotations_for,
)
from sentinel.testing import Captured, capture_reports, serve


class OrderFailed(Exception):
    """The app's error, raised after the request was tagged."""


@pytest.fixture(autouse=True)
def _no_process_annotations() -> Iterator[None]:
    """Tags set outside a request belong to the process: none before or after each test."""
    _context.process_annotations.clear()
    yield
    _context.process_annotations.clear()


class Watched:
    """An object whose own __str__ and __repr__ must never run (they would run app code)."""

    calls = 0

    def __str__(self) -> str:
        Watched.calls += 1
        return "ran"

    def __repr__(self) -> str:
        Watched.calls += 1
        return "ran"


def tagging_app(captured: Captured) -> Any:
    async def order(request: Request) -> PlainTextResponse:
        customer = request.path_params["customer"]
        sentinel.set_tag("customer", customer)
        sentinel.set_context("order", {"id": 1042, "customer": customer, "items": [1, 2]})
        if request.query_params.get("fail"):
            raise OrderFailed(f"order of {customer} failed")
        return PlainTextResponse("ok")

    async def plain(request: Request) -> PlainTextResponse:
        raise OrderFailed("no tags here")

    async def from_a_task(request: Request) -> PlainTextResponse:
        async def tag() -> None:
            sentinel.set_tag("set_in", "task")

        await asyncio.create_task(tag())
        raise OrderFailed("tagged from a task")

    def from_a_thread(request: Request) -> PlainTextResponse:  # Starlette's thread pool
        sentinel.set_tag("set_in", "thread")
        raise OrderFailed("tagged from a thread")

    routes = [
        Route("/orders/{customer}", order),
        Route("/plain", plain),
        Route("/task", from_a_task),
        Route("/thread", from_a_thread),
    ]
    return sentinel.instrument(Starlette(routes=routes), sentinel=captured.sentinel)


def by_path(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["path"]: record for record in records}


def test_tags_and_contexts_go_on_that_requests_report_and_record_only(captured: Captured) -> None:
    """Through a real server: each request's report and request record carry the tags and
    contexts that request set, and nothing of another request's (nor of a request that set
    none); a task or a thread-pool call of the request tags that request."""
    app = tagging_app(captured)
    headers = {"connection": "close"}
    with serve(app) as url, httpx.Client(base_url=url, timeout=10, headers=headers) as client:
        assert client.get("/orders/acme", params={"fail": "1"}).status_code == 500
        assert client.get("/orders/globex").status_code == 200
        assert client.get("/plain").status_code == 500
        assert client.get("/task").status_code == 500
        assert client.get("/thread").status_code == 500
        captured.wait_for(4)
    reports = by_path(captured.reports)
    records = by_path(captured.request_records)

    order = {"id": 1042, "customer": "acme", "items": [1, 2]}
    for record in (reports["/orders/acme"], records["/orders/acme"]):
        assert record["tags"] == {"customer": "acme"}
        assert record["contexts"] == {"order": order}
        assert "scope_truncated" not in record
    assert records["/orders/globex"]["tags"] == {"customer": "globex"}
    assert not {"tags", "contexts"} & (set(reports["/plain"]) | set(records["/plain"]))
    assert reports["/task"]["tags"] == {"set_in": "task"}
    assert reports["/thread"]["tags"] == {"set_in": "thread"}


def test_bounds_are_kept_and_what_is_cut_is_counted() -> None:
    """More tags and contexts than the bounds, a long value, a long key, a huge and a deep
    context: the bounds hold, and ``scope_truncated`` counts what was refused or cut."""
    annotations = Annotations()
    for number in range(MAX_TAGS + 5):
        annotations.set_tag(f"tag{number}", number)
    assert len(annotations.tags) == MAX_TAGS
    assert annotations.truncated == 5
    annotations.set_tag("tag0", "word " * 1000)  # an existing tag may still be changed
    assert annotations.tags["tag0"] == "word " * 38 + "word..."
    assert len(annotations.tags["tag0"]) <= MAX_TAG_VALUE_CHARS
    annotations.set_tag("k" * 33, "refused: the key is longer than 32 characters")
    assert "k" * 33 not in annotations.tags
    assert annotations.truncated == 7
    annotations.set_tag("tag1", "x" * 1000)  # one token the cut would split: left out
    assert annotations.tags["tag1"] == "..."

    contexts = Annotations()
    for number in range(MAX_CONTEXTS + 2):
        contexts.set_context(f"context{number}", {"n": number})
    assert len(contexts.contexts) == MAX_CONTEXTS
    assert contexts.truncated == 2

    big = Annotations()
    big.set_context("huge", {f"key{number}": "v" * 100 for number in range(100)})
    big.set_context("deep", {"one": {"two": {"three": {"four": 4}}, "kept": True}})
    assert sum(len(key) + len(value) for key, value in big.contexts["huge"].items()) <= (
        MAX_CONTEXT_CHARS
    )
    assert 10 <= len(big.contexts["huge"]) < 100
    assert big.contexts["deep"] == {"one": {"two": {}, "kept": True}}
    assert big.truncated >= 2
    request = request_context()
    request.annotations = big
    assert annotations_for(request)["scope_truncated"] == big.truncated


SECRET_URL = "postgres://orders:hunter2-cut-q7@db.internal:5432/orders"
BEFORE_AT = "postgres://orders:hunter2-cut-q7"


@pytest.mark.parametrize("shift", [-6, -1, 0])
def test_a_cut_value_keeps_no_part_of_a_secret_the_cut_would_split(shift: int) -> None:
    """A tag value and a context value are cut on the request path and scrubbed later: cut
    (``shift`` characters) before a URL's ``@``, the URL no longer looked like one and its
    password was written, in the report and the request record. The cut falls at whitespace
    now, and the token it would split is left out whole."""
    note = "failover to replica after 3 attempts; "

    async def failover(request: Request) -> PlainTextResponse:
        tag_pad = MAX_TAG_VALUE_CHARS - len(note) - len(BEFORE_AT) + shift
        sentinel.set_tag("upstream", note + "x" * tag_pad + SECRET_URL)
        # The context's budget holds its keys and values; the last 3 characters kept are
        # "...": what is left for the URL ends `shift` characters before its "@".
        context_pad = MAX_CONTEXT_CHARS - len("pad") - len("target") - len(BEFORE_AT) - 3
        sentinel.set_context("db", {"pad": "y" * (context_pad - shift), "target": SECRET_URL})
        raise OrderFailed("db failover failed")

    with capture_reports() as captured:
        app = sentinel.instrument(
            Starlette(routes=[Route("/failover", failover)]), sentinel=captured.sentinel
        )
        sentinel.testing.Client(app).get("/failover")
        captured.flush()
        [report] = captured.reports
        [record] = captured.request_records
        output = captured.stream.getvalue()
    assert "hunter2" not in output and "cut-q7" not in output
    for written in (report, record):
        assert written["tags"]["upstream"] == note.rstrip() + "..."
        assert written["contexts"]["db"]["target"] == "..."
        assert written["scope_truncated"] == 2


def test_values_are_taken_without_running_the_apps_code() -> None:
    """Text, numbers, booleans, None, dates, UUIDs and decimals are kept as they are; other
    objects become ``<TypeName>`` without their own __str__ or __repr__ running; a str
    subclass is taken as its text."""

    class Label(str):
        def __str__(self) -> str:
            Watched.calls += 1
            return "ran"

    Watched.calls = 0
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    order_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    annotations = Annotations()
    annotations.set_tag("object", Watched())
    annotations.set_tag("label", Label("gold"))
    annotations.set_tag("count", 3)
    annotations.set_tag("ratio", 0.5)
    annotations.set_tag("flag", True)
    annotations.set_tag("big", 10**400)
    annotations.set_context(
        "values",
        {
            "when": moment,
            "id": order_id,
            "price": decimal.Decimal("9.99"),
            "object": Watched(),
            "nothing": None,
            "nan": float("nan"),
            "tuple": (1, "two"),
            ("not", "a", "key"): 1,
        },
    )
    assert Watched.calls == 0
    assert annotations.tags == {
        "object": "<Watched>",
        "label": "gold",
        "count": "3",
        "ratio": "0.5",
        "flag": "true",
        "big": "<int>",
    }
    assert annotations.contexts["values"] == {
        "when": "2026-01-02 03:04:05+00:00",
        "id": "12345678-1234-5678-1234-567812345678",
        "price": "9.99",
        "object": "<Watched>",
        "nothing": None,
        "nan": "nan",
        "tuple": [1, "two"],
    }
    assert annotations.truncated == 1  # the tuple key


class BrokenMapping(Mapping[str, Any]):
    """A mapping whose iteration fails."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("cannot iterate")

    def __len__(self) -> int:
        return 1


class Hostile:
    """Equality and hashing that fail, as a key."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no")

    def __hash__(self) -> int:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (None, "value"),
        (42, "value"),
        ("", "value"),
        (Hostile(), "value"),
        ("name", BrokenMapping()),
        ("name", ["not", "a", "mapping"]),
        ("name", "not a mapping"),
    ],
    ids=["none-key", "int-key", "empty-key", "hostile-key", "broken", "list", "text"],
)
def test_bad_input_is_counted_never_raised(key: Any, value: Any) -> None:
    """Inside a request and outside one, set_tag and set_context never raise into the app:
    what they refuse is counted in ``scope_truncated``."""
    request = request_context()
    token = _context.current_request.set(request)
    try:
        sentinel.set_context(key, value)
        sentinel.set_tag(key, value)
    finally:
        _context.current_request.reset(token)
    sentinel.set_context(key, value)
    sentinel.set_tag(key, value)
    for scope in (request.annotations, _context.process_annotations):
        assert scope is not None
        assert scope.truncated >= 1
        assert scope.contexts == {}


def test_none_removes_a_tag_or_a_context() -> None:
    """set_tag(key, None) and set_context(name, None) remove what was set."""
    annotations = Annotations()
    annotations.set_tag("customer", "acme")
    annotations.set_context("order", {"id": 1})
    annotations.set_tag("customer", None)
    annotations.set_context("order", None)
    assert annotations.empty


def test_tags_and_contexts_are_scrubbed_by_key_and_by_value(captured: Captured) -> None:
    """A tag or context entry under a secret-looking key is masked whole (numbers too), a
    context with a secret-looking name is masked throughout, and secrets in ordinary text
    are scrubbed by value: in the report and in the record alike."""

    async def checkout(request: Request) -> PlainTextResponse:
        sentinel.set_tag("api_key", "sk_live_1234567890")
        sentinel.set_tag("note", "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345")
        sentinel.set_context("card", {"pin": 918273, "last4": "4242", "holder": "A. Customer"})
        sentinel.set_context("session", {"id": "sess-7f3a9c", "user": "acme"})
        raise OrderFailed("declined")

    app = sentinel.instrument(
        Starlette(routes=[Route("/checkout", checkout)]), sentinel=captured.sentinel
    )
    with serve(app) as url:
        assert httpx.get(f"{url}/checkout", timeout=10).status_code == 500
    [report] = captured.wait_for(1)
    [record] = captured.request_records
    for written in (report, record):
        text = str(written)
        secrets = ("sk_live_1234567890", "abcdefghijklmnopqrstuvwxyz012345", "918273", "7f3a9c")
        for secret in secrets:
            assert secret not in text, (secret, written)
        assert written["tags"]["api_key"].startswith("[scrubbed len=18 ")
        assert written["tags"]["note"].startswith("Authorization: ")
        assert written["contexts"]["card"]["pin"].startswith("[scrubbed len=6 ")
        assert written["contexts"]["card"]["last4"] == "4242"
        assert written["contexts"]["card"]["holder"] == "A. Customer"
        assert written["contexts"]["session"]["user"].startswith("[scrubbed")


def test_outside_a_request_they_set_the_process_scope(captured: Captured) -> None:
    """Set outside any request (at startup, in a job), a tag or context goes on every report
    and record written after, in and outside requests; a request's own tag of the same name
    wins for that request."""
    sentinel.set_tag("deployment", "blue")
    sentinel.set_tag("customer", "nobody")
    sentinel.set_context("build", {"commit": "abc1234"})
    app = tagging_app(captured)
    with serve(app) as url:
        httpx.get(f"{url}/orders/acme", params={"fail": "1"}, timeout=10)
    try:
        raise OrderFailed("in a job")
    except OrderFailed as error:
        sentinel.capture_exception(error)
    [in_request] = captured.wait_for(1)
    [in_job] = captured.wait_for(1, event="handled_exception")
    [record] = captured.request_records
    for written in (in_request, record):
        assert written["tags"] == {"deployment": "blue", "customer": "acme"}
        assert written["contexts"]["build"] == {"commit": "abc1234"}
        assert written["contexts"]["order"]["customer"] == "acme"
    assert in_job["tags"] == {"deployment": "blue", "customer": "nobody"}
    assert in_job["contexts"] == {"build": {"commit": "abc1234"}}


def test_the_process_scope_can_be_saved_and_put_back() -> None:
    """save_process_annotations() and restore_process_annotations() put the process's tags,
    contexts and count of what was cut back as they were (what sentinel.testing does around
    each block), forgetting what was set or removed since."""
    sentinel.set_tag("region", "eu")
    sentinel.set_context("build", {"commit": "abc1234"})
    saved = _context.save_process_annotations()
    sentinel.set_tag("region", "us")
    sentinel.set_tag("test_name", "a")
    sentinel.set_context("build", None)
    sentinel.set_tag("", "refused")  # counted as cut
    _context.restore_process_annotations(saved)
    assert annotations_for(None) == {
        "tags": {"region": "eu"},
        "contexts": {"build": {"commit": "abc1234"}},
    }
    sentinel.set_tag("later", "x")
    assert saved.tags == {"region": "eu"}  # the saved state is a copy, not a view


def test_without_tags_records_and_reports_have_no_such_fields() -> None:
    """Nothing set, nothing written: no empty ``tags`` or ``contexts`` fields."""
    with capture_reports() as cap:
        try:
            raise OrderFailed("untagged")
        except OrderFailed as error:
            cap.sentinel.capture_exception(error, "request")
        [report] = cap.reports
    assert not {"tags", "contexts", "scope_truncated"} & set(report)


def test_a_bytes_path_is_taken_as_text(captured: Captured) -> None:
    """A scope whose ``path`` is bytes (illegal in ASGI, yet some test clients and servers
    send one): its first exception is reported in full, the path written as text."""
    scope = {"type": "http", "method": "GET", "path": b"/orders/\xe9", "headers": []}
    assert _context.text_path(b"/orders/\xe9") == "/orders/\xe9"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise OrderFailed("with a bytes path")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    with pytest.raises(OrderFailed):
        asyncio.run(sentinel.instrument(app, sentinel=captured.sentinel)(scope, receive, send))
    [report] = captured.reports
    assert (report["message"], report["path"]) == ("with a bytes path", "/orders/\xe9")
    assert captured.metric("sentinel_internal_errors_total", component="reporter") == 0
