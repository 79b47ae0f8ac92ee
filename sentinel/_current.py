"""The process's current sentinel: the one slot that hooks and watchers report to.

A leaf module (it imports nothing of sentinel's at run time), so that everything that only
needs to ask "which sentinel?" can import it without importing the runtime that builds one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._runtime import Sentinel

_current: Sentinel | None = None
lock = threading.Lock()
"""Held while the slot changes (and by whoever must act on one sentinel atomically)."""


def current() -> Sentinel | None:
    """The most recently installed sentinel, which the process-level hooks report to."""
    return _current


def swap(sentinel: Sentinel | None) -> Sentinel | None:
    """Make ``sentinel`` the current one; returns the previous one."""
    global _current
    with lock:
        previous, _current = _current, sentinel
    return previous
