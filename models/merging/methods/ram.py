"""Reinforced Agent Merging (RAM, arXiv 2601.13572) and its tensor-local RAM+: mergekit 0.1.5's `ram` and
`ramplus_tl`, same parameter names, defaults and arithmetic.

A model contributes to a parameter where its delta from the base exceeds `epsilon` in magnitude. A parameter
one model alone changes keeps that model's delta whole (plain averaging would dilute it by the number of models);
one several models change gets the mean of their deltas. RAM+ also scales each model's unique deltas up by
lambda = 1 + r * clamp(rho, 0, alpha), rho = (its positions shared with other models) / (its unique positions),
counted within the tensor ("tensor-local"): a model whose changes mostly overlap others' gets its few unique ones
amplified.
"""

import torch
from pydantic import Field

from .base import MergeMethod, Params


class RamParams(Params):
    epsilon: float = Field(default=1e-5, ge=0)


class RamPlusParams(Params):
    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = Field(default=1e-5, ge=0)


CHUNK = 1 << 20  # positions per pass: every step is elementwise (RAM+'s counts are integers, exact in any
# order), so chunks give the same bits while the [N, chunk] temporaries stay small and warm instead of N full-size
# tensors allocated (page-faulted) afresh by each of the ten or so passes


def _contributions(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float, start: int, stop: int):
    """Positions [start, stop): (deltas [N, n] zeroed where they do not count, contributes [N, n], contributors
    [1, n]). The arithmetic is mergekit's (_prepare_ram_vectors and the products that follow)."""
    deltas = torch.stack([t.reshape(-1)[start:stop] - base.reshape(-1)[start:stop] for t in tensors])
    contributes = deltas.abs() > epsilon
    return deltas * contributes, contributes, contributes.sum(dim=0, keepdim=True)


def _merged(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float, unique_scale) -> torch.Tensor:
    """base + sum over models of (unique deltas x unique_scale) + (shared deltas / their contributors)."""
    # RAM+'s lambda is float32: bf16 inputs give a float32 result, as in mergekit
    dtype = base.dtype if unique_scale is None else torch.promote_types(base.dtype, unique_scale.dtype)
    out = torch.empty(base.numel(), dtype=dtype)
    flat = base.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        kept, _, count = _contributions(base, tensors, epsilon, start, stop)
        unique = kept * (count == 1)
        if unique_scale is not None:
            unique = unique * unique_scale
        merged = (unique + kept * (count > 1) / count.clamp(min=1)).sum(dim=0, keepdim=True)
        out[start:stop] = flat[start:stop] + merged.reshape(-1)
    return out.view(base.shape)


def ram(base, tensors, models, p: RamParams, generator) -> torch.Tensor:
    """base + (unique deltas whole) + (shared deltas / their number of contributors)."""
    return _merged(base, tensors, p.epsilon, None)


def ramplus_tl(base, tensors, models, p: RamPlusParams, generator) -> torch.Tensor:
    """RAM with each model's unique deltas scaled by its lambda (module docstring); the counts behind lambda are
    over the whole tensor, taken in a first pass."""
    shared_n = torch.zeros(len(tensors), dtype=torch.long)
    unique_n = torch.zeros(len(tensors), dtype=torch.long)
    flat = base.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        contributes = torch.stack([(t.reshape(-1)[start:stop] - flat[start:stop]).abs_() > p.epsilon
                                   for t in tensors])  # the counts only: no kept deltas in this pass
        count = contributes.sum(dim=0, keepdim=True)
        shared_n += (contributes & (count > 1)).sum(dim=1)
        unique_n += (contributes & (count == 1)).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=p.epsilon)
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    return _merged(base, tensors, p.epsilon, lam.unsqueeze(-1))


# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(name="ram", fn=ram, params=RamParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572"),
    MergeMethod(name="ramplus_tl", fn=ramplus_tl, params=RamPlusParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572",
                result_dtype=lambda dtype: torch.promote_types(dtype, torch.float32)),
]
