"""Memory-lean linear cross-entropy (kernels/linear_ce.py): values and gradients against the plain computation
(full logits, then F.cross_entropy / log_softmax + gather), the models' own losses, the memory bound, dispatch.

Where the Triton kernels run: on CUDA in this process when there is a GPU; on CPU tensors in Triton's
interpreter, which needs TRITON_INTERPRET=1 before kernels.linear_ce is imported, so
`test_kernels_in_triton_interpreter` re-runs this file in a subprocess with the variable set. There the
`triton`/`cpu` cases run on small shapes with small tiles (several token blocks, vocabulary tiles and slices,
V and H not multiples of a tile); bfloat16 runs on CUDA only (the interpreter truncates float32 -> bfloat16).
"""


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from branchmerge.kernels import linear_ce as lc
from tests.triton_interpreter import rerun_in_triton_interpreter

INTERPRETER = lc.interpreted()
CUDA = torch.cuda.is_available() and lc.triton_available() and not INTERPRETER

if INTERPRETER:  # the subprocess: the Triton kernels on CPU tensors
    IMPLS = [("triton", "cpu")]
else:
    IMPLS = [("reference", "cpu"), pytest.param("triton", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA, reason="no CUDA device (or no triton): CPU runs these in test_kernels_in_triton_interpreter")])]
SMALL_BLOCKS = (16, 32, 16)  # (BLOCK_N, BLOCK_V, BLOCK_H): many tiles on test shapes
H, V = 40, 300  # neither a multiple of a tile (BLOCK_H 16 / 64, BLOCK_V 32 / 128)
CHUNK = 16  # reference chunk: N = 37, 100 are not multiples


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """In the interpreter the dispatcher's tiles are the small ones too (many tiles, quick to interpret)."""
    if INTERPRETER:
        for name, value in zip(("BLOCK_N", "BLOCK_V", "BLOCK_H"), SMALL_BLOCKS):
            monkeypatch.setattr(lc, name, value)


def logprobs(impl, hidden, weight, targets, **kw):
    if impl == "triton":
        blocks = SMALL_BLOCKS if INTERPRETER else None
        return lc.chunked_linear_logprobs_triton(hidden, weight, targets, blocks=blocks, **kw)
    return lc.chunked_linear_logprobs_reference(hidden, weight, targets, chunk_size=CHUNK, **kw)


def plain_logprobs(hidden, weight, targets, temperature=1.0, bias=None, ignore_index=-100):
    """The full logits in the inputs' dtype, float32 log_softmax, gather (models.training.grpo's recipe)."""
    z = F.linear(hidden, weight, bias).float() / temperature
    lp = z.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != ignore_index, lp, 0.0)


def make(n, dtype, device, seed=0, ignore_every=4, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = 0.3 * torch.randn(V, H, generator=g)
    b = 0.5 * torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    targets[V - 1 :: 7] = V - 1  # the last class (in the last, partial vocabulary tile)
    if ignore_every:
        targets[1::ignore_every] = -100
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, b)]
    return (*leaves, targets.to(device))


def grads(out, upstream, *leaves):
    return torch.autograd.grad(out, [x for x in leaves if x is not None], upstream)


# ----------------------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("n", [1, 16, 37, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_logprobs_float32(impl, device, n, temperature, bias):
    h, w, b, t = make(n, torch.float32, device, seed=n, bias=bias)
    got = logprobs(impl, h, w, t, temperature=temperature, bias=b)
    want = plain_logprobs(h, w, t, temperature, b)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[t == -100] == 0)
    up = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    for g_got, g_want in zip(grads(got, up, h, w, b), grads(want, up, h, w, b)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_half(impl, device, dtype):
    if INTERPRETER and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates float32 -> bfloat16 (see the module docstring)")
    n = 100
    h, w, _, t = make(n, dtype, device, seed=3)
    up = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    got = logprobs(impl, h, w, t, temperature=0.7)
    g_got = grads(got, up, h, w)
    assert g_got[0].dtype == dtype and g_got[1].dtype == dtype
    # Against the exact float32 computation on the same (rounded) inputs: within the dtype's rounding.
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    exact = plain_logprobs(h32, w32, t, 0.7)
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(got, exact, **tol)
    for a, b in zip(g_got, grads(exact, up, h32, w32)):
        torch.testing.assert_close(a.float(), b, **tol)
    if impl == "reference":  # the same roundings as the plain path in the dtype: much closer
        want = plain_logprobs(h, w, t, 0.7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_got, grads(want, up, h, w)):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_f_cross_entropy(impl, device, reduction, monkeypatch):
    monkeypatch.setenv(lc.ENV, impl)
    h, w, b, t = make(37, torch.float32, device, seed=5, bias=True)
    got = lc.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=CHUNK)
    want = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.ones_like(want)
    for a, c in zip(grads(got, up, h, w, b), grads(want, up, h, w, b)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, device, monkeypatch):
    monkeypatch.setenv(lc.ENV, impl)
    h, w, _, t = make(5, torch.float32, device, ignore_every=0)
    t[:] = -100
    loss = lc.linear_cross_entropy(h, w, t)
    assert loss.item() == 0.0 and not loss.isnan()
    gh, gw = grads(loss, torch.ones_like(loss), h, w)
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_frozen_weight_and_leading_dims(impl, device):
    """A frozen lm_head (LoRA) gets no gradient buffer; [B, K, H] hidden states give [B, K] log-probs."""
    h, w, _, t = make(36, torch.float32, device, seed=7)
    w = w.detach()
    got = logprobs(impl, h.view(4, 9, H), w, t.view(4, 9), temperature=0.9)
    assert got.shape == (4, 9)
    want = plain_logprobs(h, w, t, 0.9).view(4, 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = grads(got.sum(), None, h)
    (g_want,) = grads(want.sum(), None, h)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_reference_rejects_out_of_range_targets_and_bad_arguments():
    h, w, _, t = make(4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"targets: expected class indices in \[0, 300\)"):
        lc.chunked_linear_logprobs_reference(h, w, torch.tensor([0, 1, 300, -100]))
    with pytest.raises(ValueError, match="targets: expected the hidden states' leading shape"):
        lc.chunked_linear_logprobs_reference(h, w, t[:3])
    with pytest.raises(ValueError, match="weight: expected"):
        lc.chunked_linear_logprobs_reference(h, w.t(), t)
    with pytest.raises(ValueError, match="reduction='avg'"):
        lc.linear_cross_entropy(h, w, t, reduction="avg")


# ----------------------------------------------------------------------------- against the models' losses

@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _hidden_and_logits(model, ids):
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    return hidden, model.get_output_embeddings()(hidden)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_shifted_loss_equals_masked_lm_loss(tiny_llama, impl, device, monkeypatch):
    from branchmerge.models.training.sft import masked_lm_loss

    monkeypatch.setenv(lc.ENV, impl)
    model = tiny_llama.to(device)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[2, 15:] = -100  # padding
    head = model.get_output_embeddings().weight
    params = [head, model.model.layers[0].mlp.up_proj.weight]

    hidden, logits = _hidden_and_logits(model, ids)
    want = masked_lm_loss(logits, labels)
    g_want = torch.autograd.grad(want, params)
    hidden, _ = _hidden_and_logits(model, ids)
    got = lc.shifted_linear_cross_entropy(hidden, head, labels, chunk_size=CHUNK)
    g_got = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_selective_logprobs_equal_grpo(tiny_llama, impl, device, monkeypatch):
    """models.training.grpo.selective_logprobs's numbers: log softmax(logits / T) of the last K tokens."""
    from branchmerge.models.training.grpo import logprobs_from_logits

    monkeypatch.setenv(lc.ENV, impl)
    model = tiny_llama.to(device)
    ids = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1)).to(device)
    k, temperature = 9, 0.7
    head = model.get_output_embeddings().weight
    hidden, logits = _hidden_and_logits(model, ids)
    want = logprobs_from_logits(logits[:, -k - 1 : -1], ids[:, -k:], temperature)
    got = lc.chunked_linear_logprobs(hidden[:, -k - 1 : -1], head, ids[:, -k:], temperature=temperature,
                                     chunk_size=CHUNK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn(4, k, generator=torch.Generator().manual_seed(2)).to(device)
    layer = model.model.layers[1].self_attn.q_proj.weight
    for a, b in zip(torch.autograd.grad(got, [head, layer], up, retain_graph=True),
                    torch.autograd.grad(want, [head, layer], up)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- memory

class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op returns while active, and how many ops ran."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.skipif(INTERPRETER, reason="a CPU reference check")
def test_reference_never_materialises_the_logits():
    """Forward and backward: no tensor of N * V elements is ever created (the plain path makes several)."""
    n, v, h, chunk = 512, 1000, 16, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)

    def largest(loss_fn):
        fwd, bwd = LargestTensor(), LargestTensor()
        with fwd:
            loss = loss_fn()
        with bwd:
            loss.backward()
        assert bwd.ops > 0  # the backward ran under the mode
        return fwd.largest, bwd.largest

    plain = largest(lambda: F.cross_entropy(F.linear(hidden, weight), targets))
    assert min(plain) >= n * v  # the probe sees the logits where they exist
    lean = largest(lambda: lc.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk))
    assert max(lean) <= max(chunk * v, v * h), lean  # one chunk's logits, or grad_weight
    assert max(lean) * 8 <= n * v


# ----------------------------------------------------------------------------- dispatch
# The switch itself (kernels/dispatch.py) is tested in tests/test_kernels.py.

def test_dispatch_is_the_shared_switch():
    from branchmerge.kernels import dispatch

    assert lc.backend is dispatch.backend


# ----------------------------------------------------------------------------- CPU: the interpreter subprocess

@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="already in the interpreter")
@pytest.mark.skipif(not lc.triton_available(), reason="triton is not installed (pip install -e '.[dev]')")
def test_kernels_in_triton_interpreter():
    """Runs this file again with TRITON_INTERPRET=1: the fused kernels on CPU tensors against the plain path."""
    rerun_in_triton_interpreter(__file__)
