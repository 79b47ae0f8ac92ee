"""Shared fixtures: a fresh sentinel per test, and real uvicorn servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sentinel import _hooks
from sentinel.testing import Captured, capture_reports


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A fresh sentinel (own registry, in-memory output) that the hooks report to."""
    with capture_reports(task_grace_seconds=0.05) as cap:
        yield cap


@pytest.fixture(autouse=True, scope="session")
def _restore_hooks() -> Iterator[None]:
    yield
    _hooks.uninstall_process_hooks()
