"""``sentinel gate``: may a progressive deployment widen its rollout? Exit 0 continue, 1 stop,
2 cannot decide."""

from __future__ import annotations

import argparse
import sys

from ._config import MonitoringConfigError, parse_duration
from ._options import add_config_option, load_config

_DESCRIPTION = """\
Compare the server errors of a new release with a baseline release in every location, from
Prometheus, before a progressive deployment widens its rollout.

For each location the new version served in the window, the gate asks Prometheus
(/api/v1/query) for the requests and server errors (5xx, invalid statuses, responses that
failed mid-stream) of the instances on each release (sentinel_build_info{version}, joined
on job and instance like SentinelReleaseErrorRatioRegression), and tests the counts at the
config's regression_confidence: a regression is an error ratio regression_factor times the
baseline's and at least regression_min_ratio, as the alert says. The baseline is --baseline,
else the other version that served the most requests in that location.

Exit status: 0 continue (a regression is ruled out everywhere), 1 stop (a regression, the
locations are named), 2 cannot decide (too little traffic, with the requests it would take;
an unknown version; Prometheus unreachable or answering errors; bad input).

Example: sentinel gate --prometheus http://prometheus:9090 --new 2024.06.1 --window 15m
"""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``gate`` subcommand."""
    parser = commands.add_parser(
        "gate",
        help="decide from Prometheus whether a rollout may widen (exit 0/1/2)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL")
    parser.add_argument(
        "--new", required=True, metavar="VERSION", help="the release being rolled out"
    )
    parser.add_argument(
        "--baseline",
        metavar="VERSION",
        help="the release to compare with (default: the busiest other one per location)",
    )
    parser.add_argument(
        "--location",
        action="append",
        dest="locations",
        default=[],
        metavar="LOCATION",
        help="judge only this location; repeat for several (default: every location the "
        "new version served)",
    )
    parser.add_argument(
        "--window",
        metavar="DURATION",
        help="how far back to count, e.g. 10m (default: the config's regression_window, "
        "scaled by time_scale)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a Prometheus query after this long (default: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")
    add_config_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Query, decide, print; returns the exit status. Input errors exit 2 before any query."""
    import time

    from .. import gate

    try:
        new_version = gate.check_version(args.new, "--new")
        baseline = (
            None if args.baseline is None else gate.check_version(args.baseline, "--baseline")
        )
        locations = [gate.check_location(location) for location in args.locations]
        config = load_config(args)
        window = args.window or config.window(config.regression_window)
        try:
            parse_duration(window)
        except MonitoringConfigError as error:
            raise gate.GateInputError(f'"--window" {error}') from None
        client = gate.PrometheusClient(args.prometheus, timeout=args.timeout)
    except ValueError as error:  # GateInputError, MonitoringConfigError, a bad URL or timeout
        print(f"sentinel gate: {error}", file=sys.stderr)
        return 2
    context = {
        "prometheus": client.url,
        "window": window,
        "baseline": baseline,
        "confidence": config.regression_confidence,
    }
    try:
        traffic = gate.fetch_traffic(client, config, window, time.time())
    except gate.PrometheusError as error:
        decision = gate.undecided(new_version, f"cannot decide: {error}")
    else:
        decision = gate.decide(
            traffic.counts,
            new_version,
            gate.Thresholds.from_config(config),
            versions=traffic.versions,
            baseline_version=baseline,
            locations=locations,
        )
    render = gate.render_json if args.json else gate.render_table
    sys.stdout.write(render(decision, context))
    sys.stdout.flush()
    return decision.exit_code
