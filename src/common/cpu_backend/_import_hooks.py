"""Run a callback right after a given module finishes importing.

The CPU backend must patch a few verl modules (engine registry, FSDP offload policy, rollout
registries). Importing those modules eagerly from the plugin would add seconds of start-up to every
Ray process, most of which never use them, and would import half of verl from inside
``verl/__init__``. Instead, a meta-path finder wraps the loader of each watched module so that the
patch runs exactly once, when (and if) the module is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType

Callback = Callable[[ModuleType], None]

_lock = threading.RLock()
_pending: dict[str, list[Callback]] = {}


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks registered for the module."""

    def __init__(self, inner: importlib.abc.Loader, fullname: str):
        self._inner = inner
        self._fullname = fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _run_callbacks(self._fullname, module)

    def __getattr__(self, name):
        # get_source / get_code / is_package etc. keep working for tools that inspect loaders
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds watched modules through the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            spec = self._find_with_other_finders(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec

    def _find_with_other_finders(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


_finder = _PostImportFinder()


def _run_callbacks(fullname: str, module: ModuleType) -> None:
    with _lock:
        callbacks = _pending.pop(fullname, [])
    for callback in callbacks:
        callback(module)


def when_imported(fullname: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``fullname`` is imported (immediately if it already is).

    Callbacks for the same module run in registration order. A callback that raises propagates
    the error to the ``import`` statement that triggered it, so a broken patch fails loudly.
    """
    with _lock:
        module = sys.modules.get(fullname)
        if module is None:
            _pending.setdefault(fullname, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback(module)
