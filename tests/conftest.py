"""Shared fixtures: a fresh sentinel per test, and real uvicorn servers on loopback; under
pytest-xdist (tests/run.sh), the longest modules are handed out first."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from sentinel import _runtime
from sentinel.testing import Captured, capture_reports


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A fresh sentinel (own registry, in-memory output) that the hooks report to."""
    with capture_reports(task_grace_seconds=0.05) as cap:
        yield cap


@pytest.fixture
def clean_environ() -> Iterator[None]:
    """Whatever a test writes to the process environment is undone."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@pytest.fixture
def restore_sys_path() -> Iterator[None]:
    """sys.path as it was before the test (the same list object, as Python keeps it)."""
    before = sys.path[:]
    yield
    sys.path[:] = before


@pytest.fixture(autouse=True, scope="session")
def _restore_hooks() -> Iterator[None]:
    yield
    _runtime.uninstall_process_wide()


LONGEST_FIRST = (
    "test_soak.py",
    "test_incident.py",
    "test_mixin_rules.py",
    "test_gate_live.py",
    "test_gate_scrape_gap.py",
    "test_demo.py",
    "test_gate.py",
    "test_metrics.py",
    "test_tenants.py",
    "test_sidecar.py",
    "test_sampling.py",
    "test_tenants_live.py",
    "test_readme.py",
    "test_mixin_dashboards.py",
    "test_collector_config.py",
    "test_export_faults.py",
    "test_stack.py",
    "test_cli.py",
    "test_gate_state.py",
)
"""Modules that take the longest on their own (most wait on real servers), longest first.
Under `pytest -n N --dist loadfile --no-loadscope-reorder` each worker takes whole modules
in collection order, so starting these first keeps the run's tail short; the other modules
follow in their usual order. A module missing here only costs time, never correctness."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, the LONGEST_FIRST modules first (a stable sort: every worker
    collects the same order, as xdist requires; a plain pytest run keeps its usual order)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
