"""Naming the failing tenants with a bounded set of series: ``python -m bench.tenants``.

One load, three ways of putting a tenant on a request counter, each in a process of its
own (so RSS is its own) that regenerates the same load from the seed:

- ``sentinel``: :class:`sentinel._tenants.TenantTracker` (50 tenants plus ``other``).
- ``datasketches``: Apache DataSketches' frequent items sketch (``frequent_strings_sketch``,
  a 5xx weighing 100 requests, as it has no decay and no error weighting of its own), with
  the top 50 re-selected every 10 s: a sketch answers queries, it does not promote a tenant
  on its own request, so a tracker built on it re-selects on a timer. The sketch needs numpy
  and a compiled extension, so it runs in a Python of its own: ``--datasketches-python``
  (e.g. a throwaway ``python3 -m venv /tmp/ds && /tmp/ds/bin/pip install datasketches``);
  without one, and without ``datasketches`` importable here, its column is skipped with a
  note.
- ``otel``: the OpenTelemetry SDK's metrics, a Counter with ``tenant`` and
  ``status_class`` attributes read by an ``InMemoryMetricReader``, with the SDK's default
  cardinality limit (2,000 attribute sets per metric; later ones fold into one
  ``otel.metric.overflow=true`` point).

The load: Zipf-like traffic (tenant of rank r gets a share ~ 1/r) over 5,000 tenants at
1,000 requests per simulated second, everyone failing at 0.05%. After a warm-up in which
nearly every tenant has been seen, the tenants ranked 100th, 200th and 300th by traffic (far
from the top) fail at 20%. Reported per variant: how many of the failing tenants it names,
what share of their 5xx it counts under their own name, how many tenant series it exposes,
RSS after the import and after the load, and the cost per request (the load is generated
before the clock starts).

A last section measures the many-worker fold (:class:`sentinel._tenants.TenantFold`): four
workers, each with its own tracker, folded every simulated second and scraped every 15,
with requests spread round-robin and with each tenant's requests kept to one or two
workers; for the tenants named at the end, how much of their traffic while named the fold
counts under their name; and for the failing tenants, the share of their 5xx named with
the fold and without it (a fleet of processes scraped one by one, which Prometheus sums by
tenant: a tenant's requests are named only in the processes that track it), with the
tenant series each way holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import unwind_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("2xx", "3xx", "4xx", "5xx")
MAX_TENANTS = 50
SCRAPE_SECONDS = 15.0
"""How often the many-worker section's Prometheus scrapes the sidecar's fold."""
RESELECT_SECONDS = 10.0
ERROR_WEIGHT = 100


def load(
    *,
    seed: int,
    tenants: int,
    per_second: int,
    warmup: int,
    seconds: int,
    failing: list[int],
    history_hours: float = 0.0,
) -> Iterator[tuple[float, str, str, int]]:
    """(simulated time, tenant, status class, requests), the same in every process given the
    seed: ``history_hours`` of the same traffic in 10-minute batches per tenant (before time
    0), then one request at a time."""
    rng = random.Random(seed)
    harmonic = sum(1.0 / rank for rank in range(1, tenants + 1))
    batch_seconds = 600
    for step in range(int(history_hours * 3600 / batch_seconds)):
        moment = -history_hours * 3600 + step * batch_seconds
        for rank in range(1, tenants + 1):
            requests = round(per_second * batch_seconds / harmonic / rank)
            errors = round(requests * 0.0005)
            if errors:
                yield moment, f"tenant-{rank:05d}", "5xx", errors
            if requests > errors:
                yield moment, f"tenant-{rank:05d}", "2xx", requests - errors
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, tenants + 1)))
    ranks = range(1, tenants + 1)
    failing_set = set(failing)
    total = per_second * (warmup + seconds)
    for start in range(0, total, 10_000):
        batch = rng.choices(ranks, cum_weights=cumulative, k=min(10_000, total - start))
        for offset, rank in enumerate(batch):
            moment = (start + offset) / per_second
            ratio = 0.20 if rank in failing_set and moment >= warmup else 0.0005
            yield moment, f"tenant-{rank:05d}", "5xx" if rng.random() < ratio else "2xx", 1


def rss_bytes() -> int:
    """Resident set size now (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- one variant per process ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Variant:
    """One way of counting: ``observe`` returns the label a request was counted under
    (for OTel only known when read: see ``named_5xx``); ``exposed()`` the (tenant values,
    label x status class series with a count) a scrape or export shows at the end."""

    observe: Callable[[str, str, int], str]

    def exposed(self) -> tuple[int, int]:
        raise NotImplementedError

    def named_5xx(self, tenant: str, from_labels: int) -> int:
        return from_labels


class SentinelVariant(Variant):
    def __init__(self, clock: Clock) -> None:
        from sentinel._tenants import TenantTracker

        self.tracker = TenantTracker(MAX_TENANTS, clock=clock)
        self.observe = self.tracker.observe

    def exposed(self) -> tuple[int, int]:
        counts = self.tracker.counts()
        return len(counts), sum(1 for values in counts.values() for value in values if value)


class SketchVariant(Variant):
    def __init__(self, clock: Clock) -> None:
        import datasketches  # type: ignore[import-not-found,unused-ignore]

        self.clock = clock
        self.sketch = datasketches.frequent_strings_sketch(10)  # up to 768 items, like our 800
        self.selected: set[str] = set()
        self.labels: set[tuple[str, str]] = set()
        self.next_selection = RESELECT_SECONDS
        self.error_type = datasketches.frequent_items_error_type.NO_FALSE_NEGATIVES

    def observe(self, tenant: str, status_class: str, count: int) -> str:
        self.sketch.update(tenant, count * (ERROR_WEIGHT if status_class == "5xx" else 1))
        if self.clock.now >= self.next_selection:
            self.next_selection += RESELECT_SECONDS
            items = self.sketch.get_frequent_items(self.error_type)
            self.selected = {item[0] for item in items[:MAX_TENANTS]}
        label = tenant if tenant in self.selected else "other"
        self.labels.add((label, status_class))
        return label

    def exposed(self) -> tuple[int, int]:
        # What the last selection exposes: its tenants and other, per status class seen.
        shown = {(label, klass) for label, klass in self.labels if label in self.selected}
        other = {(label, klass) for label, klass in self.labels if label == "other"}
        return len(self.selected) + 1, len(shown) + len(other)


class OTelVariant(Variant):
    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        self.reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[self.reader])
        self.counter = provider.get_meter("bench").create_counter("tenant_requests")
        self.points: list[Any] = []

    def observe(self, tenant: str, status_class: str, count: int) -> str:
        self.counter.add(count, {"tenant": tenant, "status_class": status_class})
        return tenant

    def exposed(self) -> tuple[int, int]:
        data = self.reader.get_metrics_data()
        assert data is not None
        self.points = [
            point
            for resource_metrics in data.resource_metrics
            for scope in resource_metrics.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        ]
        tenants = {point.attributes.get("tenant") for point in self.points}
        return len(tenants), len(self.points)

    def named_5xx(self, tenant: str, from_labels: int) -> int:
        # The SDK decides per attribute set whether it has its own point: read what it kept.
        for point in self.points:
            attributes = point.attributes
            if attributes.get("tenant") == tenant and attributes.get("status_class") == "5xx":
                return int(point.value)
        return 0

    def overflow(self) -> int:
        return sum(1 for point in self.points if "otel.metric.overflow" in point.attributes)


def prepare(name: str, clock: Clock) -> Variant:
    if name == "sentinel":
        return SentinelVariant(clock)
    if name == "datasketches":
        return SketchVariant(clock)
    if name == "otel":
        return OTelVariant()
    raise SystemExit(f"unknown variant: {name!r}")


def run_variant(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run the load through one variant in this process; the figures as a dict."""
    requests = list(load(**parameters))
    labels: list[str] = [""] * len(requests)
    if name != "datasketches":  # the app has sentinel (and its OTel SDK) loaded anyway
        import sentinel  # noqa: F401
    rss_start = rss_bytes()
    clock = Clock()
    # From the history's first moment: a tracker's clock must not start after its
    # requests (it counts a clock that steps back as standing still, so 6 hours of history
    # would arrive in one instant, never decayed).
    clock.now = requests[0][0] if requests else 0.0
    variant = prepare(name, clock)
    observe = variant.observe
    rss_imported = rss_bytes()
    history = sum(1 for request in requests if request[0] < 0)
    started = time.perf_counter()
    for position, (moment, tenant, status_class, count) in enumerate(requests):
        clock.now = moment
        labels[position] = observe(tenant, status_class, count)
        if position + 1 == history:
            started = time.perf_counter()  # the cost per request leaves out the history
    elapsed = time.perf_counter() - started
    tenant_values, series = variant.exposed()
    rss_loaded = rss_bytes()
    failing = {f"tenant-{rank:05d}" for rank in parameters["failing"]}
    errors: Counter[str] = Counter()
    named: Counter[str] = Counter()
    for (moment, tenant, status_class, _count), label in zip(requests, labels, strict=True):
        if tenant in failing and status_class == "5xx" and moment >= parameters["warmup"]:
            errors[tenant] += 1
            named[tenant] += label == tenant
    for tenant in failing:
        named[tenant] = variant.named_5xx(tenant, named[tenant])
    return {
        "variant": name,
        "history_hours": parameters.get("history_hours", 0.0),
        "requests": len(requests) - history,
        "us_per_request": elapsed / (len(requests) - history) * 1e6,
        "failing_named": sum(1 for tenant in failing if named[tenant] > 0),
        "failing": len(failing),
        "failing_5xx_named_share": sum(named.values()) / max(1, sum(errors.values())),
        "failing_5xx": sum(errors.values()),
        "tenant_values": tenant_values,
        "series": series,
        "overflow_points": variant.overflow() if isinstance(variant, OTelVariant) else 0,
        "rss_import_mb": (rss_imported - rss_start) / 2**20,
        "rss_load_mb": (rss_loaded - rss_imported) / 2**20,
        "rss_total_mb": rss_loaded / 2**20,
    }


# --- the fold of many workers ---------------------------------------------------------------


def run_fold(parameters: dict[str, Any], spread: str, workers: int = 4) -> dict[str, Any]:
    """Workers with their own trackers, folded every simulated second; for the tenants the
    fold names at the end, the share of their requests (since the fold named them) that it
    counts under their name."""
    from sentinel._tenants import TenantFold, TenantTracker

    clock = Clock()
    trackers = [TenantTracker(MAX_TENANTS, clock=clock) for _ in range(workers)]
    fold = TenantFold.of_workers(MAX_TENANTS, clock=clock)  # as the sidecar builds it
    merged = fold.tracker
    promoted_at: dict[str, int] = {}
    truth: Counter[str] = Counter()  # requests per tenant since the fold named it
    requests = list(load(**parameters))
    next_fold = next_scrape = 1.0
    local_union: set[str] = set()
    failing = {f"tenant-{rank:05d}" for rank in parameters["failing"]}
    failing_5xx: Counter[str] = Counter()  # every 5xx of the failing tenants, named or not
    for position, (moment, tenant, status_class, _count) in enumerate(requests):
        clock.now = moment
        if tenant in failing and status_class == "5xx":
            failing_5xx[tenant] += 1
        if spread == "round-robin":
            worker = position % workers
        else:  # each tenant keeps to one or two workers (its own connections)
            worker = (zlib.crc32(tenant.encode()) + (position & 1)) % workers
        trackers[worker].observe(tenant, status_class)
        if tenant in promoted_at:
            truth[tenant] += 1
        if moment >= next_fold:
            next_fold += 1.0
            for index, tracker in enumerate(trackers):
                fold.update(str(index), tracker.counts())
                local_union |= tracker.tracked()
            if moment >= next_scrape:  # Prometheus reads the fold every SCRAPE_SECONDS
                next_scrape += SCRAPE_SECONDS
                fold.counts()
            for change in merged.drain_changes():
                if change.kind == "promoted":
                    promoted_at[change.tenant] = position
                    truth[change.tenant] = 0
                else:
                    promoted_at.pop(change.tenant, None)
    for index, tracker in enumerate(trackers):
        fold.update(str(index), tracker.counts())
    counts = fold.counts()
    # Without a sidecar (a fleet of processes, each scraped on its own): Prometheus holds
    # every process's series, and `sum by (tenant)` names a tenant's requests only in the
    # processes that track it; in the others they are in `other`.
    fleet: Counter[str] = Counter()
    fleet_series = 0
    for tracker in trackers:
        local = tracker.counts()
        fleet_series += _series(local)
        for tenant in failing:
            fleet[tenant] += _errors(local, tenant)

    def named_share(errors_named: Callable[[str], int]) -> dict[str, float]:
        return {
            tenant: errors_named(tenant) / max(1, failing_5xx[tenant]) for tenant in sorted(failing)
        }

    shares = sorted(
        sum(counts[tenant]) / truth[tenant]
        for tenant in counts
        if tenant != "other" and truth[tenant] >= 100
    )
    return {
        "spread": spread,
        "local_tracked_union": len(local_union),
        "fold_labels": len(counts),
        "failing_5xx": dict(failing_5xx),
        "failing_named_by_fold": named_share(lambda tenant: _errors(counts, tenant)),
        "failing_named_by_fleet": named_share(fleet.__getitem__),
        "fleet_series": fleet_series,
        "fold_series": _series(counts),
        "named": len(shares),
        "share_min": shares[0] if shares else None,
        "share_median": shares[len(shares) // 2] if shares else None,
        "share_total": sum(sum(counts[t]) for t in counts if t != "other" and truth[t] >= 100)
        / max(1, sum(truth[t] for t in counts if t != "other" and truth[t] >= 100)),
    }


def _series(counts: dict[str, tuple[int, int, int, int]]) -> int:
    """The non-zero (label, status class) series of one exposition."""
    return sum(1 for values in counts.values() for value in values if value)


def _errors(counts: dict[str, tuple[int, int, int, int]], tenant: str) -> int:
    """The 5xx counted under ``tenant``'s own name."""
    return counts.get(tenant, (0, 0, 0, 0))[3]


# --- orchestration ---------------------------------------------------------------------------


def in_subprocess(python: str, variant: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run one variant with ``python`` from the repo root; its JSON line back."""
    command = [python, "-m", "bench.tenants", "--variant", variant, "--parameters"]
    command.append(json.dumps(parameters))
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


_VERSION_CHECK = "import datasketches, importlib.metadata as m; print(m.version('datasketches'))"


def datasketches_python(option: str | None) -> tuple[str | None, str]:
    """The Python to run the sketch with, or None and why not."""
    candidates = [option] if option else [sys.executable]
    for python in candidates:
        check = subprocess.run(
            [python, "-c", _VERSION_CHECK],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check.returncode == 0:
            return python, f"datasketches {check.stdout.strip()} in {python}"
    return None, (
        "datasketches skipped: not importable here; install it into a throwaway venv "
        "(python3 -m venv /tmp/ds && /tmp/ds/bin/pip install datasketches) and pass "
        "--datasketches-python /tmp/ds/bin/python"
    )


def table(results: list[dict[str, Any]]) -> str:
    base = next(result for result in results if result["variant"] == "sentinel")
    lines = [
        "| variant | failing tenants named | their 5xx under their name | tenant values "
        "| series | RSS import (MB) | RSS load (MB) | µs/request | cost vs sentinel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result['variant']} | {result['failing_named']} of {result['failing']} "
            f"| {result['failing_5xx_named_share']:.0%} of {result['failing_5xx']} "
            f"| {result['tenant_values']} | {result['series']}"
            + (f" ({result['overflow_points']} overflow)" if result["overflow_points"] else "")
            + f" | {result['rss_import_mb']:.1f} | {result['rss_load_mb']:.1f} "
            f"| {result['us_per_request']:.2f} "
            f"| {result['us_per_request'] / base['us_per_request']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--parameters", help=argparse.SUPPRESS)
    parser.add_argument("--datasketches-python", help="a Python with datasketches installed")
    parser.add_argument("--quick", action="store_true", help="a smaller load (about 20 s)")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    unwind_on_sigterm()
    if arguments.variant:
        print(json.dumps(run_variant(arguments.variant, json.loads(arguments.parameters))))
        return
    parameters: dict[str, Any] = {
        "seed": arguments.seed,
        "tenants": 5000,
        "per_second": 1000,
        "warmup": 60 if arguments.quick else 120,
        "seconds": 120 if arguments.quick else 300,
        "failing": [100, 200, 300],
    }
    history = 1.0 if arguments.quick else 6.0
    print(f"load: {json.dumps(parameters)}", flush=True)
    python, note = datasketches_python(arguments.datasketches_python)
    print(note, flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for title, extra in (
        (f"a fresh process ({parameters['warmup']} s of warm-up)", {}),
        (f"after {history:g} hours of the same traffic", {"history_hours": history}),
    ):
        load_parameters = {**parameters, **extra}
        results = [in_subprocess(sys.executable, "sentinel", load_parameters)]
        if python is not None:
            results.append(in_subprocess(python, "datasketches", load_parameters))
        results.append(in_subprocess(sys.executable, "otel", load_parameters))
        runs[title] = results
        print(f"\n{title}:\n\n{table(results)}", flush=True)
    folds = [run_fold(parameters, spread) for spread in ("round-robin", "sticky")]
    print(
        "\n| 4 workers, folded | tenants tracked by some worker | labels in the fold "
        "| named tenants | their requests under their name: lowest, median, all |"
    )
    print("|---|---|---|---|---|")
    for fold in folds:
        print(
            f"| {fold['spread']} | {fold['local_tracked_union']} | {fold['fold_labels']} "
            f"| {fold['named']} | {fold['share_min']:.1%}, {fold['share_median']:.1%}, "
            f"{fold['share_total']:.1%} |"
        )
    print(
        "\n| 4 workers | the failing tenants' 5xx under their name: sidecar fold "
        "| without it (Prometheus sums the processes) | tenant series held |"
    )
    print("|---|---|---|---|")
    for fold in folds:
        by_fold, by_fleet = fold["failing_named_by_fold"], fold["failing_named_by_fleet"]
        print(
            f"| {fold['spread']} | {', '.join(f'{share:.0%}' for share in by_fold.values())} "
            f"| {', '.join(f'{share:.0%}' for share in by_fleet.values())} "
            f"| {fold['fleet_series']} without, {fold['fold_series']} with the fold |"
        )
    if arguments.json:
        arguments.json.write_text(json.dumps({"runs": runs, "folds": folds}, indent=2))


if __name__ == "__main__":
    main()
