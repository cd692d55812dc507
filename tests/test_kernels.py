"""Merge kernels (kernels/merge.py): each Triton kernel against its PyTorch reference, and the dispatcher.

Where the kernels run: on CUDA in this process when there is a GPU; on CPU tensors in Triton's interpreter.
TRITON_INTERPRET=1 must be set before triton.jit decorates the kernels, i.e. before kernels.merge is imported
(other test modules import it through models.merging), so `test_kernels_in_triton_interpreter` re-runs this
file in a subprocess with the variable set; there the `cpu` cases below run and the `cuda` ones do not.
bfloat16 runs on CUDA only: the interpreter (triton 3.9) truncates float32 -> bfloat16 casts instead of
rounding to nearest even, so it cannot reproduce torch's bfloat16 results.
"""

import pytest
import torch

from branchmerge.kernels import merge as km
from tests.triton_interpreter import rerun_in_triton_interpreter

INTERPRETER = km.interpreted()
CUDA = torch.cuda.is_available() and km.triton_available() and not INTERPRETER

if INTERPRETER:
    DEVICES = ["cpu"]
else:
    DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA, reason="no CUDA device (or no triton): CPU runs these in test_kernels_in_triton_interpreter")])]
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETER else [torch.bfloat16])  # bfloat16: see the docstring
# (shape of one model's tensor, n_models): block-size multiples and not (BLOCK = 1024), 1-D and 2-D.
CASES = [((1,), 2), ((7,), 3), ((1024,), 4), ((1025,), 2), ((33, 65), 3), ((3, 1000), 4)]
WEIGHTS = [1.0, 1.0, 0.5, -0.3]  # two equal weights: integer deltas then cancel to exact zero sums


def make_deltas(shape, n, dtype, device, values="normal", seed=0):
    """n deltas with exact zeros, cancelling pairs (zero sums: sign ties) and, for "integers", equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    if values == "integers":
        d = torch.randint(-3, 4, (n, *shape), generator=g).float()
    else:
        d = torch.randn(n, *shape, generator=g)
    flat = d.view(n, -1)
    flat[0, ::5] = 0  # dropped entries never vote
    flat[1, 1::7] = -flat[0, 1::7]  # w_0 = w_1: these cancel to 0 (elected sign +)
    flat[:, 2::11] = 0  # all-zero positions: divisor 0 counts as 1
    return d.to(device=device, dtype=dtype)


def check(out, ref, exact):
    """float32: within 1e-6; exact: bit for bit; bfloat16 / float16: torch's default tolerance for the dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    elif out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out, ref)


def bit_exact(rescale=None):
    """The interpreter reproduces the CPU reference bit for bit except the L1 norms (summation order); on CUDA
    torch's own reductions and division by a Python scalar may round differently."""
    return INTERPRETER and rescale != "l1"


# ----------------------------------------------------------------------------- kernels vs references

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", CASES)
@pytest.mark.parametrize("draws", ["mask", "uniforms", "per_entry_p"])
@pytest.mark.parametrize("rescale", [None, "l1", "inverse_p"])
def test_drop_rescale(device, dtype, shape, n, draws, rescale):
    d = make_deltas(shape, n, dtype, device)
    g = torch.Generator().manual_seed(1)
    if draws == "per_entry_p":  # DELLA: one keep probability per entry
        p = (0.25 + 0.5 * torch.rand(n, *shape, generator=g)).to(device)
        kw = {"mask": torch.bernoulli(p.cpu(), generator=g).to(device)}
    else:
        p = [0.3, 0.5, 0.7, 0.9][:n]
        if draws == "mask":  # as sparsify.bernoulli draws them: float32 0/1 from the tensor's generator
            kw = {"mask": torch.stack([torch.bernoulli(torch.full(shape, q), generator=g) for q in p]).to(device)}
        else:
            kw = {"uniforms": torch.rand(n, *shape, generator=g).to(device)}
    ref = km.drop_rescale_reference(d, p, rescale=rescale, **kw)
    check(km.drop_rescale_triton(d, p, rescale=rescale, **kw), ref, bit_exact(rescale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", CASES)
@pytest.mark.parametrize("values", ["normal", "integers"])
@pytest.mark.parametrize("consensus,normalize,lambda_", [
    (True, True, 1.0), (True, False, 0.6), (False, True, 1.0), (False, False, 1.0), (False, True, 0.6)])
def test_sign_elect_disjoint_mean(device, dtype, shape, n, values, consensus, normalize, lambda_):
    d = make_deltas(shape, n, dtype, device, values)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    kw = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    ref = km.sign_elect_disjoint_mean_reference(base, d, WEIGHTS[:n], **kw)
    before = d.clone()
    check(km.sign_elect_disjoint_mean_triton(base, d, WEIGHTS[:n], **kw), ref, bit_exact())
    assert torch.equal(d, before)  # the kernel never writes the deltas


@pytest.mark.parametrize("device", DEVICES)
def test_weights_summing_to_zero_do_not_divide(device):
    """No consensus, normalize: sum_i w_i == 0 counts as 1 (as task_arithmetic.py did)."""
    d = make_deltas((100,), 2, torch.float32, device)
    base = torch.zeros(100, device=device)
    for impl in (km.sign_elect_disjoint_mean_reference, km.sign_elect_disjoint_mean_triton):
        out = impl(base, d, [1.0, -1.0], consensus=False, normalize=True)
        torch.testing.assert_close(out, d[0] - d[1])


# ----------------------------------------------------------------------------- models/merging through the kernels

@pytest.mark.skipif(INTERPRETER, reason="a CPU reference check")
def test_dare_drop_equals_its_formula():
    """sparsify.bernoulli (through drop_rescale's reference on CPU) against the formula written out."""
    from branchmerge.models.merging.methods import sparsify as sp

    delta = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    keep = (torch.rand(delta.shape, generator=torch.Generator().manual_seed(5)) < 0.3).float()
    masked = delta * keep
    for rescale, want in ((None, masked), ("inverse_p", masked / 0.3),
                          ("l1", masked * (delta.abs().sum() / masked.abs().sum()))):
        got = sp.bernoulli(delta, 0.3, torch.Generator().manual_seed(5), rescale)
        assert torch.equal(got, want), rescale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [None, "l1", "inverse_p"])
def test_dare_and_della_run_the_kernel_like_the_reference(device, dtype, rescale, monkeypatch):
    """The merge methods' drops (models/merging/methods/sparsify.py) on the Triton path equal the reference path."""
    from branchmerge.models.merging.methods import sparsify as sp

    for shape in ((7,), (33, 65)):
        delta = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
        runs = {}
        for impl in ("reference", "triton"):
            monkeypatch.setenv(km.ENV, impl)
            runs[impl] = (sp.bernoulli(delta, 0.3, torch.Generator().manual_seed(5), rescale),
                          sp.della_magprune(delta, 0.4, 0.1, torch.Generator().manual_seed(5), rescale))
        for got, ref in zip(runs["triton"], runs["reference"]):
            check(got, ref, bit_exact(rescale))


# ----------------------------------------------------------------------------- dispatch

def test_dispatch(monkeypatch):
    cpu = torch.zeros(3)
    monkeypatch.delenv(km.ENV, raising=False)
    assert km.backend(cpu) == "reference"  # auto: Triton only for CUDA tensors
    monkeypatch.setenv(km.ENV, "reference")
    assert km.backend(cpu) == "reference"
    monkeypatch.setenv(km.ENV, "cuda")
    with pytest.raises(ValueError, match="BRANCHMERGE_KERNELS='cuda': expected reference, triton or auto"):
        km.backend(cpu)
    monkeypatch.setenv(km.ENV, "triton")
    if not km.triton_available():
        with pytest.raises(RuntimeError, match="triton is not installed"):
            km.backend(cpu)
        return
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        km.backend(cpu.double())
    if INTERPRETER:
        assert km.backend(cpu) == "triton"
        d = make_deltas((50,), 3, torch.float32, "cpu")
        out = km.sign_elect_disjoint_mean(cpu.new_zeros(50), d, [1.0, 0.5, 0.3])
        assert torch.equal(out, km.sign_elect_disjoint_mean_triton(cpu.new_zeros(50), d, [1.0, 0.5, 0.3]))
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            km.backend(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_auto_dispatch_uses_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(km.ENV, raising=False)
    assert km.backend(torch.zeros(3, device="cuda")) == "triton"
    assert km.backend(torch.zeros(3, device="cuda", dtype=torch.float64)) == "reference"


# ----------------------------------------------------------------------------- CPU: the interpreter subprocess

@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="already in the interpreter")
@pytest.mark.skipif(not km.triton_available(), reason="triton is not installed (pip install -e '.[dev]')")
def test_kernels_in_triton_interpreter():
    """Runs this file again with TRITON_INTERPRET=1: every kernel on CPU tensors against its reference."""
    rerun_in_triton_interpreter(__file__)
