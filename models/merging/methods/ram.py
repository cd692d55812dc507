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
    """Positions [start, stop): (deltas [N, n], contributes [N, n], contributors [1, n]), mergekit's
    _prepare_ram_vectors on that slice."""
    deltas = torch.stack([t.reshape(-1)[start:stop] - base.reshape(-1)[start:stop] for t in tensors])
    contributes = deltas.abs() > epsilon
    return deltas, contributes, contributes.sum(dim=0, keepdim=True)


def _merge_chunk(deltas, contributes, count, unique_scale) -> torch.Tensor:
    """sum over models of (unique deltas x unique_scale) + (shared deltas / their contributors), mergekit's ops."""
    # masks as 0/1 in the deltas' dtype: x * 1.0 and x * 0.0 are x * True and x * False bit for bit (signed zeros
    # included), and float * float is vectorised where float * bool is not
    kept = deltas * contributes.to(deltas.dtype)
    unique = kept * (count == 1).to(deltas.dtype)
    if unique_scale is not None:
        unique = unique * unique_scale
    return (unique + kept * (count > 1).to(deltas.dtype) / count.clamp(min=1)).sum(dim=0, keepdim=True)


def _merged(base: torch.Tensor, parts, unique_scale) -> torch.Tensor:
    """base + each chunk's merged deltas; `parts` yields (start, stop, deltas, contributes, count)."""
    # RAM+'s lambda is float32: bf16 inputs give a float32 result, as in mergekit
    dtype = base.dtype if unique_scale is None else torch.promote_types(base.dtype, unique_scale.dtype)
    out = torch.empty(base.numel(), dtype=dtype)
    flat = base.reshape(-1)
    for start, stop, deltas, contributes, count in parts:
        out[start:stop] = flat[start:stop] + _merge_chunk(deltas, contributes, count, unique_scale).reshape(-1)
    return out.view(base.shape)


def _chunks(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    n = base.numel()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        yield (start, stop, *_contributions(base, tensors, epsilon, start, stop))


def ram(base, tensors, models, p: RamParams, generator) -> torch.Tensor:
    """base + (unique deltas whole) + (shared deltas / their number of contributors)."""
    return _merged(base, _chunks(base, tensors, p.epsilon), None)


def ramplus_tl(base, tensors, models, p: RamPlusParams, generator) -> torch.Tensor:
    """RAM with each model's unique deltas scaled by its lambda (module docstring). lambda needs counts over the
    whole tensor: a first pass takes them and keeps each chunk's deltas and masks for the second (about the
    inputs' size again, instead of computing them twice)."""
    shared_n = torch.zeros(len(tensors), dtype=torch.long)
    unique_n = torch.zeros(len(tensors), dtype=torch.long)
    parts = []
    for start, stop, deltas, contributes, count in _chunks(base, tensors, p.epsilon):
        shared_n += (contributes & (count > 1)).sum(dim=1)
        unique_n += (contributes & (count == 1)).sum(dim=1)
        parts.append((start, stop, deltas, contributes, count))
    rho = shared_n / unique_n.clamp(min=p.epsilon)
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)

    def consumed():  # each chunk freed once merged
        while parts:
            yield parts.pop(0)

    return _merged(base, consumed(), lam.unsqueeze(-1))


# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(name="ram", fn=ram, params=RamParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572"),
    MergeMethod(name="ramplus_tl", fn=ramplus_tl, params=RamPlusParams, base="required", min_inputs=1,
                reference="arxiv.org/abs/2601.13572",
                result_dtype=lambda dtype: torch.promote_types(dtype, torch.float32)),
]
