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


def _chunks(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """Per chunk of positions [start, stop): (start, stop, shares [N, n], unique [1, n], contributes [N, n] as
    uint8). shares = each model's delta where it contributes, divided by the number of contributors: mergekit's
    masked terms summed per model (a position one model changes has 1 contributor, so its share is its whole
    delta; the other models' terms are their deltas times 0, signed zeros included)."""
    flat = base.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        deltas = torch.stack([t.reshape(-1)[start:stop] - flat[start:stop] for t in tensors])
        # bool tensors viewed as uint8: their sums and casts are vectorised, bool's are not (measured 3-7x)
        contributes = (deltas.abs() > epsilon).view(torch.uint8)
        count = contributes.sum(dim=0, keepdim=True, dtype=torch.int32)  # chunk <= 2^31 positions
        shares = deltas * contributes.to(deltas.dtype) / count.clamp(min=1)
        yield start, stop, shares, count == 1, contributes


def ram(base, tensors, models, p: RamParams, generator) -> torch.Tensor:
    """base + (unique deltas whole) + (shared deltas / their number of contributors)."""
    out = torch.empty(base.numel(), dtype=base.dtype)
    flat = base.reshape(-1)
    for start, stop, shares, _, _ in _chunks(base, tensors, p.epsilon):
        out[start:stop] = flat[start:stop] + shares.sum(dim=0)
    return out.view(base.shape)


def ramplus_tl(base, tensors, models, p: RamPlusParams, generator) -> torch.Tensor:
    """RAM with each model's unique deltas scaled by its lambda (module docstring). lambda needs counts over the
    whole tensor: a first pass takes them and keeps each chunk's shares for the second (about the inputs' size
    again, instead of computing them twice)."""
    unique_n = torch.zeros(len(tensors), dtype=torch.long)
    contributes_n = torch.zeros(len(tensors), dtype=torch.long)
    parts = []
    for start, stop, shares, unique, contributes in _chunks(base, tensors, p.epsilon):
        unique_n += (contributes & unique.view(torch.uint8)).sum(dim=1, dtype=torch.int32)
        contributes_n += contributes.sum(dim=1, dtype=torch.int32)
        parts.append((start, stop, shares, unique))
    rho = (contributes_n - unique_n) / unique_n.clamp(min=p.epsilon)  # shared / unique positions, as mergekit
    lam = (1 + p.r * rho.clamp(min=0, max=p.alpha)).unsqueeze(-1)  # float32: bf16 in, float32 out (mergekit)
    out = torch.empty(base.numel(), dtype=torch.promote_types(base.dtype, lam.dtype))
    flat = base.reshape(-1)
    while parts:  # each chunk freed once merged
        start, stop, shares, unique = parts.pop(0)
        # mergekit sums unique x lambda + shared over models; at a unique position every term but one is a
        # signed zero, so that sum is sum(shares x lambda) there and sum(shares) elsewhere, bit for bit
        merged = torch.where(unique, (shares * lam).sum(dim=0, keepdim=True),
                             shares.sum(dim=0, keepdim=True, dtype=lam.dtype))
        out[start:stop] = flat[start:stop] + merged.reshape(-1)
    return out.view(base.shape)


# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(name="ram", fn=ram, params=RamParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572"),
    MergeMethod(name="ramplus_tl", fn=ramplus_tl, params=RamPlusParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572",
                result_dtype=lambda dtype: torch.promote_types(dtype, torch.float32)),
]
