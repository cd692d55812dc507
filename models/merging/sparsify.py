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
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    # mergekit's argsort, not topk / a kthvalue threshold: fine-tuned deltas often hold equal magnitudes at the
    # cut, and only the same call keeps the same ones (bit-equal results). A kthvalue path with an argsort
    # fallback on ties was tried: on SmolLM2 fine-tunes half the trims fell back and it saved nothing.
    mask[torch.argsort(_abs_flat(delta), descending=True)[:k]] = 1
    return rescaled(delta, mask.view_as(delta), rescale, density)


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
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(_abs_flat(delta))[n_bot : n_bot + target]] = 1  # argsort: same tie choice as mergekit
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
