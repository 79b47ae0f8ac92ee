#!/usr/bin/env bash
# sentinel's benchmark in one command: bash bench/run.sh [harness options]
#
# Creates .venv-bench in the repo root, installs sentinel with its `bench` extra, installs
# wrk with apt-get when it is missing and we are root (without wrk the real-server part is
# skipped, with a message), runs the harness, writes bench/results.md and prints it.
# Options go to the harness: --quick, --rounds N, --requests N, --raise-requests N,
# --no-server, --server-seconds N, --variants a,b,c, --json FILE (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SENTINEL_BENCH_VENV:-.venv-bench}"

for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        [ -x "$VENV/bin/python" ] && exec "$VENV/bin/python" -m bench.harness --help
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
    fi
done

if [ ! -x "$VENV/bin/python" ]; then
    echo "--- creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
echo "--- installing sentinel with the bench extra into $VENV" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet -e '.[bench]' >&2

want_server=1
for arg in "$@"; do
    [ "$arg" = "--no-server" ] && want_server=0
done
if [ "$want_server" = 1 ] && ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "--- installing wrk with apt-get" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } \
            >/tmp/sentinel-bench-apt.log 2>&1; then
            echo "--- could not install wrk (see /tmp/sentinel-bench-apt.log)" >&2
        fi
    fi
    if ! command -v wrk >/dev/null 2>&1; then
        echo "--- wrk is not available: the real-server part will be skipped" >&2
        echo "    (install wrk, e.g. 'apt-get install wrk', to run it)" >&2
    fi
fi

exec "$VENV/bin/python" -m bench.harness "$@"
