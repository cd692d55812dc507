"""nuslerp, multislerp, karcher and arcee_fusion against their formulas (reference/merging.md) and mergekit.

Two kinds of reference, neither built from the library's helpers:
- `ref_*`: the formula as merging.md states it, in float64 (compared at atol 1e-6 on float32 results);
- `mk_*`: mergekit's algorithm step by step in plain torch, in the input dtype, re-expressed from
  arcee-ai/mergekit `mergekit/merge_methods/` at nuslerp.py 7683563, multislerp.py e91e230, karcher.py 0f8d594
  (same algorithm as 1abd9e3) and arcee_fusion.py 0d791e0 (randint sample) / ab58c45 (randperm sample):
  compared bit for bit, so a float32 merge gives mergekit's numbers.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import branchmerge.models.merging.methods.arcee_fusion as fusion_module
from branchmerge.models.merging.config import MergeConfigError
from branchmerge.models.merging.registry import METHODS
from branchmerge.models.merging.run import run_merge
from branchmerge.models.merging.values import tensor_generator
from tests.test_merge import rand


@pytest.fixture
def inputs():
    base = rand(12, 20, seed=0)
    xs = [base + 0.1 * rand(12, 20, seed=i) for i in (1, 2, 3)]
    return base, xs


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- references from merging.md

def ref_slerp(t, a, b):
    """Slerp of two vectors by the angle between them, in float64; lerp where sin(angle) ~ 0."""
    a, b = a.double(), b.double()
    cos = float(a @ b / (a.norm() * b.norm()))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    if abs(math.sin(omega)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def ref_nuslerp(t, a, b, flatten, row_wise):
    """Whole tensors (flatten), else each row (vectors along the last dim), else each column (row_wise)."""
    if flatten or a.dim() == 1:
        return ref_slerp(t, a.flatten(), b.flatten()).view(a.shape)
    if row_wise:
        return torch.stack([ref_slerp(t, a[:, j], b[:, j]) for j in range(a.shape[1])], dim=1)
    return torch.stack([ref_slerp(t, a[i], b[i]) for i in range(a.shape[0])])


def ref_multislerp(xs, weights):
    """Unit directions u_i, mean direction m, tangent projections, exp map, scaled by the weighted mean norm."""
    x = [v.double().flatten() for v in xs]
    w = [wi / sum(weights) for wi in weights]
    norms = [float(v.norm()) for v in x]
    u = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(x, norms)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    m = m / m.norm()
    v = sum(wi * (ui - (ui @ m) * m) for wi, ui in zip(w, u))
    vn = float(v.norm())
    direction = m * math.cos(vn) + (v * math.sin(vn) / vn if vn > 0 else 0)
    return (direction * sum(wi * n for wi, n in zip(w, norms))).view(xs[0].shape)


def karcher_gradient(m, xs):
    """sum_i (1/N) log_m(u_i): zero at the Karcher mean m (first-order optimality on the sphere)."""
    g = torch.zeros_like(m)
    for x in xs:
        u = x.double().flatten() / x.double().norm()
        cos = float((u @ m).clamp(-1, 1))
        theta = math.acos(cos)
        if theta > 0:
            g += theta / math.sin(theta) * (u - cos * m) / len(xs)
    return g


def ref_fusion(base, x, sample=None):
    """merging.md: per-row KL of (softmax + 1e-8)'s, s = |delta| KL, mask = s >= median + 1.5 IQR."""
    delta = x - base
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # 1-D: one scalar
    s = delta.abs() * kl
    flat = s.flatten() if sample is None else s.flatten()[sample]
    ordered = flat.sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return base + delta * (s >= median + 1.5 * (q3 - q1)).float()


# ----------------------------------------------------------------------------- mergekit, step by step

def mk_nuslerp(t, v0, v1, dim, flatten, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.view(-1), v1.view(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos(torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(theta)
    lerp_here = (sin.abs() < eps).squeeze()
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out[lerp_here] = (1 - t) * v0[lerp_here] + t * v1[lerp_here]
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.view(shape)


def mk_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    x = torch.stack(xs)
    if base is not None:
        x = x - base
    flat = x.view(len(xs), -1)
    w = torch.tensor(weights, dtype=x.dtype)
    if normalize:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    u = flat / (norms + eps)
    m = (u * w.view(-1, 1)).sum(0)
    m = m / torch.norm(m)
    v = ((u - (u * m).sum(-1, keepdim=True) * m) * w.view(-1, 1)).sum(0)
    vn = torch.norm(v) + eps
    out = ((m * torch.cos(vn) + v * (torch.sin(vn) / vn)) * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


def mk_karcher(xs, max_iter=10, tol=1e-5):
    alpha = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.norm(x.float()) for x in xs]
    units = [(x / n).to(x.dtype) if n.item() != 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    # mergekit 0.1.5 keeps the norms as float32 tensors, so the final scale is summed in float32
    norms = [n if n.item() != 0 else torch.zeros(()) for n in norms]
    keep = [i for i, n in enumerate(norms) if n.item() > tol]
    a = [alpha[i] / sum(alpha[i] for i in keep) for i in keep]
    u = [units[i] for i in keep]
    m = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        m += ai * ui
    mn = torch.linalg.norm(m.float()).item()
    m = u[0].clone() if mn < tol else (m / mn).to(m.dtype)
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for ai, ui in zip(a, u):
            c = torch.clamp(torch.dot(m.flatten(), ui.flatten()), -1.0, 1.0)
            th = torch.arccos(c)
            if th.item() >= tol:
                g += ai * (th / torch.sin(th)) * (ui - c * m)
        gn = torch.linalg.norm(g.float())
        if gn.item() < tol:
            break
        m = (torch.cos(gn) * m + torch.sin(gn) * (g / gn)).to(m.dtype)
        if torch.linalg.norm(m.float()).item() > tol:
            m = (m / torch.linalg.norm(m.float())).to(m.dtype)
    return sum(ai * n for ai, n in zip(alpha, norms)) * m


# ----------------------------------------------------------------------------- registry

def test_registered_with_mergekit_names_parameters_and_defaults():
    for name in ("nuslerp", "multislerp", "karcher", "arcee_fusion"):
        assert name in METHODS
    nu = METHODS["nuslerp"]
    assert nu.params().nuslerp_flatten is True and nu.params().nuslerp_row_wise is False
    assert nu.model_names() == ["weight"] and nu.base == "optional" and nu.models_besides_base == 2
    ms = METHODS["multislerp"]
    assert ms.params().normalize_weights is True and ms.params().eps == 1e-8 and ms.model_names() == ["weight"]
    assert ms.base == "optional"
    ka = METHODS["karcher"]
    assert ka.params().max_iter == 10 and ka.params().tol == 1e-5 and ka.model_names() == [] and ka.base == "ignored"
    af = METHODS["arcee_fusion"]
    assert af.global_names() == [] and af.model_names() == [] and af.base == "required"
    assert (af.min_inputs, af.max_inputs) == (2, 2)


# ----------------------------------------------------------------------------- nuslerp

NUSLERP_MODES = [(True, False), (False, False), (False, True)]  # (nuslerp_flatten, nuslerp_row_wise)


@pytest.mark.parametrize("flatten,row_wise", NUSLERP_MODES)
def test_nuslerp_slerps_the_deltas(inputs, flatten, row_wise):
    base, xs = inputs
    a, b = xs[0], xs[1]
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out = METHODS["nuslerp"](base, [a, b], models=[{"weight": 1.0}, {"weight": 3.0}], params=params)
    close(out, base.double() + ref_nuslerp(0.75, a - base, b - base, flatten, row_wise))
    expected = base + mk_nuslerp(0.75, a - base, b - base, 0 if row_wise else -1, flatten)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("flatten,row_wise", NUSLERP_MODES)
def test_nuslerp_without_base_slerps_the_models(inputs, flatten, row_wise):
    """mergekit's base-less form (the registry always passes a base; the function takes None too)."""
    _, xs = inputs
    p = METHODS["nuslerp"].params(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    models = [METHODS["nuslerp"].model_params(weight=w) for w in (0.4, 0.6)]
    out = METHODS["nuslerp"].fn(None, xs[:2], models, p, None)
    close(out, ref_nuslerp(0.6, xs[0], xs[1], flatten, row_wise))
    assert torch.equal(out, mk_nuslerp(0.6, xs[0], xs[1], 0 if row_wise else -1, flatten))


def test_nuslerp_weights_summing_to_zero_take_t_half(inputs):
    base, xs = inputs
    out = METHODS["nuslerp"](base, xs[:2], models=[{"weight": 1.0}, {"weight": -1.0}])
    close(out, base.double() + ref_nuslerp(0.5, xs[0] - base, xs[1] - base, True, False))


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_parallel_and_antiparallel_deltas_lerp(flatten):
    base = torch.arange(16.0).view(4, 4)  # integers: the deltas below come out exact
    d = torch.full((4, 4), 0.5)
    models = [{"weight": 1.0}, {"weight": 3.0}]
    params = {"nuslerp_flatten": flatten}
    out = METHODS["nuslerp"](base, [base + d, base + 2 * d], models=models, params=params)
    close(out, base + 0.25 * d + 0.75 * 2 * d)
    # exactly antiparallel: lerp (mergekit in float64); mergekit in float32 misses the case (sin(fl(pi)) = -8.7e-8)
    out = METHODS["nuslerp"](base, [base + d, base - d], models=models, params=params)
    close(out, base + 0.25 * d - 0.75 * d)
    assert not torch.allclose(base + mk_nuslerp(0.75, d, -d, -1, flatten), out)


def test_nuslerp_zero_delta_follows_mergekit():
    """A zero delta has no direction: mergekit's unit vector is 0, the angle pi/2, so the result is
    base + sin(t pi / 2) * delta_b (not a lerp)."""
    base, b = rand(6, 8, seed=4), rand(6, 8, seed=5)
    out = METHODS["nuslerp"](base, [base.clone(), b], models=[{"weight": 1.0}, {"weight": 1.0}])
    close(out, base + math.sin(0.5 * math.pi / 2) * (b - base))
    assert torch.equal(out, base + mk_nuslerp(0.5, torch.zeros_like(base), b - base, -1, True))


def test_nuslerp_1d_tensors():
    base, a, b = rand(32, seed=1), rand(32, seed=2), rand(32, seed=3)
    for flatten, row_wise in NUSLERP_MODES:
        out = METHODS["nuslerp"](base, [a, b], models=[{"weight": 2.0}, {"weight": 1.0}],
                                 params={"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise})
        close(out, base.double() + ref_slerp(1 / 3, a - base, b - base))


# ----------------------------------------------------------------------------- multislerp

W3 = [1.0, 0.5, 2.0]


def test_multislerp_on_deltas(inputs):
    base, xs = inputs
    out = METHODS["multislerp"](base, xs, models=[{"weight": w} for w in W3])
    close(out, base.double() + ref_multislerp([x - base for x in xs], W3))
    assert torch.equal(out, mk_multislerp(xs, W3, base=base))


def test_multislerp_without_base_and_unnormalised_weights(inputs):
    _, xs = inputs
    ms = METHODS["multislerp"]
    models = [ms.model_params(weight=w) for w in W3]
    out = ms.fn(None, xs, models, ms.params(), None)
    close(out, ref_multislerp(xs, W3))
    assert torch.equal(out, mk_multislerp(xs, W3))
    raw = ms.fn(None, xs, models, ms.params(normalize_weights=False), None)
    assert torch.equal(raw, mk_multislerp(xs, W3, normalize=False))


def test_multislerp_two_equal_norms_equal_weights_is_the_slerp_midpoint():
    a = rand(40, seed=1)
    b = rand(40, seed=2)
    b = b * a.norm() / b.norm()
    out = METHODS["multislerp"].fn(None, [a, b], [METHODS["multislerp"].model_params(weight=1.0)] * 2,
                                   METHODS["multislerp"].params(), None)
    close(out, ref_slerp(0.5, a, b))


def test_multislerp_zero_delta_and_1d(inputs):
    base = rand(24, seed=7)
    xs = [base.clone(), base + rand(24, seed=8), base + rand(24, seed=9)]  # the first delta is zero
    out = METHODS["multislerp"](base, xs, models=[{"weight": w} for w in W3])
    close(out, base.double() + ref_multislerp([x - base for x in xs], W3))


def test_multislerp_antipodal_inputs():
    base, d = torch.zeros(10), rand(10, seed=3)
    out = METHODS["multislerp"](base, [d, -d], models=[{"weight": 1.0}, {"weight": 1.0}])
    close(out, torch.zeros(10))  # zero mean direction, two inputs: lerp (mergekit)
    with pytest.raises(ValueError, match="weighted sum of the unit directions is zero"):
        METHODS["multislerp"](base, [d, -d, torch.zeros(10)], models=[{"weight": 1.0}] * 3)


def test_multislerp_rejects_weights_summing_to_zero(inputs):
    base, xs = inputs
    with pytest.raises(ValueError, match="weights sum to 0"):
        METHODS["multislerp"](base, xs[:2], models=[{"weight": 1.0}, {"weight": -1.0}])


# ----------------------------------------------------------------------------- karcher

def test_karcher_two_tensors_is_the_geodesic_midpoint(inputs):
    _, xs = inputs
    a, b = xs[0], 2 * xs[1]
    out = METHODS["karcher"](None, [a, b])
    ua, ub = a.double() / a.double().norm(), b.double() / b.double().norm()
    mid = (ua + ub) / (ua + ub).norm()
    close(out, mid * (a.double().norm() + b.double().norm()) / 2)


@pytest.mark.parametrize("shape", [(12, 20), (50,)])
def test_karcher_is_the_riemannian_mean(shape):
    base = rand(*shape, seed=0)
    xs = [base + 0.8 * rand(*shape, seed=i) for i in (1, 2, 3, 4)]
    out = METHODS["karcher"](None, xs)
    m = out.double().flatten() / out.double().norm()
    assert karcher_gradient(m, xs).norm() < 1e-5
    close(out.norm(), sum(x.double().norm() for x in xs) / 4)
    assert torch.equal(out, mk_karcher(xs))


def test_karcher_parameters(inputs):
    _, xs = inputs
    start = sum(x.double() / x.double().norm() for x in xs)
    out = METHODS["karcher"](None, xs, params={"max_iter": 0})  # no step: the normalised mean direction
    close(out, start / start.norm() * sum(x.double().norm() for x in xs) / 3)
    assert torch.equal(METHODS["karcher"](None, xs, params={"max_iter": 3, "tol": 1e-3}),
                       mk_karcher(xs, max_iter=3, tol=1e-3))


def test_karcher_zero_tensors(inputs):
    _, xs = inputs
    zero = torch.zeros_like(xs[0])
    assert torch.equal(METHODS["karcher"](None, [zero, zero]), zero)
    out = METHODS["karcher"](None, [xs[0], xs[1], zero])  # no direction from the zero tensor; its 1/3 in the scale
    m = out.double().flatten() / out.double().norm()
    assert karcher_gradient(m, xs[:2]).norm() < 1e-5
    close(out.norm(), (xs[0].double().norm() + xs[1].double().norm()) / 3)
    assert torch.equal(out, mk_karcher([xs[0], xs[1], zero]))


# ----------------------------------------------------------------------------- arcee_fusion

@pytest.mark.parametrize("shape", [(16, 24), (40,), (3, 5, 7)])
def test_arcee_fusion_formula(shape):
    base = rand(*shape, seed=0)
    x = base + 0.2 * rand(*shape, seed=1) * (rand(*shape, seed=2) > 1).float()  # sparse, salient changes
    out = METHODS["arcee_fusion"](base, [x])
    close(out, ref_fusion(base, x))
    assert torch.equal(out, ref_fusion(base, x))


def test_arcee_fusion_by_hand_1d():
    """1-D: one KL scalar, so s ranks like |delta|. Sorted deltas .01 .02 .03 .04 .05 .06 .105 1, quartiles at
    int(q * (n - 1)) = 1, 3, 5 (mergekit; torch.quantile 'lower'): Q1 = .02, median = .04, Q3 = .06, threshold
    (.04 + 1.5 * .04) KL = .1 KL, so .105 and 1 survive. Interpolated quartiles would give .11 KL and drop .105."""
    base = torch.zeros(8)
    delta = torch.tensor([0.03, 0.01, 1.0, 0.105, 0.02, 0.05, 0.04, 0.06])
    out = METHODS["arcee_fusion"](base, [base + delta])
    assert torch.equal(out, torch.tensor([0, 0, 1.0, 0.105, 0, 0, 0, 0]))


def test_arcee_fusion_kl_is_per_row():
    """A row moved by a constant has the same softmax, KL ~ 0: it keeps the base, however large the move."""
    base = rand(8, 32, seed=0)
    x = base + 0.3 * rand(8, 32, seed=1)
    x[7] = base[7] + 5.0
    out = METHODS["arcee_fusion"](base, [x])
    assert torch.equal(out[7], base[7])
    assert (out[:7] != base[:7]).any()
    close(out, ref_fusion(base, x))


def test_arcee_fusion_subsamples_large_tensors_by_index(monkeypatch):
    """Above 1e6 elements the quartiles come from 1e6 scores drawn with replacement from the tensor's
    generator: reproducible per (seed, name), index memory 8 MB whatever the tensor, no randperm of numel."""
    base = rand(1001, 1000, seed=0)
    x = base + 0.1 * rand(1001, 1000, seed=1)
    n = x.numel()
    assert n > fusion_module.SAMPLE_SIZE == 1_000_000

    sizes = []
    quantile = torch.quantile

    def spy(t, *args, **kwargs):
        sizes.append(t.numel())
        return quantile(t, *args, **kwargs)

    def no_randperm(*args, **kwargs):
        raise AssertionError("randperm over numel")

    monkeypatch.setattr(torch, "quantile", spy)
    monkeypatch.setattr(torch, "randperm", no_randperm)
    gen = lambda seed: tensor_generator(seed, "model.embed_tokens.weight")  # noqa: E731
    out = METHODS["arcee_fusion"](base, [x], generator=gen(1))
    again = METHODS["arcee_fusion"](base, [x], generator=gen(1))
    assert sizes == [1_000_000, 1_000_000]
    assert torch.equal(out, again)
    sample = torch.randint(n, (1_000_000,), generator=gen(1))
    assert torch.equal(out, ref_fusion(base, x, sample))
    other = torch.randint(n, (1_000_000,), generator=gen(2))
    assert not torch.equal(sample, other)
    assert torch.equal(METHODS["arcee_fusion"](base, [x], generator=gen(2)), ref_fusion(base, x, other))


def test_arcee_fusion_bf16_adds_the_masked_delta_in_float32():
    """As mergekit: delta (bf16) times a float32 mask, added to the base in float32."""
    base = rand(16, 24, seed=0).bfloat16()
    x = (base.float() + 0.3 * rand(16, 24, seed=1)).bfloat16()
    out = METHODS["arcee_fusion"](base, [x])
    assert out.dtype == torch.float32
    assert torch.equal(out, ref_fusion(base, x))


# ----------------------------------------------------------------------------- configs

NOWHERE = "/nonexistent/model"


def cfg(method, models, base=NOWHERE + "/base", **extra):
    config = {"merge_method": method, "models": [{"model": NOWHERE + f"/{m}", **({"parameters": p} if p else {})}
                                                 for m, p in models], **extra}
    if base is not None:
        config["base_model"] = base
    return config


W1 = {"weight": 1.0}


@pytest.mark.parametrize("config,match", [
    (cfg("nuslerp", [("a", W1)]), r"models: nuslerp merges exactly 2 models besides the base; got 1"),
    (cfg("nuslerp", [("a", W1), ("b", W1), ("c", W1)]), r"nuslerp takes 2 to 3 input model\(s\) counting .*got 4"),
    (cfg("nuslerp", [("a", W1), ("base", None)]), r"nuslerp merges exactly 2 models besides the base; got 1"),
    (cfg("nuslerp", [("a", W1), ("b", W1), ("c", W1)], base=None), r"exactly 2 models besides the base; got 3"),
    (cfg("nuslerp", [("a", W1), ("b", {})]), r"models\[1\]\.parameters\.weight: missing"),
    (cfg("nuslerp", [("a", W1), ("b", W1)], parameters={"nuslerp_flatten": "maybe"}),
     r"parameters\.nuslerp_flatten: Input should be a valid boolean"),
    (cfg("nuslerp", [("a", W1), ("b", W1)], parameters={"tt": 0.5}),
     r"parameters: unknown parameter\(s\) 'tt' for nuslerp; allowed: weight, nuslerp_flatten, nuslerp_row_wise"),
    (cfg("multislerp", [("a", W1), ("b", {"weight": 1.0, "denisty": 0.5})]),
     r"models\[1\]\.parameters: unknown parameter\(s\) 'denisty' for multislerp; allowed: weight"),
    (cfg("multislerp", [("a", W1)], base=None), r"models: multislerp takes at least 2 input model\(s\); got 1"),
    (cfg("karcher", [("a", None), ("b", None)], base=None, parameters={"max_iter": -1}),
     r"parameters\.max_iter: Input should be greater than or equal to 0"),
    (cfg("karcher", [("a", None)], base=None, parameters={"max_iters": 5}),
     r"parameters: unknown parameter\(s\) 'max_iters' for karcher; allowed: max_iter, tol"),
    (cfg("karcher", [("a", {"densty": 0.5})], base=None),
     r"models\[0\]\.parameters: unknown parameter\(s\) 'densty' for karcher"),  # (a weight is ignored, as mergekit)
    (cfg("arcee_fusion", [("a", None), ("b", None)]),
     r"models: arcee_fusion takes exactly 2 input model\(s\) counting base_model; got 3"),
    (cfg("arcee_fusion", [("a", None), ("b", None)], base=None), r"arcee_fusion needs a base model"),
    (cfg("arcee_fusion", [("a", {"wieght": 1.0})]),
     r"models\[0\]\.parameters: unknown parameter\(s\) 'wieght' for arcee_fusion; allowed: none"),
    (cfg("arcee_fusion", [("a", None)], parameters={"threshold": 1.5}),
     r"parameters: unknown parameter\(s\) 'threshold' for arcee_fusion; allowed: none"),
])
def test_bad_configs_fail_before_reading_weights(config, match, tmp_path):
    with pytest.raises(MergeConfigError, match=match):
        run_merge(config, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_direct_calls_check_their_inputs(inputs):
    base, xs = inputs
    with pytest.raises(ValueError, match="nuslerp merges exactly two models"):
        METHODS["nuslerp"](base, xs, models=[W1] * 3)
    with pytest.raises(ValueError, match="got 2 tensors but 1 model parameter dicts"):
        METHODS["multislerp"](base, xs[:2], models=[W1])
    with pytest.raises(ValueError, match="arcee_fusion needs a base tensor"):
        METHODS["arcee_fusion"](None, xs[:1])
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        METHODS["karcher"](None, xs, params={"weight": 1})


# ----------------------------------------------------------------------------- run_merge

NAMES = {"model.embed_tokens.weight": (50, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
         "model.layers.1.mlp.up_proj.weight": (24, 16), "model.layers.1.input_layernorm.weight": (16,),
         "model.norm.weight": (16,)}


def tiny_folder(path, seed, like=None, noise=0.05):
    """A minimal HF-shaped folder: config.json + model.safetensors (float tensors and an int buffer)."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(s, generator=g) for n, s in NAMES.items()} if like is None else {
        n: v + noise * torch.randn(v.shape, generator=g) for n, v in load_file(like / "model.safetensors").items()
        if v.is_floating_point()}
    state["model.position_ids"] = torch.arange(8)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_models")
    base = tiny_folder(root / "base", 0)
    return {"base": base, **{k: tiny_folder(root / k, i, like=base) for i, k in enumerate("abc", 1)}}


def merged_weights(folder):
    return load_file(folder / "model.safetensors")


def run(folders, tmp_path, config, **kwargs):
    out = tmp_path / config["merge_method"]
    info = run_merge(config, out, seed=3, **kwargs)
    assert info["n_tensors"] == len(NAMES) + 1 and (out / "config.json").exists()
    ws = {k: merged_weights(folders[k]) for k in ("base", "a", "b", "c")}
    merged = merged_weights(out)
    assert torch.equal(merged["model.position_ids"], torch.arange(8))
    return merged, ws


def test_run_merge_nuslerp(folders, tmp_path):
    config = {"merge_method": "nuslerp", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"]), "parameters": {"weight": [1.0, 3.0]}},  # gradient: t per layer
                         {"model": str(folders["b"]), "parameters": {"weight": 1.0}}],
              "parameters": {"nuslerp_flatten": False}}
    merged, ws = run(folders, tmp_path, config)
    for name in NAMES:
        layer = int(name.split(".layers.")[1][0]) if ".layers." in name else 0
        t = 1.0 / (1.0 + (1.0 + 2.0 * layer))
        b = ws["base"][name]
        close(merged[name], b.double() + ref_nuslerp(t, ws["a"][name] - b, ws["b"][name] - b, False, False))


def test_run_merge_multislerp(folders, tmp_path):
    config = {"merge_method": "multislerp", "base_model": str(folders["base"]),
              "models": [{"model": str(folders[k]), "parameters": {"weight": w}} for k, w in zip("abc", W3)]}
    merged, ws = run(folders, tmp_path, config)
    for name in NAMES:
        b = ws["base"][name]
        close(merged[name], b.double() + ref_multislerp([ws[k][name] - b for k in "abc"], W3))


def test_run_merge_without_a_base_works_on_the_models(folders, tmp_path):
    # mergekit's base is optional for nuslerp and multislerp: without one they interpolate the models themselves.
    for method in ("nuslerp", "multislerp"):
        config = {"merge_method": method, "models": [{"model": str(folders[k]), "parameters": {"weight": w}}
                                                     for k, w in (("a", 1.0), ("b", 3.0))]}
        merged, ws = run(folders, tmp_path, config)
        for name in NAMES:
            a, b = ws["a"][name], ws["b"][name]
            expected = (ref_nuslerp(0.75, a, b, True, False) if method == "nuslerp"
                        else ref_multislerp([a, b], [1.0, 3.0]))
            close(merged[name], expected)


def test_run_merge_karcher_counts_an_unlisted_base_as_an_input(folders, tmp_path):
    config = {"merge_method": "karcher", "base_model": str(folders["base"]),
              "models": [{"model": str(folders[k])} for k in "ab"], "parameters": {"max_iter": 20}}
    merged, ws = run(folders, tmp_path, config)
    for name in NAMES:
        xs = [ws[k][name] for k in ("a", "b", "base")]
        m = merged[name].double().flatten() / merged[name].double().norm()
        assert karcher_gradient(m, xs).norm() < 1e-5, name
        assert torch.equal(merged[name], mk_karcher(xs, max_iter=20))


def test_run_merge_karcher_accepts_and_ignores_a_weight_as_mergekit(folders, tmp_path, caplog):
    """mergekit 0.1.5 runs karcher configs with per-model `weight` (copied from linear ones) and ignores it: so do
    we, with a warning (so for any parameter another method reads); a name no method knows still fails."""
    plain = {"merge_method": "karcher", "models": [{"model": str(folders[k])} for k in "ab"]}
    weighted = {"merge_method": "karcher", "models": [{"model": str(folders[k]), "parameters": {"weight": w}}
                                                      for k, w in (("a", 0.9), ("b", 0.1))]}
    with caplog.at_level("WARNING"):
        merged, _ = run(folders, tmp_path / "w", weighted)
    assert "models[0].parameters: weight has no effect on karcher (mergekit ignores it too)" in caplog.text
    same, _ = run(folders, tmp_path / "p", plain)
    assert all(torch.equal(merged[n], same[n]) for n in NAMES)
    bad = {"merge_method": "karcher", "models": [{"model": str(folders["a"]), "parameters": {"densty": 0.5}}]}
    with pytest.raises(MergeConfigError, match="unknown parameter"):
        run(folders, tmp_path / "bad", bad)


def test_run_merge_arcee_fusion_tinyr1_style(folders, tmp_path):
    """TinyR1's form: the base is listed under models too; bf16 output."""
    config = {"merge_method": "arcee_fusion", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"])}, {"model": str(folders["base"])}], "out_dtype": "bfloat16"}
    merged, ws = run(folders, tmp_path, config)
    kept = 0
    for name in NAMES:
        expected = ref_fusion(ws["base"][name], ws["a"][name])
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], expected.bfloat16()), name
        kept += int((expected != ws["base"][name]).sum())
    assert 0 < kept < sum(math.prod(s) for s in NAMES.values()) / 2


def test_multislerp_of_inputs_that_all_equal_the_base_is_the_base():
    """bf16 fine-tunes leave some norm weights exactly at the base: every delta is zero, the merge is the base
    (mergekit 0.1.5 raises, stopping the whole merge); antipodal inputs still fail as in mergekit."""
    from branchmerge.models.merging.methods.spherical import MultislerpModel, MultislerpParams, multislerp

    base = torch.linspace(-1, 1, 64).to(torch.bfloat16)
    models = [MultislerpModel(weight=w) for w in (0.5, 0.3, 0.2)]
    out = multislerp(base, [base.clone() for _ in range(3)], models, MultislerpParams(), None)
    assert torch.equal(out, base) and out.dtype == torch.bfloat16
    a = torch.randn(64)
    with pytest.raises(ValueError, match="weighted sum of the unit directions is zero"):
        multislerp(torch.zeros(64), [a, -a, a * 0 + 1e-30], [MultislerpModel(weight=w) for w in (0.5, 0.5, 0.0)],
                   MultislerpParams(), None)
