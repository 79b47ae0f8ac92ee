"""``sentinel gate``: may a progressive deployment widen its rollout? Exit 0 continue, 1 stop,
2 cannot decide. ``sentinel gate rollback-target``: the known-good release from the state
file alone."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import parse_duration
from ._options import add_config_option, load_config

if TYPE_CHECKING:
    from .. import gate as gate_module
    from ._config import MonitoringConfig

ENVIRONMENT_VARIABLE = "SENTINEL_ENVIRONMENT"

_DESCRIPTION = """\
Compare a new release with the baseline release in every location, from Prometheus, before
a progressive deployment widens its rollout; record the last known-good release.

For each location the new version served in the window, the gate asks Prometheus
(/api/v1/query) what each instance in scope (the config's selector) served, per status
code, and which release and environment it reports (sentinel_build_info), and compares the
new version with the baseline on three checks, each an exact one-sided test on the counts
at the config's regression_confidence:
  5xx ratio             server errors (5xx, invalid statuses, responses that failed
                        mid-stream): odds of failing regression_factor x the baseline's
                        and above regression_min_ratio, as
                        SentinelReleaseErrorRatioRegression says
  <code> share          each 4xx code's share of the responses (a deploy that answers 401):
                        its odds regression_factor x the baseline's and above
                        status_shift_min_ratio
  traffic per instance  requests per instance below traffic_drop_ratio x the baseline's
                        (requests that never reach the new version raise no error)
The baseline is --baseline, else the other version with the most successful responses in
that environment and location; when the new version already replaced it in the window,
the gate looks for it in the --lookback before the window. It says which and why.

With --environment (default: $SENTINEL_ENVIRONMENT) every instance in scope that runs the
new version must report that environment: one that reports another (a staging build
serving production traffic) stops the rollout. The same release in instances outside the
selector (staging's own) is no reason to stop.

With --state FILE, a decision to continue records the new version as the known-good release
of each location it judged (atomically; a stop or an undecided run leaves the file as it
is); `sentinel gate rollback-target --state FILE` prints it with nothing else running.

Exit status: 0 continue (a regression is ruled out everywhere), 1 stop (a regression or an
instance of another environment, named with its location), 2 cannot decide (too little
traffic, with the requests it would take; an unknown version; Prometheus unreachable or
answering errors; bad input or a state file that is not sentinel's, of another environment
or corrupt: then nothing is written; a continue the state file could not record).

Examples:
  sentinel gate --prometheus http://prometheus:9090 --new 2024.06.1 --window 15m
  sentinel gate --prometheus http://prometheus:9090 --new 2024.06.1 \\
      --environment production --state gate-state.json
"""

_ROLLBACK_DESCRIPTION = """\
Print the last known-good release from the gate's state file, with no network and no
Prometheus: the rollback target when the observability stack, the dashboard or the login
is down.

With --location, that location's; without, the one every location recorded (when they
differ, exit 2 naming each). --exclude skips the release being rolled back, so that the
release known good before it is printed. --json prints the records with when each was last
seen healthy. Exit 0 printed, 2 nothing to print (no such file, no record, a file that is
not sentinel's, of another --environment, or corrupt).

Example: sentinel gate rollback-target --state gate-state.json --location fra --exclude v2
"""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``gate`` subcommand and its ``rollback-target`` sub-command."""
    parser = commands.add_parser(
        "gate",
        help="decide from Prometheus whether a rollout may widen (exit 0/1/2)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--prometheus", metavar="URL", help="Prometheus base URL (required to decide)"
    )
    parser.add_argument(
        "--new", metavar="VERSION", help="the release being rolled out (required to decide)"
    )
    parser.add_argument(
        "--baseline",
        metavar="VERSION",
        help="the release to compare with (default: per location, the other one with the most "
        "successful responses)",
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
        "--environment",
        metavar="NAME",
        help=f"the environment the instances in scope serve (default: ${ENVIRONMENT_VARIABLE}; "
        "none: not checked)",
    )
    parser.add_argument(
        "--window",
        metavar="DURATION",
        help="how far back to count, e.g. 10m (default: the config's regression_window, "
        "scaled by time_scale)",
    )
    parser.add_argument(
        "--lookback",
        metavar="DURATION",
        help="how far before the window to look for a baseline the new version replaced "
        "(default: 1d, scaled by time_scale)",
    )
    parser.add_argument(
        "--traffic-ratio",
        type=float,
        metavar="RATIO",
        help="requests per instance below this share of the baseline's stop the rollout "
        "(default: the config's traffic_drop_ratio; 0 turns the check off)",
    )
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="record a decision to continue as the known-good release here (needs an environment)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up when Prometheus has not answered every query of the decision within"
        " this long, at most 3600 (default: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")
    add_config_option(parser)
    parser.set_defaults(handler=run)
    sub_commands = parser.add_subparsers(
        dest="gate_command", title="sub-commands", metavar="[rollback-target]"
    )
    rollback = sub_commands.add_parser(
        "rollback-target",
        help="print the last known-good release from the state file (no network)",
        description=_ROLLBACK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollback.add_argument("--state", required=True, metavar="FILE", help="the gate's state file")
    rollback.add_argument("--location", metavar="LOCATION", help="the location to roll back")
    rollback.add_argument(
        "--exclude", metavar="VERSION", help="never this release (the one being rolled back)"
    )
    rollback.add_argument(
        "--environment", metavar="NAME", help="refuse a state file of another environment"
    )
    rollback.add_argument(
        "--json", action="store_true", help="print the records as JSON, not the release alone"
    )
    rollback.set_defaults(handler=run_rollback_target)


def run(args: argparse.Namespace) -> int:
    """Query, decide, record, print; returns the exit status. Input errors (a state file
    that cannot be used included) exit 2 before any query, and nothing is written. Never
    raises: an unexpected error is 2, cannot decide (a traceback would exit 1, "stop")."""
    return _never_raising("sentinel gate", "cannot decide", _run, args)


def _never_raising(
    command: str, outcome: str, handler: Callable[[argparse.Namespace], int], args: Any
) -> int:
    """``handler(args)``, or 2 with one line on stderr naming the error when it raises: the
    gate's 1 means "stop the rollout" and 0 "widen it", and a crash must read as neither."""
    try:
        return handler(args)
    except Exception as error:  # any failure is "cannot decide", never 1
        detail = " ".join(str(error).split())[:500]
        named = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        if isinstance(error, OSError):  # a full disk, a closed stdout: no bug of sentinel's
            print(f"{command}: {outcome}: {named}", file=sys.stderr)
        else:
            print(
                f"{command}: {outcome}: unexpected {named} (a bug in sentinel: please report "
                "it with the command line)",
                file=sys.stderr,
            )
        return 2


def _run(args: argparse.Namespace) -> int:
    import time

    from .. import gate

    missing = [
        option
        for option, value in (("--prometheus", args.prometheus), ("--new", args.new))
        if value is None
    ]
    if missing:
        print(
            f"sentinel gate: {' and '.join(missing)} required (or: sentinel gate "
            "rollback-target --state FILE)",
            file=sys.stderr,
        )
        return 2
    try:
        request = _Request.from_args(args)
        client = gate.PrometheusClient(args.prometheus, timeout=args.timeout)
    except ValueError as error:  # GateInputError, StateError, MonitoringConfigError, the URL
        print(f"sentinel gate: {error}", file=sys.stderr)
        return 2
    at = time.time()
    context: dict[str, Any] = {
        "prometheus": client.url,
        "window": request.window,
        "lookback": request.lookback,
        "baseline": request.baseline,
        "confidence": request.thresholds.confidence,
    }
    decision = _decide(client, request, at)
    status = decision.exit_code
    if request.state is not None:
        context["state"], status = _record(request, decision, context, at)
    if args.json:
        sys.stdout.write(gate.render_json(decision, context, exit_code=status))
    else:
        sys.stdout.write(gate.render_table(decision, context))
    sys.stdout.flush()
    return status


@dataclass(frozen=True)
class _Request:
    """What ``sentinel gate`` was asked, checked."""

    new_version: str
    baseline: str | None
    locations: list[str]
    environment: str | None
    config: MonitoringConfig
    window: str
    lookback: str
    thresholds: gate_module.Thresholds
    state: Path | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Request:
        """Check every option; raises ValueError (GateInputError, StateError,
        MonitoringConfigError) naming the option and the value."""
        import os

        from .. import gate
        from ..gate import _state

        new_version = gate.check_version(args.new, "--new")
        baseline = (
            None if args.baseline is None else gate.check_version(args.baseline, "--baseline")
        )
        if baseline == new_version:
            msg = f'"--baseline" must be another release than --new: {baseline!r}'
            raise gate.GateInputError(msg)
        locations = [gate.check_location(location) for location in args.locations]
        environment, option = args.environment, "--environment"
        if environment is None and os.environ.get(ENVIRONMENT_VARIABLE):
            environment, option = os.environ[ENVIRONMENT_VARIABLE], ENVIRONMENT_VARIABLE
        if environment is not None:
            gate.check_environment(environment, option)
        config = load_config(args)
        # An empty value (an unset CI variable in --window "$WINDOW") is refused, not taken
        # for the default.
        window = config.window(config.regression_window) if args.window is None else args.window
        lookback = config.window(gate.DEFAULT_LOOKBACK) if args.lookback is None else args.lookback
        for name, value in (("--window", window), ("--lookback", lookback)):
            gate.check_window(value, name)
        thresholds = gate.Thresholds.from_config(config)
        if args.traffic_ratio is not None:
            ratio = args.traffic_ratio
            if not 0 <= ratio < 1:
                msg = f'"--traffic-ratio" must be a ratio from 0 (off) to below 1: {ratio!r}'
                raise gate.GateInputError(msg)
            thresholds = dataclasses.replace(thresholds, traffic_ratio=ratio)
        state = None
        if args.state is not None:
            if environment is None:
                msg = (
                    f'"--state" needs --environment (or {ENVIRONMENT_VARIABLE}): a state file '
                    f"records the known-good releases of one environment: {args.state!r}"
                )
                raise gate.GateInputError(msg)
            state = Path(args.state)
            _state.check_writable(state)
            # A file that is not sentinel's, is corrupt or is another environment's is refused
            # now, before anything is asked or decided.
            _state.load_state(state, environment)
        return cls(
            new_version,
            baseline,
            locations,
            environment,
            config,
            window,
            lookback,
            thresholds,
            state,
        )


def _decide(client: gate_module.Querier, request: _Request, at: float) -> gate_module.GateDecision:
    """Ask Prometheus about the window (and, when a location has no baseline there, the
    lookback before it) and decide; a Prometheus that cannot answer is "cannot decide"."""
    from .. import gate

    new_version, environment = request.new_version, request.environment
    try:
        observation = gate.observe(client, request.config, request.window, at)
        traffic = observation.counts(new_version, environment)
        mismatches = observation.mismatches(new_version, environment) if environment else ()
        history = None
        if gate.needs_history(
            traffic,
            new_version,
            request.thresholds,
            baseline_version=request.baseline,
            locations=request.locations,
        ):
            earlier = gate.observe(
                client, request.config, request.lookback, at - parse_duration(request.window)
            )
            # The lookback ends where the window starts: a new release stopped before then
            # is no canary down at the decision.
            history = earlier.counts(new_version, environment, at_decision=False)
    except gate.PrometheusError as error:
        return gate.undecided(new_version, f"cannot decide: {error}", environment)
    return gate.decide(
        traffic,
        new_version,
        request.thresholds,
        versions=observation.versions,
        baseline_version=request.baseline,
        locations=request.locations,
        history=history,
        window=request.window,
        lookback=request.lookback,
        mismatches=mismatches,
        environment=environment,
    )


def _record(
    request: _Request,
    decision: gate_module.GateDecision,
    context: dict[str, Any],
    at: float,
) -> tuple[dict[str, Any], int]:
    """Record a decision to continue in the state file; what to report about it, and the
    exit status (2 when a continue could not be recorded)."""
    from .. import gate
    from ..gate import _state

    path, environment = request.state, request.environment
    assert path is not None and environment is not None  # checked with the input
    if decision.verdict is not gate.Verdict.CONTINUE:
        message = f"{path} unchanged: only a decision to continue records a known-good release"
        return {"file": str(path), "recorded": False, "message": message}, decision.exit_code
    evidence = {
        result.location: {
            **gate.location_json(result),
            "decided_at": _state.utc_text(at),
            "window": request.window,
            "prometheus": context["prometheus"],
            "confidence": request.thresholds.confidence,
        }
        for result in decision.locations
    }
    try:
        _state.record(path, environment, decision, evidence, at)
    except (OSError, _state.StateError) as error:
        print(
            "sentinel gate: the decision was to continue, but the state file could not be "
            f"written: {error}",
            file=sys.stderr,
        )
        message = f"NOT recorded in {path}: {error}"
        return {"file": str(path), "recorded": False, "message": message}, 2
    where = ", ".join(result.location for result in decision.locations)
    message = (
        f"recorded {decision.new_version} as the known-good release of {environment} in "
        f"{where} ({path})"
    )
    return {"file": str(path), "recorded": True, "message": message}, decision.exit_code


def run_rollback_target(args: argparse.Namespace) -> int:
    """Print the known-good release from the state file (reads nothing else); never raises:
    an unexpected error is 2 with one line on stderr, never a traceback's 1."""
    return _never_raising(
        "sentinel gate rollback-target", "nothing to print", _run_rollback_target, args
    )


def _run_rollback_target(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..gate import _state
    from ..gate._traffic import check_environment, check_location, check_version

    try:
        location = None if args.location is None else check_location(args.location)
        exclude = None if args.exclude is None else check_version(args.exclude, "--exclude")
        environment = None if args.environment is None else check_environment(args.environment)
        path = Path(args.state)
        state = _state.load_state(path, environment)
        if state is None:
            msg = f"{path}: no such state file"
            raise _state.StateError(msg)
        version, chosen = _state.rollback_target(state, str(path), location, exclude)
    except ValueError as error:  # GateInputError, StateError
        print(f"sentinel gate rollback-target: {error}", file=sys.stderr)
        return 2
    if args.json:
        document = {
            "version": version,
            "environment": state.environment,
            "state": str(path),
            "locations": {
                where: {"version": item.version, "last_seen_healthy": item.last_seen_healthy}
                for where, item in chosen.items()
            },
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(f"{version}\n")
    sys.stdout.flush()
    return 0
