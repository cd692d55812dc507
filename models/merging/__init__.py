"""Model merging with mergekit's methods and semantics: a registry of tensor functions + run_merge.

Importing the package registers every method (each family module registers its own).
"""

from . import arcee_fusion, geometric, linear, sce, spherical, task_arithmetic  # noqa: F401  (registers methods)
from .registry import METHODS, MergeConfigError, MergeMethod, Params, get_method, method_names, register
from .recipe import load_recipe, plan_recipe, run_recipe
from .run import MergeSpec, plan, run_merge, validate_config
from .values import layer_t, resolve, tensor_generator

__all__ = [
    "METHODS", "MergeConfigError", "MergeMethod", "MergeSpec", "Params", "get_method", "layer_t", "method_names",
    "load_recipe", "plan", "plan_recipe", "register", "resolve", "run_merge", "run_recipe", "tensor_generator",
    "validate_config",
]
