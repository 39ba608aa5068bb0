"""Hook specifications for hubmerge plugins (entry-point group ``hubmerge``).

Hooks are tiny: each receives a ``register`` callback and calls it once per thing it
provides, as in Simon Willison's ``llm``. The built-in methods under ``plugins/`` use
exactly these hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("hubmerge")
hookimpl = pluggy.HookimplMarker("hubmerge")


@hookspec
def hubmerge_register_methods(register):
    """Register merge methods.

    Args:
        register: Call ``register(MethodClass)`` for each :class:`hubmerge.method.MergeMethod`
            subclass the plugin provides.
    """


@hookspec
def hubmerge_register_recipes(register):
    """Register named recipes for the recipe registry.

    Args:
        register: Call ``register(path_or_text, name=..., version=..., summary=...)`` per recipe.
    """
