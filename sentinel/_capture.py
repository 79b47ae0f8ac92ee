"""Report exceptions by hand: ``@sentinel.capture`` for what escapes jobs, consumers and
other functions (unhandled there), and ``sentinel.capture_exception`` for one the app
handled."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any, TypeVar, cast, get_args, overload

from ._config import ConfigError
from ._context import current_request
from ._current import current
from ._runtime import install
from ._vocabulary import Phase

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
PHASES: tuple[Phase, ...] = get_args(Phase)


def check_phase(phase: object) -> None:
    """ValueError unless ``phase`` is None or one of the fixed phases (the ``phase`` label
    has a bounded set of values, which dashboards and alerts name)."""
    if phase is not None and phase not in PHASES:
        msg = f'"phase" must be one of {", ".join(PHASES)}: {phase!r}'
        raise ValueError(msg)


@overload
def capture(func: F, /) -> F: ...


@overload
def capture(*, name: str | None = None, phase: Phase | None = None) -> Callable[[F], F]: ...


def capture(
    func: F | None = None, /, *, name: str | None = None, phase: Phase | None = None
) -> F | Callable[[F], F]:
    """Report any exception escaping ``func`` (sync or async, a function or a generator,
    a callable object or a ``functools.partial``), then re-raise it unchanged. A
    generator's exceptions escape while it is iterated: they are reported then, and what the
    consumer sends, throws or closes reaches ``func`` as is. Likewise a coroutine that a
    sync ``func`` returns: what escapes it is reported where it is awaited.

    Usable bare (``@capture``) or with options (``@capture(name="nightly-sync")``). Outside
    a request the report's route is ``name`` (default: the qualified name of the function,
    of a partial's function, or of a callable object's class) and its phase ``background``
    unless given; a ``phase`` that is not one of sentinel's phases (``request``,
    ``response``, ``lifespan``, ``background``, ``task``, ``thread``, ``process``,
    ``import``) is a ValueError when decorating, and so is a ``func`` that is not callable
    a TypeError.
    """
    check_phase(phase)
    if func is None:
        return functools.partial(_decorate, name=name, phase=phase)
    return _decorate(func, name=name, phase=phase)


def _callee(func: Callable[..., Any]) -> Callable[..., Any]:
    """What inspect should look at to tell whether calling ``func`` is async or a generator:
    it sees neither into a callable object's ``__call__`` nor through a partial of one (or
    of a bound method)."""
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.ismethod(func):
        return func.__func__
    if inspect.isroutine(func) or inspect.isclass(func) or hasattr(func, "__code__"):
        return func  # function-like objects (Cython's, AsyncMock) carry their own code flags
    return type(func).__call__


def _default_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of ``func``, of a partial's function, or of an object's class."""
    while isinstance(func, functools.partial):
        func = func.func
    named = func if hasattr(func, "__qualname__") else type(func)
    module = getattr(named, "__module__", None)
    qualname: str = named.__qualname__
    return f"{module}.{qualname}" if module else qualname


def _decorate(func: F, *, name: str | None, phase: Phase | None) -> F:
    if not callable(func):
        msg = f"capture() needs a function or another callable: {func!r}"
        raise TypeError(msg)
    label = name or _default_name(func)
    callee = _callee(func)

    if inspect.isasyncgenfunction(callee):

        @functools.wraps(func)
        async def async_generator_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            generator = func(*args, **kwargs)
            try:
                # Not ``async for``: that would not pass asend() and athrow() on to func.
                value = await generator.asend(None)
                while True:
                    try:
                        sent = yield value
                    except GeneratorExit:  # aclose(): func's clean-up runs, as unwrapped
                        await generator.aclose()
                        raise
                    except BaseException as thrown:
                        value = await generator.athrow(thrown)
                    else:
                        value = await generator.asend(sent)
            except StopAsyncIteration:
                return
            except GeneratorExit:
                raise
            except BaseException as exc:
                _report(exc, label, phase)
                raise

        return async_generator_wrapper  # type: ignore[return-value]

    if inspect.isgeneratorfunction(callee):

        @functools.wraps(func)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            try:
                # yield from passes the consumer's send(), throw() and close() on as they are.
                return (yield from func(*args, **kwargs))
            except GeneratorExit:  # close(): not an error, and frequent (at every collection)
                raise
            except BaseException as exc:
                _report(exc, label, phase)
                raise

        return generator_wrapper  # type: ignore[return-value]

    if inspect.iscoroutinefunction(callee):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except BaseException as exc:
                _report(exc, label, phase)
                raise

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            _report(exc, label, phase)
            raise
        if isinstance(result, CoroutineType):
            # Its exception escapes where it is awaited (a wrapper's or a lambda's coroutine).
            watched = cast("CoroutineType[Any, Any, Any]", _watched(result, label, phase))
            watched.__name__, watched.__qualname__ = result.__name__, result.__qualname__
            return watched
        return result

    return wrapper  # type: ignore[return-value]


async def _watched(coroutine: Coroutine[Any, Any, T], label: str, phase: Phase | None) -> T:
    """Await ``coroutine``, reporting what escapes it; ``await`` passes send(), throw() and
    close() on as they are."""
    try:
        return await coroutine
    except GeneratorExit:  # close(): not an error
        raise
    except BaseException as exc:
        _report(exc, label, phase)
        raise


def _report(exc: BaseException, label: str, phase: Phase | None) -> None:
    try:
        sentinel = current() or install()
    except Exception:
        return  # an invalid environment must not turn the job's exception into ours
    request = current_request.get()
    if request is not None:
        sentinel.capture_exception(exc, phase)
    else:
        sentinel.capture_exception(exc, phase or "background", route=label)


def capture_exception(exc: BaseException, *, phase: Phase | None = None) -> bool:
    """Report ``exc``, an exception the app handled but wants seen, as Sentry's
    ``capture_exception`` does: written as a ``handled_exception`` record with
    ``handled: true`` (with the request's route, location, request id, tags and contexts
    when called inside one), and counted in ``sentinel_handled_exceptions_total``, not as
    unhandled. False when ``exc`` was already reported (as handled, or as unhandled).

    Should ``exc`` escape the app afterwards, it is still reported as unhandled.
    Never raises for what it reports, also not for an invalid ``SENTINEL_*`` variable (then
    nothing is reported); a ``phase`` that is not one of sentinel's phases is a ValueError,
    a mistake in the calling code.
    """
    check_phase(phase)
    try:
        sentinel = current() or install()
    except ConfigError:
        return False
    return sentinel.capture_exception(exc, phase, handled=True)
