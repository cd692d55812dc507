"""Methods without a base: linear (weighted average) and passthrough (copy one model)."""

import torch

from .base import MergeMethod, Params


class LinearModel(Params):
    weight: float


class LinearParams(Params):
    normalize: bool = True


def _check_linear(p: LinearParams, models: list[LinearModel]) -> None:
    if p.normalize and sum(m.weight for m in models) == 0:
        raise ValueError("linear: weights sum to 0, so normalize: true would divide by zero")


def linear(base, tensors: list[torch.Tensor], models: list[LinearModel], p: LinearParams, generator) -> torch.Tensor:
    """sum_i w_i theta_i, divided by sum_i w_i when `normalize`."""
    # Accumulate in float32 (float64 stays float64) with mergekit's op order, so results match it bit
    # for bit and a bf16 compute dtype does not round every partial sum.
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    w = torch.tensor([m.weight for m in models], dtype=acc, device=tensors[0].device)
    out = torch.zeros_like(tensors[0], dtype=acc)
    for t, wi in zip(tensors, w):
        out.addcmul_(t, wi)
    if p.normalize:
        out /= w.sum()
    return out.to(tensors[0].dtype)


class PassthroughModel(Params):
    scale: float | None = None


def passthrough(base, tensors: list[torch.Tensor], models: list[PassthroughModel], p, generator) -> torch.Tensor:
    """The single input, optionally multiplied by `scale`."""
    scale = models[0].scale
    return tensors[0] if scale is None else tensors[0] * scale



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="linear", fn=linear, params=LinearParams, model_params=LinearModel, check=_check_linear,
        reference="arxiv.org/abs/2203.05482",
    ),
    MergeMethod(name="passthrough", fn=passthrough, model_params=PassthroughModel, max_inputs=1),
]
