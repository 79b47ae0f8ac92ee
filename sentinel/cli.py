"""The ``sentinel`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._config import ConfigError
from ._version import __version__

_RUN_DESCRIPTION = """\
Serve an ASGI app with uvicorn, wrapped in sentinel's middleware.

sentinel's hooks are installed before the app is imported, so an exception raised while
importing it is reported (phase "import") and the command exits with status 1.
Configuration comes from the SENTINEL_* and OTEL_* environment variables. Every option
after MODULE:APP is passed to uvicorn unchanged (see `uvicorn --help`), for example
--host, --port, --workers, --factory. uvicorn's access log is replaced by sentinel's
scrubbed request records, so no raw query string reaches the output.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sentinel",
        description="Observability sidecar and unhandled-exception reporter for ASGI apps.",
    )
    parser.add_argument("--version", action="version", version=f"sentinel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve MODULE:APP with uvicorn, wrapped by sentinel",
        description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("app", metavar="MODULE:APP", help='the ASGI app, e.g. "mypkg.main:app"')
    run.add_argument(
        "server_options",
        nargs=argparse.REMAINDER,
        metavar="UVICORN OPTIONS",
        help="passed to uvicorn",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.app, list(args.server_options))
    except ConfigError as error:
        print(f"sentinel: configuration error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


def _run(target: str, server_options: list[str]) -> int:
    import uvicorn

    from . import _served
    from ._runtime import install

    try:
        _served.parse_target(target)
    except _served.TargetError as error:
        print(f"sentinel run: {error}", file=sys.stderr)
        return 2
    factory = "--factory" in server_options
    server_options = [option for option in server_options if option != "--factory"]
    os.environ[_served.TARGET_VARIABLE] = target
    os.environ[_served.FACTORY_VARIABLE] = "1" if factory else "0"
    sentinel = install(service_fallback=_served.parse_target(target)[0])
    # Import here first, in the parent process: a broken app fails fast, reported once,
    # before uvicorn starts (workers import it again through the factory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        _served.load_and_report(sentinel, target, factory=factory)
    except BaseException:
        sentinel.close()
        return 1
    uvicorn_args = [
        f"{_served.__name__}:create_app",
        "--factory",
        "--no-access-log",
        *server_options,
    ]
    try:
        uvicorn.main.main(args=uvicorn_args, prog_name="sentinel run", standalone_mode=False)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sentinel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
