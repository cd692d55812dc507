"""Methods that interpolate by geometry: slerp, nearswap, model_stock (mergekit's formulas)."""

import torch

from .base import MergeMethod, Params


class SlerpParams(Params):
    t: float


# mergekit 0.1.5 takes slerp's norms and dot product in chunks of this many elements; the same chunks give the
# same float32 sums (one pass differs by up to 2.5e-6 on tensors over 1M elements).
SLERP_CHUNK = 1024 * 1024


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation of two whole tensors by the angle between them (flattened), as mergekit 0.1.5's
    slerp computes it: norms, dot product and coefficients in float32 (float64 inputs: float64) whatever the
    inputs' dtype, in SLERP_CHUNK-element chunks; the result in the inputs' dtype.

    Nearly (anti-)parallel tensors (|cos| > dot_threshold) fall back to linear interpolation, where the sin ratio
    is unstable. The threshold is compared in float32: in bfloat16, 0.9995 rounds to 1.0, so identical tensors
    (LayerNorm weights) would take the sin ratio and divide 0 by 0."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor(t, dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    chunks = [slice(start, start + SLERP_CHUNK) for start in range(0, a.shape[1], SLERP_CHUNK)]
    # the norm of the chunks' norms (not the root of a sum of squares): mergekit's order of operations
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, c].to(dtype), dim=1, keepdim=True)
                                                   for c in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, c].to(dtype), dim=1, keepdim=True)
                                                   for c in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # normalise before multiplying: no overflow in the dot product
    dot = torch.stack([((a[:, c].to(dtype) / norm_a) * (b[:, c].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
                       for c in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for c in chunks:
        result[:, c] = coef_a * a[:, c].to(dtype) + coef_b * b[:, c].to(dtype)
    return result.reshape(v0.shape)


def slerp(base, tensors, models, p: SlerpParams, generator) -> torch.Tensor:
    """`t` = 0 gives the base, 1 the other model."""
    return slerp_tensors(p.t, base, tensors[0])


class NearswapParams(Params):
    t: float


def nearswap(base, tensors, models, p: NearswapParams, generator) -> torch.Tensor:
    """Take the other model where it is within ~t of the base: w = clamp(t / |a - b|, 0, 1)."""
    a, b = base, tensors[0]
    # mergekit's (t / |a - b|.clamp(1e-6)).clamp(0, 1) and w b + (1 - w) a, op for op, in two buffers instead of
    # nine fresh temporaries: torch computes `scalar / tensor` as tensor.reciprocal() * scalar, and 1 - w is
    # -w + 1 exactly
    w = (a - b).abs_().clamp_(min=1e-6).reciprocal_().mul_(p.t).clamp_(0, 1)
    out = w * b
    return out.add_(w.neg_().add_(1).mul_(a))


class ModelStockParams(Params):
    filter_wise: bool = False


def model_stock(base, tensors, models, p: ModelStockParams, generator) -> torch.Tensor:
    """t = N c / (1 + (N - 1) c), c = mean pairwise cosine of the deltas; t * mean(theta_i) + (1 - t) * base.

    Per tensor, or per row with `filter_wise`. Where the denominator vanishes there is no finite
    estimate, so that row keeps the base (mergekit).
    """
    shape = base.shape
    if p.filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        b = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [w - b for w in ws]
    lengths = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]  # each offset's norm once, not once a pair
    cos = []
    for i, da in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            norms = lengths[i] * lengths[j]
            cos.append(((da * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    # mergekit's t * (sum(ws) / n) + (1 - t) * base, op for op, in place: sum() starts from 0 (0 + w turns a -0.0
    # into +0.0, so does `w + 0`)
    out = ws[0] + 0
    for w in ws[1:]:
        out.add_(w)
    out.div_(n).mul_(t).add_((1 - t) * b)
    return out.reshape(shape)



# This family's methods; models/merging/registry.py lists every family.
METHODS = [
    MergeMethod(
        name="slerp", fn=slerp, params=SlerpParams, base="required", min_inputs=2, max_inputs=2,
        reference="en.wikipedia.org/wiki/Slerp",
    ),
    MergeMethod(
        name="nearswap", fn=nearswap, params=NearswapParams, base="required", min_inputs=2, max_inputs=2,
        reference="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    MergeMethod(
        name="model_stock", fn=model_stock, params=ModelStockParams, base="required", min_inputs=3,
        reference="arxiv.org/abs/2403.19522",
    ),
]
