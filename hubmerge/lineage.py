"""The fully resolved recipe written beside every merge (``hubmerge_recipe.yaml``).

Every input is pinned to the commit it was read at, every parameter is explicit
(defaults filled in), and the versions of hubmerge, the method's plugin and torch are
recorded, so the merge can be re-run and verified from the output alone.
"""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .engine import MergeResult
    from .sources import ResolvedModel


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pinned_ref(model: ResolvedModel) -> dict[str, Any]:
    """A model reference pinned to its resolved commit (or its local path)."""
    ref: dict[str, Any] = (
        {"repo": model.repo_id, "revision": model.revision} if model.repo_id else {"path": str(model.directory)}
    )
    if model.ref.name:
        ref["name"] = model.ref.name
    return ref


def resolved_recipe(result: MergeResult) -> dict[str, Any]:
    """The resolved recipe of a finished merge as a plain mapping.

    Args:
        result: The merge result.

    Returns:
        A mapping valid against recipe schema v1.
    """
    import torch

    from .plugins import registered_methods

    recipe = result.recipe
    data = recipe.model_dump(mode="json", exclude_none=True, exclude={"provenance"})
    data["base"] = pinned_ref(result.base)
    data["experts"] = [pinned_ref(e) for e in result.experts]
    data["params"] = result.method.params.model_dump(mode="json")
    registered = registered_methods().get(recipe.method)
    # Where the recipe came from (a registry recipe, a published merge re-run): set by
    # hubmerge.registry in the recipe's own provenance, the one key carried over.
    source = (recipe.provenance or {}).get("source")
    data["provenance"] = {
        "hubmerge": _version("hubmerge"),
        "method_plugin": f"{registered.plugin} ({registered.distribution})" if registered else None,
        "torch": str(torch.__version__),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        **({"source": source} if source else {}),
        **result.extra.get("provenance", {}),
    }
    return {"hubmerge": data.pop("hubmerge"), **data}


def resolved_recipe_yaml(result: MergeResult) -> str:
    """:func:`resolved_recipe` as YAML text."""
    return "# Written by hubmerge: every input pinned, every parameter explicit.\n" + yaml.safe_dump(
        resolved_recipe(result), sort_keys=False, allow_unicode=True
    )
