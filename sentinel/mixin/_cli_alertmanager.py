"""``sentinel alertmanager``: the Alertmanager routing for sentinel's alerts."""

from __future__ import annotations

import argparse
import dataclasses

from ._config import MonitoringConfigError
from ._options import add_config_option, load_config, write_text

_DESCRIPTION = """\
Write an Alertmanager configuration (YAML) that routes sentinel's alerts:

  pages to the sentinel-page receiver, tickets to sentinel-ticket, and SentinelWatchdog to
  sentinel-watchdog, a dead man's switch notified every minute;
  the per-location pages of one SLO are grouped into one notification;
  a global page holds back the same SLO's per-location burn alerts and the location
  outliers, a location's page holds back that location's tickets (a page of one 4xx code,
  those of no code and of that code only), and SentinelErrorRecordsMissing is never held
  back.

Receivers are webhooks: page_receiver, ticket_receiver and watchdog_receiver in the config
(url, or url_file for Alertmanager 0.26+, and credentials_file for a bearer token: files
Alertmanager reads, so no secret is written into the output), or the --*-url flags. A
receiver without a URL is a null receiver: it exists but notifies no one.

Example: sentinel alertmanager --page-url https://pager.example/hook -o alertmanager.yaml
"""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``alertmanager`` subcommand."""
    parser = commands.add_parser(
        "alertmanager",
        help="write the Alertmanager routing for sentinel's alerts",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    for kind in ("page", "ticket", "watchdog"):
        parser.add_argument(
            f"--{kind}-url",
            metavar="URL",
            help=f"webhook of the sentinel-{kind} receiver (overrides {kind}_receiver's url)",
        )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write here, whole or not at all (default: stdout)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the configuration; a config error propagates (exit status 2, nothing written)."""
    from ._alertmanager import render_alertmanager

    config = load_config(args)
    for kind in ("page", "ticket", "watchdog"):
        url = getattr(args, f"{kind}_url")
        if url is None:
            continue
        key = f"{kind}_receiver"
        receiver = dataclasses.replace(getattr(config, key), url=url, url_file=None)
        try:
            config = config.replace(**{key: receiver})
        except MonitoringConfigError as error:
            raise MonitoringConfigError(f"--{kind}-url: {error}") from None
    write_text(render_alertmanager(config), args.output)
    return 0
