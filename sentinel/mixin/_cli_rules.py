"""``sentinel rules``: the Prometheus recording and alerting rules of a monitoring config."""

from __future__ import annotations

import argparse
from fractions import Fraction

from ._options import add_config_option, load_config, write_text

_DESCRIPTION = """\
Print (or write with -o) the Prometheus recording and alerting rules for sentinel's
metrics: error-budget burn per location and for the whole service, location outliers,
release regressions (5xx ratio and 4xx shift), a 4xx code's share shifting far above its
baseline (a deploy that answers 401), a location's traffic dropping or vanishing, lost
error records, first occurrences of exception types and of global-state mutations, and
the Watchdog. Every threshold comes from the monitoring
config (--config); the flags below override it. On a bad value (an SLO so low that a burn
window could never fire included) nothing is written and the command exits with status 2.
Check the result with `promtool check rules FILE`.

Example: sentinel rules --slo 99.5 --selector 'job="api"' -o sentinel-rules.yaml
"""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sentinel rules`` to ``commands``."""
    parser = commands.add_parser(
        "rules",
        help="print the Prometheus recording and alerting rules",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument(
        "--slo", type=float, metavar="PERCENT", help="the objective, e.g. 99.9 (default: 99.9)"
    )
    parser.add_argument(
        "--selector",
        metavar="MATCHERS",
        help="""PromQL label matchers picking sentinel's series, e.g. 'job="api"', on labels
        that tell services apart (job, namespace, ...): every record keeps them and every rule
        reads only the series they select, so the rules of several selectors can share one
        Prometheus""",
    )
    parser.add_argument(
        "--time-scale",
        type=_scale,
        metavar="X",
        help="multiply every window by X, e.g. 1/60 turns 1h into 1m (for tests and demos)",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the rules; a config error propagates (the CLI prints it and exits 2)."""
    from ._rules import render_rules

    config = load_config(args, slo=args.slo, selector=args.selector, time_scale=args.time_scale)
    write_text(render_rules(config), args.output)
    return 0


def _scale(text: str) -> float:
    """A number or a fraction such as ``1/60``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        msg = f"must be a number or a fraction such as 1/60: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
