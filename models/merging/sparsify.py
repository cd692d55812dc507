"""Sparsifiers of a task vector (delta = model - base), as in mergekit's sparsify.py.

Each returns the delta with dropped entries zeroed, optionally rescaled:
- rescale None:        no rescale
- rescale "l1":        survivors * ||delta||_1 / ||mask * delta||_1 (mergekit's default for DARE / DELLA)
- rescale "inverse_p": survivors / keep probability (the DARE paper's 1 / (1 - p); DELLA's 1 / p_i)
"""

from typing import Literal

import torch

Rescale = Literal["l1", "inverse_p"] | None


def rescaled(
    delta: torch.Tensor, mask: torch.Tensor, rescale: Rescale, keep_prob: float | torch.Tensor
) -> torch.Tensor:
    masked = delta * mask
    if rescale is None:
        return masked
    if rescale == "inverse_p":
        return masked / keep_prob
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:  # nothing to match (mergekit's eps): leave it masked
        return masked
    return masked * (before / after)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Draw on the generator's device (CPU for tensor_generator) and move the mask: the same seed then
    # gives the same mask whether the merge runs on CPU or GPU.
    return torch.bernoulli(probs.to(generator.device), generator=generator).to(probs.device)


def _abs_flat(delta: torch.Tensor) -> torch.Tensor:
    # Rank in float32: exact for bf16/fp16 values, and sort/topk are not implemented for every
    # low-precision dtype on CPU.
    w = delta.abs().reshape(-1)
    return w if w.dtype == torch.float64 else w.float()


def magnitude(delta: torch.Tensor, density: float, rescale: Rescale = None) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density * numel)) largest |delta| of this tensor."""
    if density >= 1:
        return delta
    if delta.numel() == 0 or density <= 0:  # density 0 only from a whole-model trim (trim_scope: model)
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    w = _abs_flat(delta)
    return rescaled(delta, rank_mask(w, w.numel() - k, w.numel(), delta.dtype, top=True).view_as(delta), rescale, density)


def rank_mask(w: torch.Tensor, lo: int, hi: int, dtype: torch.dtype, top: bool = False) -> torch.Tensor:
    """1 at the entries of ranks [lo, hi) in ascending order of `w` (flat), as mergekit's argsort picks them.

    When no run of equal values straddles a cut, that set is unique and two kthvalue selections (linear time)
    find it; otherwise (bf16 deltas often tie at the cut) argsort decides, as in mergekit: bit-equal either way.
    `top`: mergekit takes the top ranks from a descending argsort (TIES), else slices an ascending one.
    """
    n = w.numel()
    mask = torch.zeros(n, dtype=dtype, device=w.device)
    if hi <= lo:
        return mask
    low = torch.kthvalue(w, lo + 1).values if lo > 0 else None
    high = torch.kthvalue(w, hi).values if hi < n else None
    keep = torch.ones(n, dtype=torch.bool, device=w.device)
    if low is not None:
        keep &= w >= low
    if high is not None:
        keep &= w <= high
    unique = (low is None or int((w < low).sum()) == lo) and (high is None or int((w <= high).sum()) == hi)
    if unique and int(keep.sum()) == hi - lo:
        return mask.masked_fill_(keep, 1)
    if top:
        mask[torch.argsort(w, descending=True)[:n - lo]] = 1
    else:
        mask[torch.argsort(w)[lo:hi]] = 1
    return mask


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: Rescale = None) -> torch.Tensor:
    """Breadcrumbs: drop the top `gamma` fraction by |delta| and enough of the bottom to keep `density`.

    Keeps ranks [n_bot, n_bot + int(density * n)) of the ascending order, as mergekit >= 0.1.5 does;
    the older `[n_bot:-n_top]` slice dropped the whole delta when n_top == 0.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)  # shrink the outlier cut when density needs it
    mask = rank_mask(_abs_flat(delta), n_bot, n_bot + target, delta.dtype)  # same tie choice as mergekit
    return rescaled(delta, mask.view_as(delta), rescale, density)


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: Rescale = None) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return delta
    # Draw in float32 whatever the compute dtype, so a seed gives the same mask in every dtype.
    keep = torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    mask = _draw(keep, generator).to(delta.dtype)
    return rescaled(delta, mask, rescale, density)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: Rescale = None
) -> torch.Tensor:
    """DELLA MagPrune: within each row, keep prob = density - eps + 2 eps * normalised rank of |delta|."""
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}")
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    # Ranks and probabilities in float32 whatever the compute dtype: same seed, same mask.
    # rank = inverse of the sorting permutation: one argsort + scatter, same values as mergekit's
    # argsort(argsort(.)) at half the cost.
    order = torch.argsort(rows.abs().float(), dim=1)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).float()
    lo = ranks.min(dim=1, keepdim=True).values
    span = ranks.max(dim=1, keepdim=True).values - lo
    # A one-element row has no rank spread (mergekit divides 0/0 there): give it the mean probability.
    rank_norm = torch.where(span > 0, (ranks - lo) / span.clamp(min=1), torch.full_like(ranks, 0.5))
    probs = (density - epsilon) + 2 * epsilon * rank_norm
    mask = _draw(probs, generator)
    return rescaled(rows, mask.to(rows.dtype), rescale, probs).to(delta.dtype).reshape(shape)
