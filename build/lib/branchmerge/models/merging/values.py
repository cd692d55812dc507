"""Per-tensor parameter values with mergekit's semantics, and the per-tensor random generator.

A parameter setting in a config is one of
- a scalar:            `density: 0.5`
- a gradient:          `t: [0, 0.5, 1]`, interpolated piecewise-linearly at t = layer / (n_layers - 1);
                       tensors outside the layer stack (embeddings, final norm, lm_head) use t = 0
- a filter list:       `weight: [{filter: mlp, value: 0.5}, {value: 1}]`, where `filter` is a
                       substring of the tensor name, the first match wins and no filter (or "*")
                       matches everything. Each `value` is a scalar or a gradient.
When no filter matches, the setting gives nothing and the next scope (model -> global -> default)
is asked, as in mergekit.
"""

import hashlib
import re
from typing import Any, Callable

import torch

from .config import MergeConfigError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_t(tensor_name: str, n_layers: int) -> float:
    """Where the tensor sits in the layer stack, in [0, 1]; 0 for tensors outside it (mergekit)."""
    i = layer_index(tensor_name)
    if i is None:
        return 0.0
    if n_layers <= 1:
        return 1.0  # mergekit's choice for a one-layer slice
    return i / (n_layers - 1)


def _scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def _numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def resolve(setting: Any, tensor_name: str, t: float, validate: Callable[[Any], Any] = lambda v: v) -> Any:
    """The value of one setting for one tensor, or None when a filter list has no match."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if _scalar(setting):
        return validate(setting)
    if not setting:
        return None
    if all(_scalar(e) for e in setting):  # gradient
        values = [validate(e) for e in setting]
        if not all(_numeric(v) for v in values):  # bools / strings step instead of interpolating
            return values[int(t * (len(values) - 1))]
        x = t * (len(values) - 1)
        i0 = int(x)
        i1 = min(len(values) - 1, i0 + 1)
        frac = x - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:  # filter list
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return resolve(cond["value"], tensor_name, t, validate)
    return None


def check_setting(setting: Any, where: str, validate_leaf: Callable[[Any, str], Any]) -> None:
    """Check a setting's shape and every scalar in it, before any tensor exists.

    Checking the scalars is enough for interval bounds (density in (0, 1], ...): a gradient
    interpolates between its points, so it stays inside any interval that holds them all.
    """
    if setting is None:
        return
    if _scalar(setting):
        validate_leaf(setting, where)
        return
    items = [setting] if isinstance(setting, dict) else setting
    if not isinstance(items, list) or not items:
        raise MergeConfigError(
            f"{where}: expected a scalar, a list of scalars (gradient) or a list of {{filter, value}}; got {setting!r}"
        )
    if all(_scalar(e) for e in items):
        for i, e in enumerate(items):
            validate_leaf(e, f"{where}[{i}]")
        return
    for i, cond in enumerate(items):
        at = f"{where}[{i}]" if isinstance(setting, list) else where
        if not isinstance(cond, dict):
            raise MergeConfigError(f"{at}: a filter list holds only {{filter, value}} dicts; got {cond!r}")
        extra = set(cond) - {"filter", "value"}
        if extra or "value" not in cond:
            raise MergeConfigError(f"{at}: keys must be 'value' and optionally 'filter'; got {sorted(cond)}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise MergeConfigError(f"{at}.filter: must be a substring of tensor names; got {cond['filter']!r}")
        value = cond["value"]
        if isinstance(value, list) and all(_scalar(e) for e in value) and value:
            for j, e in enumerate(value):
                validate_leaf(e, f"{at}.value[{j}]")
        elif _scalar(value):
            validate_leaf(value, f"{at}.value")
        else:
            raise MergeConfigError(f"{at}.value: expected a scalar or a gradient (list of scalars); got {value!r}")


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """The random stream for one tensor, derived from (seed, name) alone.

    So a tensor's masks do not depend on which tensors were merged before it (order, sharding,
    skipped tensors). Within a tensor, models draw from it in config order.
    """
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
