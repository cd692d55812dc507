"""Arcee Fusion: keep the base except where the model's change is salient (mergekit's `arcee_fusion`).

Follows arcee-ai/mergekit `mergekit/merge_methods/arcee_fusion.py` (DynamicThresholdFusion + _compute_importance):

    delta = theta - theta_b
    KL    = sum_j p log(p / q) over the last dim, p = softmax(theta) + 1e-8, q = softmax(theta_b) + 1e-8
            (one value per output row of a matrix; one scalar for a 1-D tensor)
    s     = |delta| * KL
    mask  = s >= median + 1.5 (Q3 - Q1), quantiles of s (of a 1e6-element sample when s is larger)
    theta = theta_b + delta * mask

Subsampling, where we differ from mergekit: mergekit up to ab58c45 took `torch.randperm(numel)[:1_000_000]`, a
full permutation of numel int64 indices (4.4 GB for a 152k x 3584 embedding) drawn from the global, unseeded
RNG; its 2026 version (0d791e0) draws `torch.randint` indices with replacement, still from the global RNG. We
draw with replacement as well (index memory = the sample size, 8 MB, whatever the tensor), but from the
per-tensor generator, so a merge is reproducible from (seed, tensor name). Sampling with rather than without
replacement changes the quantile estimate's variance by a factor (1 - 1e6/numel) at most, far below the
estimate's own spread; tensors of at most 1e6 elements use every element, exactly as mergekit.
"""

import torch
import torch.nn.functional as F

from .base import MergeMethod

SAMPLE_SIZE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE
QUANTILES = (0.25, 0.5, 0.75)


def importance(x: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|delta| * KL(softmax(x) || softmax(base)) along the last dim, with mergekit's +eps on both softmaxes."""
    p = F.softmax(x, dim=-1).add_(eps)
    ratio = p / F.softmax(base, dim=-1).add_(eps)
    kl = ratio.log_().mul_(p).sum(dim=-1)  # same values as sum(p * log(p / q)): the products commute
    del p, ratio
    return delta.abs().mul_(kl.unsqueeze(-1))


def quantile_sample(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The scores the quartiles are taken from: all of them up to SAMPLE_SIZE, else SAMPLE_SIZE drawn uniformly
    with replacement from `generator` (indices only: no permutation of numel)."""
    flat = scores.reshape(-1)
    if flat.numel() <= SAMPLE_SIZE:
        return flat
    idx = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator, device=generator.device)
    return flat[idx.to(flat.device)]


def threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """median + 1.5 IQR. mergekit indexes the sorted sample at int(q * (n - 1)), which is torch.quantile's
    'lower' interpolation (the default 'linear' would move the threshold). Arithmetic in the scores' dtype."""
    sample = quantile_sample(scores, generator)
    q = torch.tensor(QUANTILES, dtype=torch.float64 if sample.dtype == torch.float64 else torch.float32,
                     device=sample.device)
    q1, median, q3 = torch.quantile(sample.to(q.dtype), q, interpolation="lower").to(scores.dtype)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base, tensors, models, p, generator) -> torch.Tensor:
    x = tensors[0]
    shape = base.shape
    if base.dim() == 0:  # a scalar is a 1-element vector (mergekit's unsqueeze would change its shape)
        base, x = base.reshape(1), x.reshape(1)
    delta = x - base
    scores = importance(x, base, delta)
    mask = scores >= threshold(scores, generator)
    del scores
    # mergekit multiplies by a float32 mask, so a bf16 delta is added to the base in float32: kept, to match it.
    return (base + delta * mask.float()).reshape(shape)



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="arcee_fusion", fn=arcee_fusion, base="required", min_inputs=2, max_inputs=2,
        result_dtype=lambda dtype: torch.promote_types(dtype, torch.float32),
        reference="github.com/arcee-ai/mergekit (merge_methods/arcee_fusion.py)",
    ),
]
