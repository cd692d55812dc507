"""Sparsifiers of a task vector (delta = model - base), as in mergekit's sparsify.py.

The random ones (DARE's bernoulli, DELLA's magprune) drop and rescale through kernels/merge.py's drop_rescale:
a fused Triton kernel on CUDA, elsewhere its PyTorch reference (these same ops, bit for bit).

Each returns the delta with dropped entries zeroed, optionally rescaled:
- rescale None:        no rescale
- rescale "l1":        survivors * ||delta||_1 / ||mask * delta||_1 (mergekit's default for DARE / DELLA)
- rescale "inverse_p": survivors / keep probability (the DARE paper's 1 / (1 - p); DELLA's 1 / p_i)
"""

from typing import Literal

import torch

from branchmerge.kernels.merge import drop_rescale

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


def _uniforms(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 uniforms in [0, 1): an entry is kept where u < its keep probability (a Bernoulli draw, 3x faster
    than torch.bernoulli on CPU). Drawn on the generator's device (CPU for tensor_generator) and moved: the same
    seed then gives the same mask whether the merge runs on CPU or GPU."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def argsort_magnitudes(w: torch.Tensor, *, descending: bool, dim: int = -1) -> torch.Tensor:
    """torch.argsort(w, dim, descending) of magnitudes (w >= 0, no NaN): the same permutation, 1.5x faster on CPU.

    Non-negative float32 values order as their bit patterns read as int32, so torch's CPU sort (std::sort)
    makes the same comparisons with the same outcomes and leaves equal values in the same, algorithm-given
    order mergekit's argsort leaves them in. Ascending runs as a descending sort of the negated patterns: an
    ascending integer sort takes torch's radix path, which orders equal values differently.
    """
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return torch.argsort(w, dim=dim, descending=descending)
    bits = w.view(torch.int32)
    return torch.argsort(bits if descending else -bits, dim=dim, descending=True)


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
    mask[argsort_magnitudes(_abs_flat(delta), descending=True)[:k]] = 1
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
    mask[argsort_magnitudes(_abs_flat(delta), descending=False)[n_bot : n_bot + target]] = 1  # mergekit's ties
    return rescaled(delta, mask.view_as(delta), rescale, density)


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: Rescale = None) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return delta
    # Draw in float32 whatever the compute dtype, so a seed gives the same mask in every dtype.
    uniforms = _uniforms(delta.shape, generator, delta.device)
    return drop_rescale(delta.unsqueeze(0), density, uniforms=uniforms.unsqueeze(0), rescale=rescale)[0]


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
    order = argsort_magnitudes(rows.abs().float(), descending=False, dim=1)
    n = order.shape[1]
    positions = torch.arange(n, device=order.device, dtype=torch.float32).expand(order.shape)
    ranks = torch.empty(order.shape, device=order.device).scatter_(1, order, positions)
    # Each row's ranks are 0..n-1, so mergekit's (rank - min) / (max - min) is rank / (n - 1); a one-element
    # row has no spread (mergekit divides 0/0 there): it gets the mean probability, density.
    if n > 1:
        probs = ranks.mul_(2 * epsilon / (n - 1)).add_(density - epsilon)
    else:
        probs = ranks.fill_(density)
    uniforms = _uniforms(probs.shape, generator, probs.device)
    kept = drop_rescale(rows.unsqueeze(0), probs.unsqueeze(0), uniforms=uniforms.unsqueeze(0), rescale=rescale)[0]
    return kept.to(delta.dtype).reshape(shape)
