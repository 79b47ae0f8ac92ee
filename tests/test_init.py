"""The public surface: small, sorted, and free of import-time side effects."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import sentinel


def test_all_is_sorted_and_matches_the_exports() -> None:
    """__all__ is sorted and every name in it exists (the surface changes only on purpose)."""
    assert sentinel.__all__ == sorted(sentinel.__all__)
    public = {name for name in dir(sentinel) if not name.startswith("_")} - {"annotations"}
    modules = {"types", "testing", "cli", "example"}
    assert public - modules <= set(sentinel.__all__) | {"__version__"}
    for name in sentinel.__all__:
        assert hasattr(sentinel, name), name


def test_importing_sentinel_has_no_side_effects() -> None:
    """Import reads no environment, starts no thread and installs no hook."""
    code = textwrap.dedent(
        """
        import os, sys, threading, logging
        before = (sys.excepthook, threading.excepthook, sys.unraisablehook,
                  logging.Logger.error, threading.active_count())
        os.environ["SENTINEL_METRICS_PORT"] = "not a number"  # would fail if read
        import sentinel, sentinel.testing, sentinel.cli
        after = (sys.excepthook, threading.excepthook, sys.unraisablehook,
                 logging.Logger.error, threading.active_count())
        assert before == after, (before, after)
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
