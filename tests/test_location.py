"""Location values are bounded: an allow-list, or the first N valid values, else other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import clean_env
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel._config import is_valid_location
from sentinel._location import OTHER_LOCATION, LocationSet


def test_first_values_are_kept_then_other() -> None:
    """Without an allow-list, the first `limit` valid values are kept."""
    locations = LocationSet(limit=2)
    assert locations.resolve("fra") == "fra"
    assert locations.resolve("iad") == "iad"
    assert locations.resolve("sin") == OTHER_LOCATION
    assert locations.resolve("fra") == "fra"


def test_allow_list_admits_only_its_values() -> None:
    """With an allow-list, everything outside it is other."""
    locations = LocationSet(allowed=("fra", "iad"), limit=64)
    assert [locations.resolve(v) for v in ("fra", "iad", "sin")] == ["fra", "iad", "other"]


def test_other_takes_no_place_in_the_bound() -> None:
    """A request that says "other" is counted as other without using one of the `limit`
    places (nor does a worker's shared file that names it), so the first `limit` real values
    are named."""
    locations = LocationSet(limit=2)
    assert locations.resolve(OTHER_LOCATION) == OTHER_LOCATION
    assert [locations.resolve(v) for v in ("fra", "iad", "sin")] == ["fra", "iad", "other"]
    assert len(locations) == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=200))
def test_hostile_values_never_exceed_the_bound(values: list[str]) -> None:
    """Any sequence of raw values maps into at most limit + 1 distinct valid outputs."""
    locations = LocationSet(limit=64)
    outputs = {locations.resolve(value) for value in values}
    assert len(outputs - {OTHER_LOCATION}) <= 64
    assert all(is_valid_location(output) for output in outputs)


def test_a_credential_sent_as_the_location_is_other() -> None:
    """A token in the location header (a misrouted header) never becomes a label value,
    while ordinary locations, UUIDs included, are kept."""
    from sentinel._scrub import Scrubber

    locations = LocationSet(secret=Scrubber().looks_secret)
    assert locations.resolve("sk_live_4eC39HqLyjWDarjtT1zdp7dc") == OTHER_LOCATION
    assert locations.resolve("eu-west-1") == "eu-west-1"
    assert locations.resolve("7d444840-9dc0-11d1-b245-5ffdce74fad2") != OTHER_LOCATION


SHARING_WORKER = """
import json
import sys

from sentinel._location import LocationSet

locations = LocationSet(limit=16)
locations.add_static("unknown")
own, common = sys.argv[1], [f"c{n}" for n in range(12)]
answers = {}
for n in range(60):
    for value in (f"{own}{n}", common[n % 12]):
        answers[value] = locations.resolve(value)
print(json.dumps(answers))
"""


def test_workers_sharing_a_directory_name_the_same_first_values(tmp_path: Path) -> None:
    """Four worker processes (prometheus_client in multiprocess mode) resolving their own
    new values and common ones at once: together they name at most ``limit`` values (the
    process's own location included), as one process would, and a value any of them names
    is named by every one that meets it, so its merged count is all of its requests."""
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SHARING_WORKER, f"w{k}-"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    answers = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        answers.append(json.loads(out))
    named = {value for each in answers for value, label in each.items() if label == value}
    assert len(named | {"unknown"}) <= 16
    assert len(named) == 15  # the bound is reached, not exceeded
    for value in {value for each in answers for value in each}:
        labels = {each[value] for each in answers if value in each}
        assert len(labels) == 1, (value, labels)
