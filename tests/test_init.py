"""The public surface: small, sorted, and free of import-time side effects."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import sentinel

EXPORTED = {
    "AppProtocolError",
    "Config",
    "ConfigError",
    "ConfigOptions",
    "GlobalStateMutated",
    "Sentinel",
    "SentinelMiddleware",
    "__version__",
    "capture",
    "capture_exception",
    "current",
    "install",
    "instrument",
    "set_context",
    "set_tag",
    "watch",
}
"""The documented public surface (README: "Wrapping an app"; docs/reporting.md, where
``set_tag`` and ``set_context`` are)."""


def test_all_is_sorted_and_is_the_documented_surface() -> None:
    """__all__ is sorted, equals the documented set, and every name in it exists; nothing
    else public is exported (the surface changes only on purpose)."""
    assert sentinel.__all__ == sorted(sentinel.__all__)
    assert set(sentinel.__all__) == EXPORTED
    public = {name for name in vars(sentinel) if not name.startswith("_")} - {"annotations"}
    modules = {"types", "testing", "cli", "example", "mixin", "gate"}
    assert public - modules == EXPORTED - {"__version__"}
    for name in EXPORTED - {"__version__"}:
        assert getattr(sentinel, name).__module__.startswith("sentinel"), name


def test_the_package_has_no_import_cycle() -> None:
    """No module imports one that imports it back (top level or inside functions): data
    and control flow one way, from the middleware down to the sinks."""
    import ast
    from pathlib import Path

    root = Path(sentinel.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in type_only:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if node.module:
                    targets.add(".".join([*base, node.module]))
                else:
                    targets.update(".".join([*base, alias.name]) for alias in node.names)
        graph[module] = targets - {module}
    for module in graph:
        graph[module] &= set(graph)

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), list(graph[start])
        while stack:
            current = stack.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                stack.extend(graph[current])
        return False

    # The package __init__ imports the public names from below; nothing imports it back.
    cycles = [module for module in graph if module != "sentinel" and reaches(module, module)]
    assert cycles == []
    assert [
        module for module in graph if module != "sentinel" and "sentinel" in graph[module]
    ] == []


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
