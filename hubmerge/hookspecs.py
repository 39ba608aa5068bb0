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
    """Register named recipes for the recipe registry (``hubmerge recipes list``).

    Example::

        @hubmerge.hookimpl
        def hubmerge_register_recipes(register):
            register(Path(__file__).with_name("my-ties.yaml"))           # a file
            register(YAML_TEXT, name="my-sweep", version="2", summary="...")  # or YAML text / a mapping

    A recipe is schema v1 plus, optionally, a ``version`` and ``${name}`` placeholders declared
    under ``variables:`` (description, type, default; no default = required), filled in with
    ``hubmerge run NAME --set name=value``. A recipe that fails to parse is reported by
    ``hubmerge recipes list`` and skipped.

    Args:
        register: Call ``register(recipe, *, name=None, version=None, summary=None)`` once per
            recipe. ``recipe`` is a ``pathlib.Path`` (or an ``importlib.resources`` file), YAML
            text, or a parsed mapping; ``name``/``version``/``summary`` default to the recipe's
            ``name``, ``version`` and the first line of its ``description``.
    """
