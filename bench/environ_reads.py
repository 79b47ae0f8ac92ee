"""``os.environ`` reads with and without sentinel's watch: ``python -m bench.environ_reads``.

sentinel watches the environment by making ``os.environ`` a
``sentinel._mutation._environ.WatchedEnviron`` over the same data, whose reads are the standard
library's own code. This times reads in one process with the standard ``os._Environ``
object and with the watch installed, toggling between rounds (each round measures both
states, in alternating order), and prints one JSON object: per read form and state, the
ns/read of every round. Each measurement is net of the timing loop's own cost, an empty
statement timed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import timeit

STANDARD = "standard"
WATCHED = "watched"
STATES: tuple[str, ...] = (STANDARD, WATCHED)
KEY = "PATH"
FORMS: tuple[str, ...] = (f'os.environ.get("{KEY}")', f'os.environ["{KEY}"]')


def set_state(state: str) -> None:
    """Install or remove the watch, and check that the class really changed."""
    # Imported here so that the harness can import this module's names without sentinel.
    from sentinel._mutation import _environ, _setters

    if state == WATCHED:
        _setters.install_default_watches(isolating=False)
    else:
        _setters.uninstall_default_watches()
    expected = _environ.WatchedEnviron if state == WATCHED else _environ._Environ
    if type(os.environ) is not expected:
        msg = f"{state}: os.environ is a {type(os.environ).__qualname__}, not {expected}"
        raise RuntimeError(msg)


def measure(rounds: int, reads: int) -> dict[str, dict[str, list[float]]]:
    """ns/read per form, state and round."""
    os.environ.setdefault(KEY, os.defpath)  # before the watch: not a watched write
    # The statement looks up os.environ on every read, as application code does, so the
    # watched object is resolved each time (a pre-bound method would hide it).
    timers = {form: timeit.Timer(form, globals={"os": os}) for form in FORMS}
    empty = timeit.Timer("pass")
    samples: dict[str, dict[str, list[float]]] = {f: {s: [] for s in STATES} for f in FORMS}
    try:
        for state in STATES:  # warm-up: let the interpreter specialize for both classes
            set_state(state)
            for timer in timers.values():
                timer.timeit(reads // 10)
        for r in range(rounds):
            for state in STATES if r % 2 == 0 else STATES[::-1]:
                set_state(state)
                loop_s = empty.timeit(reads)
                for form, timer in timers.items():
                    samples[form][state].append((timer.timeit(reads) - loop_s) / reads * 1e9)
    finally:
        set_state(STANDARD)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.environ_reads")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reads", type=int, default=200_000, help="reads per form and round")
    args = parser.parse_args()
    samples = measure(args.rounds, args.reads)
    print(json.dumps({"rounds": args.rounds, "reads": args.reads, "ns_per_read": samples}))


if __name__ == "__main__":
    main()
