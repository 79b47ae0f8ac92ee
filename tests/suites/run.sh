#!/usr/bin/env bash
# Runs Starlette's and FastAPI's own test suites twice, as they are and with every
# TestClient app wrapped by sentinel (the wrap_with_sentinel pytest plugin beside this
# script), and prints the tests that fail only with sentinel; exits 1 if there are any.
#
# Needs PyPI: the suites come from the pinned sdists (`pip download --no-binary :all:`,
# which ship tests/), and each suite's test dependencies (its pyproject's dependency
# group) go into a venv of its own, in a temporary directory removed at the end. Not part
# of tests/run.sh: it downloads and runs third-party suites, which takes minutes.
#
#   tests/suites/run.sh                       # both suites
#   SENTINEL_SUITES=starlette tests/suites/run.sh
#
# Settings: STARLETTE_VERSION, FASTAPI_VERSION (pins; FastAPI must accept that Starlette),
# SENTINEL_SUITES (starlette, fastapi or both), SENTINEL_SUITES_WORKERS (pytest-xdist
# workers for FastAPI's suite, default auto), SENTINEL_SUITES_TIMEOUT (seconds per pytest
# run, default 900), SENTINEL_SUITES_KEEP=1 (keep the temporary directory), PYTHON, and
# SENTINEL_MUTATION_MODE (default report; raise shows what raise mode would refuse).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
STARLETTE_VERSION="${STARLETTE_VERSION:-1.10.0}"
FASTAPI_VERSION="${FASTAPI_VERSION:-0.165.0}"
SUITES="${SENTINEL_SUITES:-starlette fastapi}"
WORKERS="${SENTINEL_SUITES_WORKERS:-auto}"
RUN_TIMEOUT="${SENTINEL_SUITES_TIMEOUT:-900}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sentinel-suites.XXXXXX")"
cleanup() {
    if [ "${SENTINEL_SUITES_KEEP:-0}" = "1" ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# What sentinel reads from the environment when the plugin instruments each app.
export SENTINEL_METRICS_PORT=0
export SENTINEL_MUTATION_MODE="${SENTINEL_MUTATION_MODE:-report}"

# pip's output goes to $WORK/pip.log, shown when pip fails.
pip_quiet() {
    timeout 900 "$@" --quiet --disable-pip-version-check >>"$WORK/pip.log" 2>&1 || {
        tail -n 30 "$WORK/pip.log" >&2
        echo "failed: $*" >&2
        exit 2
    }
}

# suite name, version, extra pip arguments... : unpacks the sdist, builds its venv.
prepare() {
    local name="$1" version="$2"; shift 2
    local venv="$WORK/venv-$name"
    echo "--- $name $version: sources and test dependencies"
    pip_quiet "$PYTHON" -m pip download --no-deps --no-binary :all: "$name==$version" \
        -d "$WORK/sdist"
    tar xzf "$WORK/sdist/$name-$version.tar.gz" -C "$WORK"
    [ -d "$WORK/$name-$version/tests" ] || { echo "$name's sdist has no tests/" >&2; exit 1; }
    "$PYTHON" -m venv "$venv"
    pip_quiet "$venv/bin/python" -m pip install --upgrade pip  # --group needs pip 25.1
    pip_quiet "$venv/bin/python" -m pip install -e "$REPO" "$@"
}

# suite name, label (plain or sentinel), pytest arguments... : one run, its junit XML kept.
run_suite() {
    local name="$1" label="$2"; shift 2
    local dir="$WORK/$name-$(version_of "$name")"
    local status=0
    local start=$SECONDS
    echo "--- $name, $label"
    (cd "$dir" && timeout --kill-after=30 "$RUN_TIMEOUT" "$WORK/venv-$name/bin/python" -m pytest \
        -q -p no:cacheprovider --junitxml="$WORK/$name-$label.xml" "$@" tests \
        >"$WORK/$name-$label.log" 2>&1) || status=$?
    tail -n 1 "$WORK/$name-$label.log"
    echo "    (exit $status, $((SECONDS - start)) s)"
    if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
        tail -n 30 "$WORK/$name-$label.log" >&2
        echo "$name ($label) did not complete (exit $status)" >&2
        exit 2
    fi
}

version_of() {
    if [ "$1" = starlette ]; then echo "$STARLETTE_VERSION"; else echo "$FASTAPI_VERSION"; fi
}

both_runs() {
    local name="$1"; shift
    run_suite "$name" plain "$@"
    SENTINEL_SUITES_REPORT="$WORK/$name-sentinel.jsonl" PYTHONPATH="$REPO/tests/suites" \
        run_suite "$name" sentinel -p wrap_with_sentinel "$@"
}

for suite in $SUITES; do
    case "$suite" in
        starlette)
            # Its dev group names starlette[full] itself: the pin keeps it to this version.
            prepare starlette "$STARLETTE_VERSION" "starlette[full]==$STARLETTE_VERSION" \
                --group "$WORK/starlette-$STARLETTE_VERSION/pyproject.toml:dev"
            both_runs starlette
            ;;
        fastapi)
            prepare fastapi "$FASTAPI_VERSION" "starlette==$STARLETTE_VERSION" \
                "fastapi[all]==$FASTAPI_VERSION" \
                --group "$WORK/fastapi-$FASTAPI_VERSION/pyproject.toml:tests"
            # pytest-sugar (in its tests group) would replace pytest's own summary lines.
            both_runs fastapi -p no:sugar -n "$WORKERS"
            ;;
        *)
            echo "unknown suite: $suite (starlette or fastapi)" >&2
            exit 2
            ;;
    esac
done

# Which tests fail (or error) with sentinel and not without it, from the junit XML files.
"$PYTHON" - "$WORK" $SUITES <<'PY'
import json
import pathlib
import sys
import xml.etree.ElementTree as ET
from collections import Counter

work, suites = pathlib.Path(sys.argv[1]), sys.argv[2:]


def outcomes(path):
    passed, failed = 0, set()
    for case in ET.parse(path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(test)
        elif case.find("skipped") is None:
            passed += 1
    return passed, failed


only_with_sentinel = 0
for suite in suites:
    plain_passed, plain_failed = outcomes(work / f"{suite}-plain.xml")
    wrapped_passed, wrapped_failed = outcomes(work / f"{suite}-sentinel.xml")
    print(f"=== {suite}: without sentinel {plain_passed} passed, {len(plain_failed)} failed;"
          f" with sentinel {wrapped_passed} passed, {len(wrapped_failed)} failed")
    report = work / f"{suite}-sentinel.jsonl"
    lines = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    clients = sum(line.get("clients", 0) for line in lines)
    threads = sum(line.get("sentinel_threads", 0) for line in lines)
    events, mutations = Counter(), Counter()
    for line in lines:
        events.update(line.get("events", {}))
        mutations.update(line.get("mutations", {}))
    print(f"    apps wrapped: {clients}; sentinel threads alive at the end: {threads}")
    print(f"    records sentinel wrote: {dict(events.most_common())}")
    for where, count in mutations.most_common(10):
        print(f"    global_state_mutated x{count}: {where}")
    if clients == 0:
        print("    the plugin wrapped no app: the sentinel run proves nothing")
        only_with_sentinel += 1
    for line in lines:
        if "component" in line:
            print(f"    internal error ({line['component']}) x{line['count']:g} in {line['origin']}")
    for test in sorted(plain_failed - wrapped_failed):
        print(f"    fails only without sentinel (flaky?): {test}")
    for test in sorted(wrapped_failed - plain_failed):
        print(f"    FAILS ONLY WITH SENTINEL: {test}")
    only_with_sentinel += len(wrapped_failed - plain_failed)
if only_with_sentinel:
    print(f"{only_with_sentinel} test(s) fail only with sentinel; logs: *-sentinel.log"
          " (SENTINEL_SUITES_KEEP=1 keeps them)")
sys.exit(1 if only_with_sentinel else 0)
PY
