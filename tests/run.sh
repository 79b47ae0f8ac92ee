#!/usr/bin/env bash
# Installs everything the tests need (Debian's Prometheus and Alertmanager, and the
# Python packages into .venv) and runs the whole suite:
# ruff, mypy --strict on sentinel/, pytest on the newest Starlette, then the
# middleware and routing tests again on the oldest supported Starlette (0.40).
# pytest's "no tests collected" (exit 5) is a failure here, never a pass.
# The tests run in SENTINEL_TEST_WORKERS pytest-xdist workers (default 4: most of the suite
# waits on real servers, so more workers than cores still pays), whole modules per worker,
# the longest modules first (tests/conftest.py). SENTINEL_TEST_WORKERS=0 runs them serially.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SENTINEL_TEST_VENV:-.venv}"
OLDEST_VENV="${VENV}-starlette-oldest"
OLDEST_STARLETTE="0.40.0"
WORKERS="${SENTINEL_TEST_WORKERS:-4}"
PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
# Two modules without module-scoped fixtures: their tests are spread one by one.
PARALLEL_OLDEST=(-n "$WORKERS" --dist load)
if [ "$WORKERS" = 0 ]; then
    PARALLEL=(-p no:xdist)
    PARALLEL_OLDEST=(-p no:xdist)
fi

make_venv() {
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install --quiet --upgrade pip
    "$1/bin/python" -m pip install --quiet -e '.[test]' "${@:2}"
}

run_pytest() {
    local python="$1"; shift
    local status=0
    "$python" -m pytest "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: treating as a failure" >&2
        exit 1
    fi
    return "$status"
}

# Real Prometheus and Alertmanager from Debian: the tests start them on loopback.
SERVERS="prometheus promtool prometheus-alertmanager amtool"
missing() {
    for binary in $SERVERS; do
        command -v "$binary" >/dev/null || return 0
    done
    return 1
}
if missing; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus prometheus-alertmanager
fi
# The tests that need them skip without them: a machine that cannot install them fails here.
for binary in $SERVERS; do
    command -v "$binary" >/dev/null || { echo "$binary is required by the tests" >&2; exit 1; }
done

make_venv "$VENV"
"$VENV/bin/ruff" check sentinel tests docker bench
"$VENV/bin/ruff" format --check sentinel tests docker bench
"$VENV/bin/mypy" --strict sentinel

# The oldest Starlette's environment is installed while the suite runs (after the main
# install: both editable installs write the project's egg-info).
OLDEST_LOG="$(mktemp)"
make_venv "$OLDEST_VENV" "starlette==$OLDEST_STARLETTE" >"$OLDEST_LOG" 2>&1 &
OLDEST_INSTALL=$!
trap 'kill "$OLDEST_INSTALL" 2>/dev/null || true; rm -f "$OLDEST_LOG"' EXIT
status=0
run_pytest "$VENV/bin/python" -q --durations=15 "${PARALLEL[@]}" || status=$?
if ! wait "$OLDEST_INSTALL"; then
    cat "$OLDEST_LOG" >&2
    echo "installing Starlette $OLDEST_STARLETTE into $OLDEST_VENV failed" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

echo "--- again on the oldest supported Starlette ($OLDEST_STARLETTE)"
run_pytest "$OLDEST_VENV/bin/python" -q -p no:cacheprovider "${PARALLEL_OLDEST[@]}" \
    tests/test_middleware.py tests/test_routes.py
