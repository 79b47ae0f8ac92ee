"""Report exceptions by hand: ``@sentinel.capture`` for what escapes jobs, consumers and
other functions (unhandled there), and ``sentinel.capture_exception`` for one the app
handled."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any, Protocol, TypeVar, cast, get_args, overload

from ._config import ConfigError
from ._context import current_request
from ._current import current
from ._runtime import install
from ._vocabulary import Phase

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound="staticmethod[Any, Any] | classmethod[Any, Any, Any]")
T = TypeVar("T")
PHASES: tuple[Phase, ...] = get_args(Phase)


def check_phase(phase: object) -> None:
    """ValueError unless ``phase`` is None or one of the fixed phases (the ``phase`` label
    has a bounded set of values, which dashboards and alerts name)."""
    if phase is not None and phase not in PHASES:
        msg = f'"phase" must be one of {", ".join(PHASES)}: {phase!r}'
        raise ValueError(msg)


class Decorator(Protocol):
    """What ``capture(name=..., phase=...)`` returns: applied to a function or a static or
    class method, it gives back the same kind of thing."""

    # A staticmethod is callable too: it matches both, and is given back either way.
    @overload
    def __call__(self, func: M, /) -> M: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, func: F, /) -> F: ...


@overload
def capture(func: M, /) -> M: ...  # type: ignore[overload-overlap]


@overload
def capture(func: F, /) -> F: ...


@overload
def capture(*, name: str | None = None, phase: Phase | None = None) -> Decorator: ...


def capture(func: Any = None, /, *, name: str | None = None, phase: Phase | None = None) -> Any:
    """Report any exception escaping ``func`` (sync or async, a function or a generator,
    a callable object, a ``functools.partial``, a ``staticmethod`` or ``classmethod`` in
    either decorator order), then re-raise it unchanged. A generator's exceptions escape
    while it is iterated: they are reported then, and what the consumer sends, throws or
    closes reaches ``func`` as is; an exception the consumer throws in that comes back out
    unhandled (the endpoint's ``HTTPException`` in a FastAPI ``yield`` dependency, a
    ``with`` block's error in a ``@contextmanager``) is the consumer's, not reported.
    Likewise a coroutine that a sync ``func`` returns: what escapes it is reported where it
    is awaited.

    Usable bare (``@capture``) or with options (``@capture(name="nightly-sync")``). Outside
    a request the report's route is ``name`` (default: the qualified name of the function,
    of a partial's function, or of a callable object's class) and its phase ``background``
    unless given; a ``phase`` that is not one of sentinel's phases (``request``,
    ``response``, ``lifespan``, ``background``, ``task``, ``thread``, ``process``,
    ``import``) is a ValueError when decorating, and so is an empty ``name``; a ``func``
    that is not callable, or a ``name`` that is not text, is a TypeError.
    """
    check_phase(phase)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        msg = f'"name" must be a non-empty string: {name!r}'
        raise (ValueError if isinstance(name, str) else TypeError)(msg)
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
    if isinstance(func, staticmethod | classmethod):
        # Above @staticmethod or @classmethod: the function inside is wrapped, and given
        # back in the same descriptor, so the method binds as it did.
        wrapped = _decorate(func.__func__, name=name, phase=phase)
        descriptor = staticmethod if isinstance(func, staticmethod) else classmethod
        return cast("F", descriptor(wrapped))
    if not callable(func):
        msg = f"capture() needs a function or another callable: {func!r}"
        raise TypeError(msg)
    label = name or _default_name(func)
    callee = _callee(func)

    if inspect.isasyncgenfunction(callee):

        @functools.wraps(func)
        async def async_generator_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            generator = func(*args, **kwargs)
            # Not ``async for``: that would not pass asend() and athrow() on to func.
            message: Any = None
            throwing = False
            while True:
                try:
                    if throwing:
                        value = await generator.athrow(message)
                    else:
                        value = await generator.asend(message)
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    if not isinstance(exc, GeneratorExit) and not (throwing and exc is message):
                        _report(exc, label, phase)
                    raise
                try:
                    message, throwing = (yield value), False
                except GeneratorExit:  # aclose(): func's clean-up runs, as unwrapped
                    try:
                        await generator.aclose()
                    except BaseException as exc:
                        _report(exc, label, phase)
                        raise
                    raise
                except BaseException as thrown:
                    message, throwing = thrown, True

        return async_generator_wrapper  # type: ignore[return-value]

    if inspect.isgeneratorfunction(callee):

        @functools.wraps(func)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            generator = func(*args, **kwargs)
            # Driven by hand, not with ``yield from``: an exception the consumer throws in
            # (a FastAPI dependency gets the endpoint's HTTPException, a @contextmanager the
            # with block's) comes back out unless func handles it, and is the consumer's to
            # report, not func's.
            message: Any = None
            throwing = False
            while True:
                try:
                    value = generator.throw(message) if throwing else generator.send(message)
                except StopIteration as stop:
                    return stop.value
                except BaseException as exc:
                    # GeneratorExit out of func: not an error, and frequent (every collection).
                    if not isinstance(exc, GeneratorExit) and not (throwing and exc is message):
                        _report(exc, label, phase)
                    raise
                try:
                    message, throwing = (yield value), False
                except GeneratorExit:  # close(): func's clean-up runs, as unwrapped
                    try:
                        generator.close()
                    except BaseException as exc:
                        _report(exc, label, phase)
                        raise
                    raise
                except BaseException as thrown:
                    message, throwing = thrown, True

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
