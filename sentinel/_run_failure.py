"""How a worker of ``sentinel run --workers N`` (or one started by ``--reload``) tells the
supervising process that it could not load or start the app: uvicorn's supervisor stops on
a worker's startup failure with status 0, so ``sentinel run`` reads this instead.
"""

from __future__ import annotations

import os

__all__ = [
    "FAILURE_VARIABLE",
    "LIFESPAN_FAILED",
    "LIFESPAN_RAISED",
    "first_failure",
    "note_startup_failure",
]

FAILURE_VARIABLE = "SENTINEL_RUN_FAILURE_FILE"
"""Where the first worker that cannot load or start the app says so (created by it, so the
others stay quiet), for ``sentinel run --workers N`` to exit non-zero: uvicorn's supervisor
stops on a worker's startup failure with status 0. The file holds the sentence that was
printed, or one of the two lifespan records below."""
LIFESPAN_FAILED = "lifespan startup failed"
"""Recorded when the app's lifespan startup failed (``lifespan.startup.failed``: a
Starlette lifespan that raised, an invalid ``add_middleware`` configuration): uvicorn ends
the worker with its startup-failure status."""
LIFESPAN_RAISED = "lifespan startup raised"
"""Recorded when the app raised during its lifespan startup: a failure under
``--lifespan on``; under ``auto`` uvicorn takes it for "lifespan unsupported" and serves."""


def note_startup_failure(*, raised: bool) -> None:
    """Called by the middleware when the app's lifespan startup fails (``raised``: the app
    raised instead of sending ``lifespan.startup.failed``), so that ``sentinel run --workers
    N`` exits with uvicorn's startup-failure status as one process does; nothing outside
    its workers. uvicorn has logged why already."""
    first_failure(LIFESPAN_RAISED if raised else LIFESPAN_FAILED)


def first_failure(sentence: str) -> bool:
    """Record ``sentence`` for ``sentinel run``; whether no other worker did before."""
    path = os.environ.get(FAILURE_VARIABLE)
    if not path:
        return True
    try:
        with open(path, "x", encoding="utf-8") as file:
            file.write(sentence)
    except FileExistsError:
        return False
    except OSError:
        pass
    return True
