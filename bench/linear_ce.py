"""Memory-lean linear cross-entropy (kernels/linear_ce.py) vs the plain loss: peak memory and time of one
forward + backward of the LM-head loss at SmolLM2-like shapes.

    .venv/bin/python bench/linear_ce.py [--tokens 4096] [--hidden 576] [--vocab 49152] [--dtype float32]
                                        [--chunk-size 256] [--impls plain,chunked] [--repeats N]

plain: F.cross_entropy(F.linear(h, W).float(), t) (what models.training.sft.masked_lm_loss does on the model's logits);
chunked: the PyTorch reference, chunk_size tokens at a time; triton: the fused kernel (CUDA only); liger:
liger-kernel's fused linear cross-entropy (CUDA, when installed). Each implementation runs in a fresh
subprocess. Memory on CPU: the process's peak RSS (ru_maxrss) minus its RSS just before the call, so the
inputs, the weight and the libraries are not counted but every temporary and the gradients are; on CUDA:
torch.cuda.max_memory_allocated above the allocated bytes before the call. Time: the median of N calls after
a warm-up call on CUDA (Triton compiles on its first launch); on CPU the first call is both measured and timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from branchmerge.kernels import linear_ce as lc  # noqa: E402

MiB = 2**20


def loss_fn(impl: str, chunk_size: int):
    if impl == "plain":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)
    if impl == "chunked":
        return lambda h, w, t: -lc.chunked_linear_logprobs_reference(h, w, t, chunk_size=chunk_size).mean()
    if impl == "triton":
        return lambda h, w, t: -lc.chunked_linear_logprobs_triton(h, w, t).mean()
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)
    raise ValueError(f"--impls: unknown implementation {impl!r}: expected plain, chunked, triton or liger")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args) -> dict:
    """One implementation in this process: {"peak_mib", "seconds"}."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    fn = loss_fn(args.one, args.chunk_size)

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    if cuda:
        step()  # warm-up: compiles; leaves the grads allocated, as in training
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        times = []
        for _ in range(args.repeats or 10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    else:
        before = rss_bytes()
        start = time.perf_counter()
        step()
        times = [time.perf_counter() - start]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        for _ in range((args.repeats or 1) - 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"peak_mib": peak / MiB, "seconds": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--chunk-size", type=int, default=lc.DEFAULT_CHUNK_SIZE)
    ap.add_argument("--impls", default=None, help="comma-separated; default: plain,chunked (+ triton,liger on CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the subprocess: measure this one
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return

    cuda = torch.cuda.is_available()
    impls = args.impls.split(",") if args.impls else ["plain", "chunked"] + (["triton", "liger"] if cuda else [])
    logits_mib = args.tokens * args.vocab * 4 / MiB
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} chunk_size={args.chunk_size} "
          f"on {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'} ({torch.get_num_threads()} threads); "
          f"float32 logits N*V*4 = {logits_mib:.0f} MiB")
    print(f"{'impl':<9} {'peak MiB':>10} {'x logits':>9} {'seconds':>9} {'vs plain mem':>13} {'vs plain time':>14}")
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--one", impl, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size)]
        if args.repeats:
            cmd += ["--repeats", str(args.repeats)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{impl:<9} {'-':>10} {'-':>9} {'-':>9}   ({last[:90]})")
            continue
        r = results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
        ratio = ""
        if "plain" in results and impl != "plain":
            p = results["plain"]
            ratio = f"{p['peak_mib'] / max(r['peak_mib'], 1e-9):>12.1f}x {r['seconds'] / p['seconds']:>13.2f}x"
        print(f"{impl:<9} {r['peak_mib']:>10.0f} {r['peak_mib'] / logits_mib:>9.2f} {r['seconds']:>9.2f} {ratio}")


if __name__ == "__main__":
    main()
