"""Memory-lean linear cross-entropy / selective log-probs: log softmax(h W^T + b)[target] without the logits.

The LM head's logits [tokens, vocab] are the largest activation of a small model's training step (4096 tokens
x 49152 vocab = 805 MB in float32, and autograd keeps two or three of them). Here they are never materialised
whole, in the forward pass or the backward:

- `chunked_linear_logprobs_reference` (PyTorch, CPU and anywhere): per chunk of `chunk_size` tokens,
  logits = F.linear(h_chunk, W, b) in the inputs' dtype (as the model's lm_head computes them), then float32,
  / temperature, logsumexp and the target's logit; only [N] values are kept (the inputs and the logsumexp are
  saved for backward, not the logits). Backward recomputes each chunk's logits and adds the chunk's
  dlogits @ W into grad_hidden and dlogits^T @ h into a float32 grad_weight (and bias) buffer.
- `chunked_linear_logprobs_triton` (CUDA): a fused forward kernel, per block of tokens and slice of the
  vocabulary, computes the logits tile by tile (tl.dot over hidden tiles, float32 accumulation) and keeps an
  online logsumexp and the target's logit; the slices' partial logsumexps are combined in torch. The backward
  kernel recomputes each (token block, vocab block) tile, forms dlogits = g / T * (onehot - softmax) in
  registers and atomically adds dlogits @ W and dlogits^T @ h into float32 grad buffers (the design of Apple's
  cut-cross-entropy, without its gradient filtering). Nothing [tokens, vocab]-sized is written.
- `chunked_linear_logprobs`: the dispatcher, as in kernels/merge.py: BRANCHMERGE_KERNELS=reference|triton
  forces one; unset (or auto) takes Triton for CUDA tensors of float32 / bfloat16 / float16, the reference
  otherwise. Forcing `triton` on CPU tensors needs TRITON_INTERPRET=1 set before this module is imported.

Semantics. `chunked_linear_logprobs(h [..., H], W [V, H], t [...])` = log softmax((h W^T + b) / T)[t] in
float32, shaped like t; positions where t == ignore_index (-100) give 0 and get no gradient. This is
models.training.grpo.logprobs_from_logits(h @ W^T, t, T) (selective log-probs for RL) without the logits.
`linear_cross_entropy` = F.cross_entropy(h W^T + b, labels, ignore_index, reduction) in float32; "mean" is
over the non-ignored labels and is 0 (not NaN) when there are none. It takes already-shifted pairs (hidden
at position t with the label of position t + 1); `shifted_linear_cross_entropy(h [B, T, H], W, labels [B, T])`
does the shift and equals models.training.sft.masked_lm_loss(lm_head(h), labels).

Numerics. float32 inputs: the reference equals the plain computation to float32 rounding (~1e-6). bfloat16 /
float16 inputs: the reference rounds each chunk's logits to the inputs' dtype, as the model's lm_head does;
the Triton kernel keeps them in float32 (more accurate, so the two differ by the dtype's rounding of the
logits). float32 tl.dot follows torch.backends.cuda.matmul.allow_tf32 (off by default: IEEE float32).
Targets outside [0, V) (other than ignore_index) raise in the reference and give NaN in the Triton path.
"""

# String annotations: `tl.constexpr` is only read by triton.jit, so this module imports without triton.
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

# Re-exported: tests and callers ask this module which backend runs.
from branchmerge.kernels.dispatch import ENV, TRITON_DTYPES, Backend, backend, interpreted, jit, tl, triton, triton_available  # noqa: F401

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100
# Tokens per chunk of the reference: the chunk's float32 logits are chunk_size * V * 4 bytes (256 x 49152 =
# 50 MB) and a few such temporaries live at once, against N * V * 4 bytes (and two or three copies) in full.
DEFAULT_CHUNK_SIZE = 256
# Triton tiles: a program computes [BLOCK_N tokens, BLOCK_V vocab] logits, BLOCK_H hidden units per tl.dot.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
NUM_WARPS = 8
TARGET_PROGRAMS = 512  # forward: split the vocabulary until about this many programs run


# ----------------------------------------------------------------------------- reference: chunked PyTorch

def _chunk_logits(h, weight, bias, temperature):
    """(h W^T + b) in the inputs' dtype -> float32 / temperature: one chunk's [c, V] scaled logits."""
    z = F.linear(h, weight, bias).float()  # .float() of float32 logits is the same tensor: ours to modify
    return z.div_(temperature) if temperature != 1.0 else z


def _forward_reference(hidden, weight, bias, targets, temperature, ignore_index, chunk_size):
    """(log-probs [N], logsumexp [N]) in float32, chunk by chunk."""
    n, v = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= v))
    if bad.any():
        raise ValueError(f"targets: expected class indices in [0, {v}) or ignore_index={ignore_index}, "
                         f"got {targets[bad][:5].tolist()}")
    safe = torch.where(valid, targets, 0)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        z = _chunk_logits(hidden[sl], weight, bias, temperature)
        lse[sl] = torch.logsumexp(z, dim=-1)
        logp[sl] = z.gather(1, safe[sl, None]).squeeze(1) - lse[sl]
        del z
    return logp.masked_fill_(~valid, 0.0), lse


def _backward_reference(grad_out, hidden, weight, bias, targets, lse, temperature, ignore_index, chunk_size,
                        needs):
    """(grad_hidden, grad_weight, grad_bias) of sum(grad_out * logp); None where `needs` says not needed."""
    n = hidden.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    # d logp_i / d z_ij = onehot_ij - p_ij, and z = logits / T: each row's gradient scale is g_i / T.
    g = torch.where(valid, grad_out.float() / temperature, 0.0)
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    # The matmuls in the dtype autograd's would use through the lm_head: autocast's, else the inputs'.
    device = hidden.device.type
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    weight_mm = weight.to(mm_dtype)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        dz = _chunk_logits(hidden[sl], weight, bias, temperature)
        dz.sub_(lse[sl, None]).exp_().mul_(-g[sl, None])  # -g * softmax, in place
        dz.scatter_add_(1, safe[sl, None], g[sl, None])  # + g at the target (0 for ignored rows)
        if need_b:
            grad_b += dz.sum(0)
        d = dz.to(mm_dtype)
        if need_h:
            if mm_dtype == hidden.dtype:
                torch.mm(d, weight_mm, out=grad_h[sl])
            else:
                grad_h[sl] = d @ weight_mm
        if need_w:
            if mm_dtype == torch.float32:
                grad_w.addmm_(d.t(), hidden[sl])  # no [V, H] temporary
            else:
                grad_w += d.t() @ hidden[sl].to(mm_dtype)  # each chunk's product rounded once, summed in float32
        del dz, d
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------- Triton: fused kernels

@jit
def _logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, inv_t,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(x W^T + b) / T for tokens offs_n x vocab offs_v, float32 [BLOCK_N, BLOCK_V] (zeros outside H)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    rows_x = x_ptr + offs_n.to(tl.int64)[:, None] * H
    rows_w = w_ptr + offs_v.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(rows_x + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(rows_w + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@jit
def _lse_forward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N, V, H, inv_t, v_per_split,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token block x one vocabulary slice: running max m, sum exp(z - m) and the target's z (0 if the
    target is outside the slice), stored at [split, token]. No logits leave the registers."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, inv_t,
                         HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + out, m, mask=mask_n)
    tl.store(s_ptr + out, s, mask=mask_n)
    tl.store(tgt_ptr + out, z_tgt, mask=mask_n)


@jit
def _backward_kernel(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, gx_ptr, gw_ptr, gb_ptr, N, V, H, inv_t,
                     HAS_BIAS: tl.constexpr, NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile: recompute z, dz = g (onehot - softmax) with g = grad / T (0 for ignored
    tokens), then grad_x += dz @ W and grad_W += dz^T @ x over the hidden tiles (float32 atomics)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, inv_t,
                     HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    tgt = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    dz = (onehot - tl.exp(z - lse[:, None])) * g[:, None]
    dz = tl.where(mask_v[None, :], dz, 0.0)
    if NEED_GB:
        tl.atomic_add(gb_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    dz_in = dz.to(x_ptr.dtype.element_ty)  # the products in the inputs' dtype, accumulated in float32
    rows_x = offs_n.to(tl.int64)[:, None] * H
    rows_w = offs_v.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        mask_x = mask_n[:, None] & mask_h[None, :]
        mask_w = mask_v[:, None] & mask_h[None, :]
        if NEED_GX:
            w = tl.load(w_ptr + rows_w + offs_h[None, :], mask=mask_w, other=0.0)
            gx = tl.dot(dz_in, w, input_precision=PRECISION)
            tl.atomic_add(gx_ptr + rows_x + offs_h[None, :], gx, mask=mask_x, sem="relaxed")
        if NEED_GW:
            x = tl.load(x_ptr + rows_x + offs_h[None, :], mask=mask_x, other=0.0)
            gw = tl.dot(tl.trans(dz_in), x, input_precision=PRECISION)
            tl.atomic_add(gw_ptr + rows_w + offs_h[None, :], gw, mask=mask_w, sem="relaxed")


def _precision(dtype) -> str:
    """float32 tl.dot: IEEE unless torch's own float32 matmuls use TF32; half inputs: tensor cores (the
    setting only applies to float32 operands)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _forward_triton(hidden, weight, bias, targets, temperature, ignore_index, blocks=(BLOCK_N, BLOCK_V, BLOCK_H),
                    target_programs=TARGET_PROGRAMS):
    n, h = hidden.shape
    v = weight.shape[0]
    bn, bv, bh = blocks
    n_blocks = triton.cdiv(n, bn)
    v_blocks = triton.cdiv(v, bv)
    splits = min(v_blocks, max(1, triton.cdiv(target_programs, n_blocks)))
    v_per_split = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(v, v_per_split)  # every slice non-empty
    part = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    m, s, z_tgt = part
    b = bias if bias is not None else hidden  # a dummy pointer when HAS_BIAS is off
    _lse_forward_kernel[(n_blocks, splits)](
        hidden, weight, b, targets, m, s, z_tgt, n, v, h, 1.0 / temperature, v_per_split,
        HAS_BIAS=bias is not None, PRECISION=_precision(hidden.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        num_warps=NUM_WARPS)
    m_all = m.max(0).values
    lse = m_all + (s * torch.exp(m - m_all)).sum(0).log()
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < v)
    logp = torch.where(in_range, z_tgt.sum(0) - lse, float("nan"))
    return torch.where(valid, logp, 0.0), lse


def _backward_triton(grad_out, hidden, weight, bias, targets, lse, temperature, ignore_index, needs,
                     blocks=(BLOCK_N, BLOCK_V, BLOCK_H)):
    n, h = hidden.shape
    v = weight.shape[0]
    bn, bv, bh = blocks
    need_h, need_w, need_b = needs
    g = torch.where(targets != ignore_index, grad_out.float() / temperature, 0.0).contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    gx = torch.zeros(n, h, **f32) if need_h else g
    gw = torch.zeros(v, h, **f32) if need_w else g
    gb = torch.zeros(v, **f32) if need_b else g
    b = bias if bias is not None else hidden
    _backward_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
        hidden, weight, b, targets, lse, g, gx, gw, gb, n, v, h, 1.0 / temperature,
        HAS_BIAS=bias is not None, NEED_GX=need_h, NEED_GW=need_w, NEED_GB=need_b,
        PRECISION=_precision(hidden.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=NUM_WARPS)
    return (gx.to(hidden.dtype) if need_h else None), (gw if need_w else None), (gb if need_b else None)


# ----------------------------------------------------------------------------- autograd + public API

class _LinearLogprobs(torch.autograd.Function):
    """log softmax((h W^T + b) / T)[t] with the logits recomputed in backward, never saved."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, chunk_size, impl, blocks):
        if impl == "triton":
            logp, lse = _forward_triton(hidden, weight, bias, targets, temperature, ignore_index, blocks)
        else:
            logp, lse = _forward_reference(hidden, weight, bias, targets, temperature, ignore_index, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.args = (temperature, ignore_index, chunk_size, impl, blocks)
        # Autograd runs backward outside autocast: recompute the logits and do the matmuls under the forward's
        # autocast state, as autograd would through an autocast lm_head (bf16 matmuls are ~2x faster on CPU).
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, ignore_index, chunk_size, impl, blocks = ctx.args
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if impl == "triton":
            gh, gw, gb = _backward_triton(grad_out, hidden, weight, bias, targets, lse, temperature,
                                          ignore_index, needs, blocks)
        else:
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                gh, gw, gb = _backward_reference(grad_out, hidden, weight, bias, targets, lse, temperature,
                                                 ignore_index, chunk_size, needs)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, gb, None, None, None, None, None, None


def _apply(impl, hidden, weight, targets, temperature, chunk_size, bias, ignore_index, blocks=None):
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected the hidden states' leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [vocab, {hidden.shape[-1]}] (the lm_head's [V, H]), "
                         f"got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1 tokens, got {chunk_size}")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if impl == "triton":
        h, weight, t = h.contiguous(), weight.contiguous(), t.contiguous()
        bias = None if bias is None else bias.contiguous()
    logp, _ = _LinearLogprobs.apply(h, weight, bias, t, float(temperature), ignore_index, int(chunk_size), impl,
                                    blocks or (BLOCK_N, BLOCK_V, BLOCK_H))
    return logp.view(shape)


def chunked_linear_logprobs_reference(hidden, weight, targets, *, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE,
                                      bias=None, ignore_index=IGNORE_INDEX):
    """The PyTorch path: chunks of `chunk_size` tokens. See `chunked_linear_logprobs`."""
    return _apply("reference", hidden, weight, targets, temperature, chunk_size, bias, ignore_index)


def chunked_linear_logprobs_triton(hidden, weight, targets, *, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE,
                                   bias=None, ignore_index=IGNORE_INDEX, blocks=None):
    """The fused Triton path (chunk_size is unused: tiles of `blocks` = (BLOCK_N, BLOCK_V, BLOCK_H))."""
    if triton is None:
        raise RuntimeError("chunked_linear_logprobs_triton needs triton: pip install -e '.[dev]' (or '.[gpu]')")
    return _apply("triton", hidden, weight, targets, temperature, chunk_size, bias, ignore_index, blocks)


def chunked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                            bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax((hidden @ weight^T + bias) / temperature)[targets], float32, shaped like targets.

    hidden [..., H] and weight [V, H] (the lm_head's) in one dtype; targets [...] (long); positions with
    targets == ignore_index give 0 and no gradient. Differentiable in hidden, weight and bias; the full
    [tokens, V] logits are never materialised (chunk_size tokens at a time in the reference).
    """
    impl = backend(hidden, weight)
    return _apply(impl, hidden, weight, targets, temperature, chunk_size, bias, ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         reduction: Reduction = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight^T + bias, labels, ignore_index=..., reduction=...) in float32, lean.

    The caller passes aligned pairs: hidden[i] predicts labels[i] (shift first for a causal LM, or use
    `shifted_linear_cross_entropy`). "mean" averages over labels != ignore_index and is 0 when there are none;
    "none" returns [...] per-token losses (0 where ignored).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    loss = chunked_linear_logprobs(hidden, weight, labels, chunk_size=chunk_size, bias=bias,
                                   ignore_index=ignore_index).neg()
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def shifted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Next-token loss of a causal LM from its last hidden states [B, T, H] and lm_head weight [V, H]:
    hidden[:, t] predicts labels[:, t + 1]; the mean over labels != ignore_index (0 if none).

    Equals models.training.sft.masked_lm_loss(F.linear(hidden, weight, bias), labels) without the logits. Only the
    positions with a target are projected: in SFT most positions are prompt (about 87% in our data), whose
    logits the loss never reads.
    """
    h, y = hidden[:, :-1], labels[:, 1:]
    targets = y != ignore_index
    return linear_cross_entropy(h[targets], weight, y[targets], bias=bias, ignore_index=ignore_index,
                                reduction="mean", chunk_size=chunk_size)
