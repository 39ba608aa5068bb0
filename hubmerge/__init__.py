"""hubmerge: merge fine-tuned models and adapters the way the Hugging Face Hub expects.

Plugin authors need :data:`hookimpl` and :class:`hubmerge.method.MergeMethod`. Loaded lazily:
``load_task_model`` (per-task deployments), ``load_dynamic_model`` (SE-Merging's dynamic deployments)
and ``load_task_data`` (a recipe's ``data:``).
"""

from .hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: ``hubmerge.load_task_model`` imports transformers only when used
    if name == "load_task_model":
        from .deployment import load_task_model

        return load_task_model
    if name == "load_dynamic_model":  # SE-Merging's dynamic deployments
        from .dynamic import load_dynamic_model

        return load_dynamic_model
    if name == "load_task_data":  # a recipe's `data:` (unlabeled samples per task)
        from .data import load_task_data

        return load_task_data
    raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")
