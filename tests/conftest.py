"""Shared fixtures: a fresh sentinel per test, and real uvicorn servers on loopback."""

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
