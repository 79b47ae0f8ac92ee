"""What the operator commands share: ``--config FILE`` with flag overrides, and ``-o`` output
written whole or not at all."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._config import MonitoringConfig


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the monitoring config (YAML or TOML); flags given override it."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="monitoring config, YAML or TOML (default: the built-in defaults)",
    )


def load_config(args: argparse.Namespace, **overrides: Any) -> MonitoringConfig:
    """The config from ``--config`` (or the defaults), with every override that is not None
    applied; raises MonitoringConfigError naming the key and the value."""
    path = getattr(args, "config", None)
    config = MonitoringConfig.load(path) if path else MonitoringConfig()
    given = {key: value for key, value in overrides.items() if value is not None}
    return config.replace(**given) if given else config


class OutputError(ValueError):
    """``-o`` names something the command cannot write as asked."""


def write_text(text: str, output: str | None) -> None:
    """``text`` to stdout, or to the file ``output`` atomically: a temporary file beside it,
    fsync, rename, so a failure never leaves a half-written file."""
    if output is None or output == "-":
        sys.stdout.write(text)
        return
    if Path(output).is_dir():
        msg = f'"--output" names a directory, not a file: {output!r}'
        raise OutputError(msg)
    write_file_atomically(Path(output), text)


def output_directory(output: str) -> Path:
    """``output`` as the directory to write files into; it need not exist yet."""
    directory = Path(output)
    if directory.exists() and not directory.is_dir():
        msg = f'"--output" names a file, not a directory: {output!r}'
        raise OutputError(msg)
    return directory


def write_file_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, whole:
    a temporary file beside it, fsync, rename, fsync of the directory. A symbolic link is
    written through, as ``>`` would: the file it points to is replaced, the link stays."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes it 0600: keep the mode of the file it replaces, else the usual 0644
        # (a server in a container running as another user must be able to read it).
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (where directories can be opened: not on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
