"""Tests for sentinel._exceptions: fingerprints, frames, chains, locals and reportability."""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib.util
import itertools
import json
import keyword
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import traceback
import types
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sentinel
from sentinel import _scrub
from sentinel._exceptions import (
    _MAX_CHAIN,
    FrameClassifier,
    LocalsBudget,
    Renderer,
    _collapse_repeats,
    chain,
    culprit,
    describe,
    display_path,
    error_path,
    fingerprint,
    frames,
    is_app_file,
    is_reportable,
    raised_at,
    safe_message,
    scrubbed_message,
    type_name,
)
from sentinel._scrub import Scrubber

PROPERTY = settings(max_examples=40, deadline=None)
MASK = re.compile(r"^\[scrubbed len=\d+ hash=[0-9a-f]{8}\]$")
SENTINEL_DIR = os.path.dirname(os.path.abspath(sentinel.__file__)) + os.sep

HEADER = ("# a generated module for fingerprint tests", "# fillers follow")
_variant_ids = itertools.count()


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside site-packages and the stdlib, so its files count as app code."""
    return tmp_path_factory.mktemp("fpmods")


def load_module(source: str, base: Path, name: str = "fpmod") -> types.ModuleType:
    """Import ``source`` as module ``name`` from a fresh file (fresh for linecache, too)."""
    directory = base / f"variant{next(_variant_ids)}"
    directory.mkdir()
    path = directory / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_source(
    above: Sequence[str] = (),
    inside: Sequence[str] = (),
    inside_run: Sequence[str] = (),
    function: str = "boom",
    raise_lines: Sequence[str] = ("raise exc_type(message)",),
) -> str:
    """A module whose ``run()`` calls ``function``, which raises; ``run`` returns the error.

    Two fixed comment lines come first, so no generated filler can be a coding cookie.
    """
    lines = [*HEADER, *above, f"def {function}(message, exc_type):", *inside]
    lines += [f"    {line}" for line in raise_lines]
    lines += ["", "", "def run(message='boom', exc_type=ValueError):", "    try:", *inside_run]
    lines += [
        f"        {function}(message, exc_type)",
        "    except BaseException as error:",
        "        return error",
        "    raise AssertionError('nothing was raised')",
        "",
    ]
    return "\n".join(lines)


def raised(func: Callable[..., Any], *args: Any) -> BaseException:
    """The exception ``func(*args)`` raises (its traceback starts at this helper's frame)."""
    try:
        func(*args)
    except BaseException as error:
        return error
    raise AssertionError("nothing was raised")


def real_frames(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frame entries of ``frames()`` output, without the skipped-frames marker."""
    return [item for item in described if "skipped_frames" not in item]


identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: (
        not keyword.iskeyword(name)
        and not keyword.issoftkeyword(name)
        and name not in {"run", "message", "exc_type", "error", "print", "int", "str"}
    )
)
comment_text = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
)
indentation = st.sampled_from(["", " ", "    ", "        ", "\t"])
filler_line = st.one_of(
    indentation,
    st.builds(lambda indent, text: f"{indent}#{text}", indentation, comment_text),
)
filler = st.lists(filler_line, max_size=6)


# --------------------------------------------------------------------------- fingerprint


@PROPERTY
@given(variants=st.lists(st.tuples(filler, filler, filler), min_size=1, max_size=3))
def test_fingerprint_is_stable_across_blank_and_comment_line_shifts(
    workdir: Path, variants: list[tuple[list[str], list[str], list[str]]]
) -> None:
    """Blank/comment lines above the function or before the raise keep the fingerprint."""
    classifier = FrameClassifier()
    baseline = fingerprint(load_module(module_source(), workdir).run(), classifier)
    for above, inside, inside_run in variants:
        module = load_module(module_source(above, inside, inside_run), workdir)
        error = module.run()
        raising_tb = error.__traceback__.tb_next
        assert raising_tb is not None
        # The raise really moved: def line, fillers, then the raise.
        assert raising_tb.tb_lineno == len(HEADER) + len(above) + len(inside) + 2
        assert fingerprint(error, classifier) == baseline


@PROPERTY
@given(
    site_a=st.tuples(identifiers, identifiers, st.sampled_from([ValueError, KeyError, OSError])),
    site_b=st.tuples(identifiers, identifiers, st.sampled_from([ValueError, KeyError, OSError])),
)
def test_different_call_sites_have_different_fingerprints(
    workdir: Path,
    site_a: tuple[str, str, type[Exception]],
    site_b: tuple[str, str, type[Exception]],
) -> None:
    """A different function, raising line or exception type gives a different fingerprint."""
    prints = []
    for function, variable, exc_type in (site_a, site_b):
        raise_lines = (f"{variable} = message", f"raise exc_type({variable})")
        source = module_source(function=function, raise_lines=raise_lines)
        error = load_module(source, workdir).run("same message", exc_type)
        assert type(error) is exc_type
        prints.append(fingerprint(error, FrameClassifier()))
    if site_a == site_b:
        assert prints[0] == prints[1]
    else:
        assert prints[0] != prints[1]


def test_two_raise_lines_in_one_function_have_different_fingerprints(workdir: Path) -> None:
    """Two raise statements with different text in the same function are two bugs."""
    source = textwrap.dedent(
        """\
        def boom(which):
            if which:
                raise ValueError("x")
            raise ValueError("x" if which else "y")


        def run(which):
            try:
                boom(which)
            except ValueError as error:
                return error
        """
    )
    module = load_module(source, workdir)
    classifier = FrameClassifier()
    assert fingerprint(module.run(True), classifier) != fingerprint(module.run(False), classifier)


huge_messages = st.builds(
    lambda text, n: text * n, st.text(min_size=1, max_size=8), st.integers(2_000, 50_000)
)
any_messages = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=())),  # surrogates and controls too
    st.text(alphabet=st.characters(max_codepoint=0x1F)),  # unprintable only
    huge_messages,
)


@pytest.fixture(scope="module")
def message_module(workdir: Path) -> types.ModuleType:
    """One module whose ``run(message)`` raises ``ValueError(message)``."""
    return load_module(module_source(), workdir)


@PROPERTY
@given(message=any_messages)
def test_message_never_changes_the_fingerprint(
    message_module: types.ModuleType, message: str
) -> None:
    """The fingerprint ignores the message, whatever it contains and however large it is."""
    classifier = FrameClassifier()
    baseline = fingerprint(message_module.run(""), classifier)
    error = message_module.run(message)
    assert error.args == (message,)
    assert fingerprint(error, classifier) == baseline


@PROPERTY
@given(message=any_messages)
def test_describe_bounds_and_survives_any_message(
    message_module: types.ModuleType, message: str
) -> None:
    """describe() never raises on odd messages and bounds the message length."""
    error = message_module.run(message)
    described = describe(error, FrameClassifier(), 50, Scrubber(), None)
    assert described["exception_type"] == "ValueError"
    assert isinstance(described["message"], str)
    # 8192 characters of message, a truncation note, and room for masks of secrets in it.
    assert len(described["message"]) <= 2 * 8192 + 100


def test_fingerprint_ignores_non_string_arguments(message_module: types.ModuleType) -> None:
    """Non-string exception arguments are part of the message, not the fingerprint."""
    classifier = FrameClassifier()
    baseline = fingerprint(message_module.run("text"), classifier)
    assert fingerprint(message_module.run(12345), classifier) == baseline
    assert fingerprint(message_module.run(object()), classifier) == baseline


FINGERPRINT_SCRIPT = textwrap.dedent(
    """\
    import importlib.util, sys
    from sentinel._exceptions import FrameClassifier, fingerprint
    spec = importlib.util.spec_from_file_location("fpmod", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(fingerprint(module.run("message", ValueError), FrameClassifier()))
    print(fingerprint(module.run_group(), FrameClassifier()))
    """
)

GROUP_SOURCE = textwrap.dedent(
    """\


    def run_group():
        try:
            try:
                raise LookupError("inner")
            except LookupError as inner:
                members = [KeyError("a"), ValueError("b"), TypeError("c"), OSError("d")]
                raise ExceptionGroup("many", members) from inner
        except ExceptionGroup as error:
            return error
    """
)


def test_fingerprint_is_stable_across_processes_and_hash_seeds(workdir: Path) -> None:
    """The same code path fingerprints identically in other processes with other hash seeds."""
    module = load_module(module_source() + GROUP_SOURCE, workdir)
    classifier = FrameClassifier()
    expected = [
        fingerprint(module.run("message", ValueError), classifier),
        fingerprint(module.run_group(), classifier),
    ]
    for seed in ("0", "1", "4242424242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", FINGERPRINT_SCRIPT, module.__file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout.split() == expected, result.stderr


CAUSE_SOURCE = textwrap.dedent(
    """\
    def boom(cause):
        raise RuntimeError("outer") from cause


    def run(cause=None):
        try:
            boom(cause)
        except RuntimeError as error:
            return error
    """
)


def test_chained_cause_changes_the_fingerprint(workdir: Path) -> None:
    """``raise X from Y`` fingerprints differently from ``raise X``, and by the cause's type."""
    module = load_module(CAUSE_SOURCE, workdir)
    classifier = FrameClassifier()
    plain = fingerprint(module.run(None), classifier)
    from_value = fingerprint(module.run(ValueError("one")), classifier)
    from_value_other_message = fingerprint(module.run(ValueError("two")), classifier)
    from_key = fingerprint(module.run(KeyError("one")), classifier)
    assert plain != from_value
    assert from_value != from_key
    assert from_value == from_value_other_message


ORDINARY_SOURCE = textwrap.dedent(
    """\
    def boom(during_handling):
        if during_handling:
            try:
                {}["missing"]
            except KeyError:
                fail()
        fail()


    def fail():
        raise ValueError("failed")


    def single():
        raise ExceptionGroup("one", [ValueError("x")])
    """
)


def test_implicit_context_changes_the_fingerprint(workdir: Path) -> None:
    """An exception raised while handling another differs from the same one raised alone."""
    module = load_module(ORDINARY_SOURCE, workdir)
    classifier = FrameClassifier()
    alone = raised(module.boom, False)
    handling = raised(module.boom, True)
    assert handling.__context__ is not None
    assert fingerprint(alone, classifier) != fingerprint(handling, classifier)


def test_exception_groups_fingerprint_by_member_types_not_order(workdir: Path) -> None:
    """Group fingerprints depend on the set of member types, not their order or messages."""
    source = textwrap.dedent(
        """\
        def run(members):
            try:
                raise ExceptionGroup("group", members)
            except ExceptionGroup as error:
                return error
        """
    )
    module = load_module(source, workdir)
    classifier = FrameClassifier()
    one = fingerprint(module.run([ValueError("a"), KeyError("b")]), classifier)
    reordered = fingerprint(module.run([KeyError("c"), ValueError("d")]), classifier)
    other = fingerprint(module.run([ValueError("a"), TypeError("b")]), classifier)
    assert one == reordered
    assert one != other


def test_fingerprint_uses_the_traceback_as_caught(workdir: Path) -> None:
    """Passing the traceback from the first catch keeps the fingerprint as it was there."""
    source = textwrap.dedent(
        """\
        def boom():
            raise ValueError("x")


        def inner():
            try:
                boom()
            except ValueError as error:
                return error, error.__traceback__


        def outer():
            error, tb = inner()
            try:
                raise error
            except ValueError as again:
                return again, tb
        """
    )
    module = load_module(source, workdir)
    classifier = FrameClassifier()
    first, first_tb = module.inner()
    at_first_catch = fingerprint(first, classifier)
    error, tb = module.outer()
    assert fingerprint(error, classifier, tb) == fingerprint(first, classifier, first_tb)
    assert fingerprint(error, classifier, tb) == at_first_catch
    # Without the saved traceback, the re-raise site in outer() is part of the path.
    assert fingerprint(error, classifier) != at_first_catch


def test_only_app_frames_count_when_there_are_any(workdir: Path) -> None:
    """Library frames between app frames do not change the fingerprint."""
    source = textwrap.dedent(
        """\
        def boom(*args):
            raise ValueError("from a callback")


        def run(via):
            try:
                via()
            except ValueError as error:
                return error
        """
    )
    module = load_module(source, workdir)
    through_json = functools.partial(json.dumps, object(), default=module.boom, indent=1)
    through_copy = functools.partial(copy.deepcopy, types.SimpleNamespace(__deepcopy__=module.boom))
    via_json = module.run(through_json)
    via_copy = module.run(through_copy)
    classifier = FrameClassifier()
    modules = {item["module"] for item in frames(via_json, classifier, 50, Scrubber(), None)}
    assert "json.encoder" in modules  # there really are library frames in between
    assert fingerprint(via_json, classifier) == fingerprint(via_copy, classifier)


def test_without_app_frames_library_frames_count() -> None:
    """When no frame is in the app, library frames tell different call sites apart."""
    import fractions
    import ipaddress

    classifier = FrameClassifier(app_modules=("no_such_app",))
    from_fractions = raised(fractions.Fraction, "not a number")
    from_ipaddress = raised(ipaddress.ip_address, "not an address")
    assert type(from_fractions) is type(from_ipaddress) is ValueError
    assert fingerprint(from_fractions, classifier) != fingerprint(from_ipaddress, classifier)


def test_fingerprints_of_ordinary_exceptions_keep_their_values(workdir: Path) -> None:
    """Fingerprints of exceptions without recursion, raised members or zip frames are the
    values earlier releases gave them: an upgrade must not make every known error "new"."""
    classifier = FrameClassifier()
    plain = load_module(module_source(), workdir)
    cause = load_module(CAUSE_SOURCE, workdir)
    group = load_module(module_source() + GROUP_SOURCE, workdir)
    other = load_module(ORDINARY_SOURCE, workdir)
    assert {
        "plain": fingerprint(plain.run("m", ValueError), classifier),
        "other type": fingerprint(plain.run("m", KeyError), classifier),
        "no cause": fingerprint(cause.run(None), classifier),
        "cause never raised": fingerprint(cause.run(ValueError("one")), classifier),
        "members never raised": fingerprint(group.run_group(), classifier),
        "context": fingerprint(raised(other.boom, True), classifier),
        "one member": fingerprint(raised(other.single), classifier),
        "never raised, no message": fingerprint(RuntimeError(), classifier),
    } == {
        "plain": "25ef9303cfd1b5cc",
        "other type": "c482cd9b4816ebc3",
        "no cause": "17ba98fac94b754d",
        "cause never raised": "77e4023cc9fbc196",
        "members never raised": "48eb104f2e16ab86",
        "context": "8666dfe0502f0f7e",
        "one member": "5cff49c71b5ed5b5",
        "never raised, no message": "465cd40fc0de5fd3",
    }


RECURSION_SOURCE = textwrap.dedent(
    """\
    def walk(node):
        return walk(node)


    def ping(node):
        return pong(node)


    def pong(node):
        return ping(node)


    def check(node):
        return inspect(node)


    def inspect(node):
        return node


    def climb(node):
        check(node)
        return descend(node)


    def descend(node):
        return climb(node)


    def find(depth):
        if depth == 0:
            raise KeyError("bottom")
        return find(depth - 1)


    def at_depth(depth, bug, *args):
        if depth:
            return at_depth(depth - 1, bug, *args)
        try:
            bug(*args)
        except (RecursionError, KeyError) as error:
            return error
    """
)


def test_recursion_fingerprints_the_same_at_any_depth(workdir: Path) -> None:
    """A RecursionError is one fingerprint whatever depth its recursion started at: plain
    recursion, a cycle of functions (either one may be the innermost), and a cycle that
    calls helpers (the limit falls in one of them, or not); distinct recursions stay
    distinct, and so does bounded recursion from the code that ends it."""
    module = load_module(RECURSION_SOURCE, workdir)
    classifier = FrameClassifier()
    found: dict[str, set[str]] = {}
    for bug in (module.walk, module.ping, module.climb):
        errors = [module.at_depth(depth, bug, 1) for depth in range(8)]
        assert all(isinstance(error, RecursionError) for error in errors)
        found[bug.__name__] = {fingerprint(error, classifier) for error in errors}
    assert all(len(prints) == 1 for prints in found.values()), found
    assert len(set.union(*found.values())) == 3
    # Recursion that ends by itself counts once too, at whatever depth the bug shows.
    shallow, deep = (fingerprint(module.at_depth(0, module.find, n), classifier) for n in (3, 9))
    assert shallow == deep
    assert shallow not in set.union(*found.values())


def test_repeated_frames_collapse_in_linear_time() -> None:
    """Collapsing runs stays fast for 1,000-frame stacks of any shape, keeps paths without
    repeats as they are, and folds a cycle to one copy whatever its phase at the end."""
    shapes = {
        "distinct": [f"f{n}" for n in range(1000)],
        "long cycle": [f"f{n % 500}" for n in range(1000)],
        "same": ["f"] * 1000,
        "nested": (["a"] * 31 + ["b"]) * 32,
        "near cycles": ([f"f{n}" for n in range(31)] + ["f0"]) * 32,
    }
    started = time.perf_counter()
    collapsed = {name: _collapse_repeats(entries) for name, entries in shapes.items()}
    assert time.perf_counter() - started < 1.0
    assert collapsed["distinct"] == shapes["distinct"]
    assert collapsed["long cycle"] == shapes["long cycle"]  # longer than a cycle is looked for
    assert collapsed["same"] == ["f"]
    for extra in range(1, 4):
        assert _collapse_repeats(["x", *(["a", "b", "c"] * 20), *["a", "b"][:extra], "z"]) == [
            "x",
            "a",
            "b",
            "c",
            "z",
        ]


GROUP_MEMBERS_SOURCE = textwrap.dedent(
    """\
    def charge():
        raise ValueError("card declined")


    def ship():
        raise ValueError("no address")


    def bill():
        raise KeyError("sku")


    def audit():
        raise KeyError("user")


    def run(*tasks):
        errors = []
        for task in tasks:
            try:
                task()
            except Exception as error:
                errors.append(error)
        try:
            raise ExceptionGroup("tasks failed", errors)
        except ExceptionGroup as group:
            return group


    def nested(*tasks):
        raise run(*tasks)
    """
)


def test_group_members_fingerprint_by_their_own_code_path(workdir: Path) -> None:
    """Several raised members of a group count by their own fingerprints (not their order,
    nor how often one repeats), so different failures of the same types at the same place
    are different groups, also nested; a single member counts by its type as before (the
    reporter reports the error inside); huge trees stay bounded."""
    module = load_module(GROUP_MEMBERS_SOURCE, workdir)
    classifier = FrameClassifier()

    def run(*tasks: Callable[[], None]) -> str:
        return fingerprint(module.run(*tasks), classifier)

    assert run(module.charge, module.bill) != run(module.ship, module.audit)
    assert run(module.charge, module.bill) != run(module.ship, module.bill)
    assert run(module.charge, module.bill) == run(module.bill, module.charge)
    assert run(module.charge, module.bill) == run(module.charge, module.bill, module.charge)
    inner_one = functools.partial(module.nested, module.charge, module.bill)
    inner_two = functools.partial(module.nested, module.ship, module.bill)
    assert run(inner_one, module.audit) != run(inner_two, module.audit)
    assert run(module.charge) == run(module.ship)

    group: BaseException = raised(_raise, ValueError("leaf"))
    for level in range(200):
        group = raised(_raise, ExceptionGroup(f"{level}", [group, raised(_raise, KeyError())]))
    started = time.perf_counter()
    assert fingerprint(group, classifier) == fingerprint(group, classifier)
    assert time.perf_counter() - started < 1.0


def test_source_in_a_zip_is_read_without_earlier_formatting(tmp_path: Path) -> None:
    """Code imported from a zip (zipapp, egg, pex) fingerprints and shows its source the
    same whether or not anything formatted a traceback of it before."""
    package = f"zipped{next(_variant_ids)}"
    archive = tmp_path / "app.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(f"{package}/__init__.py", "")
        bundle.writestr(
            f"{package}/jobs.py", "def sync(rows):\n    total = 0\n    return rows['missing']\n"
        )
    sys.path.insert(0, str(archive))
    try:
        jobs = importlib.import_module(f"{package}.jobs")
        classifier = FrameClassifier(app_modules=(package,))
        first = raised(jobs.sync, {})
        unformatted = fingerprint(first, classifier)
        source = frames(first, classifier, 50, Scrubber(), None)[-1]["source"]
        traceback.format_exception(first)  # as the app, or a library, may log it
        formatted = fingerprint(raised(jobs.sync, {}), classifier)
    finally:
        sys.path.remove(str(archive))
        sys.path_importer_cache.pop(str(archive), None)
        for name in (package, f"{package}.jobs"):
            sys.modules.pop(name, None)
    assert source == "return rows['missing']"
    assert unformatted == formatted


class _ArgsOnlyError(Exception):
    def __str__(self) -> str:
        raise AssertionError("the app's own __str__ is not called for a fingerprint")


def test_an_exception_never_raised_fingerprints_by_its_message_without_its_values() -> None:
    """Without a traceback, the message tells call sites apart, with its values (numbers,
    hex ids, uuids, quoted text) left out and its length bounded; the app's own __str__
    is not run (its plain arguments stand in)."""
    classifier = FrameClassifier()

    def unraised(error: BaseException) -> str:
        assert error.__traceback__ is None
        return fingerprint(error, classifier)

    payment = unraised(RuntimeError("payment provider returned 502"))
    assert payment != unraised(RuntimeError("email service quota exceeded"))
    assert payment == unraised(RuntimeError("payment provider returned 503"))
    assert payment != unraised(ValueError("payment provider returned 502"))
    same = [
        ("user 'alice' not found", "user 'bob' not found"),
        ('order "A-1" failed', 'order "B-22" failed'),
        ("can't reach 'db1'", "can't reach 'db-2'"),
        (
            "request 0f8fad5b-d9cb-469f-a165-70867728950e timed out",
            "request 7c9e6679-7425-40de-944b-e07fc1f90ae7 timed out",
        ),
        ("<Connection object at 0x7f3a2c10>", "<Connection object at 0x7f00aa0b93>"),
        ("commit 3fa4c2e19b not found", "commit 9bd0e71f22ac not found"),
        ("took 1.25 s for 3 rows", "took 30 s for 12000 rows"),
        ("x" * 300 + " one", "x" * 300 + " two"),
    ]
    for first, second in same:
        assert unraised(RuntimeError(first)) == unraised(RuntimeError(second)), first
    assert unraised(RuntimeError("can't reach db")) != unraised(RuntimeError("can't reach cache"))
    started = time.perf_counter()
    unraised(RuntimeError("'x " * 1_000_000))
    assert time.perf_counter() - started < 1.0
    assert unraised(_ArgsOnlyError("sync failed", 3)) == unraised(_ArgsOnlyError("sync failed", 4))
    assert unraised(_ArgsOnlyError("sync failed")) != unraised(_ArgsOnlyError("push failed"))


def _failing_pairs() -> Any:
    """A generator that fails on its first item."""
    raise LookupError("no pairs")
    yield ("never", "reached")


def _consume_with(consume: Callable[[Any], Any]) -> BaseException:
    """The error from ``consume(_failing_pairs())``; the calling line is the same for all."""
    try:
        consume(_failing_pairs())
    except LookupError as error:
        return error
    raise AssertionError("nothing was raised")


def test_sentinel_own_frames_are_excluded() -> None:
    """Frames inside sentinel's package appear neither in frames nor in the fingerprint."""
    through_sentinel = _consume_with(Scrubber().pairs)
    through_builtin = _consume_with(dict)
    tb_files = []
    tb = through_sentinel.__traceback__
    while tb is not None:
        tb_files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert any(name.startswith(SENTINEL_DIR) for name in tb_files)  # it did pass through
    described = frames(through_sentinel, FrameClassifier(), 50, Scrubber(), None)
    assert [item["function"] for item in described] == ["_consume_with", "_failing_pairs"]
    assert not any(item["file"].startswith(SENTINEL_DIR) for item in described)
    classifier = FrameClassifier()
    assert fingerprint(through_sentinel, classifier) == fingerprint(through_builtin, classifier)


def test_is_sentinel_covers_the_package_but_not_the_example_app() -> None:
    """sentinel's modules are sentinel frames; its bundled example app is not."""
    import sentinel.example.app

    classifier = FrameClassifier()
    assert classifier.is_sentinel(_scrub.__file__)
    assert not classifier.is_sentinel(sentinel.example.app.__file__)
    assert not classifier.is_sentinel(__file__)


# --------------------------------------------------------------------------- chain


def test_chain_lists_causes_and_contexts_in_order() -> None:
    """chain() starts with the exception and follows __cause__, then __context__."""
    root = OSError("root")
    middle = KeyError("middle")
    middle.__context__ = root
    top = ValueError("top")
    top.__cause__ = middle
    assert chain(top) == [("exception", top), ("cause", middle), ("context", root)]


def test_chain_skips_suppressed_context() -> None:
    """``raise X from None`` hides the context from the chain."""
    error = ValueError("x")
    error.__context__ = KeyError("hidden")
    error.__suppress_context__ = True
    assert chain(error) == [("exception", error)]


def test_context_cycles_terminate_without_repeats() -> None:
    """A cycle in __context__/__cause__ neither loops forever nor repeats exceptions."""
    first, second = ValueError("first"), KeyError("second")
    first.__context__ = second
    second.__context__ = first
    assert chain(first) == [("exception", first), ("context", second)]
    selfish = RuntimeError("self")
    selfish.__cause__ = selfish
    assert chain(selfish) == [("exception", selfish)]
    classifier = FrameClassifier()
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(first, classifier))
    described = describe(first, classifier, 50, Scrubber(), LocalsBudget(100, 1.0))
    assert described["exception_type"] == "ValueError"


def test_chain_length_is_bounded_and_keeps_the_root_cause() -> None:
    """A very long chain of causes is cut to its nearest links and its root cause (the
    last link, what went wrong first), and says how many links it left out between them."""
    from sentinel._exceptions import chain_and_skipped

    errors = [ValueError(str(n)) for n in range(50)]
    for outer, inner in itertools.pairwise(errors):
        outer.__cause__ = inner
    result, skipped = chain_and_skipped(errors[0])
    assert len(result) == _MAX_CHAIN
    assert [member for _, member in result] == [*errors[: _MAX_CHAIN - 1], errors[-1]]
    assert skipped == 50 - _MAX_CHAIN
    assert chain(errors[0]) == result
    exactly = errors[-_MAX_CHAIN:]
    assert chain_and_skipped(exactly[0]) == (
        [("exception", exactly[0])] + [("cause", error) for error in exactly[1:]],
        0,
    )


def test_a_long_chain_reports_its_root_cause_and_counts_the_links_left_out() -> None:
    """describe() of an exception raised from a chain of 100 (as a retry loop makes) lists
    its nearest causes, then the root cause, and says how many causes are not listed."""

    def retried() -> None:
        error: BaseException | None = None
        for attempt in range(100):
            try:
                if error is None:
                    raise ConnectionRefusedError("db down")
                raise TimeoutError(f"attempt {attempt}") from error
            except OSError as caught:
                error = caught
        assert error is not None
        raise error

    described = describe(raised(retried), FrameClassifier(), 50, Scrubber(), None)
    causes = described["causes"]
    assert [cause["message"] for cause in causes] == [
        "attempt 98",
        "attempt 97",
        "attempt 96",
        "db down",
    ]
    assert causes[-1]["exception_type"] == "ConnectionRefusedError"
    assert described["causes_skipped"] == 95
    assert len(causes) + described["causes_skipped"] + 1 == 100


# --------------------------------------------------------------------------- describe


def _raise_group() -> None:
    """Raise an ExceptionGroup of two caught exceptions."""
    errors: list[Exception] = []
    for error in (ValueError("first member"), KeyError("second member")):
        try:
            raise error
        except Exception as caught:
            errors.append(caught)
    raise ExceptionGroup("several failures", errors)


def test_describe_lists_exception_group_members() -> None:
    """describe() includes each member of an ExceptionGroup under "exceptions"."""
    group = raised(_raise_group)
    described = describe(group, FrameClassifier(), 50, Scrubber(), None)
    assert described["exception_type"] == "ExceptionGroup"
    members = described["exceptions"]
    assert [member["exception_type"] for member in members] == ["ValueError", "KeyError"]
    assert [member["message"] for member in members] == ["first member", "'second member'"]
    assert all(member["frames"][-1]["function"] == "_raise_group" for member in members)
    assert "exceptions_skipped" not in described


def test_describe_bounds_large_and_nested_groups() -> None:
    """Large groups list a bounded number of members; deeply nested groups stop descending."""
    big = ExceptionGroup("big", [ValueError(str(n)) for n in range(25)])
    described = describe(big, FrameClassifier(), 50, Scrubber(), None)
    assert len(described["exceptions"]) + described["exceptions_skipped"] == 25
    assert len(described["exceptions"]) < 25

    nested: BaseException = ValueError("leaf")
    for depth in range(10):
        nested = ExceptionGroup(f"level {depth}", [nested])
    level = describe(nested, FrameClassifier(), 50, Scrubber(), None)
    depth = 0
    while "exceptions" in level:
        level = level["exceptions"][0]
        depth += 1
    assert 1 <= depth < 10


def test_describe_scrubs_message_and_source() -> None:
    """Secrets in the message and in the source line of a frame are masked."""

    def leak() -> None:
        raise ValueError("login failed password=hunter2secret")  # password=hunter2secret

    described = describe(raised(leak), FrameClassifier(), 50, Scrubber(), None)
    text = json.dumps(described)
    assert "hunter2secret" not in text
    assert "password=[scrubbed len=13 hash=" in described["message"]
    assert described["frames"][-1]["function"].endswith("leak")


# --------------------------------------------------------------------------- frames


def _recurse(depth: int) -> None:
    """Recurse ``depth`` times, then raise."""
    if depth == 0:
        raise ValueError("bottom")
    _recurse(depth - 1)


def test_frames_are_outermost_first() -> None:
    """frames() lists the catching frame first and the raising frame last, with line numbers."""
    error = raised(_recurse, 3)
    described = frames(error, FrameClassifier(), 50, Scrubber(), None)
    assert [item["function"] for item in described] == ["raised"] + ["_recurse"] * 4
    assert described[-1]["source"] == 'raise ValueError("bottom")'
    assert described[-1]["line"] == _recurse.__code__.co_firstlineno + 3
    assert described[0]["module"] == __name__
    assert described[0]["file"] == __file__


def test_frames_keep_the_innermost_when_over_max_frames() -> None:
    """Over max_frames, a skipped_frames marker comes first and the innermost frames stay."""
    error = raised(_recurse, 9)  # 11 frames: raised() and 10 _recurse calls
    described = frames(error, FrameClassifier(), 3, Scrubber(), None)
    assert described[0] == {"skipped_frames": 8}
    kept = described[1:]
    assert len(kept) == 3
    assert all(item["function"] == "_recurse" for item in kept)
    assert kept[-1]["source"] == 'raise ValueError("bottom")'
    assert kept[0]["source"] == kept[1]["source"] == "_recurse(depth - 1)"


def test_frames_without_skipping_have_no_marker() -> None:
    """Exactly max_frames frames are listed without a skipped_frames marker."""
    error = raised(_recurse, 1)  # raised(), _recurse(1), _recurse(0)
    described = frames(error, FrameClassifier(), 3, Scrubber(), None)
    assert len(described) == 3
    assert all("skipped_frames" not in item for item in described)


def test_in_app_is_false_for_stdlib_and_site_packages_frames() -> None:
    """Frames from the stdlib and from installed packages are not app frames."""
    classifier = FrameClassifier()
    stdlib_error = raised(json.loads, "{")
    described = frames(stdlib_error, classifier, 50, Scrubber(), None)
    assert described[0]["in_app"] is True  # this test file
    json_frames = [item for item in described if item["module"].startswith("json")]
    assert json_frames and not any(item["in_app"] for item in json_frames)

    make_counter = functools.partial(prometheus_client.Counter, labelnames=["__reserved"])
    library_error = raised(make_counter, "sentinel_test_counter", "doc")
    assert isinstance(library_error, ValueError)
    described = frames(library_error, classifier, 50, Scrubber(), None)
    library = [item for item in described if item["module"].startswith("prometheus_client")]
    assert library and not any(item["in_app"] for item in library)
    assert all("site-packages" in item["file"] for item in library)


def test_in_app_is_true_for_files_in_a_tmp_dir(workdir: Path) -> None:
    """Code in an arbitrary directory (not stdlib or site-packages) is app code."""
    module = load_module(module_source(), workdir)
    described = frames(module.run(), FrameClassifier(), 50, Scrubber(), None)
    assert [item["function"] for item in described] == ["run", "boom"]
    assert all(item["in_app"] for item in described)
    assert all(item["module"] == "fpmod" for item in described)


def test_classifier_heuristic_on_paths() -> None:
    """The heuristic: installed and stdlib paths and pseudo-files are not app, others are."""
    classifier = FrameClassifier()
    assert not classifier.in_app(json.__file__, "json")
    assert not classifier.in_app(prometheus_client.__file__, "prometheus_client")
    assert not classifier.in_app("<string>", "__main__")
    assert not classifier.in_app(_scrub.__file__, "sentinel._scrub")
    assert classifier.in_app("/srv/myapp/handlers.py", "myapp.handlers")
    assert classifier.in_app(__file__, __name__)


def test_console_scripts_of_installed_packages_are_not_app_code() -> None:
    """A console script's wrapper (bin/uvicorn, bin/sentinel, run as __main__) is installed
    code, not the app's, though it is neither stdlib nor site-packages."""
    scripts = sysconfig.get_paths()["scripts"]
    assert not is_app_file(os.path.join(scripts, "uvicorn"))
    assert not FrameClassifier().in_app(os.path.join(scripts, "sentinel"), "__main__")
    assert is_app_file(os.path.join(os.path.dirname(scripts), "..", "srv", "main.py")) is (
        not os.path.abspath(os.path.join(scripts, "..", "..", "srv")).startswith(sys.prefix)
    )


@pytest.mark.parametrize(
    ("filename", "module", "shown"),
    [
        ("/srv/app/mypkg/main.py", "mypkg.main", "mypkg/main.py"),
        ("/srv/app/mypkg/api/__init__.py", "mypkg.api", "mypkg/api/__init__.py"),
        ("mypkg/main.py", "mypkg.main", "mypkg/main.py"),
        ("/srv/app/run.py", "__main__", "/srv/app/run.py"),
        ("/srv/app/other.py", "mypkg.main", "/srv/app/other.py"),
        ("/srv/app/xmypkg/main.py", "mypkg.main", "/srv/app/xmypkg/main.py"),
        ("<string>", "mypkg", "<string>"),
    ],
)
def test_display_path_starts_at_the_import_root(filename: str, module: str, shown: str) -> None:
    """A file is shown from where its module's dotted name starts; as it is when the name
    does not lead to it (a script, generated code, a file the module name does not match)."""
    assert display_path(filename.replace("/", os.sep), module) == shown


def test_culprit_is_the_innermost_app_frame_as_path_line_and_function(workdir: Path) -> None:
    """The culprit is the innermost frame in the app's own code, however many library frames
    lie under it, written ``path:line in function``; with no app frame, the innermost frame;
    with no frame at all (never raised), None."""
    module = load_module(
        "\n".join(
            [
                "import json",
                "",
                "def decode(body):",
                "    return json.loads(body)",
                "",
                "def run():",
                "    try:",
                "        decode('{')",
                "    except ValueError as error:",
                "        return error",
            ]
        ),
        workdir,
        name="shopdecode",
    )
    described = frames(module.run(), FrameClassifier(), 50, Scrubber(), None)
    assert [item["in_app"] for item in described][:2] == [True, True]
    assert described[-1]["module"] == "json.decoder" and not described[-1]["in_app"]
    assert culprit(described) == "shopdecode.py:4 in decode"

    library_only = [item for item in described if not item["in_app"]]
    innermost = library_only[-1]
    assert culprit(library_only) == (
        f"json/decoder.py:{innermost['line']} in {innermost['function']}"
    )
    assert culprit([]) is None
    assert culprit([{"skipped_frames": 3}]) is None


def _mixed_quotes() -> None:
    query = "SELECT 1 WHERE password='hunter2-quoted' AND note=\"it's\""
    raise ValueError(len(query))


def test_string_locals_are_scrubbed_before_their_repr() -> None:
    """A string holding both quote kinds has its quotes escaped in its repr
    (password=\\'...\\'), where the key-value rule would miss the value: a string local is
    scrubbed first, then shown."""
    described = frames(
        raised(_mixed_quotes), FrameClassifier(), 50, Scrubber(), LocalsBudget(500, 5.0)
    )
    shown = described[-1]["locals"]["query"]
    assert "hunter2-quoted" not in shown
    assert "password=\\'[scrubbed len=14 hash=" in shown


def test_app_modules_override_the_heuristic(workdir: Path) -> None:
    """With app_modules, in_app follows module-name prefixes only, whatever the path."""
    classifier = FrameClassifier(app_modules=("json", "fpmod"))
    assert classifier.in_app(json.decoder.__file__, "json.decoder")
    assert classifier.in_app(json.__file__, "json")
    assert classifier.in_app(str(workdir / "fpmod.py"), "fpmod")
    assert classifier.in_app(str(workdir / "sub.py"), "fpmod.sub")
    assert not classifier.in_app(str(workdir / "fpmodule.py"), "fpmodule")
    assert not classifier.in_app(__file__, __name__)

    described = frames(raised(json.loads, "{"), classifier, 50, Scrubber(), None)
    by_module = {item["module"]: item["in_app"] for item in described}
    assert by_module[__name__] is False
    assert by_module["json.decoder"] is True


def test_app_modules_decide_which_frames_fingerprint(workdir: Path) -> None:
    """With app_modules set, frames outside those modules do not affect the fingerprint."""
    module = load_module(module_source(), workdir)
    only_fpmod = FrameClassifier(app_modules=("fpmod",))
    direct = module.run()
    via_helper = raised(module.boom, "boom", ValueError)  # different (non-app) caller
    assert fingerprint(direct, only_fpmod) != fingerprint(via_helper, only_fpmod)
    # run() itself is an fpmod frame; compare boom-only paths from two non-app callers.
    via_lambda = raised(lambda: module.boom("boom", ValueError))
    assert fingerprint(via_helper, only_fpmod) == fingerprint(via_lambda, only_fpmod)
    everything = FrameClassifier()
    assert fingerprint(via_helper, everything) != fingerprint(via_lambda, everything)


# --------------------------------------------------------------------------- locals


class _SlowRepr:
    def __repr__(self) -> str:
        time.sleep(0.05)
        return "slow"


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class _HugeRepr:
    def __repr__(self) -> str:
        return "H" * 1_000_000


def _slow_locals() -> None:
    slow = _SlowRepr()
    after_one = "first"
    after_two = "second"
    raise ValueError(type(slow).__name__, after_one, after_two)


def _huge_locals() -> None:
    big_text = "x" * 100_000
    big_list = ["y" * 1_000] * 1_000
    big_dict = {f"key{n}": "z" * 1_000 for n in range(1_000)}
    big_object = _HugeRepr()
    raise ValueError(len(big_text) + len(big_list) + len(big_dict) + bool(big_object))


def _broken_locals() -> None:
    broken = _BrokenRepr()
    fine = "still rendered"
    raise ValueError(f"{fine}{id(broken)}")


def _secret_locals() -> None:
    db_password = "hunter2-correct-horse"
    api_token = 424242424242
    settings = {"password": "hunter2-correct-horse", "user": "alice"}
    raise ValueError(len(db_password), type(api_token).__name__, len(settings))


def innermost_locals(error: BaseException, budget: LocalsBudget) -> dict[str, str]:
    """The captured locals of the innermost frame of ``error``."""
    return frames(error, FrameClassifier(), 50, Scrubber(), budget)[-1]["locals"]


def test_huge_locals_are_truncated_to_max_chars() -> None:
    """Every rendered local stays within max_chars (plus a short ellipsis)."""
    error = raised(_huge_locals)
    captured = innermost_locals(error, LocalsBudget(max_chars=64, seconds=5.0))
    assert set(captured) == {"big_text", "big_list", "big_dict", "big_object"}
    for name, rendered in captured.items():
        assert 0 < len(rendered) <= 64 + 3, name
    assert captured["big_text"].startswith("'xxx")
    assert captured["big_list"].startswith("['yyy")


def test_render_then_shorten_bounds_any_repr() -> None:
    """render() keeps reprlib's bounds (so scrubbing sees whole values); shorten() cuts to
    max_chars plus an ellipsis."""
    budget = LocalsBudget(max_chars=10, seconds=1.0)
    assert budget.shorten(budget.render(12)) == "12"
    for value in ("a" * 1000, b"b" * 1000, list(range(1000)), _HugeRepr(), 10**1000):
        assert len(budget.render(value)) < 1000
        assert len(budget.shorten(budget.render(value))) <= 13


def test_local_with_failing_repr_is_reported_as_failed() -> None:
    """A local whose __repr__ raises renders as "<repr() failed: ...>", others still render."""
    error = raised(_broken_locals)
    captured = innermost_locals(error, LocalsBudget(max_chars=100, seconds=5.0))
    assert captured["fine"] == "'still rendered'"
    assert captured["broken"].startswith("<repr() failed: RuntimeError")


def test_slow_repr_exhausts_the_time_budget() -> None:
    """After the time budget is spent, remaining locals are skipped with a marker."""
    error = raised(_slow_locals)
    captured = innermost_locals(error, LocalsBudget(max_chars=100, seconds=0.01))
    assert captured["<skipped>"] == "time budget for locals exhausted"
    assert "after_one" not in captured
    assert "after_two" not in captured
    assert captured.get("slow", "slow") == "slow"


def test_locals_are_all_rendered_within_budget() -> None:
    """With time to spare, every local of the frame is rendered and nothing is skipped."""
    error = raised(_slow_locals)
    captured = innermost_locals(error, LocalsBudget(max_chars=100, seconds=5.0))
    assert captured == {"slow": "slow", "after_one": "'first'", "after_two": "'second'"}


def test_secret_named_locals_are_masked() -> None:
    """Locals with secret-looking names are masked, and their values never appear."""
    error = raised(_secret_locals)
    described = frames(error, FrameClassifier(), 50, Scrubber(), LocalsBudget(200, 5.0))
    captured = described[-1]["locals"]
    assert MASK.match(captured["db_password"])
    assert MASK.match(captured["api_token"])
    assert "alice" in captured["settings"]
    text = json.dumps(described)
    assert "hunter2" not in text
    assert "424242424242" not in text


def _form_body_local(tail: int) -> None:
    body = (
        "grant_type=client_credentials&scope=openid+profile+email&client_id=shop-web"
        + "&client_secret=hunter2-local-q7"
        + "&ui_locales=en-US&prompt=consent&max_age=3600&display=page"[:tail]
    )
    raise RuntimeError(len(body))


@pytest.mark.parametrize("tail", range(0, 60, 3))
def test_a_long_string_local_is_scrubbed_before_it_is_elided(tail: int) -> None:
    """Eliding a long string's middle first could cut a secret's key off its value (for
    some lengths, ``client_secret=`` went and the secret stayed). Scrubbed first, then
    elided: at no length does the secret show."""
    error = raised(_form_body_local, tail)
    described = frames(error, FrameClassifier(), 50, Scrubber(), LocalsBudget(100, 5.0))
    shown = described[-1]["locals"]["body"]
    assert len(shown) <= 104
    assert "hunter2" not in shown and "local-q7" not in shown


_REPR_URL = "postgres://checkout:hunter2-repr-q7@db.internal:5432/checkout"


class _Settings:
    """An app's settings object whose repr is longer than locals_max_chars (100 here), its
    secret URL written last, its ``@`` ``shift`` characters past the 100th."""

    def __init__(self, shift: int) -> None:
        start = "Settings(service_name='checkout-"
        middle = "', database_url='" + _REPR_URL[: _REPR_URL.index("@")]
        self.service_name = "checkout-" + "x" * (100 + shift - len(start) - len(middle))

    def __repr__(self) -> str:
        return f"Settings(service_name='{self.service_name}', database_url='{_REPR_URL}')"


def _settings_local(shift: int) -> None:
    settings = _Settings(shift)
    raise RuntimeError(id(settings))


def _settings_in_a_list(shift: int) -> None:
    held = [_Settings(shift)]
    raise RuntimeError(id(held))


@pytest.mark.parametrize("shift", [0, 3, 8])
def test_an_object_repr_is_scrubbed_before_it_is_cut(shift: int) -> None:
    """An object's repr longer than max_chars was cut first: cut ``shift`` characters before
    its URL's ``@``, the password was written. Scrubbed first, then cut: no part of it shows
    (the object alone, and inside a list)."""
    assert repr(_Settings(shift)).index("@") == 100 + shift
    for func in (_settings_local, _settings_in_a_list):
        described = frames(
            raised(func, shift), FrameClassifier(), 50, Scrubber(), LocalsBudget(100, 5.0)
        )
        shown = json.dumps(described[-1]["locals"])
        assert "hunter2" not in shown and "repr-q7" not in shown, shown
        assert "Settings(service_name=" in shown


_DICT_VALUE = "hunter2-dict-q7"


def _form_body_in_a_mapping(after: int) -> None:
    # reprlib keeps the last 126 characters of a long string inside a mapping: the value
    # is in them and its key (`after` characters follow the value) is not, for some `after`.
    upstream_request = {
        "method": "POST",
        "body": (
            "grant_type=client_credentials&scope=openid+profile+email+offline_access"
            "&audience=https%3A%2F%2Fapi.shop.example%2F&resource=orders&client_id=shop-web"
            "&ui_locales=en-US&prompt=consent&max_age=3600&display=page&acr_values=urn%3Amace"
            f"&client_secret={_DICT_VALUE}&redirect_uri=https%3A%2F%2Fshop.example%2Fcb"
            + "&state="
            + "s" * (after - 46)
        ),
    }
    raise RuntimeError(len(upstream_request))


@pytest.mark.parametrize("after", range(99, 114, 3))
def test_a_string_inside_a_mapping_is_scrubbed_before_it_is_elided(after: int) -> None:
    """reprlib elides a long string inside a mapping in its middle, which for these lengths
    left ``client_secret=`` out and its value in. Scrubbed before it is elided, the value
    never shows."""
    described = frames(
        raised(_form_body_in_a_mapping, after),
        FrameClassifier(),
        50,
        Scrubber(),
        LocalsBudget(256, 5.0),
    )
    shown = described[-1]["locals"]["upstream_request"]
    assert "hunter2" not in shown and "dict-q7" not in shown, shown
    assert shown.startswith("{'body': 'grant_type=client_credentials")


def test_a_huge_string_local_is_scrubbed_within_its_bound() -> None:
    """A string far longer than scrubbing is bounded to keeps its head, scrubbed."""

    def huge() -> None:
        text = "token=hunter2-huge-q7 " + "x " * 500_000
        raise RuntimeError(len(text))

    described = frames(raised(huge), FrameClassifier(), 50, Scrubber(), LocalsBudget(100, 5.0))
    shown = described[-1]["locals"]["text"]
    assert "hunter2" not in shown and shown.startswith("'token=[scrubbed")


def test_locals_only_for_app_frames() -> None:
    """Library frames never carry locals; app frames do when a budget is given."""
    error = raised(json.loads, "{")
    described = frames(error, FrameClassifier(), 50, Scrubber(), LocalsBudget(100, 5.0))
    for item in described:
        assert ("locals" in item) == item["in_app"]
    assert all(
        "locals" not in item for item in frames(error, FrameClassifier(), 50, Scrubber(), None)
    )


# --------------------------------------------------------------------------- small helpers


def test_is_reportable_excludes_control_flow() -> None:
    """Cancellation, interrupts, exit and generator exit are not reported; errors are."""
    assert not is_reportable(asyncio.CancelledError())
    assert not is_reportable(KeyboardInterrupt())
    assert not is_reportable(SystemExit(0))
    assert not is_reportable(GeneratorExit())
    assert is_reportable(ValueError("bad"))
    assert is_reportable(ExceptionGroup("g", [ValueError("bad")]))
    assert is_reportable(Exception())


def test_is_reportable_excludes_trio_cancellation() -> None:
    """trio's Cancelled is control flow, too."""
    trio = pytest.importorskip("trio")

    async def cancelled() -> BaseException:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep(1)
            except trio.Cancelled as error:
                return error
        raise AssertionError("not cancelled")

    assert not is_reportable(trio.run(cancelled))


def test_subclass_of_cancelled_error_is_not_reportable() -> None:
    """A subclass of asyncio.CancelledError is still cancellation, whatever its name."""

    class ShutdownCancelled(asyncio.CancelledError):
        pass

    assert not is_reportable(ShutdownCancelled())


def test_app_error_named_cancelled_is_reportable() -> None:
    """An ordinary app exception that happens to be called Cancelled is still an error."""

    class Cancelled(ValueError):
        """E.g. "the order was cancelled" in a shop."""

    assert is_reportable(Cancelled("order 17 was cancelled"))


class _Outer:
    class InnerError(Exception):
        pass


def test_type_name() -> None:
    """Builtins are bare names; other exceptions are module-qualified with their qualname."""
    assert type_name(ValueError) == "ValueError"
    assert type_name(ExceptionGroup) == "ExceptionGroup"
    assert type_name(json.JSONDecodeError) == "json.decoder.JSONDecodeError"
    assert type_name(_Outer.InnerError) == f"{__name__}._Outer.InnerError"


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str exploded")


def test_safe_message() -> None:
    """safe_message is str(exc), whole (scrubbed_message bounds it), and never raises."""
    assert safe_message(ValueError("plain")) == "plain"
    assert safe_message(KeyError("k")) == "'k'"
    assert safe_message(ValueError(42)) == "42"
    assert safe_message(_BadStr()) == "<str() failed: RuntimeError>"
    assert safe_message(ValueError("m" * 100_000)) == "m" * 100_000


def test_scrubbed_message_is_bounded_after_scrubbing() -> None:
    """A message is scrubbed in its first 8192 characters, cut back to a space, and the
    rest is masked whole; a short one is only scrubbed."""
    scrubber = Scrubber(hash_key=b"k")
    assert scrubbed_message(ValueError("plain"), scrubber) == "plain"
    words = "word " * 5_000
    message = scrubbed_message(ValueError(words), scrubber)
    assert message.startswith(words[:8190])
    assert message.endswith(f"[rest not scanned: {scrubber.mask(words[8190:])}]")
    assert len(message) < 8300
    assert scrubbed_message(ValueError("m" * 8192), scrubber) == "m" * 8192


UPSTREAM = "postgres://orders:hunter2-pad-q7@db.internal:5432/orders"


def _padded_message(shift: int) -> str:
    """An app's message that echoes client input before its own secret URL, the input
    padded so that the 8192-character bound falls ``shift`` characters after the URL's
    password (``shift`` -1: right between the password and its ``@``)."""
    before = "no sku '"
    middle = "' in postgres://orders:hunter2-pad-q7"
    pad = "Z" * (8192 - len(before) - len(middle) + 1 + shift)
    return f"no sku {pad!r} in {UPSTREAM}"


@pytest.mark.parametrize("shift", [-8, -1, 0, 1, 12])
def test_a_message_padded_to_cut_a_secret_url_shows_no_part_of_it(shift: int) -> None:
    """The reviewer's attack: a message echoing client input, padded so that the 8192
    bound falls between a URL's password and its ``@``. Cut first, the URL no longer looked
    like one and its password was written, in the report and on the span; scrubbed first
    (the cut at the space before the URL), no part of it is."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    from sentinel import testing

    async def lookup(request: Request) -> None:
        sku = (await request.body()).decode()
        raise LookupError(f"no sku {sku!r} in {UPSTREAM}")  # the message echoes the input

    padding = _padded_message(shift)[len("no sku '") : -len(f"' in {UPSTREAM}")]
    exporter = InMemorySpanExporter()
    with testing.capture_reports(span_exporter=exporter) as captured:
        app = Starlette(routes=[Route("/lookup", lookup, methods=["POST"])])
        client = testing.Client(sentinel.instrument(app, sentinel=captured.sentinel))
        assert client.post("/lookup", content=padding).status_code == 500
        captured.flush()
        [report] = captured.reports
        output = captured.stream.getvalue()
    [span] = exporter.get_finished_spans()
    [event] = span.events
    for written in (output, span.to_json(), report["message"]):
        assert "hunter2" not in written and "pad-q7" not in written
    assert report["message"].startswith("no sku 'ZZZZ")
    # The same text on the span, cut by the SDK's attribute limit after it was scrubbed.
    assert (event.attributes or {})["exception.message"] == report["message"][:4096]
    assert "[rest not scanned: [scrubbed len=" in report["message"]


# --------------------------------------------------------------------------- deep groups


def _raise(error: BaseException) -> None:
    raise error


def test_is_reportable_and_error_path_go_far_past_the_recursion_limit() -> None:
    """3,000 levels of groups, each with a cancelled sibling: still an error, and the path
    leads to it; the same depth of cancellations only is not reportable."""
    leaf = raised(_raise, ValueError("the bug"))
    group: BaseException = leaf
    cancelled: BaseException = asyncio.CancelledError()
    for level in range(3_000):
        group = raised(_raise, BaseExceptionGroup(f"{level}", [asyncio.CancelledError(), group]))
        cancelled = BaseExceptionGroup(f"{level}", [cancelled, KeyboardInterrupt()])
    assert is_reportable(group)
    assert not is_reportable(cancelled)
    path = error_path(group)
    assert len(path) == 3_001 and path[0] is group and path[-1] is leaf
    assert raised_at(path) is leaf.__traceback__
    assert error_path(cancelled) == [cancelled]


def test_a_group_too_large_to_look_through_counts_as_an_error() -> None:
    """Past 10,000 exceptions the walk stops, and the group is reported rather than lost."""
    group: BaseException = asyncio.CancelledError()
    for level in range(12_000):
        group = BaseExceptionGroup(f"{level}", [group, KeyboardInterrupt()])
    started = time.perf_counter()
    assert is_reportable(group)
    assert error_path(group) == [group]
    assert time.perf_counter() - started < 1.0


def test_error_path_stops_at_several_errors_and_finds_where_a_built_error_was_raised() -> None:
    """A group holding two errors is the thing reported; an error built into groups and never
    raised itself was raised where the innermost group that was raised was."""
    two = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
    outer = BaseExceptionGroup("outer", [two, asyncio.CancelledError()])
    assert error_path(outer) == [outer, two]
    plain = ValueError("plain")
    assert error_path(plain) == [plain]
    leaf = ValueError("built")
    inner = raised(_raise, ExceptionGroup("inner", [leaf]))
    outer_group = ExceptionGroup("outer", [inner])
    path = error_path(outer_group)
    assert path == [outer_group, inner, leaf]
    assert raised_at(path) is inner.__traceback__


def test_shared_members_do_not_blow_up_the_walk() -> None:
    """A group listing the same member twice at every level (2**60 paths) is walked once."""
    group: BaseException = ValueError("shared")
    for _ in range(60):
        group = BaseExceptionGroup("both", [group, group, asyncio.CancelledError()])
    started = time.perf_counter()
    assert is_reportable(group)
    assert error_path(group) == [group]  # two errors (the same one twice) at the top
    assert time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------- the app's code


class _Gate:
    """A __str__/__repr__ that waits until released (or 2 s), like a slow remote lookup."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def wait(self) -> str:
        self.entered.set()
        self.release.wait(2.0)
        return "late"

    def __repr__(self) -> str:
        return self.wait()


class _SlowStrError(Exception):
    gate: _Gate

    def __str__(self) -> str:
        return self.gate.wait()


class _CustomStrError(Exception):
    def __str__(self) -> str:
        return f"custom: {self.args[0]}"


def test_renderer_stops_waiting_at_the_deadline_and_starts_nothing_while_all_are_busy() -> None:
    """Values rendered in order until the deadline, None after; with every helper still busy
    in an abandoned call, callers get None at once; once released, helpers are used again."""
    gate = _Gate()
    renderer = Renderer(max_helpers=1)

    def show(item: object) -> str:
        return gate.wait() if item == "slow" else str(item)

    started = time.monotonic()
    assert renderer.run(show, [1, "slow", 3], time.monotonic() + 0.05) == ["1", None, None]
    assert renderer.run(show, [4], time.monotonic() + 5.0) == [None]  # its one helper is busy
    assert time.monotonic() - started < 1.0
    gate.release.set()
    for _ in range(200):  # the helper comes back once the abandoned call returns
        if renderer.run(show, [5], time.monotonic() + 0.5) == ["5"]:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the helper never came back")
    assert renderer.run(show, [], time.monotonic() + 1.0) == []


def test_safe_message_runs_only_the_apps_own_str_on_the_renderer() -> None:
    """Builtin __str__ over builtin arguments is read directly; the app's __str__ (or an
    argument that is the app's object) goes through the renderer and its deadline."""
    busy = Renderer(max_helpers=0)  # never runs anything: shows which path was taken
    not_run = "<str() did not finish within the time budget>"
    assert safe_message(ValueError("plain", 3), busy) == "('plain', 3)"
    assert safe_message(KeyError("k"), busy) == "'k'"
    assert safe_message(ExceptionGroup("g", [ValueError()]), busy) == "g (1 sub-exception)"
    message = type("Message", (str,), {"__str__": lambda self: "the app's own"})("m")
    assert safe_message(ExceptionGroup(message, [ValueError()]), busy) == not_run
    assert safe_message(_CustomStrError("x"), busy) == not_run
    assert safe_message(ValueError(_Gate()), busy) == not_run
    assert safe_message(_CustomStrError("x"), Renderer(), time.monotonic() + 5) == "custom: x"

    slow = _SlowStrError()
    slow.gate = _Gate()
    started = time.monotonic()
    try:
        assert safe_message(slow, Renderer(), time.monotonic() + 0.05) == not_run
    finally:
        slow.gate.release.set()
    assert time.monotonic() - started < 1.0


def test_locals_of_the_apps_objects_are_rendered_by_the_renderer_within_budget() -> None:
    """With a renderer, a local whose repr blocks is left out at the deadline (plain locals
    before it are kept), and the report moves on long before the repr returns."""
    gate = _Gate()

    def blocked() -> None:
        before = "kept"
        holder = gate
        raise ValueError(before, type(holder).__name__)

    error = raised(blocked)
    started = time.monotonic()
    try:
        budget = LocalsBudget(max_chars=100, seconds=0.25, renderer=Renderer())
        captured = innermost_locals(error, budget)
        elapsed = time.monotonic() - started
        # On a loaded machine the renderer's thread may reach the repr after the deadline.
        assert gate.entered.wait(5)
    finally:
        gate.release.set()
    assert captured == {"before": "'kept'", "<skipped>": "time budget for locals exhausted"}
    assert elapsed < 2.0


class _StuckStrError(Exception):
    """An exception whose __str__ waits on its gate (a pool that has no connection left)."""

    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        self.gate = gate

    def __str__(self) -> str:
        return self.gate.wait()


class _LateStrError(Exception):
    def __str__(self) -> str:
        time.sleep(0.3)
        return "late, but it finishes"


def test_a_class_whose_str_does_not_finish_holds_one_helper_then_gets_the_placeholder() -> None:
    """A value still rendering at its deadline holds its helper, is counted, and its class
    (or, under a builtin __str__, its argument's class) is rendered no more: later values of
    it get the placeholder at once, and the other helpers stay free for other classes."""
    gate, argument_gate = _Gate(), _Gate()
    counted: list[None] = []
    renderer = Renderer(max_helpers=3, on_unfinished=lambda: counted.append(None))
    not_run = "<str() did not finish within the time budget>"
    try:
        assert safe_message(_StuckStrError(gate), renderer, time.monotonic() + 0.5) == not_run
        assert safe_message(ValueError(argument_gate), renderer, time.monotonic() + 0.5) == not_run
        # Each helper is held (on a busy machine it may only have started by now).
        assert gate.entered.wait(5) and argument_gate.entered.wait(5)
        assert len(counted) == 2
        started = time.monotonic()
        for _ in range(5):
            assert safe_message(_StuckStrError(gate), renderer, time.monotonic() + 5) == not_run
            assert safe_message(ValueError(_Gate()), renderer, time.monotonic() + 5) == not_run
        assert time.monotonic() - started < 1.0
        for text in ("one", "two", "three"):
            message = safe_message(_CustomStrError(text), renderer, time.monotonic() + 5)
            assert message == f"custom: {text}"
        assert safe_message(ValueError(Path("/srv")), renderer, time.monotonic() + 5) == "/srv"
        assert len(counted) == 2
    finally:
        gate.release.set()
        argument_gate.release.set()


def test_a_class_late_only_for_a_short_budget_is_rendered_again() -> None:
    """A value that misses its deadline but finishes soon after was held up by the budget,
    not stuck: its class is rendered again next time."""
    renderer = Renderer(max_helpers=1)
    not_run = "<str() did not finish within the time budget>"
    assert safe_message(_LateStrError(), renderer, time.monotonic() + 0.1) == not_run
    for _ in range(100):
        message = safe_message(_LateStrError(), renderer, time.monotonic() + 5)
        if message != not_run:
            break
        time.sleep(0.05)  # the helper is still finishing the late one
    assert message == "late, but it finishes"


def test_locals_of_a_stuck_class_get_the_placeholder_and_the_others_still_render() -> None:
    """Once a local's __repr__ did not finish, later locals of its class read as not
    finished at once, and the frame's other locals are rendered (not skipped)."""
    gate = _Gate()

    def blocked() -> None:
        holder = gate
        after = "kept"
        raise ValueError(type(holder).__name__, after)

    error = raised(blocked)
    counted: list[None] = []
    renderer = Renderer(on_unfinished=lambda: counted.append(None))
    not_run = "<repr() did not finish within the time budget>"
    try:
        first = innermost_locals(error, LocalsBudget(max_chars=100, seconds=0.5, renderer=renderer))
        assert gate.entered.is_set()
        assert first == {"<skipped>": "time budget for locals exhausted"}
        started = time.monotonic()
        again = innermost_locals(error, LocalsBudget(max_chars=100, seconds=5, renderer=renderer))
        assert time.monotonic() - started < 1.0
    finally:
        gate.release.set()
    assert again == {"holder": not_run, "after": "'kept'", "gate": not_run}
    assert len(counted) == 1


# --------------------------------------------------------------------------- report contents


def _task(name: str) -> None:
    """Fail as a task whose database is down: raised from the refused connection."""
    try:
        raise ConnectionRefusedError(f"db down for {name}")
    except OSError as error:
        raise RuntimeError(f"{name} failed") from error


def _task_group() -> None:
    """Raise what a task group with two failed tasks raises."""
    failures = [raised(_task, name) for name in ("a", "b")]
    raise ExceptionGroup("unhandled errors in a TaskGroup", failures)


def test_group_members_carry_their_own_causes() -> None:
    """Each member of a group is described with its own chain (`causes`), as the report's
    exception is: the root cause of each failed task is there to read, as it is in the
    members' fingerprints."""
    described = describe(raised(_task_group), FrameClassifier(), 50, Scrubber(), None)
    members = described["exceptions"]
    assert [member["message"] for member in members] == ["a failed", "b failed"]
    for member, name in zip(members, "ab", strict=True):
        [cause] = member["causes"]
        assert cause["relation"] == "cause"
        assert cause["exception_type"] == "ConnectionRefusedError"
        assert cause["message"] == f"db down for {name}"
        assert cause["frames"][-1]["function"] == "_task"


def test_members_and_causes_described_for_one_report_are_bounded() -> None:
    """However wide and deep the groups and however long each member's chain, one report
    describes a bounded number of exceptions, and counts what it left out."""

    def chained(depth: int) -> BaseException:
        error: BaseException = ValueError("root")
        for _ in range(depth):
            outer = ValueError("link")
            outer.__cause__ = error
            error = outer
        return error

    def tree(depth: int) -> BaseException:
        if depth == 0:
            return chained(10)
        group = ExceptionGroup("level", [tree(depth - 1) for _ in range(10)])
        group.__cause__ = chained(10)
        return group

    described = describe(tree(3), FrameClassifier(), 50, Scrubber(), None)
    listed = 0
    pending = [described]
    while pending:
        item = pending.pop()
        listed += 1
        pending.extend(item.get("exceptions", []))
        pending.extend(item.get("causes", []))
    assert listed <= 256
    assert described["exceptions_skipped"] > 0 or any(
        member.get("exceptions_skipped") for member in described["exceptions"]
    )


def _noted() -> None:
    error = ValueError("checkout failed")
    error.add_note("while charging order 1042 for customer 77")
    error.add_note("retry with password=hunter2secret")
    raise error


def test_notes_are_reported_scrubbed_and_bounded() -> None:
    """An exception's notes (add_note) are written, scrubbed, under `notes`; many notes or a
    long one are bounded, and what is left out is counted."""
    described = describe(raised(_noted), FrameClassifier(), 50, Scrubber(), None)
    first, second = described["notes"]
    assert first == "while charging order 1042 for customer 77"
    assert "hunter2secret" not in second and second.startswith("retry with password=[scrubbed")
    assert described["message"] == "checkout failed"

    crowded = ValueError("x")
    for number in range(25):
        crowded.add_note(f"note {number} " + "n" * 5000)
    crowded.__notes__.append(42)  # not text: its type is written, nothing of the app runs
    many = describe(crowded, FrameClassifier(), 50, Scrubber(), None)
    assert len(many["notes"]) == 10 and many["notes_skipped"] == 16
    assert all(len(note) < 1200 for note in many["notes"])


def test_notes_never_change_the_fingerprint() -> None:
    """Notes often hold per-request values: the same bug with other notes, raised or never
    raised, keeps its fingerprint."""
    classifier = FrameClassifier()
    plain, noted = raised(_noted), raised(_noted)
    plain.__notes__ = []
    noted.add_note("order 2048")
    assert fingerprint(plain, classifier) == fingerprint(noted, classifier)
    built, built_noted = ValueError("provider failed"), ValueError("provider failed")
    built_noted.add_note("request 5f1e")
    assert fingerprint(built, classifier) == fingerprint(built_noted, classifier)


def _peak_bytes(func: Callable[[], Any]) -> int:
    """How much memory ``func()`` allocated at its peak."""
    import tracemalloc

    tracemalloc.start()
    try:
        func()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _big_binary_locals() -> None:
    blob = b"\x00password=hunter2secret " + b"\xff" * 20_000_000  # noqa: F841
    buffer = bytearray(b"token=hunter2secret ") + bytearray(20_000_000)  # noqa: F841
    raise ValueError("upload failed")


def test_big_bytes_locals_are_read_only_as_far_as_they_are_shown() -> None:
    """A 20 MB bytes or bytearray local costs the report what is shown of it (16 times
    max_chars is read and scrubbed), not a repr of 80 MB; it is shown, scrubbed, and cut."""
    error = raised(_big_binary_locals)
    captured: dict[str, str] = {}

    def render() -> None:
        captured.update(innermost_locals(error, LocalsBudget(max_chars=256, seconds=5.0)))

    assert _peak_bytes(render) < 2_000_000
    assert captured["blob"].startswith("b'\\x00password=[scrubbed len=13 hash=")
    assert captured["buffer"].startswith("bytearray(b'token=[scrubbed len=13 hash=")
    assert all(len(text) <= 256 + 3 for text in captured.values())
    assert "hunter2secret" not in json.dumps(captured)


@pytest.mark.parametrize("kind", [bytes, bytearray])
@pytest.mark.parametrize("error_type", [ValueError, KeyError])
def test_a_message_of_big_bytes_is_read_only_as_far_as_it_is_written(
    kind: type[bytes | bytearray], error_type: type[Exception]
) -> None:
    """An exception built with 20 MB of bytes (a failed upload's body) costs its message
    what is written of it; the message is str() of the exception up to its bound, and the
    rest is masked whole as for any long message."""
    data = kind(b"\xfe" * 20_000_000)
    error = error_type(data)
    messages: list[str] = []
    assert _peak_bytes(lambda: messages.append(scrubbed_message(error, Scrubber()))) < 2_000_000
    [message] = messages
    expected_start = repr(kind(b"\xfe" * 100))[:-2]
    assert message.startswith(expected_start[:400])
    assert re.search(r"\[rest not scanned: \[scrubbed len=\d+ hash=[0-9a-f]{8}\]\]$", message)
    assert len(message) < 8300
    two = ValueError(b"\xfe" * 20_000, "second")
    assert safe_message(two).endswith(", 'second')")
