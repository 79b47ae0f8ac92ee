"""pytest plugin: every Starlette ``TestClient`` serves its app wrapped by sentinel.

Load it into a third-party suite (Starlette's, FastAPI's) with
``PYTHONPATH=tests/suites pytest -p wrap_with_sentinel``; ``tests/suites/run.sh`` does.
FastAPI's ``TestClient`` is Starlette's, so both suites go through the patched
``__init__``. Each client gets its own sentinel, as an app instrumented from the outside
would: ``sentinel.instrument(app, registry=<fresh registry>, stream=<in memory>,
metrics_port=0)``, the rest of the configuration from the ``SENTINEL_*`` variables. The
sentinels a test created are closed when it ends (what the process's exit would do), so
what closing does lands in that test and not in the next one's.

When ``SENTINEL_SUITES_REPORT`` names a file, each pytest process appends JSON lines to it:
one ``{"clients": N, "sentinel_threads": N, "events": {...}, "mutations": {...}}`` (how
many apps it wrapped, how many of sentinel's threads were still alive at its end, the
records sentinel wrote by event, and the ``global_state_mutated`` ones by target, key and
route), and one per sentinel that counted internal errors (failures inside sentinel that it
caught, so no test sees them): ``{"origin": <test id or "collection">, "component": ...,
"count": ...}``.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import sentinel

_wrapped: list[tuple[str, sentinel.SentinelMiddleware]] = []
_per_test: list[sentinel.SentinelMiddleware] = []
_current_test = "collection"
_original_init: Any = None


def wrap(app: Any) -> Any:
    """``app`` behind a fresh sentinel, as the client will call it (ASGI 3)."""
    if isinstance(app, sentinel.SentinelMiddleware):
        return app  # the test instrumented it itself
    from starlette import testclient

    is_asgi3 = getattr(testclient, "_is_asgi3", None)
    wrap_asgi2 = getattr(testclient, "_WrapASGI2", None)
    asgi3 = is_asgi3(app) if is_asgi3 is not None else not inspect.isclass(app)
    if not asgi3 and wrap_asgi2 is not None:
        app = wrap_asgi2(app)  # what the client does itself with an ASGI 2 app
    middleware = sentinel.instrument(
        app, registry=CollectorRegistry(), stream=io.StringIO(), metrics_port=0
    )
    _wrapped.append((_current_test, middleware))
    if _current_test != "collection":
        _per_test.append(middleware)
    return middleware


def pytest_configure(config: pytest.Config) -> None:
    global _original_init
    from starlette.testclient import TestClient

    original = TestClient.__init__
    _original_init = original

    def __init__(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        original(self, wrap(app), *args, **kwargs)

    TestClient.__init__ = __init__  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    from starlette.testclient import TestClient

    if _original_init is not None:
        TestClient.__init__ = _original_init  # type: ignore[method-assign]
    _write_report()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _current_test
    _current_test = item.nodeid
    try:
        return (yield)
    finally:
        _current_test = "collection"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    while _per_test:
        _per_test.pop().sentinel.close()


def _write_report() -> None:
    path = os.environ.get("SENTINEL_SUITES_REPORT")
    if not path:
        return
    # Before the collection-time sentinels are closed: what is left running by then leaks.
    threads = sum(1 for t in threading.enumerate() if t.name.startswith("sentinel-"))
    events: Counter[str] = Counter()
    mutations: Counter[str] = Counter()
    lines = []
    for origin, middleware in _wrapped:
        registry = middleware.sentinel.registry
        if registry is None:
            continue
        middleware.sentinel.close()  # writes what is pending
        stream = middleware.sentinel.stream
        for text in stream.getvalue().splitlines() if isinstance(stream, io.StringIO) else ():
            record = json.loads(text)
            events[record.get("event", "?")] += 1
            if record.get("event") == "global_state_mutated":
                where = f"{record.get('target')} {record.get('key')!r} in {record.get('route')}"
                mutations[where] += 1
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "sentinel_internal_errors_total" and sample.value:
                    component = sample.labels.get("component", "")
                    entry = {"origin": origin, "component": component, "count": sample.value}
                    lines.append(json.dumps(entry) + "\n")
    summary = {
        "clients": len(_wrapped),
        "sentinel_threads": threads,
        "events": dict(events),
        "mutations": dict(mutations.most_common(20)),
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(summary) + "\n")
        out.writelines(lines)
