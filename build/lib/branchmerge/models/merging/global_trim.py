"""The TIES paper's trim: keep each model's top-`density` deltas over the whole model, not per tensor.

mergekit trims per tensor (every tensor keeps the same fraction); the paper ranks |delta| across all of a
model's parameters at once, so tensors that changed a lot keep more. `ties` offers it as
`parameters: {trim_scope: model}`. Streaming keeps memory at one tensor per model:

1. a histogram of |delta| over the top 16 bits of its float32 bit pattern (monotone in the value for
   non-negative floats, so bins are ordered; 32,641 bins cover 0..inf) finds the bin holding the k-th largest;
2. a second pass counts, per tensor, the entries in higher bins and keeps only the cut bin's values, whose
   sorted order gives the exact threshold.
Each tensor then keeps exactly that many of its largest entries (the per-tensor trim with a per-tensor
density), so the merge itself runs unchanged. Entries equal to the threshold are all kept.
"""

from __future__ import annotations

import torch

N_BINS = (0x7F800000 >> 16) + 1  # +inf's bin is the last


def _abs_delta(model, base, source: str, base_source: str) -> torch.Tensor:
    return (model.get(source).float() - base.get(base_source).float()).abs().reshape(-1)


def _bins(values: torch.Tensor) -> torch.Tensor:
    return (values.view(torch.int32) >> 16).long()


def kept_counts(model, base, tensors: list[tuple[str, str, str]], density: float) -> dict[str, int]:
    """For one model: {output tensor: how many of its |delta| entries are among the model's top `density`}.

    `tensors` lists (output name, this model's source tensor, the base's source tensor), float tensors only.
    """
    hist = torch.zeros(N_BINS, dtype=torch.long)
    total = 0
    for _, src, base_src in tensors:
        d = _abs_delta(model, base, src, base_src)
        hist += torch.bincount(_bins(d), minlength=N_BINS)
        total += d.numel()
    k = int(density * total)
    if k <= 0:
        return {name: 0 for name, _, _ in tensors}
    above = hist.flip(0).cumsum(0).flip(0)  # above[b] = entries in bins >= b
    cut_bin = int((above >= k).nonzero().max())
    need_in_bin = k - (int(above[cut_bin + 1]) if cut_bin + 1 < N_BINS else 0)
    counts, in_bin = {}, {}
    for name, src, base_src in tensors:  # second pass: entries clearly above, and the cut bin's values
        d = _abs_delta(model, base, src, base_src)
        bins = _bins(d)
        counts[name] = int((bins > cut_bin).sum())
        in_bin[name] = d[bins == cut_bin]
    threshold = torch.sort(torch.cat(list(in_bin.values())), descending=True).values[need_in_bin - 1]
    return {name: counts[name] + int((in_bin[name] >= threshold).sum()) for name in counts}
