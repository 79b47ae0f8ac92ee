"""The gate's state file: a decision to continue records the known-good release per location
with when it was seen healthy and the evidence; nothing else records; the write is atomic
(a process killed mid-write leaves a whole file) and locked (two gates recording at once
lose nothing); a file that is not sentinel's, is corrupt or is another environment's is
refused naming the file and the problem; and the rollback target comes from the file
alone."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import clean_env

from sentinel.gate import Counts, GateDecision, StateError, Thresholds, Verdict, decide
from sentinel.gate._state import (
    HISTORY_LIMIT,
    KIND,
    load_state,
    record,
    rollback_target,
    utc_text,
)

AT = 1_780_000_000.0


def _continue(version: str = "v2", locations: tuple[str, ...] = ("fra", "iad")) -> GateDecision:
    """A decision to continue ``version`` in ``locations`` (both versions at 0.05%)."""
    traffic = {}
    for location in locations:
        traffic[(location, version)] = Counts(20_000, 10)
        traffic[(location, "base")] = Counts(20_000, 10)
    decision = decide(traffic, version, Thresholds())
    assert decision.verdict is Verdict.CONTINUE, decision.summary
    return decision


def _evidence(decision: GateDecision) -> dict[str, dict[str, object]]:
    return {result.location: {"reason": result.reason} for result in decision.locations}


def test_a_continue_records_the_known_good_release_per_location(tmp_path: Path) -> None:
    """The new version becomes each judged location's known-good release, seen healthy at
    the decision's time, with its evidence; the file says what it is and whose."""
    path = tmp_path / "gate-state.json"
    decision = _continue()
    record(path, "production", decision, _evidence(decision), AT)
    document = json.loads(path.read_text())
    assert document["kind"] == KIND and document["schema"] == 1
    assert document["environment"] == "production"
    assert document["updated_at"] == utc_text(AT) == "2026-05-28T20:26:40Z"
    fra = document["locations"]["fra"]
    assert fra["known_good"] == "v2" and fra["last_seen_healthy"] == "2026-05-28T20:26:40Z"
    assert fra["evidence"] == {"reason": decision.locations[0].reason}
    assert fra["history"] == [{"version": "v2", "last_seen_healthy": "2026-05-28T20:26:40Z"}]
    state = load_state(path, "production")
    assert state is not None and set(state.locations) == {"fra", "iad"}
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_later_decisions_keep_the_history_and_the_other_locations(tmp_path: Path) -> None:
    """v1 then v2 in fra and iad, then v3 in fra only: fra's history is v3, v2, v1 (most
    recent first, each once), iad keeps v2; the history is bounded."""
    path = tmp_path / "state.json"
    for step, (version, locations) in enumerate(
        [("v1", ("fra", "iad")), ("v2", ("fra", "iad")), ("v3", ("fra",)), ("v2", ("fra",))]
    ):
        decision = _continue(version, locations)
        record(path, "production", decision, _evidence(decision), AT + step * 60)
    state = load_state(path)
    assert state is not None
    assert [item.version for item in state.locations["fra"].history] == ["v2", "v3", "v1"]
    assert state.locations["fra"].last_seen_healthy == utc_text(AT + 180)
    assert state.locations["iad"].known_good == "v2"
    assert state.locations["iad"].last_seen_healthy == utc_text(AT + 60)
    for step in range(HISTORY_LIMIT + 5):
        record(path, "production", _continue(f"r{step}", ("iad",)), {}, AT + 1000 + step)
    state = load_state(path)
    assert state is not None and len(state.locations["iad"].history) == HISTORY_LIMIT


def test_only_a_decision_to_continue_is_recorded(tmp_path: Path) -> None:
    """A stop or an undecided decision is refused by record() and the file is untouched."""
    path = tmp_path / "state.json"
    decision = _continue()
    record(path, "production", decision, {}, AT)
    before = path.read_bytes()
    stop = decide(
        {("fra", "v3"): Counts(1_000, 200), ("fra", "v2"): Counts(20_000, 10)}, "v3", Thresholds()
    )
    assert stop.verdict is Verdict.STOP
    waiting = decide({("fra", "v3"): Counts(100, 0)}, "v3", Thresholds())
    for other in (stop, waiting):
        with pytest.raises(ValueError, match="only a decision to continue is recorded"):
            record(path, "production", other, {}, AT + 60)
    assert path.read_bytes() == before


def test_a_state_file_of_another_environment_is_refused(tmp_path: Path) -> None:
    """Reading or recording a staging file for production: refused, naming the file and both
    environments; the file stays as it was."""
    path = tmp_path / "state.json"
    record(path, "staging", _continue(), {}, AT)
    before = path.read_bytes()
    with pytest.raises(StateError) as raised:
        load_state(path, "production")
    assert str(raised.value) == (
        f"{path}: the state file records environment 'staging', not 'production' "
        "(use a state file per environment)"
    )
    with pytest.raises(StateError, match="records environment 'staging'"):
        record(path, "production", _continue(), {}, AT + 60)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "corrupt state file: it is empty"),
        (b"groups:\n  - name: sentinel\n", "not a sentinel gate state file: not JSON"),
        (b'{"groups": []}', 'not a sentinel gate state file (no "kind": "sentinel-gate-state"'),
        (b"[1, 2]", 'not a sentinel gate state file (no "kind"'),
        (b"\xff\xfe\x00binary", "not a sentinel gate state file: not UTF-8 text"),
        (b'{"kind": "sentinel-gate-state", "schema": 1, "environ', "corrupt state file: not JSON"),
        (b'{"kind": "sentinel-gate-state", "schema": 7}', "state file schema 7 is not the one"),
        (
            b'{"kind": "sentinel-gate-state", "schema": 1, "environment": "prod\\nenv"}',
            "corrupt state file: \"environment\" must be an environment name: 'prod\\nenv'",
        ),
        (
            b'{"kind": "sentinel-gate-state", "schema": 1, "environment": "production",'
            b' "locations": {"fra": {"known_good": "v\\t2", "last_seen_healthy": "x"}}}',
            "corrupt state file: locations.fra.known_good must be a release name: 'v\\t2'",
        ),
        (
            b'{"kind": "sentinel-gate-state", "schema": 1, "environment": "production",'
            b' "locations": {"fra": {"known_good": "v2", "last_seen_healthy": "yesterday"}}}',
            "locations.fra.last_seen_healthy must be an ISO 8601 time: 'yesterday'",
        ),
        (
            b'{"kind": "sentinel-gate-state", "schema": 1, "environment": "production",'
            b' "locations": {"fra,iad": {}}}',
            "corrupt state file: 'fra,iad' is not a location",
        ),
        # JSON nested beyond Python's recursion limit: a RecursionError while parsing, which
        # must be "not sentinel's" like any other file it cannot read.
        (b"[" * 100_000, "not a sentinel gate state file: JSON nested too deeply: b'[[[["),
        (b'{"a":' * 100_000, "not a sentinel gate state file: JSON nested too deeply"),
    ],
)
def test_a_file_that_is_not_sentinels_or_is_corrupt_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """Empty, another tool's file, binary, cut short, a newer schema, bad values: refused
    with the file's name and the problem (the value shown), and never overwritten."""
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as raised:
        load_state(path, "production")
    assert str(raised.value).startswith(f"{path}: ")
    assert problem in str(raised.value)
    with pytest.raises(StateError):
        record(path, "production", _continue(), {}, AT)
    assert path.read_bytes() == content


def test_the_rollback_target_comes_from_the_file(tmp_path: Path) -> None:
    """Per location, or the release every location agrees on; never the excluded one (the
    release before it instead); a location without a record, a disagreement or nothing left
    after the exclusion is an error that says what is recorded."""
    path = tmp_path / "state.json"
    record(path, "production", _continue("v1"), {}, AT)
    record(path, "production", _continue("v2"), {}, AT + 60)
    state = load_state(path)
    assert state is not None
    assert rollback_target(state, "f")[0] == "v2"
    version, chosen = rollback_target(state, "f", "fra", exclude="v2")
    assert version == "v1" and chosen["fra"].last_seen_healthy == utc_text(AT)
    with pytest.raises(StateError, match=r"no known-good release is recorded for 'syd' \(recorded"):
        rollback_target(state, "f", "syd")
    record(path, "production", _continue("v3", ("iad",)), {}, AT + 120)
    state = load_state(path)
    assert state is not None
    with pytest.raises(StateError) as raised:
        rollback_target(state, "f")
    assert str(raised.value) == (
        "f: the known-good releases differ by location (fra: v2, iad: v3); name one with --location"
    )
    only = record(tmp_path / "one.json", "production", _continue("v9", ("fra",)), {}, AT)
    with pytest.raises(StateError, match="no known-good release other than 'v9'"):
        rollback_target(only, "f", "fra", exclude="v9")


def test_two_gates_recording_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two threads recording different locations 50 times each into one file: the lock and
    the re-read keep both locations' latest records (without the lock, one thread's write
    overwrites the other's most of the time)."""
    path = tmp_path / "state.json"
    errors: list[BaseException] = []

    def gate(location: str) -> None:
        try:
            for step in range(50):
                decision = _continue(f"{location}-{step}", (location,))
                record(path, "production", decision, {}, AT + step)
        except BaseException as error:  # handed to the test
            errors.append(error)

    threads = [threading.Thread(target=gate, args=(name,)) for name in ("fra", "iad")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    state = load_state(path)
    assert state is not None
    assert state.locations["fra"].known_good == "fra-49"
    assert state.locations["iad"].known_good == "iad-49"
    assert len(state.locations["fra"].history) == HISTORY_LIMIT


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from sentinel.gate import Counts, Thresholds, decide
    from sentinel.gate._state import record

    path = Path(sys.argv[1])
    evidence = {"fra": {"padding": "x" * 2_000_000}}
    print("ready", flush=True)
    for step in range(100_000):
        decision = decide(
            {("fra", f"v{step}"): Counts(20_000, 10), ("fra", "base"): Counts(20_000, 10)},
            f"v{step}",
            Thresholds(),
        )
        record(path, "production", decision, evidence, 1_780_000_000.0 + step)
    """
)


def test_a_process_killed_mid_write_leaves_a_whole_file(tmp_path: Path) -> None:
    """A process that records 2 MB of evidence over and over, killed with SIGKILL at five
    different moments: each time the file reads as a whole, valid state (the old one or the
    new one); a temporary file a kill left behind has a name of its own."""
    path = tmp_path / "state.json"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for attempt in range(5):
        process = subprocess.Popen(
            [sys.executable, str(script), str(path)],
            stdout=subprocess.PIPE,
            env=clean_env(),
            text=True,
        )
        try:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
            deadline = time.monotonic() + 10
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05 + 0.07 * attempt)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
        state = load_state(path, "production")
        assert state is not None and state.locations["fra"].known_good.startswith("v")
        assert len(state.locations["fra"].evidence["padding"]) == 2_000_000
    leftovers = {item.name for item in tmp_path.iterdir()} - {
        "state.json",
        "state.json.lock",
        "writer.py",
    }
    # A kill between creating the temporary file and renaming it may leave one behind (never
    # in place of the state file); they are named so that nothing mistakes them for it.
    assert all(name.startswith(".state.json.") for name in leftovers)


def test_a_state_file_behind_a_symbolic_link_is_written_through_it(tmp_path: Path) -> None:
    """--state naming a link (to a file on the deploy runner's disk kept elsewhere): the record
    replaces the file it points to, the link stays a link (the rollback reads the same file
    through either name), and the lock is the real file's, so that gates naming it through
    different links share it."""
    real = tmp_path / "store" / "gate-state.json"
    real.parent.mkdir()
    record(real, "production", _continue("v1"), {}, AT)
    link = tmp_path / "gate-state.json"
    link.symlink_to(real)
    record(link, "production", _continue("v2"), {}, AT + 60)
    assert link.is_symlink() and link.resolve() == real
    state = load_state(real, "production")
    assert state is not None and state.locations["fra"].known_good == "v2"
    assert [item.version for item in state.locations["fra"].history] == ["v2", "v1"]
    assert sorted(item.name for item in tmp_path.rglob("*")) == [
        "gate-state.json",
        "gate-state.json",
        "gate-state.json.lock",
        "store",
    ]
    assert (real.parent / "gate-state.json.lock").exists()


@pytest.mark.parametrize("location", ["", "eu west"])
def test_a_decision_the_file_could_not_be_read_back_with_is_not_recorded(
    tmp_path: Path, location: str
) -> None:
    """A continue that names a location sentinel could not have reported (built by hand:
    the gate's own decisions leave such values out) is refused before anything is written,
    so that the file the gate and rollback-target read never becomes one they refuse: the
    old file stays as it was, and rollback-target still answers from it."""
    path = tmp_path / "gate-state.json"
    decision = _continue()
    record(path, "production", decision, _evidence(decision), AT)
    before = path.read_text()
    bad = dataclasses.replace(
        decision,
        locations=(dataclasses.replace(decision.locations[0], location=location),),
    )
    with pytest.raises(StateError, match="not a location sentinel reports"):
        record(path, "production", bad, {}, AT + 60)
    assert path.read_text() == before
    fresh = tmp_path / "fresh.json"
    with pytest.raises(StateError):
        record(fresh, "production", bad, {}, AT)
    assert not fresh.exists()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sentinel.cli",
            "gate",
            "rollback-target",
            "--state",
            str(path),
            "--location",
            "fra",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "v2\n"), result.stderr
