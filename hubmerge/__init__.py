"""hubmerge: merge fine-tuned models and adapters the way the Hugging Face Hub expects.

Plugin authors need :data:`hookimpl` and :class:`hubmerge.method.MergeMethod`.
"""

from .hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
