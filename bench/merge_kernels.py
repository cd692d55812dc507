"""Merge kernels: PyTorch reference vs Triton (kernels/merge.py) on one tensor of every model.

    .venv/bin/python bench/merge_kernels.py [--size 4096] [--models 3] [--dtype float32] [--repeats N]

On CUDA: times each op's reference and Triton kernel (median of N calls after a warm-up that compiles it)
and prints the ratio, with the Triton kernel's effective bandwidth (the bytes it must move / time). Without
CUDA: reference only (the Triton column reads "-"), which at least shows the script and the references run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from branchmerge.kernels import merge as km  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of one call, after a warm-up call (Triton compiles on its first launch)."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="each model's tensor is size x size")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and km.triton_available()
    device = "cuda" if cuda else "cpu"
    repeats = args.repeats or (20 if cuda else 3)
    dtype = getattr(torch, args.dtype)
    n, shape = args.models, (args.size, args.size)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    deltas = (0.01 * torch.randn(n, *shape, generator=g)).to(device=device, dtype=dtype)
    uniforms = torch.rand((n, *shape), generator=g).to(device)  # as models/merging/methods/sparsify.py draws them
    weights = [1.0, 0.5, 0.8, 0.3][:n] + [1.0] * max(0, n - 4)

    elt = deltas.element_size()
    numel = deltas[0].numel()
    # op name -> (reference call, triton call, bytes the kernel must move at least)
    ops = {
        "drop_rescale (DARE, l1)": (
            lambda: km.drop_rescale_reference(deltas, args.density, uniforms=uniforms, rescale="l1"),
            lambda: km.drop_rescale_triton(deltas, args.density, uniforms=uniforms, rescale="l1"),
            n * numel * (2 * elt + 4 + 4)),  # partials pass: delta + uniforms; apply pass: delta + uniforms + out
        "sign_elect_disjoint_mean (TIES)": (
            lambda: km.sign_elect_disjoint_mean_reference(base, deltas, weights, consensus=True, normalize=True),
            lambda: km.sign_elect_disjoint_mean_triton(base, deltas, weights, consensus=True, normalize=True),
            (n + 2) * numel * elt),
    }
    what = f"{n} models x {args.size}x{args.size} {args.dtype} on {torch.cuda.get_device_name() if cuda else 'CPU'}"
    print(f"merge kernels: {what}, median of {repeats}" + ("" if cuda else " (no CUDA: reference only)"))
    print(f"{'op':34} {'reference':>11} {'triton':>11} {'ratio':>7} {'triton GB/s':>12}")
    for name, (reference, kernel, nbytes) in ops.items():
        t_ref = timed(reference, repeats)
        if cuda:
            t_tri = timed(kernel, repeats)
            print(f"{name:34} {t_ref * 1e3:9.3f}ms {t_tri * 1e3:9.3f}ms {t_ref / t_tri:6.2f}x "
                  f"{nbytes / t_tri / 1e9:12.1f}")
        else:
            print(f"{name:34} {t_ref * 1e3:9.3f}ms {'-':>11} {'-':>7} {'-':>12}")


if __name__ == "__main__":
    main()
