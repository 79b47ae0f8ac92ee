"""The ``sentinel`` command.

Each command imports the heavy parts it needs (uvicorn, the runtime with its
OpenTelemetry and prometheus-client setup) when it runs, so that ``sentinel --help`` and
the generators answer at once; the imports inside functions below are those.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._collector_config import (
    DEFAULT_DECISION_WAIT_SECONDS,
    DEFAULT_EXPORTER_ENDPOINT,
    DEFAULT_LATENCY_THRESHOLD_MS,
    DEFAULT_SPANS_PER_TRACE,
    collector_config,
    header_comment,
    render_yaml,
)
from ._config import ConfigError
from ._version import __version__
from .mixin import MonitoringConfigError
from .mixin._options import OutputError

if TYPE_CHECKING:
    import click

    from ._config import Config
    from ._scrub import Scrubber

_RUN_DESCRIPTION = """\
Serve an ASGI app with uvicorn, wrapped in sentinel's middleware.

sentinel's hooks are installed before the app is imported, so an exception raised while
importing it is reported (phase "import") and the command exits with status 1.
Configuration comes from the SENTINEL_* and OTEL_* environment variables, and from
uvicorn's --env-file (which needs python-dotenv); a SENTINEL_* variable that sentinel does
not read is named at the start, with the one probably meant. uvicorn's options, before or
after MODULE:APP as uvicorn takes them, are passed to it unchanged (see `uvicorn --help`),
for example --host, --port, --workers, --factory, --env-file, --app-dir. uvicorn's access
log is replaced by sentinel's sampled, scrubbed request records (no raw query string
reaches the output). With --workers N the workers' metrics are merged and served on
SENTINEL_METRICS_PORT by this process, from files in a temporary directory
(sentinel-run-*) it removes at the end; one that a killed run left behind is removed by
the next run. SENTINEL_METRICS_PORT equal to the app's --port on an overlapping address
is refused (exit status 2). When the app cannot be found, one sentence says what is
missing, where Python looked and which names come close, and nothing is reported: a wrong
MODULE:APP is no exception of the app's.

Examples:
  sentinel run sentinel.example.app:app --host 127.0.0.1 --port 8000
  sentinel run mypkg.main:app --host 0.0.0.0 --port 8000 --workers 4
  sentinel run --reload mypkg.main:app
"""


_DEMO_DESCRIPTION = """\
Play the incident sentinel comes from against the bundled example app, on 127.0.0.1, for
--duration seconds, then print a summary. Traffic comes from three locations through a
location header: healthy with sub-percent errors, then sin (3% of the traffic) failing one
request in five while the service stays under 1%, a customer failing one request in five,
a middleware failing before routing, a handler writing an environment variable, a new
exception type, and at last fra pointed at a staging build that answers 401. A live view
shows the progress and each location's error and burn rate.

When prometheus and prometheus-alertmanager are on the PATH they are started too, with
the generated rules and routing (windows scaled down to fit the run); the summary lists
the alerts Alertmanager delivered to a webhook receiver and what the rollout gate says
about the deploy. Without them (or with --no-servers) the burn rates come from sentinel's
own counters. The demo reads no SENTINEL_* or OTEL_* variable, and ignores
PROMETHEUS_MULTIPROC_DIR: it counts in its own process. Every process it starts is stopped
at the end, also on Ctrl-C, SIGTERM or SIGHUP. Exit status 1 when a part did not start,
130 on Ctrl-C, 128 + the signal's number on SIGTERM or SIGHUP.

Example: sentinel demo --duration 30 --json
"""

_SIDECAR_DESCRIPTION = """\
Serve /metrics and /healthz with the merged metrics of every worker process.

For multi-worker servers (uvicorn --workers N, gunicorn with uvicorn workers): the workers
write their metrics to the directory in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode) and this process serves them as one view on SENTINEL_METRICS_PORT.
`sentinel run --workers N` does this by itself. Exit status 2 when the directory or the
configuration is wrong, 1 when the port cannot be bound; each message names what it
tried and what to do.

Example: PROMETHEUS_MULTIPROC_DIR=/tmp/sentinel-metrics sentinel sidecar --port 9464
"""

_CONFIG_DESCRIPTION = """\
Print the configuration sentinel resolves from the environment (sentinel.Config, read by
Config.from_env as `sentinel run` and the middleware read it), each value with where it
came from: a SENTINEL_* or OTEL_* variable, the --app argument, or the default. With
traces on, the span exporters, the OTLP endpoint and the OTLP headers are shown too.
Secrets are masked with sentinel's scrubber: credentials and query values in URLs, every
OTLP header value, and anything secret-looking. Keyword arguments given in code
(sentinel.instrument(app, location=...)) win over all of these and are not seen here.

SENTINEL_* variables that sentinel does not read are listed, with the one probably meant.
An invalid value exits with status 2 and the message the middleware would give.

Examples:
  sentinel config
  SENTINEL_LOCATION=fra sentinel config --app mypkg.main:app --json
"""

_DESCRIPTION = """\
Observability sidecar and unhandled-exception reporter for ASGI apps. Every command has
its own --help, with an example.

Examples:
  sentinel run mypkg.main:app --port 8000
  sentinel config
"""

_COLLECTOR_CONFIG_DESCRIPTION = """\
Print an OpenTelemetry Collector configuration (YAML) whose tail_sampling processor applies
sentinel's policy to whole traces, for traces that cross services:

  keep every trace with an error span (status_code ERROR),
  keep every trace slower than the latency threshold (latency),
  keep every trace a service's sentinel kept on purpose (its sentinel.keep_reason: the first
  request of a rare key, a caller's sampled parent, the keep header, the hook, ...),
  rate-limit the rest per location (the sentinel.location span attribute): one budget per
  location, and one more shared by all locations not listed.

Needs collector-contrib 0.116 or later (earlier versions could drop every trace of the
listed locations through the unlisted locations' inverted match).

Locations: --location, else SENTINEL_LOCATIONS, else SENTINEL_LOCATION. The budget is the
2xx target of kept records per second and location, times --spans-per-trace. The pipeline
receives OTLP on 0.0.0.0:4317 (gRPC) and 0.0.0.0:4318 (HTTP) and exports kept traces over
OTLP gRPC to --exporter-endpoint. All spans of a trace must reach the same collector: with
several collectors, put the loadbalancing exporter in front of them.

Example: sentinel collector-config --location fra --location iad > otelcol.yaml
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sentinel`` command with ``argv`` (default: the process's arguments); returns
    the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:
            try:
                return int(args.handler(args))
            except OutputError as error:
                print(f"sentinel {args.command}: {error}", file=sys.stderr)
                return 2
            except OSError as error:  # a directory it may not write, a full disk
                # 2, as for bad input: for the gate, 1 means "stop the rollout".
                print(f"sentinel {args.command}: cannot write: {error}", file=sys.stderr)
                return 2
        if args.command == "run":
            if args.app is None:
                args.command_parser.error(
                    "the following argument is required: MODULE:APP (e.g. mypkg.main:app)"
                )
            return _run(args.app, list(args.server_options))
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(args.duration, args.port, args.json, servers=not args.no_servers)
        if args.command == "sidecar":
            return _sidecar(args.host, args.port)
        if args.command == "collector-config":
            return _collector_config(args)
        if args.command == "config":
            return _config(args.app, as_json=args.json)
    except (ConfigError, MonitoringConfigError) as error:
        print(f"sentinel: configuration error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``sentinel`` parser with every command (the operator commands included)."""
    parser = _Parser(
        prog="sentinel",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sentinel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        usage="%(prog)s [-h] MODULE:APP [UVICORN OPTIONS ...]",
        help="serve MODULE:APP with uvicorn, wrapped by sentinel",
        description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Optional to argparse only so that its error for a missing app does not also call the
    # uvicorn options (a remainder, which may be empty) required: main says what is missing.
    run.add_argument(
        "app", metavar="MODULE:APP", nargs="?", help='the ASGI app, e.g. "mypkg.main:app"'
    )
    run.add_argument(
        "server_options",
        nargs=argparse.REMAINDER,
        metavar="UVICORN OPTIONS",
        help="passed to uvicorn",
    )
    run.set_defaults(command_parser=run)
    demo = commands.add_parser(
        "demo",
        help="play the incident sentinel comes from against the example app, then summarize",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--duration", type=float, default=60.0, metavar="SECONDS", help="default: 60")
    demo.add_argument("--port", type=_port, default=0, help="the app's port (default: a free one)")
    demo.add_argument(
        "--no-servers",
        action="store_true",
        help="do not start Prometheus and Alertmanager even when they are installed",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    sidecar = commands.add_parser(
        "sidecar",
        help="serve the merged metrics of all worker processes on one port",
        description=_SIDECAR_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sidecar.add_argument("--host", help="address to bind (default: SENTINEL_METRICS_HOST)")
    sidecar.add_argument(
        "--port", type=int, help="port to serve on (default: SENTINEL_METRICS_PORT, 9464)"
    )
    config = commands.add_parser(
        "config",
        help="print the resolved configuration and where each value came from",
        description=_CONFIG_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument(
        "--app",
        metavar="MODULE:APP",
        help="the app `sentinel run` would serve: its module is the service name when no "
        "variable sets one (not imported)",
    )
    config.add_argument("--json", action="store_true", help="print JSON, for scripts")
    collector = commands.add_parser(
        "collector-config",
        help="print an OpenTelemetry Collector configuration with sentinel's tail sampling",
        description=_COLLECTOR_CONFIG_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collector.add_argument(
        "--location",
        action="append",
        dest="locations",
        default=[],
        metavar="LOCATION",
        help="a location with its own budget; repeat for each (default: SENTINEL_LOCATIONS, "
        "else SENTINEL_LOCATION)",
    )
    collector.add_argument(
        "--latency-threshold-ms",
        type=int,
        metavar="MS",
        help="keep traces slower than this (default: the configured keep_slower_than_seconds, "
        f"else {DEFAULT_LATENCY_THRESHOLD_MS})",
    )
    collector.add_argument(
        "--spans-per-trace",
        type=int,
        default=DEFAULT_SPANS_PER_TRACE,
        metavar="N",
        help=f"estimated spans in one trace across services (default: {DEFAULT_SPANS_PER_TRACE})",
    )
    collector.add_argument(
        "--exporter-endpoint",
        default=DEFAULT_EXPORTER_ENDPOINT,
        metavar="HOST:PORT",
        help=f"OTLP gRPC endpoint for kept traces, without TLS (default: "
        f"{DEFAULT_EXPORTER_ENDPOINT})",
    )
    collector.add_argument(
        "--decision-wait-seconds",
        type=float,
        default=DEFAULT_DECISION_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long the collector waits for a trace's spans before deciding "
        f"(default: {DEFAULT_DECISION_WAIT_SECONDS:g})",
    )
    for command_module in _operator_commands():
        command_module.add_parser(commands)
    return parser


class _Parser(argparse.ArgumentParser):
    """The ``sentinel`` parser, which takes uvicorn's options before ``sentinel run``'s
    MODULE:APP too (see :func:`_app_first`)."""

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(_app_first(arguments), namespace)


_HELP = ("-h", "--help")


def _app_first(arguments: list[str]) -> list[str]:
    """``arguments`` with ``sentinel run``'s MODULE:APP moved right after ``run``, so that
    uvicorn's options may come before it, as uvicorn takes them: ``run --port 8000 --reload
    mypkg.main:app`` is ``run mypkg.main:app --port 8000 --reload``. A word after an option
    that takes a value is that value, not the app. Without an app, ``["run"]``, for the
    error that names what is missing; with -h before the app, and for the other commands,
    ``arguments`` as they are."""
    if arguments[:1] != ["run"] or len(arguments) < 2 or not arguments[1].startswith("-"):
        return arguments
    if arguments[1] in _HELP:
        return arguments
    import uvicorn

    values = _values_taken(uvicorn.main)
    options: list[str] = []
    words = iter(arguments[1:])
    for word in words:
        if word in _HELP:
            return arguments
        if word == "--":  # the end of the options: the app follows
            word = next(words, "")
            if not word:
                break
        elif word.startswith("-") and word != "-":
            options.append(word)
            if "=" in word:
                continue
            if word not in values:
                # An option uvicorn does not know may have taken a value: the app is the
                # first word after it like MODULE:APP, and uvicorn names the option.
                return _around_unknown_option(options, list(words))
            options.extend(itertools.islice(words, values[word]))
            continue
        return ["run", word, *options, *words]
    return ["run"]


def _around_unknown_option(options: list[str], rest: list[str]) -> list[str]:
    """``run`` with the app first after an option uvicorn does not know, when ``rest`` has a
    word like MODULE:APP (`--metrics-port 9464 app:app`); else the first word that is no
    option, as for a flag."""
    words = [word for word in rest if not word.startswith("-")]
    app = next((word for word in words if ":" in word), words[0] if words else None)
    if app is None:
        return ["run"]
    rest.remove(app)
    return ["run", app, *options, *rest]


def _values_taken(command: click.Command) -> dict[str, int]:
    """How many values each option of ``command`` takes (its flags none)."""
    import click

    return {
        name: 0 if parameter.is_flag or parameter.count else parameter.nargs
        for parameter in command.params
        if isinstance(parameter, click.Option)
        for name in (*parameter.opts, *parameter.secondary_opts)
    }


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        msg = f"a port is 0-65535: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return port


def _operator_commands() -> list[Any]:
    """The modules ``sentinel/mixin/_cli_*.py``: each defines ``add_parser(commands)``, which
    adds its subcommand with ``set_defaults(handler=...)``. They import what the command
    needs only when it runs."""
    import importlib
    import pkgutil

    from . import mixin

    names = sorted(
        info.name for info in pkgutil.iter_modules(mixin.__path__) if info.name.startswith("_cli_")
    )
    return [importlib.import_module(f"{mixin.__name__}.{name}") for name in names]


def _run(target: str, server_options: list[str]) -> int:
    import uvicorn

    from . import _run_factory, _run_failure

    factory = "--factory" in server_options
    # With --reload the app is served by a child process uvicorn restarts on each change,
    # while this one supervises: like workers, it counts in files this one merges.
    reloads = "--reload" in server_options
    server_options = [option for option in server_options if option != "--factory"]
    uvicorn_args = [
        f"{_run_factory.__name__}:create_app",
        "--factory",
        "--no-access-log",
        *server_options,
    ]
    # uvicorn parses its options only once it runs, after the app is imported: parse them
    # first, so a bad one is uvicorn's own usage error, not a traceback after the import.
    # Before the app's name: `--prot 8000 app:app` is about --prot, not an app named 8000.
    options = _parse_server_options(uvicorn.main, uvicorn_args)
    if isinstance(options, int):
        return options
    try:
        _run_factory.parse_target(target)
    except _run_factory.TargetError as error:
        print(f"sentinel run: {error}", file=sys.stderr)
        return 2
    # uvicorn loads the --env-file once it runs too: its SENTINEL_* variables (and
    # PROMETHEUS_MULTIPROC_DIR, WEB_CONCURRENCY) must count from here on.
    if options["env_file"] is not None and (problem := _load_env_file(options["env_file"])):
        print(f"sentinel run: {problem}", file=sys.stderr)
        return 2
    # Here, in the one process the operator started: once per run, not once per worker.
    for unknown in _unknown_variables(os.environ):
        print(f"sentinel run: {_unknown_variable_sentence(unknown)}", file=sys.stderr)
    try:
        workers = _worker_count(server_options)
    except ValueError as error:
        print(f"sentinel run: {error}", file=sys.stderr)
        return 2
    _settle_multiprocess_mode()
    os.environ[_run_factory.TARGET_VARIABLE] = target
    os.environ[_run_factory.FACTORY_VARIABLE] = "1" if factory else "0"
    os.environ.pop(_run_failure.FAILURE_VARIABLE, None)
    parts: list[Callable[[], None]] = []  # undone by clean_up, last first
    cleaned: list[bool] = []

    def clean_up() -> None:
        if cleaned:
            return
        cleaned.append(True)
        for part in reversed(parts):
            part()

    # Undone also when a signal ends the process, while the app is imported included.
    with _flush_before_signals(clean_up):
        try:
            return _set_up_and_serve(
                target,
                uvicorn_args,
                options,
                workers=workers,
                reloads=reloads,
                parts=parts,
                clean_up=clean_up,
            )
        except KeyboardInterrupt:  # Ctrl-C before uvicorn took the signals over
            return 130
        finally:
            clean_up()


def _set_up_and_serve(
    target: str,
    uvicorn_args: list[str],
    options: dict[str, Any],
    *,
    workers: int,
    reloads: bool,
    parts: list[Callable[[], None]],
    clean_up: Callable[[], None],
) -> int:
    """``sentinel run`` once its options are read: the workers' directory, the merged
    endpoint, sentinel, the app's first import, then uvicorn; what it sets up is added to
    ``parts`` for the caller to undo."""
    import shutil
    import tempfile

    import uvicorn

    from . import _run_factory, _run_failure
    from ._config import Config, value_sources
    from ._runtime import install
    from ._sidecar import (
        MetricsServer,
        bind_failure_advice,
        merged_registry,
        multiprocess_dir,
        multiprocess_dir_problem,
    )

    service = _run_factory.parse_target(target)[0]
    config = Config.from_env(service_fallback=service)
    if conflict := _port_conflict(options, config, dual_stack=workers > 1 or reloads):
        print(f"sentinel run: {conflict}", file=sys.stderr)
        return 2
    variable = _multiprocess_variable()
    given_dir = multiprocess_dir()
    if given_dir:
        if problem := multiprocess_dir_problem() or _unwritable(given_dir, variable):
            print(f"sentinel run: {problem}", file=sys.stderr)
            return 2
        _warn_of_earlier_files(given_dir, variable)
    failed = None
    if workers > 1 or reloads:
        from prometheus_client import values

        # This process only supervises: what it counts (its own sentinel, the app's first
        # import) stays in memory. In a given directory its files would stand in the merged
        # view as a worker that never ends, and into the next run there.
        values.ValueClass = values.MutexValue
        _sweep_run_dirs()
        # The workers' metric files (unless the directory is given).
        run_dir = tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX)
        owner = _mark_run_dir(run_dir)

        def remove_run_dir() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)
            if owner is not None:
                os.close(owner)

        parts.append(remove_run_dir)
        if not reloads:
            # And their word that they could not load or start the app: uvicorn's supervisor
            # stops on it with status 0. Not with --reload, which serves again on the next
            # change: each reload says why it failed, and Ctrl-C ends it as uvicorn would.
            failed = os.path.join(run_dir, "failed")
            os.environ[_run_failure.FAILURE_VARIABLE] = failed
        if not given_dir:
            os.environ[variable] = os.path.join(run_dir, "metrics")
            os.mkdir(os.environ[variable])
    shared_dir = multiprocess_dir()
    if shared_dir and config.metrics_port:
        # The merged view is bounded as the workers are, and they may have been told by a
        # keyword (instrument(app, max_tenants=5)) that this process never sees: a limit
        # this run's environment sets is used, any other is the one the workers publish.
        sources = value_sources()
        max_tenants, max_series, max_locations = (
            getattr(config, field) if field in sources else None
            for field in ("max_tenants", "max_series", "max_locations")
        )
        try:
            merged_endpoint = MetricsServer(
                merged_registry(shared_dir, max_tenants, max_series, max_locations),
                config.metrics_host,
                config.metrics_port,
            ).start()
        except OSError as error:
            advice = bind_failure_advice(
                error,
                config.metrics_host,
                config.metrics_port,
                host_option="SENTINEL_METRICS_HOST",
                port_option="SENTINEL_METRICS_PORT",
            )
            print(f"sentinel run: the merged metrics endpoint {advice}", file=sys.stderr)
        else:
            parts.append(merged_endpoint.stop)
    try:
        sentinel = install(config)
    except OSError as error:  # a metric file prometheus-client cannot create
        if shared_dir:
            sentence = _cannot_write(variable, shared_dir, error)
        else:
            sentence = f"sentinel could not be set up ({error}): fix that, then start again"
        print(f"sentinel run: {sentence}", file=sys.stderr)
        return 2
    parts.append(sentinel.close)
    # Import here first, in the parent process: a broken app fails fast, reported once,
    # before uvicorn starts (workers import it again through the factory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if options["app_dir"]:
        # First, as uvicorn puts it once it runs; the workers start with this sys.path.
        sys.path.insert(0, options["app_dir"])
    try:
        # Only imported here: a factory is called once, by the process that serves it.
        _run_factory.load_and_report(sentinel, target, factory=False)
    except (KeyboardInterrupt, SystemExit):
        raise  # Ctrl-C, or the app ending the process itself: no error to explain
    except BaseException as error:
        sentence = _run_factory.describe_failure(target, error, scrub=sentinel.scrubber.text)
        clean_up()
        print(f"sentinel run: {sentence}", file=sys.stderr, flush=True)
        return 1
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again with the handler it
    # found, which for SIGTERM ends the process before any `finally` or atexit: the caller's
    # handler writes what is pending first, then hands the signal to the handler that was
    # there before, so the process ends (and exits) exactly as uvicorn would have made it.
    try:
        uvicorn.main.main(args=uvicorn_args, prog_name="sentinel run", standalone_mode=False)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0 if failed is None else _workers_status(failed, options["lifespan"])


def _port_conflict(options: Mapping[str, Any], config: Config, *, dual_stack: bool) -> str | None:
    """Why the metrics endpoint and the app cannot both listen as configured (one port, on
    addresses that overlap), in a sentence; None when they can. Port 0 is any free port.
    ``dual_stack``: uvicorn binds the app's ``::`` for IPv4 too (it does with workers or
    --reload; a single process takes IPv6 only there)."""
    port, host = options["port"], options["host"]
    if options["uds"] or options["fd"] is not None or not port or port != config.metrics_port:
        return None
    # The endpoint binds localhost as IPv4, and its :: for IPv4 too.
    localhost = config.metrics_host.lower() == "localhost"
    metrics = _bound_addresses("127.0.0.1" if localhost else config.metrics_host) or []
    app = _bound_addresses(host, dual_stack=dual_stack)
    if app is None:  # a host name, not looked up here: a wildcard takes whatever it names
        overlap = any(address.is_unspecified for address, _ in metrics)
    else:
        overlap = any(_collide(one, other) for one in app for other in metrics)
    if not overlap:
        return None
    return (
        f"SENTINEL_METRICS_PORT and --port are both {port}, on addresses that overlap (the "
        f"metrics endpoint on {config.metrics_host}, the app on {host or '0.0.0.0'}): give one "
        "of them another port"
    )


_Bound = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, bool]


def _bound_addresses(host: str, *, dual_stack: bool = True) -> list[_Bound] | None:
    """The addresses a server listening at ``host`` takes, each with whether it takes IPv4
    too (an IPv6 wildcard bound ``dual_stack``); None for a host name."""
    names = {"": ["0.0.0.0", "::"], "localhost": ["127.0.0.1", "::1"]}
    try:
        addresses = [ipaddress.ip_address(name) for name in names.get(host.lower(), [host])]
    except ValueError:
        return None
    return [(address, dual_stack and address.version == 6) for address in addresses]


def _collide(first: _Bound, second: _Bound) -> bool:
    """Whether two sockets listening on one port at these addresses collide."""
    (one, one_dual), (other, other_dual) = first, second
    if one.version == other.version:
        return one == other or one.is_unspecified or other.is_unspecified
    six, dual = (one, one_dual) if one.version == 6 else (other, other_dual)
    return six.is_unspecified and dual


_RUN_DIR_PREFIX = "sentinel-run-"
_RUN_DIR_OWNER = "owner"
"""In a run directory: the pid of the ``sentinel run`` that made it, which holds an
exclusive ``flock`` on the file until it ends (the kernel releases it however the process
ends, SIGKILL too): a later run that can lock it knows the directory was left behind."""
_SWEEP_AT_MOST = 32
"""Run directories looked at per start: the sweep stays bounded."""
_SWEEP_FILES_AT_MOST = 1024
"""Files looked at in each; a directory with more is left as it is."""
_UNMARKED_AGE_SECONDS = 24 * 3600
"""A run directory made before runs marked theirs is left behind once nothing in it
changed for this long (and no worker holds its liveness file)."""


def _mark_run_dir(run_dir: str) -> int | None:
    """Write and lock ``run_dir``'s owner file (see ``_RUN_DIR_OWNER``); its descriptor, to
    close once the directory is removed (None when it could not be written)."""
    from ._sidecar import locked_file

    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    name = os.path.join(run_dir, _RUN_DIR_OWNER)
    owner = f"{os.getpid()}\n".encode()
    # Without locks (no fcntl, a file system without them) no sweep can lock it either:
    # the file then keeps the directory as "in use".
    return locked_file(name, f"{name}.tmp", fcntl, owner, lock_required=False)


def _sweep_run_dirs() -> None:
    """Remove the run directories in the temporary directory that earlier runs left behind
    (killed before they could remove them), and say so in one line; errors are ignored.

    Only this user's directories, never through a symlink, and only when it is known that
    nothing uses them: their owner file can be locked (its run ended), or, without one (made
    before runs kept one), nothing in them changed for a day; and in both cases no worker
    still holds its liveness file there (workers a killed run left running).
    """
    import itertools
    import shutil
    import tempfile

    try:
        import fcntl  # noqa: F401  (without locks nothing is known to have ended)

        temporary = tempfile.gettempdir()
        with os.scandir(temporary) as entries:
            named = (entry.path for entry in entries if entry.name.startswith(_RUN_DIR_PREFIX))
            candidates = list(itertools.islice(named, _SWEEP_AT_MOST))
    except (ImportError, OSError):
        return
    removed = []
    for path in candidates:
        try:
            if _left_behind(path):
                shutil.rmtree(path)  # follows no symlink, refuses one at path
                removed.append(path)
        except OSError:
            continue
    if not removed:
        return
    if len(removed) == 1:
        said = f"{removed[0]}, left behind by an earlier run that was killed"
    else:
        pattern = os.path.join(temporary, f"{_RUN_DIR_PREFIX}*")
        said = f"{len(removed)} directories {pattern}, left behind by earlier runs that were killed"
    print(f"sentinel run: removed {said}", file=sys.stderr, flush=True)


def _left_behind(path: str) -> bool:
    """Whether the run directory ``path`` is this user's and known to be in use no more."""
    import stat
    import time

    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        return False
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if not os.path.samestat(status, os.fstat(directory)):
            return False  # replaced since
        owner = _released(_RUN_DIR_OWNER, directory)
        if owner is None:
            cutoff = time.time() - _UNMARKED_AGE_SECONDS
            if not _unchanged_since(cutoff, directory):
                return False
        elif not owner:
            return False
        return not _worker_alive(directory)
    finally:
        os.close(directory)


def _released(name: str, directory: int) -> bool | None:
    """Whether the file ``name`` in ``directory`` (a descriptor) can be locked, so that
    whoever held it has ended; False when it is held or that cannot be told, None when
    there is no such file."""
    import fcntl
    import stat

    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return False
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(descriptor)  # and the probe's lock with it
    return True


def _subdirectory(name: str, directory: int) -> int | None:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError:
        return None


def _worker_alive(directory: int) -> bool:
    """Whether a worker holds its liveness file in the run directory's metrics directory
    (or more files are there than a sweep looks at)."""
    from ._sidecar import LIVENESS_PREFIX, LIVENESS_SUFFIX

    metrics = _subdirectory("metrics", directory)
    if metrics is None:
        return False
    try:
        names = [
            name
            for name in os.listdir(metrics)
            if name.startswith(LIVENESS_PREFIX) and name.endswith(LIVENESS_SUFFIX)
        ]
        if len(names) > _SWEEP_FILES_AT_MOST:
            return True
        return not all(_released(name, metrics) for name in names)
    finally:
        os.close(metrics)


def _unchanged_since(cutoff: float, directory: int) -> bool:
    """Whether nothing in the run directory, its metrics directory included, changed after
    ``cutoff`` (a time), looking at no more than ``_SWEEP_FILES_AT_MOST`` files."""
    if os.fstat(directory).st_mtime > cutoff:
        return False
    metrics = _subdirectory("metrics", directory)
    try:
        looked_at = 0
        for where in (directory, metrics):
            if where is None:
                continue
            for name in os.listdir(where):
                looked_at += 1
                status = os.stat(name, dir_fd=where, follow_symlinks=False)
                if looked_at > _SWEEP_FILES_AT_MOST or status.st_mtime > cutoff:
                    return False
        return True
    finally:
        if metrics is not None:
            os.close(metrics)


def _workers_status(path: str, lifespan: str) -> int:
    """The exit status the workers' record at ``path`` calls for: 0 without one; 1 when a
    worker could not load the app (it said why); uvicorn's startup-failure status, as with
    one process, when the app's lifespan startup failed (uvicorn logged why)."""
    from uvicorn.config import STARTUP_FAILURE

    from . import _run_failure

    try:
        with open(path, encoding="utf-8") as file:
            recorded = file.read()
    except FileNotFoundError:
        return 0
    except OSError:
        return 1
    if recorded == _run_failure.LIFESPAN_RAISED:
        # Under --lifespan auto uvicorn took it for "lifespan unsupported" and served.
        return STARTUP_FAILURE if lifespan == "on" else 0
    if recorded == _run_failure.LIFESPAN_FAILED:
        return STARTUP_FAILURE
    return 1


def _load_env_file(path: str) -> str | None:
    """Load ``path`` into the environment as uvicorn loads its ``--env-file`` (python-dotenv's
    ``load_dotenv``, which keeps every variable already set), before the configuration is
    read and the app imported; why it cannot be loaded, in a sentence, else None.

    Without python-dotenv uvicorn would fail on it only after the app was imported, and the
    app would fail first when it reads a variable of the file at import time."""
    import importlib

    try:
        dotenv = importlib.import_module("dotenv")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "dotenv":
            return (
                f"--env-file needs python-dotenv, which is not installed in {sys.prefix}: "
                f"{path!r} was not loaded (pip install python-dotenv, then start again)"
            )
        return (
            f"--env-file needs python-dotenv, which cannot be imported "
            f"({type(error).__name__}: {error}): {path!r} was not loaded"
        )
    try:
        dotenv.load_dotenv(dotenv_path=path)
    except (OSError, UnicodeDecodeError) as error:
        return f"--env-file {path!r} cannot be read ({error})"
    return None


def _multiprocess_variable() -> str:
    """PROMETHEUS_MULTIPROC_DIR, or its lower-case form when only that one is set."""
    from ._sidecar import MULTIPROC_DIR_VARIABLE

    lower = MULTIPROC_DIR_VARIABLE.lower()
    if not os.environ.get(MULTIPROC_DIR_VARIABLE) and os.environ.get(lower):
        return lower
    return MULTIPROC_DIR_VARIABLE


def _settle_multiprocess_mode() -> None:
    """Unset an empty PROMETHEUS_MULTIPROC_DIR (or lower-case form): sentinel takes it as
    unset, while prometheus-client takes any value for multiprocess mode, and would write
    counter_<pid>.db and the like into the working directory."""
    from prometheus_client import values

    from ._sidecar import MULTIPROC_DIR_VARIABLE

    names = (MULTIPROC_DIR_VARIABLE, MULTIPROC_DIR_VARIABLE.lower())
    for name in names:
        if os.environ.get(name) == "":
            del os.environ[name]
    # prometheus-client chose how to keep values when `import sentinel` imported it, from
    # the environment then (no metric exists yet): choose again when it says otherwise now,
    # an empty variable dropped or a directory given in --env-file.
    multiprocess = any(name in os.environ for name in names)
    if multiprocess != (values.ValueClass is not values.MutexValue):
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _unwritable(path: str, variable: str) -> str | None:
    """Why prometheus-client cannot create its metric files in ``path``, as a sentence
    naming ``variable`` and what to do; None when a file can be created there."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return _cannot_write(variable, path, error)
    return None


def _cannot_write(variable: str, path: str, error: OSError) -> str:
    return (
        f"{variable} names {path!r}, where prometheus-client cannot create its metric files "
        f"({error.strerror or error}): give a directory this user (uid {os.getuid()}) can "
        f"write to, or leave {variable} unset (sentinel run --workers N makes a fresh one)"
    )


def _warn_of_earlier_files(path: str, variable: str) -> None:
    """Say once that ``path``, before any worker started, holds an earlier run's files."""
    try:
        count = len(os.listdir(path))
    except OSError:
        return
    if count:
        files = "1 file" if count == 1 else f"{count} files"
        print(
            f"sentinel run: {variable} names {path!r}, which holds {files} of an earlier "
            "run: their counts, ended processes and release are merged into this run's "
            f"metrics; empty it between runs (or leave {variable} unset: sentinel run "
            "--workers N makes a fresh one)",
            file=sys.stderr,
            flush=True,
        )


def _parse_server_options(command: click.Command, args: list[str]) -> dict[str, Any] | int:
    """uvicorn's options, as ``command`` parses ``args``; the exit status when it refuses
    them, after showing its usage error (or its help, for ``--help``)."""
    import click

    try:
        context = command.make_context("sentinel run", list(args))
    except click.exceptions.Exit as exit_:  # --help or --version: shown, nothing to run
        return exit_.exit_code
    except click.ClickException as error:
        error.show()
        if isinstance(error, click.NoSuchOption) and (variable := _variable_for(error.option_name)):
            print(
                f"sentinel run: sentinel's own settings are environment variables: {variable}",
                file=sys.stderr,
            )
        return error.exit_code
    return dict(context.params)


def _variable_for(option: str) -> str | None:
    """The SENTINEL_* variable an option like ``--metrics-port`` was meant to set, if any."""
    from ._config import ENVIRONMENT

    name = _VARIABLE_PREFIX + option.lstrip("-").upper().replace("-", "_")
    return name if any(variable.name == name for variable in ENVIRONMENT) else None


@contextlib.contextmanager
def _flush_before_signals(clean_up: Callable[[], None]) -> Iterator[None]:
    import signal

    # An ignored signal stays ignored (a job started in the background by a shell): the
    # process goes on, with nothing cleaned up under it.
    handled = [
        signum
        for signum in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN
    ]
    previous: dict[int, Any] = {signum: signal.getsignal(signum) for signum in handled}

    def on_signal(signum: int, _frame: object) -> None:
        clean_up()
        signal.signal(signum, previous[signum])
        signal.raise_signal(signum)

    for signum in handled:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _worker_count(server_options: list[str]) -> int:
    """The number of workers uvicorn will start (``--workers N``, else ``WEB_CONCURRENCY``,
    else 1); ValueError naming where a value that is no integer came from."""
    source, raw = "WEB_CONCURRENCY", os.environ.get("WEB_CONCURRENCY")
    for index, option in enumerate(server_options):
        if option == "--workers" and index + 1 < len(server_options):
            source, raw = "--workers", server_options[index + 1]
        elif option.startswith("--workers="):
            source, raw = "--workers", option.partition("=")[2]
    if raw is None:
        return 1
    try:
        return int(raw)  # as uvicorn reads either
    except ValueError:
        msg = f"{source} must be an integer (the number of worker processes): {raw!r}"
        raise ValueError(msg) from None


def _sidecar(host: str | None, port: int | None) -> int:
    import signal
    import threading

    from ._config import Config
    from ._sidecar import (
        MULTIPROC_DIR_VARIABLE,
        Liveness,
        MetricsServer,
        bind_failure_advice,
        merged_registry,
        multiprocess_dir,
        multiprocess_dir_problem,
    )

    problem = multiprocess_dir_problem()
    if problem is not None:
        print(f"sentinel sidecar: {problem}", file=sys.stderr)
        return 2
    path = multiprocess_dir() or ""
    stale = Liveness(path).ended_files()
    if stale:
        files = sum(len(names) for names in stale.values())
        ended = "1 process that has" if len(stale) == 1 else f"{len(stale)} processes that have"
        print(
            f"sentinel sidecar: {MULTIPROC_DIR_VARIABLE} names {path!r}, which holds the files "
            f"of {ended} ended ({files} files: an earlier run's, or workers since replaced), "
            "whose counts stay in the merged totals: empty it between runs, before the "
            "workers start",
            file=sys.stderr,
            flush=True,
        )
    flags: dict[str, tuple[str, Any]] = {
        "metrics_port": ("--port", port),
        "metrics_host": ("--host", host),
    }
    given = {field: value for field, (_, value) in flags.items() if value is not None}
    try:
        config = Config.from_env(**given)  # a flag is checked like the variable it overrides
    except ConfigError as error:
        message = str(error)
        for field, (flag, _) in flags.items():
            # The keyword's name means nothing on the command line: name the flag instead.
            message = message.replace(f'"{field}"', flag, 1)
        print(f"sentinel sidecar: {message}", file=sys.stderr)
        return 2
    if not config.metrics_port:
        source = "--port 0" if port is not None else "SENTINEL_METRICS_PORT=0"
        print(
            f"sentinel sidecar: {source} turns the metrics endpoint off, so there is nothing "
            "to serve: give the port Prometheus scrapes with --port or SENTINEL_METRICS_PORT",
            file=sys.stderr,
        )
        return 2
    bind = config.metrics_host
    try:
        server = MetricsServer(merged_registry(path), bind, config.metrics_port).start()
    except OSError as error:
        advice = bind_failure_advice(
            error,
            bind,
            config.metrics_port,
            host_option="--host or SENTINEL_METRICS_HOST",
            port_option="--port or SENTINEL_METRICS_PORT",
        )
        print(f"sentinel sidecar: {advice}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    address = f"[{bind}]" if ":" in bind else bind
    print(
        f"sentinel sidecar: serving the metrics in {path} on http://{address}:{server.port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    server.stop()
    return 0


def _collector_config(args: argparse.Namespace) -> int:
    from ._config import Config

    config = Config.from_env()
    options = {
        "locations": args.locations,
        "latency_threshold_ms": args.latency_threshold_ms,
        "spans_per_trace": args.spans_per_trace,
        "exporter_endpoint": args.exporter_endpoint,
        "decision_wait_seconds": args.decision_wait_seconds,
    }
    text = header_comment(config, **options) + render_yaml(collector_config(config, **options))
    sys.stdout.write(text)
    return 0


def _config(app: str | None, *, as_json: bool) -> int:
    from . import _run_factory

    try:
        service_fallback = None if app is None else _run_factory.parse_target(app)[0]
    except _run_factory.TargetError as error:
        print(f"sentinel config: --app {error}", file=sys.stderr)
        return 2
    report = resolved_config(os.environ, service_fallback=service_fallback)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_config(report)
    return 0


def resolved_config(
    environ: Mapping[str, str], *, service_fallback: str | None = None
) -> dict[str, Any]:
    """What ``sentinel config --json`` prints: every Config field's value and source, the
    span export when traces are on, and the SENTINEL_* variables nothing reads; secrets
    masked. ConfigError (naming the variable) for an invalid value, as the middleware."""
    import dataclasses

    from ._config import Config, value_sources
    from ._scrub import Scrubber

    config = Config.from_env(environ, service_fallback=service_fallback)
    scrubber = Scrubber(config.scrub_keys)
    sources = value_sources(environ)
    if service_fallback and "service" not in sources:
        sources["service"] = "--app"
    settings = {
        field.name: {
            "value": _masked(getattr(config, field.name), scrubber),
            "source": sources.get(field.name, "default"),
        }
        for field in dataclasses.fields(config)
    }
    return {
        "sentinel_version": __version__,
        "config": settings,
        "traces_export": _traces_export(environ, scrubber) if config.traces else None,
        "unknown_variables": _unknown_variables(environ),
    }


def _masked(value: Any, scrubber: Scrubber) -> Any:
    """``value`` as JSON can hold it, every text scrubbed; a class or a function (given in
    code) by its dotted name."""
    if isinstance(value, str):
        return scrubber.text(value)
    if isinstance(value, tuple | list):
        return [_masked(entry, scrubber) for entry in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):
        return f"{getattr(value, '__module__', None) or '?'}.{name}"
    return scrubber.text(repr(value))


def _traces_export(environ: Mapping[str, str], scrubber: Scrubber) -> dict[str, Any]:
    """Where spans go, resolved as the OTel SDK's exporters resolve it from the variables."""
    from ._config import trace_exporters

    exporter_variable = "OTEL_TRACES_EXPORTER"
    kinds = trace_exporters(environ)
    otlp = [kind for kind in kinds if kind != "console"]
    rows: dict[str, Any] = {
        "exporters": {
            "value": [kind if kind == "console" else f"otlp ({kind})" for kind in kinds],
            "source": exporter_variable if environ.get(exporter_variable) else "default",
        }
    }
    for kind in otlp:
        name = "endpoint" if len(otlp) == 1 else f"endpoint ({kind})"
        endpoint, source = _otlp_endpoint(environ, kind)
        rows[name] = {"value": _masked_url(endpoint, scrubber), "source": source}
    if otlp:
        rows["headers"] = _otlp_headers(environ, scrubber)
    return rows


def _otlp_endpoint(environ: Mapping[str, str], protocol: str) -> tuple[str, str]:
    """The traces endpoint the OTLP exporter of ``protocol`` uses, and its variable."""
    signal_variable, base_variable = (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    if value := environ.get(signal_variable, "").strip():
        return value, signal_variable
    base = environ.get(base_variable, "").strip()
    if protocol == "grpc":
        return (base, base_variable) if base else ("http://localhost:4317", "default")
    # The HTTP exporter appends the signal's path to the base endpoint, never to its own.
    if base:
        return f"{base.removesuffix('/')}/v1/traces", base_variable
    return "http://localhost:4318/v1/traces", "default"


def _otlp_headers(environ: Mapping[str, str], scrubber: Scrubber) -> dict[str, Any]:
    """The OTLP headers, every value masked: they are there to carry credentials. An entry
    that is not ``name=value`` (which the exporter drops) is shown masked whole, under
    ``<not name=value>``."""
    import logging

    from opentelemetry.util.re import parse_env_headers

    for variable in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        if raw := environ.get(variable, ""):
            # Its warning about an entry it cannot parse quotes the entry, credential and all.
            parser_log = logging.getLogger("opentelemetry.util.re")
            disabled, parser_log.disabled = parser_log.disabled, True
            try:
                headers = parse_env_headers(raw, liberal=True)
            finally:
                parser_log.disabled = disabled
            masked = {scrubber.text(name): scrubber.mask(value) for name, value in headers.items()}
            invalid = [entry.strip() for entry in raw.split(",") if "=" not in entry]
            if any(invalid):
                masked["<not name=value>"] = ", ".join(scrubber.mask(e) for e in invalid if e)
            return {"value": masked, "source": variable}
    return {"value": {}, "source": "default"}


def _masked_url(url: str, scrubber: Scrubber) -> str:
    """``url`` with its user information and every query and fragment value masked, and the
    rest scrubbed as text (a token in the path)."""
    from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return scrubber.mask(url)
    netloc = (
        f"{scrubber.mask(parts.netloc.rpartition('@')[0])}@{host}" if "@" in parts.netloc else host
    )
    query = "&".join(
        f"{quote(key, safe='')}={scrubber.mask(value)}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    fragment = scrubber.mask(parts.fragment) if parts.fragment else ""
    path = scrubber.text(parts.path)
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def _unknown_variables(environ: Mapping[str, str]) -> list[dict[str, str | None]]:
    """SENTINEL_* variables that nothing reads (a typo, or a setting from another version),
    each with the variable probably meant; their values are not shown."""
    from . import _run_factory, _run_failure
    from ._config import ENVIRONMENT

    known = sorted({v.name for v in ENVIRONMENT if v.name.startswith("SENTINEL_")})
    internal = {
        _run_factory.TARGET_VARIABLE,
        _run_factory.FACTORY_VARIABLE,
        _run_failure.FAILURE_VARIABLE,
    }
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith("SENTINEL_") and name not in known and name not in internal
    )
    return [{"variable": name, "did_you_mean": _meant(name, known)} for name in unknown]


_VARIABLE_PREFIX = "SENTINEL_"


def _meant(name: str, known: list[str]) -> str | None:
    """The variable of ``known`` that ``name`` probably means, or None when none is close.

    Only the part after SENTINEL_ is compared (all of them share the prefix, which would
    make any two look alike): the one it begins (ENV for ENVIRONMENT, when no other begins
    with it), else a near spelling (LOCATON), else the one it extends (SERVICE_NAME)."""
    import difflib

    wanted = name.upper().removeprefix(_VARIABLE_PREFIX)
    parts = [variable.removeprefix(_VARIABLE_PREFIX) for variable in known]
    begun = sorted((part for part in parts if part.startswith(wanted)), key=len)
    # LOC begins LOCATION, LOCATIONS and LOCATION_HEADER, which begin with LOCATION.
    if len(wanted) >= 3 and begun and all(part.startswith(begun[0]) for part in begun):
        return _VARIABLE_PREFIX + begun[0]
    near = difflib.get_close_matches(wanted, parts, n=1, cutoff=0.75)
    if near:
        return _VARIABLE_PREFIX + near[0]
    extended = [part for part in parts if wanted.startswith(f"{part}_")]
    return _VARIABLE_PREFIX + max(extended, key=len) if extended else None


def _unknown_variable_sentence(unknown: Mapping[str, str | None]) -> str:
    hint = f"; did you mean {unknown['did_you_mean']}?" if unknown["did_you_mean"] else ""
    return f"{unknown['variable']} is set, but sentinel reads no such variable{hint}"


_NOT_SET_MEANS = {"log_format": "not set: console on a terminal, json otherwise"}


def _print_config(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        # Written to a file or a pipe: wide enough that no value is folded.
        console = Console(file=sys.stdout, highlight=False, width=160)

    def table(title: str, rows: dict[str, Any]) -> Table:
        shown = Table(title=title, title_justify="left", show_lines=False)
        shown.add_column("setting", overflow="fold")
        shown.add_column("value", overflow="fold", ratio=3)
        shown.add_column("from", overflow="fold", ratio=2)
        for name, row in rows.items():
            value = row["value"]
            text = _NOT_SET_MEANS.get(name, "not set") if value is None else _shown(value)
            source = row["source"]
            style = "dim" if source == "default" else "bold"
            # Text, not markup: a masked value "[scrubbed ...]" is not a style tag.
            shown.add_row(Text(name), Text(text), Text(source, style=style))
        return shown

    console.print(
        table(f"sentinel.Config (sentinel {report['sentinel_version']})", report["config"])
    )
    if report["traces_export"] is not None:
        console.print(table("span export", report["traces_export"]))
    for unknown in report["unknown_variables"]:
        console.print(Text(_unknown_variable_sentence(unknown)), style="yellow")


def _shown(value: Any) -> str:
    """A value as the table shows it: lists comma-separated, pairs as key=value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}={_shown(entry)}" for key, entry in value.items()) or "none"
    if isinstance(value, list):
        if all(isinstance(entry, list) and len(entry) == 2 for entry in value) and value:
            return ", ".join(f"{key}={_shown(entry)}" for key, entry in value)
        return ", ".join(_shown(entry) for entry in value) or "none"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
