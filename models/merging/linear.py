"""Methods without a base: linear (weighted average) and passthrough (copy one model)."""

import torch

from .registry import MergeMethod, Params, register


class LinearModel(Params):
    weight: float


class LinearParams(Params):
    normalize: bool = True


def _check_linear(p: LinearParams, models: list[LinearModel]) -> None:
    if p.normalize and sum(m.weight for m in models) == 0:
        raise ValueError("linear: weights sum to 0, so normalize: true would divide by zero")


def linear(base, tensors: list[torch.Tensor], models: list[LinearModel], p: LinearParams, generator) -> torch.Tensor:
    """sum_i w_i theta_i, divided by sum_i w_i when `normalize`."""
    out = sum(m.weight * t for t, m in zip(tensors, models))
    if p.normalize:
        out = out / sum(m.weight for m in models)
    return out


class PassthroughModel(Params):
    scale: float | None = None


def passthrough(base, tensors: list[torch.Tensor], models: list[PassthroughModel], p, generator) -> torch.Tensor:
    """The single input, optionally multiplied by `scale`."""
    scale = models[0].scale
    return tensors[0] if scale is None else tensors[0] * scale


register(MergeMethod(
    name="linear", fn=linear, params=LinearParams, model_params=LinearModel, check=_check_linear,
    reference="arxiv.org/abs/2203.05482",
))
register(MergeMethod(name="passthrough", fn=passthrough, model_params=PassthroughModel, max_inputs=1))
