"""Benchmarks of sentinel against its peers (bench/README.md)."""

from __future__ import annotations

import signal
import sys


def unwind_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a cancelled CI job) unwind like Ctrl-C, so every ``with``
    and ``finally`` runs: the servers a benchmark started are stopped and its temporary
    directories removed, where the default action would leave them behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
