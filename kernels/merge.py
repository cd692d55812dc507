"""Merge kernels: the per-tensor hot paths of the task-arithmetic family (TIES / DARE / DELLA).

Inputs are a stack of deltas `[n_models, *shape]` (delta_i = theta_i - base, one tensor of one model per row)
and per-model weights. Two ops, each as `<op>_reference` (PyTorch: defines the result), `<op>_triton` (the
kernel) and the dispatcher `<op>`; models/merging/methods/ calls the dispatchers:

- `drop_rescale`: DARE / DELLA drop (methods/sparsify.py's bernoulli and della_magprune). The caller passes
  uniforms (`uniforms`: keep where u < p; drawn on the CPU generator, so a seed gives the same mask on any
  device) or the draws themselves (`mask`); the kernel fuses keep + rescale ("l1": survivors * ||delta||_1 /
  ||kept||_1; "inverse_p": survivors / p).
- `sign_elect_disjoint_mean`: the fused combine, one pass over the stack: w_i * delta_i, elected sign
  s = sgn(sum_i w_i delta_i) (0 -> +1), m_i = [sgn(w_i delta_i) == s] (zeros never vote),
  sum_i m_i w_i delta_i, optional divide by sum_i m_i w_i (a zero divisor counts as 1), * lambda, + base.
  consensus=False is plain task arithmetic (m_i = 1, divisor sum_i w_i).

No TIES trim kernel: mergekit keeps exactly k = int(density * n) entries, choosing among equal magnitudes at the
cut by its argsort's order; a threshold kernel keeps every tie (more than k), so it would merge other values.

Dispatch: BRANCHMERGE_KERNELS=reference|triton forces one; unset (or `auto`): Triton when the tensors are on
CUDA, triton imports and the dtype is float32 / bfloat16 / float16; the reference otherwise (CPU, float64).
Forcing `triton` on CPU tensors needs TRITON_INTERPRET=1 set before this module is imported.

Numerics: the kernels compute in float32 and round to the storage dtype wherever the reference stores an
intermediate (w_i * delta_i, each sum, the quotient, the product with lambda, the result), add models in
config order, divide correctly rounded (div_rn) and launch with FMA contraction off. The masking and the
combine then give the reference's bits (float32 in the CPU interpreter; on CUDA up to torch's own reduction
order). The L1 norms are block partial sums (fixed order, no atomics) added up in torch: equal to the
reference's norms within float32 rounding, so "l1" outputs agree to ~1e-7 relative, not bit for bit.
"""

# String annotations: `tl.constexpr` is only read by triton.jit (which accepts strings), so this module
# imports without triton and the references still work.
from __future__ import annotations

from typing import Literal

import torch

# Re-exported: tests and callers ask this module which backend runs.
from branchmerge.kernels.dispatch import ENV, TRITON_DTYPES, Backend, backend, interpreted, jit, tl, triton, triton_available  # noqa: F401

Rescale = Literal["l1", "inverse_p"] | None
L1_EPS = 1e-7  # mergekit's: below it on either side, nothing to match and the masked delta stays as is
BLOCK = 1024
NUM_WARPS = 4

# How a kernel decides which entries survive (constexpr MODE).
KEEP_MASK, KEEP_UNIFORM = 0, 1
# How survivors are rescaled (constexpr RESCALE).
_RESCALE_CODE = {None: 0, "l1": 1, "inverse_p": 2}


# ----------------------------------------------------------------------------- argument normalisation

def _per_model(values, n: int, what: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A float, n floats or a 1-D tensor of n values -> tensor [n]."""
    t = torch.as_tensor(values, dtype=dtype, device=device)
    t = t.expand(n) if t.dim() == 0 else t
    if t.shape != (n,):
        raise ValueError(f"{what}: expected a float or {n} values (one per model), got shape {tuple(t.shape)}")
    return t


def _keep_prob(keep_prob, deltas: torch.Tensor) -> list[float] | torch.Tensor:
    """Per-model probabilities as Python floats (what sparsify.py divides by), or per entry as a tensor."""
    n = deltas.shape[0]
    if isinstance(keep_prob, torch.Tensor) and keep_prob.dim() > 1:
        if keep_prob.shape != deltas.shape:
            raise ValueError(f"keep_prob: per-entry probabilities must have the deltas' shape "
                             f"{tuple(deltas.shape)}, got {tuple(keep_prob.shape)}")
        return keep_prob
    return _per_model(keep_prob, n, "keep_prob", torch.float64, "cpu").tolist()


def _check_rescale(rescale: Rescale, keep_prob) -> None:
    if rescale not in _RESCALE_CODE:
        raise ValueError(f"rescale={rescale!r}: expected None, 'l1' or 'inverse_p'")
    if rescale == "inverse_p" and keep_prob is None:
        raise ValueError("rescale='inverse_p' divides by the keep probability: pass keep_prob")


def _keep_args(deltas, mask, uniforms, keep_prob):
    """(mode, draws) from exactly one of mask / uniforms, shapes checked."""
    given = [name for name, v in (("mask", mask), ("uniforms", uniforms)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of mask, uniforms; got {given or 'none'}")
    for name, v in (("mask", mask), ("uniforms", uniforms)):
        if v is not None and v.shape != deltas.shape:
            raise ValueError(f"{name}: expected the deltas' shape {tuple(deltas.shape)}, got {tuple(v.shape)}")
    if uniforms is not None and keep_prob is None:
        raise ValueError("uniforms are kept where u < keep_prob: pass keep_prob")
    if mask is not None:
        return KEEP_MASK, mask
    return KEEP_UNIFORM, uniforms


# ----------------------------------------------------------------------------- drop + rescale: reference

def _mask_rescale_reference(deltas, mode, draws, keep_prob, rescale):
    """Per model, the same ops as models/merging/methods/sparsify.py's `rescaled` on that model's delta."""
    probs = None if keep_prob is None else _keep_prob(keep_prob, deltas)
    out = torch.empty_like(deltas)
    for i, delta in enumerate(deltas):
        if mode == KEEP_MASK:
            keep = draws[i] != 0
        else:
            keep = draws[i] < probs[i]
        masked = delta * keep
        if rescale == "inverse_p":
            masked = masked / probs[i]
        elif rescale == "l1":
            before = delta.abs().sum()
            after = masked.abs().sum()
            if not (before < L1_EPS or after < L1_EPS):
                masked = masked * (before / after)
        out[i] = masked
    return out


def drop_rescale_reference(deltas, keep_prob=None, *, mask=None, uniforms=None, rescale: Rescale = "l1"):
    """DARE / DELLA drop of each model's delta, then rescale. See `drop_rescale`."""
    _check_rescale(rescale, keep_prob)
    mode, draws = _keep_args(deltas, mask, uniforms, keep_prob)
    return _mask_rescale_reference(deltas, mode, draws, keep_prob, rescale)


# ----------------------------------------------------------------------------- drop + rescale: Triton

@jit
def _rnd(x, DT: tl.constexpr):
    """Round float32 to the storage dtype and back: where the reference stores an intermediate."""
    return x.to(DT).to(tl.float32)


@jit
def _masked_block(d_ptr, draw_ptr, p_ptr, row, start, offs, inb,
                  MODE: tl.constexpr, PER_ENTRY_P: tl.constexpr):
    """(delta, delta * keep) of one block of one model's row, in float32."""
    d = tl.load(d_ptr + start + offs, mask=inb, other=0.0).to(tl.float32)
    if MODE == 0:  # KEEP_MASK
        keep = tl.load(draw_ptr + start + offs, mask=inb, other=0) != 0
    else:  # KEEP_UNIFORM
        u = tl.load(draw_ptr + start + offs, mask=inb, other=1.0)
        if PER_ENTRY_P:
            p = tl.load(p_ptr + start + offs, mask=inb, other=0.0)
        else:
            p = tl.load(p_ptr + row)
        keep = u < p
    return d, d * keep.to(tl.float32)  # a product, as the reference's: -0.0 and inf * 0 = nan alike


@jit
def _l1_partials_kernel(d_ptr, draw_ptr, p_ptr, part_ptr, numel, n_blocks,
                        MODE: tl.constexpr, PER_ENTRY_P: tl.constexpr, BLOCK: tl.constexpr):
    """part[row, 0, block] = sum |delta|, part[row, 1, block] = sum |delta * keep| over one block."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    start = row.to(tl.int64) * numel
    d, masked = _masked_block(d_ptr, draw_ptr, p_ptr, row, start, offs, inb, MODE, PER_ENTRY_P)
    out = part_ptr + row.to(tl.int64) * 2 * n_blocks + pid
    tl.store(out, tl.sum(tl.abs(d), axis=0))
    tl.store(out + n_blocks, tl.sum(tl.abs(masked), axis=0))


@jit
def _mask_rescale_kernel(d_ptr, draw_ptr, p_ptr, scale_ptr, out_ptr, numel,
                         MODE: tl.constexpr, RESCALE: tl.constexpr, PER_ENTRY_P: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    start = row.to(tl.int64) * numel
    d, out = _masked_block(d_ptr, draw_ptr, p_ptr, row, start, offs, inb, MODE, PER_ENTRY_P)
    if RESCALE == 1:  # l1: one scale per model (1 where the norms were below L1_EPS)
        out = out * tl.load(scale_ptr + row)
    elif RESCALE == 2:  # inverse_p
        if PER_ENTRY_P:
            p = tl.load(p_ptr + start + offs, mask=inb, other=1.0)
        else:
            p = tl.load(p_ptr + row)
        out = tl.math.div_rn(out, p)
    tl.store(out_ptr + start + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


def _mask_rescale_triton(deltas, mode, draws, keep_prob, rescale):
    shape, n = deltas.shape, deltas.shape[0]
    d = deltas.reshape(n, -1).contiguous()
    numel, dev = d.shape[1], d.device
    out = torch.empty_like(d)
    if n == 0 or numel == 0:
        return out.reshape(shape)
    per_entry = isinstance(keep_prob, torch.Tensor) and keep_prob.dim() > 1
    if keep_prob is None:
        p = d.new_ones(n, dtype=torch.float32)
    elif per_entry:
        p = keep_prob.reshape(n, -1).to(device=dev, dtype=torch.float32).contiguous()
    else:
        p = torch.tensor(_keep_prob(keep_prob, deltas), dtype=torch.float32, device=dev)
    draw = draws.reshape(n, -1).to(dev).contiguous()
    draw = draw.view(torch.uint8) if draw.dtype == torch.bool else draw
    draw = draw.float() if mode == KEEP_UNIFORM else draw
    n_blocks = triton.cdiv(numel, BLOCK)
    scale = p.new_ones(n)
    if rescale == "l1":
        part = torch.empty(n, 2, n_blocks, dtype=torch.float32, device=dev)
        _l1_partials_kernel[(n_blocks, n)](d, draw, p, part, numel, n_blocks, MODE=mode,
                                           PER_ENTRY_P=per_entry, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                           enable_fp_fusion=False)
        norms = part.sum(dim=2).to(d.dtype)  # [n, 2]: ||delta||_1, ||kept||_1 as the reference stores them
        before, after = norms[:, 0], norms[:, 1]
        scale = torch.where((before < L1_EPS) | (after < L1_EPS), torch.ones_like(before), before / after).float()
    _mask_rescale_kernel[(n_blocks, n)](d, draw, p, scale, out, numel, MODE=mode,
                                        RESCALE=_RESCALE_CODE[rescale], PER_ENTRY_P=per_entry, BLOCK=BLOCK,
                                        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out.reshape(shape)


def drop_rescale_triton(deltas, keep_prob=None, *, mask=None, uniforms=None, rescale: Rescale = "l1"):
    _check_rescale(rescale, keep_prob)
    mode, draws = _keep_args(deltas, mask, uniforms, keep_prob)
    return _mask_rescale_triton(deltas, mode, draws, keep_prob, rescale)


def drop_rescale(deltas: torch.Tensor, keep_prob=None, *, mask: torch.Tensor | None = None,
                 uniforms: torch.Tensor | None = None, rescale: Rescale = "l1") -> torch.Tensor:
    """DARE / DELLA: drop entries of each model's delta, rescale the survivors.

    deltas [n_models, *shape]; exactly one of `mask` (the Bernoulli draws, non-zero = keep) or `uniforms`
    (draws in [0, 1): keep where u < keep_prob), both shaped like deltas. keep_prob: a float, one per model,
    or per entry ([n_models, *shape], DELLA); needed for `uniforms` and rescale="inverse_p".
    rescale: "l1" (mergekit's default), "inverse_p" (the papers' 1/p) or None.
    """
    impl = drop_rescale_triton if backend(deltas) == "triton" else drop_rescale_reference
    return impl(deltas, keep_prob, mask=mask, uniforms=uniforms, rescale=rescale)


# ----------------------------------------------------------------------------- sign election + disjoint mean

def sign_elect_disjoint_mean_reference(base, deltas, weights, *, consensus=True, normalize=False, lambda_=1.0,
                                       overwrite_deltas=False):
    """Steps 2-5 of the task-arithmetic recipe (the combine of models/merging/task_arithmetic.py)."""
    weights = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
    weights = weights.view(-1, *[1] * base.dim())
    deltas = deltas.mul_(weights) if overwrite_deltas else deltas * weights
    if consensus:
        majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        # sign 0 never equals +-1: dropped entries do not vote. As floats: float * float is vectorised,
        # float * bool is not (half the combine's time); x * 1.0 and x * 0.0 are the same values either way.
        mask = (deltas.sign() == majority).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed


@jit
def _combine_kernel(base_ptr, d_ptr, w_ptr, out_ptr, numel, lam, divisor_all,
                    N: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """One block of the output: every model's block is read (the second loop re-reads it from cache)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    DT: tl.constexpr = d_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], dtype=tl.float32)
    row = d_ptr + offs  # stepped by numel per model: 64-bit pointer arithmetic, no int32 overflow
    for i in tl.static_range(N):  # in config order, like torch's sum over the stacked dim
        w = tl.load(w_ptr + i).to(tl.float32)
        d = tl.load(row, mask=inb, other=0.0).to(tl.float32)
        total += _rnd(w * d, DT)
        row += numel
    if CONSENSUS:
        positive = _rnd(total, DT) >= 0  # elected sign +1 (a zero sum counts as +), else -1 (nan too)
        mixed = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        row = d_ptr + offs
        for i in tl.static_range(N):
            w = tl.load(w_ptr + i).to(tl.float32)
            d = tl.load(row, mask=inb, other=0.0).to(tl.float32)
            row += numel
            wd = _rnd(w * d, DT)
            agree = tl.where(positive, wd > 0, wd < 0).to(tl.float32)
            mixed += wd * agree
            divisor += w * agree
        mixed = _rnd(mixed, DT)
        divisor = _rnd(divisor, DT)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    else:
        mixed = _rnd(total, DT)
        divisor = divisor_all
    if NORMALIZE:
        mixed = _rnd(tl.math.div_rn(mixed, divisor), DT)
    mixed = _rnd(mixed * lam, DT)  # * 1.0 is exact: no branch needed for the reference's `if lambda != 1`
    b = tl.load(base_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (b + mixed).to(out_ptr.dtype.element_ty), mask=inb)


def sign_elect_disjoint_mean_triton(base, deltas, weights, *, consensus=True, normalize=False, lambda_=1.0,
                                    overwrite_deltas=False):
    n = deltas.shape[0]
    if n == 0 or base.numel() == 0:
        return sign_elect_disjoint_mean_reference(base, deltas, weights, consensus=consensus,
                                                  normalize=normalize, lambda_=lambda_)
    if deltas.shape[1:] != base.shape:
        raise ValueError(f"deltas {tuple(deltas.shape)} must stack n tensors shaped like base {tuple(base.shape)}")
    w = _per_model(weights, n, "weights", deltas.dtype, deltas.device)  # rounded to the dtype, as the reference
    divisor_all = 1.0
    if not consensus:  # a scalar: computed as the reference computes it
        total_w = w.sum()
        divisor_all = 1.0 if total_w.abs() < 1e-8 else float(total_w)
    d = deltas.reshape(n, -1).contiguous()
    b = base.reshape(-1).contiguous()
    out = torch.empty(b.shape, dtype=torch.promote_types(base.dtype, deltas.dtype), device=b.device)
    numel = b.numel()
    _combine_kernel[(triton.cdiv(numel, BLOCK),)](b, d, w, out, numel, float(lambda_), divisor_all, N=n,
                                                  CONSENSUS=consensus, NORMALIZE=normalize, BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out.view(base.shape)


def sign_elect_disjoint_mean(base: torch.Tensor, deltas: torch.Tensor, weights, *, consensus: bool = True,
                             normalize: bool = False, lambda_: float = 1.0,
                             overwrite_deltas: bool = False) -> torch.Tensor:
    """The task-arithmetic combine: base + lambda * sum_i m_i w_i delta_i [/ sum_i m_i w_i].

    base [*shape]; deltas [n_models, *shape] (already sparsified); weights: n floats or a tensor [n].
    consensus: TIES sign election (m_i = [sgn(w_i delta_i) == elected sign]); else m_i = 1.
    overwrite_deltas: the reference may weight `deltas` in place (saves one stack-sized buffer); the
    Triton kernel never writes it.
    """
    impl = sign_elect_disjoint_mean_triton if backend(base, deltas) == "triton" else sign_elect_disjoint_mean_reference
    return impl(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                overwrite_deltas=overwrite_deltas)
