"""SCE (FuseChat): select salient positions, weight models by delta energy, erase minority signs."""

from typing import Annotated

import torch
from pydantic import Field

from .registry import MergeMethod, Params, register


class SceParams(Params):
    select_topk: Annotated[float, Field(ge=0, le=1)] = 1.0
    int8_mask: bool = False  # accepted for mergekit configs; no numerical effect


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
        var = torch.var(d, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * p.select_topk)
        select = torch.zeros(var.numel(), dtype=d.dtype, device=d.device)
        if k > 0:
            select[torch.topk(var.reshape(-1), k).indices] = 1
        d = d * select.view_as(var)
    majority = torch.where(d.sum(dim=0) >= 0, 1.0, -1.0).to(d.dtype)
    mask = d.sign() == majority
    energy = d.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    eta = eta.view(-1, *[1] * base.dim()) * mask
    return base + (d * eta).sum(dim=0) / eta.sum(dim=0).clamp(min=1e-6)


register(MergeMethod(
    name="sce", fn=sce, params=SceParams, base="required", reference="arxiv.org/abs/2408.07990",
))
