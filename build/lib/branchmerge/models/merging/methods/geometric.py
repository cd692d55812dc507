"""Methods that interpolate by geometry: slerp, nearswap, model_stock (mergekit's formulas)."""

import torch

from .base import MergeMethod, Params


class SlerpParams(Params):
    t: float


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation of two whole tensors by the angle between them (flattened).

    Nearly (anti-)parallel tensors fall back to linear interpolation, where the sin ratio is unstable.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return (1 - t) * v0 + t * v1
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)  # normalise first: no overflow
    t = torch.tensor(t, dtype=dot.dtype)  # coefficients in the compute dtype, as mergekit does
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) / torch.sin(theta)) * v0 + (torch.sin(t * theta) / torch.sin(theta)) * v1


def slerp(base, tensors, models, p: SlerpParams, generator) -> torch.Tensor:
    """`t` = 0 gives the base, 1 the other model."""
    return slerp_tensors(p.t, base, tensors[0])


class NearswapParams(Params):
    t: float


def nearswap(base, tensors, models, p: NearswapParams, generator) -> torch.Tensor:
    """Take the other model where it is within ~t of the base: w = clamp(t / |a - b|, 0, 1)."""
    a, b = base, tensors[0]
    w = (p.t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


class ModelStockParams(Params):
    filter_wise: bool = False


def model_stock(base, tensors, models, p: ModelStockParams, generator) -> torch.Tensor:
    """t = N c / (1 + (N - 1) c), c = mean pairwise cosine of the deltas; t * mean(theta_i) + (1 - t) * base.

    Per tensor, or per row with `filter_wise`. Where the denominator vanishes there is no finite
    estimate, so that row keeps the base (mergekit).
    """
    shape = base.shape
    if p.filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        b = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [w - b for w in ws]
    cos = []
    for i, da in enumerate(offsets):
        for db in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(da, dim=-1) * torch.linalg.vector_norm(db, dim=-1)
            cos.append(((da * db).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / n) + (1 - t) * b).reshape(shape)



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="slerp", fn=slerp, params=SlerpParams, base="required", min_inputs=2, max_inputs=2,
        reference="en.wikipedia.org/wiki/Slerp",
    ),
    MergeMethod(
        name="nearswap", fn=nearswap, params=NearswapParams, base="required", min_inputs=2, max_inputs=2,
        reference="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    MergeMethod(
        name="model_stock", fn=model_stock, params=ModelStockParams, base="required", min_inputs=3,
        reference="arxiv.org/abs/2403.19522",
    ),
]
