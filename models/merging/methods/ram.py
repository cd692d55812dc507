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


def _contributions(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """(deltas [N, P] zeroed where they do not count, contributes [N, P], contributors [1, P]), P = numel."""
    deltas = torch.stack([t - base for t in tensors]).view(len(tensors), -1)
    contributes = deltas.abs() > epsilon
    return deltas * contributes, contributes, contributes.sum(dim=0, keepdim=True)


def ram(base, tensors, models, p: RamParams, generator) -> torch.Tensor:
    """base + (unique deltas whole) + (shared deltas / their number of contributors)."""
    kept, _, count = _contributions(base, tensors, p.epsilon)
    merged = (kept * (count == 1) + kept * (count > 1) / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base, tensors, models, p: RamPlusParams, generator) -> torch.Tensor:
    """RAM with each model's unique deltas scaled by its lambda (module docstring)."""
    kept, contributes, count = _contributions(base, tensors, p.epsilon)
    shared, unique = count > 1, count == 1
    rho = (contributes & shared).sum(dim=1) / (contributes & unique).sum(dim=1).clamp(min=p.epsilon)
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    merged = (kept * unique * lam.unsqueeze(-1) + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(name="ram", fn=ram, params=RamParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572"),
    MergeMethod(name="ramplus_tl", fn=ramplus_tl, params=RamPlusParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572"),
]
