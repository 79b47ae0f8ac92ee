"""Writes to process-global state made while serving requests: attributed, reported once.

Detection apart from policy:

- ``_detect``: how a write is found (an intercepted write's :class:`Note`, the
  end-of-request :class:`StateProbe`, the opt-in :class:`Compared` snapshots and their diff).
- ``_watcher``: what is done about it (:class:`MutationWatcher`: report, raise, isolate).
- ``_setters``: the process-wide setters watched by default (``os.chdir``, logging,
  ``signal.signal``...), wrapped at write time, and ``app.state``.
- ``_environ``: the environment, watched at write time and isolated per request.
- ``_watch``: ``sentinel.watch()``, the opt-in watches of the app's own state.
- ``_render``: keys and values as text, without running the app's code.
"""

from ._detect import compared
from ._environ import sync_environ
from ._setters import (
    default_watches_installed,
    install_default_watches,
    uninstall_default_watches,
    watch_app_state,
)
from ._watch import watch
from ._watcher import GlobalStateMutated, MutationWatcher, watch_modes

__all__ = [
    "GlobalStateMutated",
    "MutationWatcher",
    "compared",
    "default_watches_installed",
    "install_default_watches",
    "sync_environ",
    "uninstall_default_watches",
    "watch",
    "watch_app_state",
    "watch_modes",
]
