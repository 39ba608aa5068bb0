"""The plugin host: loads every entry point of group ``hubmerge``, guarded.

A plugin that fails to import is recorded in :func:`load_failures` (shown by
``hubmerge plugins``) and skipped; it never takes the host down.
``HUBMERGE_LOAD_PLUGINS`` (comma-separated entry-point names) restricts loading.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownMethodError
from .method import MergeMethod

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hubmerge"
_manager: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded: its entry point, distribution and the error."""

    name: str
    distribution: str
    error: str


@dataclass(frozen=True)
class RegisteredMethod:
    """A method class with the plugin and distribution that registered it."""

    method: type[MergeMethod]
    plugin: str
    distribution: str


def _distribution_of(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "?"


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading the entry points on first use.

    Returns:
        A ``pluggy.PluginManager`` with every loadable ``hubmerge`` plugin registered.
    """
    global _manager
    if _manager is None:
        _manager = _load()
    return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins so the next call reloads them (tests, newly installed plugins)."""
    global _manager
    _manager = None
    _failures.clear()


def _load() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("hubmerge")
    pm.add_hookspecs(hookspecs)
    wanted = os.environ.get("HUBMERGE_LOAD_PLUGINS")
    allowed = {n.strip() for n in wanted.split(",") if n.strip()} if wanted is not None else None
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and entry_point.name not in allowed:
            continue
        if pm.get_plugin(entry_point.name) is not None:
            continue
        try:
            module = entry_point.load()
            pm.register(module, name=entry_point.name)
        except Exception as exc:  # a broken plugin is reported, never fatal
            logger.warning("plugin %r failed to load: %s", entry_point.name, exc)
            _failures.append(PluginFailure(entry_point.name, _distribution_of(entry_point), f"{type(exc).__name__}: {exc}"))
            continue
        _plugin_dists[entry_point.name] = _distribution_of(entry_point)
    pm.check_pending()
    return pm


_plugin_dists: dict[str, str] = {}


def load_failures() -> list[PluginFailure]:
    """Plugins that failed to load in the current manager.

    Returns:
        One :class:`PluginFailure` per broken entry point.
    """
    get_plugin_manager()
    return list(_failures)


def registered_methods() -> dict[str, RegisteredMethod]:
    """Collect the methods every loaded plugin registers.

    Returns:
        Method name to :class:`RegisteredMethod`, sorted by name.

    Raises:
        PluginError: If a plugin registers something that is not a ``MergeMethod``
            subclass, or two plugins register the same name.
    """
    pm = get_plugin_manager()
    found: dict[str, RegisteredMethod] = {}
    for impl in pm.hook.hubmerge_register_methods.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(cls, _plugin=plugin_name):
            if not (isinstance(cls, type) and issubclass(cls, MergeMethod)) or not cls.name:
                raise PluginError(f"plugin {_plugin!r} registered {cls!r}, not a named MergeMethod subclass")
            if cls.name in found and found[cls.name].method is not cls:
                raise PluginError(
                    f"method {cls.name!r} is registered by both {found[cls.name].plugin!r} and {_plugin!r}"
                )
            found[cls.name] = RegisteredMethod(cls, _plugin, _plugin_dists.get(_plugin, "?"))

        impl.function(register=register)
    return dict(sorted(found.items()))


def get_method(name: str) -> type[MergeMethod]:
    """Look a method up by its registered name.

    Args:
        name: The method name from a recipe.

    Returns:
        The method class.

    Raises:
        UnknownMethodError: If no plugin provides it; close names are suggested.
    """
    methods = registered_methods()
    if name in methods:
        return methods[name].method
    close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    known = ", ".join(methods) or "none (no plugin loaded)"
    raise UnknownMethodError(f"unknown method {name!r}{hint} (installed: {known})")
