"""The merge-method registry: every method by name, listed here once (mergekit's merge_methods/registry.py).

Each family module defines its methods (a function over tensors + parameter schemas, methods/base.py) in its
METHODS list; nothing registers itself on import.
"""

from .methods import arcee_fusion, geometric, linear, ram, sce, spherical, task_arithmetic
from .methods.base import MergeConfigError, MergeMethod

FAMILIES = (linear, task_arithmetic, geometric, spherical, sce, arcee_fusion, ram)


def _index(methods: list[MergeMethod]) -> dict[str, MergeMethod]:
    by_name: dict[str, MergeMethod] = {}
    for method in methods:
        if method.name in by_name:
            raise ValueError(f"merge method {method.name!r} is listed twice")
        overlap = set(method.global_names()) & set(method.model_names())
        if overlap:  # a name must mean one scope, or config resolution would be ambiguous
            raise ValueError(f"merge method {method.name!r}: {sorted(overlap)} declared both global and per-model")
        by_name[method.name] = method
    return by_name


METHODS: dict[str, MergeMethod] = _index([m for family in FAMILIES for m in family.METHODS])


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise MergeConfigError(f"merge_method: unknown method {name!r}; registered: {', '.join(method_names())}")
    return METHODS[name]
