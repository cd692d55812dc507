"""Model merging with mergekit's methods and semantics: a registry of tensor functions + run_merge.

Importing the package registers every method (each family module registers its own).
"""

from . import geometric, linear, sce, task_arithmetic  # noqa: F401  (registration side effects)
from .registry import METHODS, MergeConfigError, MergeMethod, Params, get_method, method_names, register
from .run import MergeSpec, plan, run_merge, validate_config
from .values import layer_t, resolve, tensor_generator

__all__ = [
    "METHODS", "MergeConfigError", "MergeMethod", "MergeSpec", "Params", "get_method", "layer_t", "method_names",
    "plan", "register", "resolve", "run_merge", "tensor_generator", "validate_config",
]
