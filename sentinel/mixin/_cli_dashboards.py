"""``sentinel dashboards``: the Grafana dashboards, one JSON file each."""

from __future__ import annotations

import argparse
import sys

from ._options import add_config_option, load_config, output_directory, write_file_atomically

_DESCRIPTION = """\
Write sentinel's Grafana dashboards as JSON files, ready to import or provision:

  <prefix>-overview    requests by status class, error ratio per location against the
                       SLO, error budget remaining, burn rates, latency p50/p90/p99, the
                       release each location runs, traffic and each 4xx code's share
                       against their baselines, 4xx share by release;
  <prefix>-exceptions  unhandled exceptions by type, phase, route and location, new types,
                       links from a route to its traces in Tempo;
  <prefix>-health      sentinel's own signals: records seen and kept, dropped reports,
                       internal errors, global state mutations, event-loop lag.

The uid prefix, tags, SLO, label names and rate window come from the monitoring config.
Each file is <uid>.json, written whole or not at all. Needs grafana-foundation-sdk:
pip install 'sentinel-asgi[dashboards]'.

Example: sentinel dashboards -o dashboards
"""

INSTALL_HINT = "dashboards need grafana-foundation-sdk: pip install 'sentinel-asgi[dashboards]'"


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``dashboards`` subcommand."""
    parser = commands.add_parser(
        "dashboards",
        help="write sentinel's Grafana dashboards (JSON)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        default="dashboards",
        help="directory to write <uid>.json files into (default: ./dashboards)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate every dashboard, then write them; a config error propagates (exit status 2,
    nothing written)."""
    config = load_config(args)
    try:
        from ._dashboards import dashboard_files
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("grafana_foundation_sdk"):
            raise
        print(f"sentinel dashboards: {INSTALL_HINT}", file=sys.stderr)
        return 2
    directory = output_directory(args.output)
    files = dashboard_files(config)
    for name, text in files.items():
        write_file_atomically(directory / name, text)
    return 0
