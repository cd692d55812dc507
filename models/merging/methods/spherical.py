"""Methods that average on the hypersphere: nuslerp, multislerp, karcher (mergekit's algorithms and numerics).

Each follows arcee-ai/mergekit `mergekit/merge_methods/{nuslerp,multislerp,karcher}.py` op for op (same eps,
thresholds, clamps and dtypes of coefficients), so a float32 merge gives mergekit's numbers. Deliberate
differences: nuslerp also falls back to lerp for exactly antiparallel vectors (see `nuslerp_tensors`), and
multislerp rejects weights summing to 0 under normalize_weights while planning (mergekit writes NaN).

Bases: mergekit takes the base of nuslerp and multislerp as optional (given: the method works on deltas from it).
The registry has no optional-base mode yet, so both are registered with `base="required"` (always on deltas, as
a branch merge wants); their functions also accept `base=None` for mergekit's base-less form.
"""

from typing import Annotated

import torch
from pydantic import Field

from .base import MergeMethod, Params

# ----------------------------------------------------------------------------- nuslerp

class NuslerpModel(Params):
    weight: float


class NuslerpParams(Params):
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
                    eps: float = 1e-8) -> torch.Tensor:
    """Slerp of the whole flattened tensors (`flatten`), else of each vector along the last dim (each row of a
    matrix), or along dim 0 with `row_wise` (mergekit's naming). Lerp where sin(theta) < eps.

    Differs from mergekit only for exactly antiparallel vectors (cos == -1): float32 acos(-1) is not exactly pi,
    so sin(theta) = -8.7e-8 escapes mergekit's `|sin| < 1e-8` test and it divides rounding noise by it (v, -v at
    t = 0.3 gives 0.34 v, at t = 0.75 gives 0); here `cos <= -1` takes the lerp, as mergekit does in float64.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin_theta = torch.sin(theta)
    colinear = ((sin_theta.abs() < eps) | (cos <= -1)).squeeze(-1)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    # squeeze(-1) where mergekit squeezes every dim: the same mask, and no crash on a size-1 leading dim.
    res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]  # flattened: a 0-dim mask, the whole tensor
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def nuslerp(base, tensors, models: list[NuslerpModel], p: NuslerpParams, generator) -> torch.Tensor:
    """t = w2 / (w1 + w2) (0.5 when the weights sum to ~0); with a base, base + slerp of the two deltas."""
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) != 2:
        raise ValueError(f"nuslerp merges exactly two models (plus an optional base); got {len(tensors)}")
    w1, w2 = models[0].weight, models[1].weight
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    a, b = tensors
    kw = {"row_wise": p.nuslerp_row_wise, "flatten": p.nuslerp_flatten}
    if base is None:
        return nuslerp_tensors(t, a, b, **kw)
    return base + nuslerp_tensors(t, a - base, b - base, **kw)


# ----------------------------------------------------------------------------- multislerp

class MultislerpModel(Params):
    weight: float


class MultislerpParams(Params):
    normalize_weights: bool = True
    eps: float = 1e-8


def _check_multislerp(p: MultislerpParams, models: list[MultislerpModel]) -> None:
    if p.normalize_weights and len(models) > 1 and sum(m.weight for m in models) == 0:
        raise ValueError("multislerp: weights sum to 0, so normalize_weights: true would divide by zero")


def multislerp(base, tensors, models: list[MultislerpModel], p: MultislerpParams, generator) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (flattened tensors, or their deltas from the base):
    unit vectors u_i, mean direction m = normalise(sum w_i u_i), tangent vectors u_i - <u_i, m> m, their weighted
    sum v, exp map m cos|v| + v sin|v| / |v|, scaled by sum w_i |x_i|. Weights in the compute dtype, as mergekit.

    A zero mean direction: lerp for two inputs, an error for more (mergekit), except when every input equals
    the base (all deltas exactly zero): the base.
    """
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor([m.weight for m in models], dtype=x.dtype, device=x.device)
    if p.normalize_weights:
        w = w / w.sum()
    eps = p.eps
    shape = x.shape[1:]
    # In place where the values are the same: each [models, numel] temporary is a fresh allocation (page faults)
    # as large as the inputs.
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat.div_(norms + eps)
    scratch = units * w.view(-1, 1)
    mean = scratch.sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if bool((norms == 0).all()):
            # Every input equals the base (bf16 fine-tunes whose change to a norm weight rounded away): the point
            # itself. mergekit 0.1.5 raises here, which stops whole bf16 merges (README: where we differ).
            return base.clone() if base is not None else tensors[0].clone()
        if len(tensors) != 2:
            raise ValueError(
                "multislerp: the weighted sum of the unit directions is zero (e.g. antipodal inputs a, -a with "
                "equal weights); use different weights"
            )
        x0, x1 = (t if base is None else t - base for t in tensors)  # x holds the unit vectors now
        res = x0 * w[0] + x1 * w[1]
        return res if base is None else res + base
    mean = mean / mean_norm
    dots = torch.mul(units, mean, out=scratch).sum(-1, keepdim=True)
    tangent = units.sub_(torch.mul(dots, mean, out=scratch))
    v = torch.mul(tangent, w.view(-1, 1), out=scratch).sum(0)
    del units, tangent, scratch, x, flat
    v_norm = torch.norm(v) + eps
    res = mean * torch.cos(v_norm) + v * (torch.sin(v_norm) / v_norm)
    res = (res * (norms.squeeze(-1) * w).sum()).view(shape)
    return res if base is None else res + base


# ----------------------------------------------------------------------------- karcher

class KarcherParams(Params):
    max_iter: Annotated[int, Field(ge=0)] = 10
    tol: Annotated[float, Field(ge=0)] = 1e-5


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the unit directions, scaled by sum_i alpha_i |x_i|.

    Norms, as mergekit 0.1.5 takes them: float64 for float64 inputs, else float32, kept as tensors (mergekit sums
    the final scale from them: a Python-float sum differed by 1 ulp on SmolLM2 weights); inputs with norm <= tol
    take no part in the direction (their alpha still counts in the scale). Start: the normalised weighted mean of
    the directions; each step moves along the weighted sum of log maps, sum a_i theta_i / sin(theta_i)
    (u_i - cos(theta_i) m), by its length, until that length < tol.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(dtype))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a_valid = [alphas[i] / total for i in valid]
    u_valid = [units[i] for i in valid]
    del units

    mean = torch.zeros_like(u_valid[0])
    for a, u in zip(a_valid, u_valid):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u_valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_valid, u_valid):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(base, tensors, models, p: KarcherParams, generator) -> torch.Tensor:
    """Equal weights 1/N over every input (a base_model not listed under models is one of them, as in mergekit)."""
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), p.max_iter, p.tol)



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="nuslerp", fn=nuslerp, params=NuslerpParams, model_params=NuslerpModel, base="optional",
        min_inputs=2, max_inputs=3, models_besides_base=2, reference="github.com/arcee-ai/mergekit (merge_methods/nuslerp.py)",
    ),
    MergeMethod(
        name="multislerp", fn=multislerp, params=MultislerpParams, model_params=MultislerpModel, base="optional",
        min_inputs=2, check=_check_multislerp, reference="goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    MergeMethod(
        name="karcher", fn=karcher, params=KarcherParams, min_inputs=1, reference="en.wikipedia.org/wiki/Karcher_mean",
    ),
]
