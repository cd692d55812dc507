"""SCE (FuseChat): select salient positions, weight models by delta energy, erase minority signs."""

from typing import Annotated

import torch
from pydantic import Field

from .base import MergeMethod, Params


class SceParams(Params):
    select_topk: Annotated[float, Field(ge=0, le=1)] = 1.0
    int8_mask: bool = False  # accepted for mergekit configs; no numerical effect


VARIANCE_CHUNK = 1 << 20  # elements per Welford pass: its float64 temporaries stay ~32 MB, not 4x the tensor


def population_variance(d: torch.Tensor) -> torch.Tensor:
    """torch.var(d, dim=0, unbiased=False), bit for bit, in about half the time on CPU.

    On CPU torch reduces a leading dim with Welford's update in float64 (for float32 / bf16 / fp16 input):
    the same updates, run as whole-tensor ops over the few models, give the same float64 values and so the
    same rounded result (the top-k cut that follows is sensitive to the last bit). Each position's updates
    are its own, so they run over VARIANCE_CHUNK positions at a time: on a bf16 embedding matrix the float64
    temporaries of one pass would otherwise outweigh the inputs. Elsewhere: torch.var.
    """
    if d.device.type != "cpu" or d.dtype == torch.float64:
        return torch.var(d, dim=0, unbiased=False)
    flat = d.reshape(d.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=d.dtype)
    for start in range(0, flat.shape[1], VARIANCE_CHUNK):
        part = flat[:, start:start + VARIANCE_CHUNK]
        mean = part[0].double()
        m2 = torch.zeros_like(mean)
        for i in range(1, part.shape[0]):
            x = part[i].double()
            delta = x - mean
            mean.add_(delta / (i + 1))
            m2.add_(delta.mul_(x.sub_(mean)))
        out[start:start + VARIANCE_CHUNK] = m2.div_(part.shape[0])
    return out.view(d.shape[1:])


def sce(base, tensors, models, p: SceParams, generator) -> torch.Tensor:
    """theta = base + sum_i eta_i m_i d_i / max(sum_i eta_i m_i, 1e-6).

    Select: keep the top `select_topk` fraction of positions by variance of d across models (among
    positions whose variance is non-zero). eta_i = mean(d_i^2) / sum_k mean(d_k^2) (uniform if the
    sum < 1e-6). m_i = [sign d_i == sign sum_k d_k] with 0 -> +1 for the sum.
    """
    if not tensors:
        return base
    d = torch.stack([t - base for t in tensors])
    if p.select_topk < 1:
        var = population_variance(d)
        k = int(torch.count_nonzero(var) * p.select_topk)
        select = torch.zeros(var.numel(), dtype=d.dtype, device=d.device)
        if k > 0:
            # mergekit's topk, so equal variances at the cut resolve alike; unsorted: the selected set is the
            # same (the sort runs after the selection), at a third of the time on CPU.
            select[torch.topk(var.reshape(-1), k, sorted=False).indices] = 1
        d = d * select.view_as(var)
    majority = torch.where(d.sum(dim=0) >= 0, 1.0, -1.0).to(d.dtype)
    mask = d.sign() == majority
    energy = d.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    eta = eta.view(-1, *[1] * base.dim()) * mask
    return base + (d * eta).sum(dim=0) / eta.sum(dim=0).clamp(min=1e-6)



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="sce", fn=sce, params=SceParams, base="required", reference="arxiv.org/abs/2408.07990",
    ),
]
