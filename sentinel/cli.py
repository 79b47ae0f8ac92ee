"""The ``sentinel`` command.

Each command imports the heavy parts it needs (uvicorn, the runtime with its
OpenTelemetry and prometheus-client setup) when it runs, so that ``sentinel --help`` and
the generators answer at once; the imports inside functions below are those.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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

_RUN_DESCRIPTION = """\
Serve an ASGI app with uvicorn, wrapped in sentinel's middleware.

sentinel's hooks are installed before the app is imported, so an exception raised while
importing it is reported (phase "import") and the command exits with status 1.
Configuration comes from the SENTINEL_* and OTEL_* environment variables. Every option
after MODULE:APP is passed to uvicorn unchanged (see `uvicorn --help`), for example
--host, --port, --workers, --factory. uvicorn's access log is replaced by sentinel's
sampled, scrubbed request records (no raw query string reaches the output). With
--workers N the workers' metrics are merged and served on SENTINEL_METRICS_PORT by this
process.
"""


_DEMO_DESCRIPTION = """\
Play the incident sentinel comes from against the bundled example app, on 127.0.0.1, for
--duration seconds, then print a summary. Traffic comes from three locations through a
location header: healthy with sub-percent errors, then sin (3% of the traffic) failing one
request in five while the service stays under 1%, a middleware failing before routing, a
handler writing an environment variable and a new exception type. A live view shows the
progress and each location's error and burn rate.

When prometheus and prometheus-alertmanager are on the PATH they are started too, with
the generated rules and routing (windows scaled down to fit the run), and the summary
lists the alerts Alertmanager delivered to a webhook receiver. Without them (or with
--no-servers) the burn rates come from sentinel's own counters. Every process the demo
starts is stopped at the end, also on Ctrl-C. Exit status 1 when a part did not start.

Example: sentinel demo --duration 30 --json
"""

_SIDECAR_DESCRIPTION = """\
Serve /metrics and /healthz with the merged metrics of every worker process.

For multi-worker servers (uvicorn --workers N, gunicorn with uvicorn workers): the workers
write their metrics to the directory in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode) and this process serves them as one view on SENTINEL_METRICS_PORT.
`sentinel run --workers N` does this by itself.
"""

_COLLECTOR_CONFIG_DESCRIPTION = """\
Print an OpenTelemetry Collector configuration (YAML) whose tail_sampling processor applies
sentinel's policy to whole traces, for traces that cross services:

  keep every trace with an error span (status_code ERROR),
  keep every trace slower than the latency threshold (latency),
  rate-limit the rest per location (the sentinel.location span attribute): one budget per
  location, and one more shared by all locations not listed.

Locations: --location, else SENTINEL_LOCATIONS, else SENTINEL_LOCATION. The budget is the
2xx target of kept records per second and location, times --spans-per-trace. The pipeline
receives OTLP on 0.0.0.0:4317 (gRPC) and 0.0.0.0:4318 (HTTP) and exports kept traces over
OTLP gRPC to --exporter-endpoint. All spans of a trace must reach the same collector: with
several collectors, put the loadbalancing exporter in front of them.

Example: sentinel collector-config --location fra --location iad > otelcol.yaml
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
    demo = commands.add_parser(
        "demo",
        help="play the incident sentinel comes from against the example app, then summarize",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--duration", type=float, default=60.0, metavar="SECONDS", help="default: 60")
    demo.add_argument("--port", type=int, default=0, help="the app's port (default: a free one)")
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
    args = parser.parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "run":
            return _run(args.app, list(args.server_options))
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(args.duration, args.port, args.json, servers=not args.no_servers)
        if args.command == "sidecar":
            return _sidecar(args.host, args.port)
        if args.command == "collector-config":
            return _collector_config(args)
    except (ConfigError, MonitoringConfigError) as error:
        print(f"sentinel: configuration error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


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
    import shutil
    import tempfile

    import uvicorn

    from . import _run_factory
    from ._config import Config
    from ._runtime import install
    from ._sidecar import MULTIPROC_DIR_VARIABLE, MetricsServer, merged_registry, multiprocess_dir

    try:
        _run_factory.parse_target(target)
        workers = _worker_count(server_options)
    except (_run_factory.TargetError, ValueError) as error:
        print(f"sentinel run: {error}", file=sys.stderr)
        return 2
    factory = "--factory" in server_options
    server_options = [option for option in server_options if option != "--factory"]
    os.environ[_run_factory.TARGET_VARIABLE] = target
    os.environ[_run_factory.FACTORY_VARIABLE] = "1" if factory else "0"
    own_multiproc_dir = None
    if workers > 1 and not multiprocess_dir():
        # Workers write their metrics to files; this process serves the merged view.
        own_multiproc_dir = tempfile.mkdtemp(prefix="sentinel-metrics-")
        os.environ[MULTIPROC_DIR_VARIABLE] = own_multiproc_dir
    service = _run_factory.parse_target(target)[0]
    config = Config.from_env(service_fallback=service)
    merged_endpoint = None
    shared_dir = multiprocess_dir()
    if shared_dir and config.metrics_port:
        try:
            merged_endpoint = MetricsServer(
                merged_registry(shared_dir), config.metrics_host, config.metrics_port
            ).start()
        except OSError as error:
            print(f"sentinel run: metrics port {config.metrics_port}: {error}", file=sys.stderr)
    sentinel = install(config)
    # Import here first, in the parent process: a broken app fails fast, reported once,
    # before uvicorn starts (workers import it again through the factory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        # Only imported here: a factory is called once, by the process that serves it.
        _run_factory.load_and_report(sentinel, target, factory=False)
    except BaseException:
        sentinel.close()
        return 1
    uvicorn_args = [
        f"{_run_factory.__name__}:create_app",
        "--factory",
        "--no-access-log",
        *server_options,
    ]

    cleaned: list[bool] = []

    def clean_up() -> None:
        if cleaned:
            return
        cleaned.append(True)
        sentinel.close()
        if merged_endpoint is not None:
            merged_endpoint.stop()
        if own_multiproc_dir is not None:
            shutil.rmtree(own_multiproc_dir, ignore_errors=True)

    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again with the handler it
    # found, which for SIGTERM ends the process before any `finally` or atexit: this one
    # writes what is pending first, then hands the signal to the handler that was there
    # before, so the process ends (and exits) exactly as uvicorn would have made it.
    with _flush_before_signals(clean_up):
        try:
            uvicorn.main.main(args=uvicorn_args, prog_name="sentinel run", standalone_mode=False)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1
        finally:
            clean_up()
    return 0


@contextlib.contextmanager
def _flush_before_signals(clean_up: Callable[[], None]) -> Iterator[None]:
    import signal

    handled = (signal.SIGTERM, signal.SIGINT)
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
    """The number of workers uvicorn will start (``--workers N`` or ``WEB_CONCURRENCY``)."""
    raw = os.environ.get("WEB_CONCURRENCY", "1")
    for index, option in enumerate(server_options):
        if option == "--workers" and index + 1 < len(server_options):
            raw = server_options[index + 1]
        elif option.startswith("--workers="):
            raw = option.partition("=")[2]
    try:
        return int(raw)
    except ValueError:
        msg = f'"--workers" must be an integer: {raw!r}'
        raise ValueError(msg) from None


def _sidecar(host: str | None, port: int | None) -> int:
    import signal
    import threading

    from ._config import Config
    from ._sidecar import MULTIPROC_DIR_VARIABLE, MetricsServer, merged_registry, multiprocess_dir

    path = multiprocess_dir()
    if not path or not os.path.isdir(path):
        print(
            f"sentinel sidecar: {MULTIPROC_DIR_VARIABLE} must name the directory the workers "
            f"write their metrics to: {path!r}",
            file=sys.stderr,
        )
        return 2
    given: dict[str, Any] = {
        name: value
        for name, value in (("metrics_port", port), ("metrics_host", host))
        if value is not None
    }
    config = Config.from_env(**given)  # a flag is checked like the variable it overrides
    if not config.metrics_port:
        print("sentinel sidecar: the metrics port is 0 (off); nothing to serve", file=sys.stderr)
        return 2
    bind = config.metrics_host
    try:
        server = MetricsServer(merged_registry(path), bind, config.metrics_port).start()
    except OSError as error:
        print(
            f"sentinel sidecar: cannot bind {bind}:{config.metrics_port}: {error}", file=sys.stderr
        )
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"sentinel sidecar: serving the metrics in {path} on http://{bind}:{server.port}/metrics",
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


if __name__ == "__main__":
    sys.exit(main())
