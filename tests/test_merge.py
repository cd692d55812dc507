"""Merge methods against their formulas (reference/merging.md), the value resolver, and run_merge end to end.

The reference formulas below are written from merging.md directly, not with the library's helpers.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from branchmerge.models.merging.checkpoint import Checkpoint
from branchmerge.models.merging.config import MergeConfigError
from branchmerge.models.merging.registry import METHODS, method_names
from branchmerge.models.merging.run import run_merge
from branchmerge.models.merging.values import layer_t, resolve, tensor_generator

REQUIRED = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
EXTRA = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "nearswap", "sce",
         "passthrough", "ram", "ramplus_tl"]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def inputs():
    base = rand(16, 24, seed=0)
    xs = [base + 0.1 * rand(16, 24, seed=i) for i in (1, 2, 3)]
    return base, xs


W = [1.0, 0.5, 0.8]
D = [0.5, 0.3, 0.7]


# ----------------------------------------------------------------------------- reference formulas

def ref_combine(base, sparse_deltas, weights, consensus, normalize, lam=1.0):
    """Steps 2-5 of the task-arithmetic recipe in merging.md."""
    wd = [w * d for w, d in zip(weights, sparse_deltas)]
    if consensus:
        s = torch.sign(sum(wd))
        s[s == 0] = 1
        m = [((torch.sign(x) == s) & (x != 0)).float() for x in wd]
    else:
        m = [torch.ones_like(x) for x in wd]
    delta = sum(x * mi for x, mi in zip(wd, m))
    if normalize:
        div = sum(w * mi for w, mi in zip(weights, m))
        if not consensus:
            div = torch.full_like(delta, float(sum(weights)))
        delta = delta / torch.where(div == 0, torch.ones_like(div), div)
    return base + lam * delta


def ref_topk(delta, density):
    """Keep the k = int(density * n) largest |delta| (at least one)."""
    k = max(1, int(density * delta.numel()))
    kth_largest = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= kth_largest, delta, torch.zeros_like(delta))


def ref_l1(delta, kept):
    return kept * delta.abs().sum() / kept.abs().sum()


# ----------------------------------------------------------------------------- registry

def test_registry_has_all_methods():
    assert set(REQUIRED + EXTRA) <= set(method_names())
    with pytest.raises(MergeConfigError, match=r"unknown method 'tie'.*registered: .*dare_ties.*ties"):
        from branchmerge.models.merging.registry import get_method
        get_method("tie")


def test_parameter_schemas_use_mergekit_names_and_defaults():
    ties = METHODS["ties"]
    assert ties.params().normalize is True and ties.params().rescale is False and ties.params().lambda_ == 1.0
    assert METHODS["task_arithmetic"].params().normalize is False
    assert METHODS["dare_ties"].params().rescale is True and METHODS["dare_ties"].params().normalize is False
    assert METHODS["della"].params().normalize is True and METHODS["della"].params().rescale is True
    assert METHODS["della_linear"].model_params(weight=1).epsilon == 0.15
    assert METHODS["breadcrumbs"].model_params(weight=1).gamma == 0.01
    assert METHODS["ties"].model_params(weight=1).density == 1.0
    assert "lambda" in ties.global_names() and {"weight", "density"} <= set(ties.model_names())
    assert METHODS["linear"].params().normalize is True
    assert METHODS["sce"].params().select_topk == 1.0


# ----------------------------------------------------------------------------- formulas

def test_linear(inputs):
    _, xs = inputs
    out = METHODS["linear"](None, xs, models=[{"weight": w} for w in W])
    torch.testing.assert_close(out, sum(w * x for w, x in zip(W, xs)) / sum(W))
    raw = METHODS["linear"](None, xs, models=[{"weight": w} for w in W], params={"normalize": False})
    torch.testing.assert_close(raw, sum(w * x for w, x in zip(W, xs)))


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.6)])
def test_task_arithmetic(inputs, normalize, lam):
    base, xs = inputs
    out = METHODS["task_arithmetic"](base, xs, models=[{"weight": w} for w in W],
                                     params={"normalize": normalize, "lambda": lam})
    expected = base + lam * sum(w * (x - base) for w, x in zip(W, xs)) / (sum(W) if normalize else 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (False, 0.5)])
def test_ties(inputs, normalize, lam):
    base, xs = inputs
    out = METHODS["ties"](base, xs, models=[{"weight": w, "density": d} for w, d in zip(W, D)],
                          params={"normalize": normalize, "lambda": lam})
    trimmed = [ref_topk(x - base, d) for x, d in zip(xs, D)]
    torch.testing.assert_close(out, ref_combine(base, trimmed, W, True, normalize, lam))


def test_ties_sign_election_by_hand():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0])
    out = METHODS["ties"](base, [a, b], models=[{"weight": 1.0}, {"weight": 1.0}])
    # elected signs: -, -, + (zero sum counts as +); disjoint mean over agreeing models; nothing for 0
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 0.0]))


def test_ties_trim_keeps_exactly_k_among_equal_magnitudes():
    """Deltas of bf16 weights tie a lot: still exactly int(density * n) entries survive, as in mergekit."""
    base = torch.zeros(64, 64)
    x = torch.randint(-3, 4, (64, 64)).float()  # 7 distinct values: many ties at any cut
    out = METHODS["ties"](base, [x], models=[{"weight": 1.0, "density": 0.37}])
    kept = out != 0
    assert int(kept.sum()) == int(0.37 * x.numel())
    assert x.abs()[kept].min() >= x.abs()[~kept & (x != 0)].max()  # every kept |delta| >= every dropped one


def test_dare_linear_survivors_follow_l1_rescale(inputs):
    """One model: every surviving entry is w * delta * ||delta||_1 / ||kept||_1; ~density of them survive."""
    base = rand(200, 100, seed=5)
    x = base + rand(200, 100, seed=6)
    out = METHODS["dare_linear"](base, [x], models=[{"weight": 0.7, "density": 0.3}],
                                 generator=torch.Generator().manual_seed(1))
    delta = x - base
    kept = torch.where(out != base, delta, torch.zeros_like(delta))
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out, base + 0.7 * ref_l1(delta, kept))


def test_dare_inverse_p(inputs):
    base = rand(200, 100, seed=5)
    x = base + rand(200, 100, seed=6)
    out = METHODS["dare_linear"](base, [x], models=[{"weight": 1.0, "density": 0.25}],
                                 params={"rescale_mode": "inverse_p"})
    delta = x - base
    kept = torch.where(out != base, delta, torch.zeros_like(delta))
    torch.testing.assert_close(out, base + kept / 0.25)


@pytest.mark.parametrize("name,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_masks_come_from_the_tensor_generator(inputs, name, consensus):
    """Contract: models draw Bernoulli(density) masks in config order from the tensor's generator."""
    base, xs = inputs
    out = METHODS[name](base, xs, models=[{"weight": w, "density": d} for w, d in zip(W, D)],
                        generator=tensor_generator(7, "t"))
    g = tensor_generator(7, "t")
    masks = [torch.bernoulli(torch.full(base.shape, d), generator=g) for d in D]
    sparse = [ref_l1(x - base, m * (x - base)) for x, m in zip(xs, masks)]
    torch.testing.assert_close(out, ref_combine(base, sparse, W, consensus, normalize=False))


def test_dare_reproducible_and_seed_dependent(inputs):
    base, xs = inputs
    models = [{"weight": w, "density": 0.5} for w in W]
    a = METHODS["dare_ties"](base, xs, models=models, generator=tensor_generator(1, "layers.0.w"))
    b = METHODS["dare_ties"](base, xs, models=models, generator=tensor_generator(1, "layers.0.w"))
    c = METHODS["dare_ties"](base, xs, models=models, generator=tensor_generator(2, "layers.0.w"))
    d = METHODS["dare_ties"](base, xs, models=models, generator=tensor_generator(1, "layers.1.w"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("name,consensus,gamma", [("breadcrumbs", False, 0.05), ("breadcrumbs_ties", True, 0.0)])
def test_breadcrumbs(inputs, name, consensus, gamma):
    base, xs = inputs
    out = METHODS[name](base, xs, models=[{"weight": w, "density": d, "gamma": gamma} for w, d in zip(W, D)])
    sparse = []
    for x, d in zip(xs, D):
        delta = x - base
        n = delta.numel()
        rank = delta.abs().flatten().argsort().argsort().view_as(delta)  # 0 = smallest
        keep_n = int(d * n)
        n_bot = n - keep_n - int(gamma * n)  # drop the top gamma and the bottom rest
        sparse.append(torch.where((rank >= n_bot) & (rank < n_bot + keep_n), delta, torch.zeros_like(delta)))
    assert all((s != 0).sum() == int(d * s.numel()) for s, d in zip(sparse, D))  # gamma=0 keeps top-density
    torch.testing.assert_close(out, ref_combine(base, sparse, W, consensus, normalize=False))


@pytest.mark.parametrize("name,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
def test_della(inputs, name, consensus, normalize):
    base, xs = inputs
    eps = 0.1
    out = METHODS[name](base, xs, models=[{"weight": w, "density": d, "epsilon": eps} for w, d in zip(W, D)],
                        generator=tensor_generator(3, "t"))
    g = tensor_generator(3, "t")
    sparse = []
    for x, d in zip(xs, D):
        delta = x - base
        probs = torch.empty_like(delta)
        for r, row in enumerate(delta.abs().tolist()):  # rank within each row, normalised to [0, 1]
            order = sorted(range(len(row)), key=row.__getitem__)
            for rank, c in enumerate(order):
                probs[r, c] = (d - eps) + 2 * eps * rank / (len(row) - 1)
        mask = torch.bernoulli(probs, generator=g)
        sparse.append(ref_l1(delta, mask * delta))
    torch.testing.assert_close(out, ref_combine(base, sparse, W, consensus, normalize))


def test_della_rejects_probabilities_outside_0_1():
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        METHODS["della"].model_params(weight=1, density=0.1, epsilon=0.15)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp(inputs, t):
    base, xs = inputs
    a, b = base, xs[0]
    out = METHODS["slerp"](a, [b], params={"t": t})
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    omega = math.acos(cos)
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    torch.testing.assert_close(out, expected)


def test_slerp_collinear_is_lerp(inputs):
    base, _ = inputs
    out = METHODS["slerp"](base, [2 * base], params={"t": 0.25})
    torch.testing.assert_close(out, 0.75 * base + 0.25 * 2 * base)


def test_slerp_in_bfloat16_never_divides_zero_by_zero():
    """The collinearity threshold is compared in float32 (in bf16 0.9995 rounds to 1.0, so parallel tensors took
    the sin ratio and wrote NaN: issue 12)."""
    a = torch.ones(64, dtype=torch.bfloat16)
    out = METHODS["slerp"](a, [a], params={"t": 0.5})
    assert out.dtype == torch.bfloat16 and torch.equal(out, a)
    b = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
    assert torch.isfinite(METHODS["slerp"](b, [b * 1.0001], params={"t": 0.3})).all()


def test_slerp_on_tensors_over_a_million_elements_matches_float64():
    """Norms and dot product in 1M-element chunks (mergekit 0.1.5's), against the formula in float64 (float32's
    rounding over 2.5M-element sums moves the angle by ~1e-6 relative: the bound is float32's, not mergekit's)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2_500_000, generator=g) for _ in range(2))
    b = 0.6 * a + 0.8 * b  # an angle well inside the slerp branch
    out = METHODS["slerp"](a, [b], params={"t": 0.3})
    a64, b64 = a.double(), b.double()
    omega = torch.acos((a64 @ b64) / (a64.norm() * b64.norm()))
    expected = (torch.sin(0.7 * omega) * a64 + torch.sin(0.3 * omega) * b64) / torch.sin(omega)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)


def ref_ram(base, xs, epsilon, r=None, alpha=None):
    """RAM / RAM+ element by element from the paper's rule (arXiv 2601.13572, mergekit 0.1.5's tensor-local form)."""
    b, ds = base.flatten().tolist(), [(x - base).flatten().tolist() for x in xs]
    P = len(b)
    who = [[i for i, d in enumerate(ds) if abs(d[j]) > epsilon] for j in range(P)]
    lam = [1.0] * len(ds)
    if r is not None:
        for i in range(len(ds)):
            shared = sum(1 for j in range(P) if i in who[j] and len(who[j]) > 1)
            unique = sum(1 for j in range(P) if who[j] == [i])
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = []
    for j in range(P):
        if len(who[j]) == 1:
            out.append(b[j] + lam[who[j][0]] * ds[who[j][0]][j])
        else:
            out.append(b[j] + sum(ds[i][j] for i in who[j]) / max(len(who[j]), 1))
    return torch.tensor(out).reshape(base.shape)


def test_ram_and_ramplus_tl_follow_the_rule_by_hand():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    # sparse deltas: each model changes about half the entries, so unique, shared and untouched ones all occur
    xs = [base + torch.randn(6, 7, generator=g) * (torch.rand(6, 7, generator=g) < 0.5) for _ in range(3)]
    torch.testing.assert_close(METHODS["ram"](base, xs, params={}), ref_ram(base, xs, 1e-5))
    torch.testing.assert_close(METHODS["ramplus_tl"](base, xs, params={"r": 0.5, "alpha": 0.4}),
                               ref_ram(base, xs, 1e-5, r=0.5, alpha=0.4))
    assert METHODS["ramplus_tl"].params() == METHODS["ramplus_tl"].params(r=0.1, alpha=0.2, epsilon=1e-5)
    # untouched entries keep the base, a lone model's delta is kept whole (not divided by 3)
    only_first = [xs[0], base.clone(), base.clone()]
    torch.testing.assert_close(METHODS["ram"](base, only_first, params={}), xs[0])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(inputs, filter_wise):
    base, xs = inputs
    out = METHODS["model_stock"](base, xs, params={"filter_wise": filter_wise})
    rows = [base] if not filter_wise else list(base)
    expected = []
    for r in range(len(rows)):
        b = base.flatten() if not filter_wise else base[r]
        ws = [x.flatten() if not filter_wise else x[r] for x in xs]
        deltas = [w - b for w in ws]
        cos = [torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm())
               for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / len(cos)
        n = len(ws)
        t = n * c / (1 + (n - 1) * c)
        expected.append(t * sum(ws) / n + (1 - t) * b)
    expected = expected[0].view_as(base) if not filter_wise else torch.stack(expected)
    torch.testing.assert_close(out, expected)


def test_nearswap(inputs):
    base, xs = inputs
    t = 0.05
    out = METHODS["nearswap"](base, [xs[0]], params={"t": t})
    a, b = base.flatten().tolist(), xs[0].flatten().tolist()
    expected = []
    for ai, bi in zip(a, b):
        w = min(max(t / max(abs(ai - bi), 1e-6), 0.0), 1.0)
        expected.append(w * bi + (1 - w) * ai)
    torch.testing.assert_close(out, torch.tensor(expected).view_as(base))


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce(inputs, topk):
    base, xs = inputs
    out = METHODS["sce"](base, xs, params={"select_topk": topk})
    deltas = [x - base for x in xs]
    if topk < 1:
        var = torch.stack(deltas).var(dim=0, unbiased=False)
        k = int((var != 0).sum() * topk)
        threshold = var.flatten().kthvalue(var.numel() - k + 1).values
        keep = (var >= threshold).float()
        deltas = [d * keep for d in deltas]
    energy = [d.pow(2).mean() for d in deltas]
    eta = [e / sum(energy) for e in energy]
    s = torch.sign(sum(deltas))
    s[s == 0] = 1
    m = [(torch.sign(d) == s).float() for d in deltas]
    num = sum(e * mi * d for e, mi, d in zip(eta, m, deltas))
    den = torch.clamp(sum(e * mi for e, mi in zip(eta, m)), min=1e-6)
    torch.testing.assert_close(out, base + num / den)


def test_passthrough(inputs):
    _, xs = inputs
    torch.testing.assert_close(METHODS["passthrough"](None, xs[:1]), xs[0])
    torch.testing.assert_close(METHODS["passthrough"](None, xs[:1], models=[{"scale": 0.5}]), 0.5 * xs[0])


# ----------------------------------------------------------------------------- value resolver

def test_layer_t():
    assert layer_t("model.embed_tokens.weight", 4) == 0.0
    assert layer_t("model.norm.weight", 4) == 0.0
    assert layer_t("lm_head.weight", 4) == 0.0
    assert layer_t("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert layer_t("model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(2 / 3)
    assert layer_t("model.layers.3.self_attn.q_proj.weight", 4) == 1.0
    assert layer_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # mergekit: one layer -> t = 1


def test_resolve_scalar_gradient_and_filters():
    assert resolve(0.5, "x", 0.3) == 0.5
    assert resolve([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    grad = [0.0, 1.0, 0.5]
    assert resolve(grad, "x", 0.0) == 0.0
    assert resolve(grad, "x", 0.25) == pytest.approx(0.5)
    assert resolve(grad, "x", 0.5) == pytest.approx(1.0)
    assert resolve(grad, "x", 0.75) == pytest.approx(0.75)
    assert resolve(grad, "x", 1.0) == pytest.approx(0.5)
    assert resolve([True, False], "x", 0.4) is True and resolve([True, False], "x", 1.0) is False
    setting = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 1}]
    assert resolve(setting, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.5
    assert resolve(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve(setting, "model.norm.weight", 0.0) == 1
    assert resolve([{"filter": "mlp", "value": 0.5}], "model.norm.weight", 0.0) is None  # falls through
    assert resolve({"filter": "norm", "value": 2}, "model.norm.weight", 0.0) == 2


def test_tensor_generator_depends_on_seed_and_name_only():
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(tensor_generator(0, "a")), draw(tensor_generator(0, "a")))
    assert not torch.equal(draw(tensor_generator(0, "a")), draw(tensor_generator(1, "a")))
    assert not torch.equal(draw(tensor_generator(0, "a")), draw(tensor_generator(0, "b")))


# ----------------------------------------------------------------------------- run_merge

def tiny_llama(path, seed, *, tie=True, vocab=1000, like=None, noise=0.05):
    """A tiny random Llama folder; with `like`, that folder's weights plus seeded noise (a 'fine-tune')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if like is not None:
        state = {k: v for k, v in load_file(like / "model.safetensors").items()}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = state.get(name, state["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
                p.copy_(src + noise * torch.randn(src.shape, generator=g))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_models")
    base = tiny_llama(root / "base", 0)
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))  # a stand-in tokenizer file
    return {
        "base": base,
        "a": tiny_llama(root / "a", 1, like=base),
        "b": tiny_llama(root / "b", 2, like=base),
        "untied": tiny_llama(root / "untied", 3, tie=False, like=base),
        "vocab1001": tiny_llama(root / "vocab1001", 4, vocab=1001),
    }


def weights(folder):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def ties_config(folders, **extra):
    return {
        "merge_method": "ties",
        "base_model": str(folders["base"]),
        "models": [
            {"model": str(folders["a"]), "parameters": {"weight": [1.0, 0.5]}},  # gradient over layers
            {"model": str(folders["b"]), "parameters": {"weight": 0.7}},
        ],
        "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
        **extra,
    }


def expected_ties(name, base, a, b):
    t = 0.0 if ".layers." not in name else float(name.split(".layers.")[1].split(".")[0])  # 2 layers: t = idx
    wa, wb = 1.0 + (0.5 - 1.0) * t, 0.7
    density = 0.3 if "mlp" in name else 0.6
    trimmed = [ref_topk(a - base, density), ref_topk(b - base, density)]
    return ref_combine(base, trimmed, [wa, wb], consensus=True, normalize=True)


def test_run_merge_ties_end_to_end(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    info = run_merge(ties_config(folders), out, seed=0)
    assert info["method"] == "ties" and info["n_tensors"] == 20 and info["seconds"] >= 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "tokenizer_config.json", "merge_config.json"}
    assert not list(tmp_path.glob(".merged.tmp-*"))
    merged, base, a, b = (weights(folders[k]) if k != "out" else weights(out) for k in ("out", "base", "a", "b"))
    assert set(merged) == set(base) and "lm_head.weight" not in merged  # all inputs tied: stays tied
    for name in merged:
        torch.testing.assert_close(merged[name], expected_ties(name, base[name], a[name], b[name]), msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, merged["model.layers.1.mlp.up_proj.weight"])
    assert model.config.tie_word_embeddings is True
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_run_merge_sharded_bf16_output(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    run_merge(ties_config(folders), single, seed=0)
    out = tmp_path / "sharded"
    info = run_merge(ties_config(folders, out_dtype="bfloat16"), out, seed=0, max_shard_size=100_000)
    assert info["n_shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights(single))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    sharded = weights(out)
    for name, x in weights(single).items():
        assert sharded[name].dtype == torch.bfloat16
        torch.testing.assert_close(sharded[name], x.to(torch.bfloat16), msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def bf16_folders(folders, tmp_path_factory):
    """The base and three fine-tunes stored in bfloat16, as real checkpoints are."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge_bf16")
    third = tiny_llama(root / "c32", 5, like=folders["base"])
    out = {}
    for name, src in (("base", folders["base"]), ("a", folders["a"]), ("b", folders["b"]), ("c", third)):
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(root / name)
        out[name] = root / name
    return out


def test_every_method_merges_bf16_checkpoints_in_bf16_and_finite(bf16_folders, tmp_path):
    """Without a `dtype` key tensors merge in the dtype they are stored in (mergekit's rule) and the output keeps
    it, except where mergekit's method returns float32 (arcee_fusion's mask, RAM+'s lambda: mergekit writes what
    the method returns); no method writes a non-finite value (slerp did: NaN in parallel bf16 tensors, issue 12)."""
    from bench.merge_vs_mergekit import merge_config

    from branchmerge.models.merging.registry import METHODS as REGISTRY

    f = bf16_folders
    for method in sorted(REGISTRY):
        config = merge_config(method, f["base"], [f["a"], f["b"], f["c"]])
        if config is None:
            continue
        del config["dtype"]
        out = tmp_path / method
        run_merge(config, out, seed=0)
        expected = torch.float32 if method in ("arcee_fusion", "ramplus_tl") else torch.bfloat16
        assert REGISTRY[method].result_dtype(torch.bfloat16) == expected
        for name, x in weights(out).items():
            assert x.dtype == expected, (method, name)
            assert torch.isfinite(x).all(), (method, name)


def test_full_range_slices_merge_as_models(folders, tmp_path):
    """The most published slerp config (mergekit's README form: one slice, each source [0, N], t gradients by
    filter) gives exactly the tensors of the same merge written with `models`; a partial range fails naming the
    key before any weight is read."""
    a, b = str(folders["a"]), str(folders["b"])
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    sliced = {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}],
              "merge_method": "slerp", "base_model": a, "parameters": {"t": t}, "dtype": "float32"}
    listed = {"models": [{"model": a}, {"model": b}], "merge_method": "slerp", "base_model": a,
              "parameters": {"t": t}, "dtype": "float32"}
    run_merge(sliced, tmp_path / "sliced", seed=0)
    run_merge(listed, tmp_path / "listed", seed=0)
    x, y = weights(tmp_path / "sliced"), weights(tmp_path / "listed")
    assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)


def test_frankenmerge_slices(folders, tmp_path):
    """A passthrough frankenmerge (SOLAR-style depth up-scaling): slices [0, 2] of a then [1, 2] of b give a
    3-layer model whose layers are a's 0, 1 and b's 1, with the embeddings from the first slice's model and the
    final norm from the last's; num_hidden_layers follows and transformers loads it. A per-slice weight gradient
    runs over the slice's own layers; a range past a model's layers fails naming the key before anything is
    written."""
    from transformers import AutoModelForCausalLM

    a, b = str(folders["a"]), str(folders["b"])
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                         {"sources": [{"model": b, "layer_range": [1, 2]}]}]}
    run_merge(config, tmp_path / "franken", seed=0)
    out, wa, wb = weights(tmp_path / "franken"), weights(folders["a"]), weights(folders["b"])
    assert json.loads((tmp_path / "franken" / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.equal(out["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], wb["model.norm.weight"])
    assert sum(".layers.2." in n for n in out) == sum(".layers.1." in n for n in wb) > 0
    for name, x in out.items():
        if ".layers." in name:
            layer = int(name.split(".")[2])
            src, i = (wa, layer) if layer < 2 else (wb, 1)
            assert torch.equal(x, src[name.replace(f"layers.{layer}.", f"layers.{i}.")]), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "franken").config.num_hidden_layers == 3
    # linear over two 2-layer slices with weight gradients: a's weight runs 1 -> 0 inside each slice
    grad = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [1, 0]}},
                                    {"model": b, "layer_range": [0, 2], "parameters": {"weight": [0, 1]}}]}] * 2}
    run_merge(grad, tmp_path / "grad", seed=0)
    out = weights(tmp_path / "grad")
    q = "self_attn.q_proj.weight"
    for k, (src, i) in enumerate([(wa, 0), (wb, 1), (wa, 0), (wb, 1)]):
        assert torch.equal(out[f"model.layers.{k}.{q}"], src[f"model.layers.{i}.{q}"]), k
    past = {**config, "slices": [{"sources": [{"model": b, "layer_range": [1, 3]}]}]}
    with pytest.raises(MergeConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[1, 3\] of .*, which has "
                                               r"2 layers"):
        run_merge(past, tmp_path / "past", seed=0)
    assert not (tmp_path / "past").exists()


def test_run_merge_untied_head(folders, tmp_path):
    """One model has its own lm_head: tied models contribute their embeddings as lm_head; output unties."""
    from transformers import AutoModelForCausalLM

    config = {"merge_method": "task_arithmetic", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(folders["untied"]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "merged"
    run_merge(config, out, seed=0)
    merged, base, a, u = weights(out), weights(folders["base"]), weights(folders["a"]), weights(folders["untied"])
    emb = "model.embed_tokens.weight"
    expected_head = base[emb] + 0.5 * (a[emb] - base[emb]) + 0.5 * (u["lm_head.weight"] - base[emb])
    torch.testing.assert_close(merged["lm_head.weight"], expected_head)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.lm_head.weight, expected_head)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_run_merge_dare_seeded(folders, tmp_path):
    config = {"merge_method": "dare_ties", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": str(folders["b"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    run_merge(config, tmp_path / "s1", seed=1)
    run_merge(config, tmp_path / "s1again", seed=1)
    run_merge(config, tmp_path / "s2", seed=2)
    s1, s1again, s2 = weights(tmp_path / "s1"), weights(tmp_path / "s1again"), weights(tmp_path / "s2")
    assert all(torch.equal(s1[k], s1again[k]) for k in s1)
    assert not torch.equal(s1["model.layers.0.mlp.up_proj.weight"], s2["model.layers.0.mlp.up_proj.weight"])
    # each tensor depends on (seed, its name) only, not on the tensors merged before it
    base, a, b = weights(folders["base"]), weights(folders["a"]), weights(folders["b"])
    name = "model.layers.1.self_attn.q_proj.weight"
    alone = METHODS["dare_ties"](base[name], [a[name], b[name]], models=[{"weight": 1.0, "density": 0.5}] * 2,
                                 generator=tensor_generator(1, name))
    torch.testing.assert_close(s1[name], alone)


def test_run_merge_linear_without_base(folders, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(folders["a"]), "parameters": {"weight": 1.0}},
                                                   {"model": str(folders["b"]), "parameters": {"weight": 3.0}}],
              "dtype": "float64"}
    run_merge(config, tmp_path / "m", seed=0)
    merged, a, b = weights(tmp_path / "m"), weights(folders["a"]), weights(folders["b"])
    for name in merged:
        expected = ((a[name].double() + 3 * b[name].double()) / 4).float()
        assert merged[name].dtype == torch.float64  # dtype given, no out_dtype: written in dtype (mergekit)
        torch.testing.assert_close(merged[name].float(), expected)


def test_run_merge_refuses_existing_output_and_cleans_up_on_failure(folders, tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        run_merge(ties_config(folders), out, seed=0)
    run_merge(ties_config(folders), out, seed=0, overwrite=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()

    calls = []

    def flaky_get(self, name):
        calls.append(name)
        if len(calls) > 10:
            raise OSError("disk went away")
        return original(self, name)

    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", flaky_get)
    with pytest.raises(OSError, match="disk went away"):
        run_merge(ties_config(folders), tmp_path / "never", seed=0)
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


# ----------------------------------------------------------------------------- bad configs

NOWHERE = "/nonexistent/model"  # static errors must come before any file is opened


def cfg(method="ties", **over):
    config = {"merge_method": method, "base_model": NOWHERE + "/base",
              "models": [{"model": NOWHERE + "/a", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": NOWHERE + "/b", "parameters": {"weight": 1.0}}]}
    config.update(over)
    return {k: v for k, v in config.items() if v is not None}  # None: leave the key out


@pytest.mark.parametrize("config,match", [
    (cfg("tie"), r"merge_method: unknown method 'tie'; registered: .*ties"),
    (cfg(base_model=None), r"base_model: merge_method ties needs a base model"),
    (cfg(models=[{"model": "/x", "parameters": {"weight": 1, "density": 0}}]),
     r"models\[0\]\.parameters\.density: Input should be greater than 0"),
    (cfg(models=[{"model": "/x", "parameters": {"weight": 1, "density": 1.5}}]),
     r"models\[0\]\.parameters\.density: Input should be less than or equal to 1"),
    (cfg(parameters={"density": [0.5, 1.2]}), r"parameters\.density\[1\]: Input should be less than or equal to 1"),
    (cfg(parameters={"density": [{"filter": "mlp", "value": 0}, {"value": 0.5}]}),
     r"parameters\.density\[0\]\.value: Input should be greater than 0"),
    (cfg(parameters={"densty": 0.5}),
     r"parameters: unknown parameter\(s\) 'densty' for ties; allowed: weight, density"),
    (cfg(models=[{"model": "/x", "parameters": {"weight": 1, "normalise": False}}]),
     r"models\[0\]\.parameters: unknown parameter\(s\) 'normalise' for ties; allowed: weight, density"),
    (cfg(models=[{"model": "/x", "parameters": {"density": 0.5}}]), r"models\[0\]\.parameters\.weight: missing"),
    (cfg("passthrough", base_model=None, models=None,
         slices=[{"sources": [{"model": "/x", "layer_range": [0, 2]}, {"model": "/y", "layer_range": [0, 2]}]}]),
     r"slices\[0\]\.sources: passthrough takes exactly 1 input model\(s\); got 2"),
    (cfg(models=None, slices=[{"sources": [{"model": "/x", "layer_range": [0, 2], "parameters": {"weight": 1}},
                                           {"model": NOWHERE + "/base", "layer_range": [0, 3]}]}]),
     r"slices\[0\]\.sources: layer ranges of different lengths \[\[0, 2\], \[0, 3\]\]"),
    (cfg(models=None, slices=[{"sources": [{"model": "/x", "layer_range": [0, 2], "parameters": {"weight": 1}}]}]),
     r"base_model: '/nonexistent/model/base' is not one of slices\[0\]\.sources"),
    (cfg(chat_template="chatmlx"), r"chat_template: 'chatmlx' is neither 'auto', a built-in template \(alpaca, "
                                   r"chatml, exaone, llama3, mistral\) nor a Jinja template"),
    (cfg(models=None, slices=[{"sources": [{"model": "/x", "layer_range": [2, 1]}]}]),
     r"slices\[0\]\.sources\[0\]\.layer_range: expected \[start, end\] with 0 <= start < end; got \[2, 1\]"),
    (cfg(slices=[{"sources": [{"model": "/x", "layer_range": [0, 2]}]}]), r"slices, models: give the models one way"),
    (cfg(dtype="fp8"), r"dtype: 'fp8' is not supported; allowed: float32, bfloat16, float16, float64"),
    (cfg(out_dtype="int8"), r"out_dtype: 'int8' is not supported"),
    (cfg(tokenizer_source=["a"]), r"tokenizer_source: expected 'base', 'union' or a model path; got \['a'\]"),
    (cfg(parameters={"rescale_mode": "l2"}), r"parameters\.rescale_mode: Input should be 'l1' or 'inverse_p'"),
    (cfg(parameters={"normalize": "maybe"}), r"parameters\.normalize: Input should be a valid boolean"),
    (cfg("slerp", models=[{"model": "/a"}, {"model": "/b"}], parameters={"t": 0.5}),
     r"models: slerp takes exactly 2 input model\(s\) counting base_model; got 3"),
    (cfg("slerp", models=[{"model": "/x"}]), r"parameters\.t: required by slerp"),
    (cfg("linear", models=[{"model": "/x", "parameters": {"weight": 1}}]),
     r"base_model \(/nonexistent/model/base\) is not listed under models.*needs 'weight'"),
    (cfg("passthrough", base_model=None, models=[{"model": "/a"}, {"model": "/b"}]),
     r"models: passthrough takes exactly 1 input model\(s\); got 2"),
    (cfg("slerp", models=[{"model": "/a", "parameters": {"wheight": 1}}], parameters={"t": 0.5}),
     r"models\[0\]\.parameters: unknown parameter\(s\) 'wheight' for slerp; allowed: none"),
    (cfg(models=[{"model": "/x", "parameters": {"weight": 1}, "weights": 2}]),
     r"models\[0\]: unknown key\(s\) 'weights'"),
    (cfg(models=[{"model": "/x", "parameters": {"weight": [{"filter": 3, "value": 1}]}}]),
     r"models\[0\]\.parameters\.weight\[0\]\.filter: must be a substring"),
])
def test_bad_configs_fail_before_reading_weights(config, match, tmp_path):
    with pytest.raises(MergeConfigError, match=match):
        run_merge(config, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_per_tensor_errors_fail_before_reading_weights(folders, tmp_path, monkeypatch):
    def no_reads(self, name):
        raise AssertionError(f"read {name} before validation finished")

    monkeypatch.setattr(Checkpoint, "get", no_reads)
    # della: density - epsilon <= 0, only on mlp tensors (a filter), caught while planning
    config = {"merge_method": "della", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"]),
                          "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}}]}
    with pytest.raises(MergeConfigError, match=r"tensor model\.layers\.0\.mlp\.\w+\.weight \(models\[0\].*density \+/- "
                                               r"epsilon must lie in \(0, 1\)"):
        run_merge(config, tmp_path / "out", seed=0)
    # a filter list without fallback leaves weight unset for non-mlp tensors
    config = {"merge_method": "ties", "base_model": str(folders["base"]),
              "models": [{"model": str(folders["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]}
    with pytest.raises(MergeConfigError,
                       match=r"tensor model\.embed_tokens\.weight \(models\[0\].*weight: Field required"):
        run_merge(config, tmp_path / "out", seed=0)
    # linear weights summing to zero for some tensors
    config = {"merge_method": "linear", "models": [
        {"model": str(folders["a"]), "parameters": {"weight": 1}},
        {"model": str(folders["b"]), "parameters": {"weight": [{"filter": "norm", "value": -1}, {"value": 1}]}}]}
    with pytest.raises(MergeConfigError,
                       match=r"tensor model\.layers\.0\.input_layernorm\.weight: linear: weights sum to 0"):
        run_merge(config, tmp_path / "out", seed=0)
    # shapes differ across models: names the tensor and every shape
    config = {"merge_method": "linear", "models": [{"model": str(folders["a"]), "parameters": {"weight": 1}},
                                                   {"model": str(folders["vocab1001"]), "parameters": {"weight": 1}}]}
    with pytest.raises(ValueError, match=r"tensor model\.embed_tokens\.weight has different shapes across models: "
                                         r".*/a: \[1000, 64\], .*/vocab1001: \[1001, 64\]; the vocabularies differ"):
        run_merge(config, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_non_float_tensors_are_copied_from_the_reference(tmp_path):
    from safetensors.torch import save_file

    for i, name in enumerate(("x", "y")):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2, 3), float(i)), "positions": torch.arange(4) + i},
                  str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": "linear", "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1}}
                                                   for n in ("x", "y")]}
    run_merge(config, tmp_path / "m", seed=0)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    torch.testing.assert_close(merged["w"], torch.full((2, 3), 0.5))
    assert torch.equal(merged["positions"], torch.arange(4))


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    config = {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "empty")}]}
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        run_merge(config, tmp_path / "out", seed=0)



@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_workers_do_not_change_the_output(folders, tmp_path, method):
    """Tensors merged two or three at a time come out in the same order with the same bits."""
    config = ties_config(folders, merge_method=method) if method == "ties" else {
        "merge_method": method, "base_model": str(folders["base"]),
        "models": [{"model": str(folders[k]), "parameters": {"weight": 1.0, "density": 0.5}} for k in ("a", "b")]}
    outputs = {}
    for workers in (1, 2, 3):
        run_merge(config, tmp_path / f"w{workers}", seed=3, workers=workers, max_shard_size=50_000)
        outputs[workers] = weights(tmp_path / f"w{workers}")
        index = json.loads((tmp_path / f"w{workers}" / "model.safetensors.index.json").read_text())
        assert index == json.loads((tmp_path / "w1" / "model.safetensors.index.json").read_text())
    for workers in (2, 3):
        assert all(torch.equal(outputs[workers][k], outputs[1][k]) for k in outputs[1])
    with pytest.raises(ValueError, match="workers: expected >= 1; got 0"):
        run_merge(config, tmp_path / "w0", seed=3, workers=0)


def test_checkpoint_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(9).reshape(3, 3), "u8": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ck = Checkpoint(tmp_path)
    assert ck.names() == sorted(tensors)
    for name, x in tensors.items():
        assert ck.shape(name) == tuple(x.shape) and ck.dtype(name) == x.dtype
        got = ck.get(name)
        assert got.dtype == x.dtype and torch.equal(got, x), name
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("shape,dtype", [((3, 257, 33), torch.float32), ((2, 1000), torch.float32),
                                         ((4, 333, 7), torch.bfloat16), ((1, 50), torch.float32),
                                         ((5, 999), torch.float16), ((3, 1100, 1000), torch.bfloat16)])
def test_population_variance_is_torch_var_bit_for_bit(shape, dtype):
    """Also over more positions than one Welford pass takes (VARIANCE_CHUNK: 1,100,000 > 2^20)."""
    from branchmerge.models.merging.methods.sce import population_variance

    g = torch.Generator().manual_seed(sum(shape))
    d = (0.01 * torch.randn(shape, generator=g)).to(dtype)
    d[:, :5] = 0  # zero-variance positions, which sce's count_nonzero skips
    expected = torch.var(d, dim=0, unbiased=False)
    got = population_variance(d)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("shape,dim", [((300_000,), -1), ((64, 5000), 1)])
def test_argsort_magnitudes_is_torch_argsort_including_ties(descending, shape, dim):
    """The integer-view sort keeps mergekit's (torch.argsort's) order among equal magnitudes: the trims then
    keep the same entries. Quantised values give many ties; zeros included."""
    from branchmerge.models.merging.methods.sparsify import argsort_magnitudes

    g = torch.Generator().manual_seed(len(shape))
    w = ((torch.randn(shape, generator=g) * 100).round() / 100).abs()
    w.view(-1)[:500] = 0.0
    expected = torch.argsort(w, dim=dim, descending=descending)
    assert torch.equal(argsort_magnitudes(w, descending=descending, dim=dim), expected)


# ----------------------------------------------------------------------------- tokenizer_source and chat_template

WORDS = ["<unk>", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "it", "is"]


def word_tokenizer(path, added=(), template=None):
    """A 12-word tokenizer (plus `added` special tokens after them) saved into a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if added:
        fast.add_tokens(list(added), special_tokens=True)
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_models")
    a = word_tokenizer(tiny_llama(root / "a", 11, vocab=12), template="{{ 'A' }}{% for m in messages %}{% endfor %}")
    b = word_tokenizer(tiny_llama(root / "b", 12, vocab=14), added=("<think>", "</think>"),
                       template="{{ 'B' }}{% for m in messages %}{% endfor %}")
    c = word_tokenizer(tiny_llama(root / "c", 13, vocab=12), template="{{ 'B' }}{% for m in messages %}{% endfor %}")
    padded = word_tokenizer(tiny_llama(root / "padded", 14, vocab=16))  # 16 rows, 12 tokens (Qwen-style padding)
    return {"a": a, "b": b, "c": c, "padded": padded}


def test_tokenizer_source_union_aligns_rows_and_resizes(vocab_models, tmp_path):
    """union: a's 12 words, then b's two added tokens (ids 12, 13). a lacks them, so its rows for them are b's
    (the only model that has them, as mergekit does): the average keeps b's rows there; vocab_size follows."""
    from transformers import AutoTokenizer

    a, b = vocab_models["a"], vocab_models["b"]
    config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    run_merge(config, tmp_path / "union", seed=0)
    out, wa, wb = weights(tmp_path / "union"), weights(a), weights(b)
    emb = "model.embed_tokens.weight"
    assert out[emb].shape == (14, 64)
    assert torch.equal(out[emb][:12], (0.5 * wa[emb] + 0.5 * wb[emb][:12]) / 1.0)
    assert torch.equal(out[emb][12:], wb[emb][12:])
    assert json.loads((tmp_path / "union" / "config.json").read_text())["vocab_size"] == 14
    tok = AutoTokenizer.from_pretrained(tmp_path / "union")
    assert len(tok) == 14 and tok.convert_tokens_to_ids(["<think>", "</think>", "cat"]) == [12, 13, 3]


def test_tokenizer_source_base_drops_padding_rows(vocab_models, tmp_path):
    """base: the base's tokenizer without ids past its vocab_size; rows past the tokenizer's length (padding)
    are dropped from every vocabulary tensor, and vocab_size is the tokenizer's length (mergekit)."""
    p, a = vocab_models["padded"], vocab_models["a"]
    config = {"merge_method": "task_arithmetic", "base_model": str(p), "dtype": "float32", "tokenizer_source": "base",
              "models": [{"model": str(a), "parameters": {"weight": 0.3}}]}
    run_merge(config, tmp_path / "base", seed=0)
    out, wp, wa = weights(tmp_path / "base"), weights(p), weights(a)
    emb = "model.embed_tokens.weight"
    assert out[emb].shape == (12, 64)
    assert torch.equal(out[emb], wp[emb][:12] + 0.3 * (wa[emb] - wp[emb][:12]))
    assert json.loads((tmp_path / "base" / "config.json").read_text())["vocab_size"] == 12
    # without tokenizer_source the vocabularies must agree, and the message says how to align them
    with pytest.raises(ValueError, match=r"different shapes across models.*set tokenizer_source"):
        run_merge({**config, "tokenizer_source": None}, tmp_path / "none", seed=0)


@pytest.mark.parametrize("template,expected", [
    ("chatml", "builtin"),
    ("auto", "{{ 'B' }}{% for m in messages %}{% endfor %}"),  # b and c share it: the plurality
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "same"),
])
def test_chat_template(vocab_models, tmp_path, template, expected):
    from transformers import AutoTokenizer

    from branchmerge.models.merging.vocab import CHAT_TEMPLATES

    """A built-in name is mergekit's file of that name, `auto` the template most inputs share, anything else the
    template itself; with tokenizer_source (the tokenizer is built) and without (the reference's is re-saved)."""
    names = ("a", "c") if expected == "same" else ("a", "c", "b")  # b's vocabulary needs tokenizer_source
    config = {"merge_method": "linear", "dtype": "float32", "chat_template": template,
              "models": [{"model": str(vocab_models[k]), "parameters": {"weight": 1.0}} for k in names],
              **({"tokenizer_source": "union"} if "b" in names else {})}
    run_merge(config, tmp_path / "out", seed=0)
    got = AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    want = {"builtin": (CHAT_TEMPLATES / "chatml.jinja").read_text(), "same": template}.get(expected, expected)
    assert got == want


def test_a_merge_never_writes_non_finite_values(folders, tmp_path):
    """Finite inputs, an output that overflows float16 (weights 1e7, no normalising): the merge fails naming the
    tensor and publishes nothing, rather than writing inf (mergekit would)."""
    config = {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False},
              "models": [{"model": str(folders["a"]), "parameters": {"weight": 1e7}}]}
    with pytest.raises(RuntimeError, match=r"linear produced \d+ non-finite value\(s\) in .* from finite inputs"):
        run_merge(config, tmp_path / "inf", seed=0)
    assert not (tmp_path / "inf").exists() and not list(tmp_path.glob(".inf*"))
