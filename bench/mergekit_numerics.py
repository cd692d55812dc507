"""Our slerp, karcher, ram and ramplus_tl against mergekit 0.1.5's own functions on random tensors, in float32,
bfloat16 (and float64 for karcher), including slerp over 1M elements (mergekit's chunking) and parallel bf16
tensors (where slerp used to write NaN). Runs in mergekit's venv (bench/merge_vs_mergekit.py builds it) with this
checkout importable as `branchmerge` through a folder of symlinks:

    mkdir -p /tmp/shim/branchmerge && ln -sfn $PWD/models /tmp/shim/branchmerge/models \
        && ln -sfn $PWD/kernels /tmp/shim/branchmerge/kernels
    ~/.cache/branchmerge/mergekit-venv/bin/python bench/mergekit_numerics.py

Prints, per case, (our dtype, mergekit's dtype, max |ours - mergekit|); parallel: (mergekit finite, ours finite,
max |diff|). ram / ramplus_tl: mergekit's decorated functions take its TensorGroup, so its helper
_prepare_ram_vectors is called and the two lines of each method body are applied to its outputs.
"""
import sys, torch
sys.path.insert(0, "/tmp/shim")
from mergekit.merge_methods.ram import _prepare_ram_vectors
from mergekit.merge_methods.slerp import slerp as mk_slerp
from mergekit.merge_methods.karcher import karcher_merge_tensors
from branchmerge.models.merging.registry import METHODS
g = torch.Generator().manual_seed(0)
res = {}
for dt in (torch.float32, torch.bfloat16):
    base = torch.randn(300, 257, generator=g).to(dt)
    xs = [(base.float() + torch.randn(300, 257, generator=g) * (torch.rand(300, 257, generator=g) < 0.5)).to(dt)
          for _ in range(3)]
    # mergekit's RAM math via its helper (the decorated functions take a TensorGroup)
    tv, nz, cnt, ov, un = _prepare_ram_vectors(xs, base, 1e-5)
    tz = tv * nz
    mk = base + ((tz * un) + (tz * ov / cnt.clamp(min=1))).sum(dim=0, keepdim=True).reshape_as(base)
    ours = METHODS["ram"](base, xs, params={})
    res[f"ram {dt}"] = (ours.dtype, mk.dtype, float((ours.float() - mk.float()).abs().max()))
    sc = (nz & ov).sum(dim=1); uc = (nz & un).sum(dim=1)
    rho = sc / uc.clamp(min=1e-5); lam = 1 + 0.1 * rho.clamp(min=0, max=0.2)
    merged = ((tz * un * lam.unsqueeze(-1)) + (tz * ov / cnt.clamp(min=1))).sum(dim=0, keepdim=True)
    mk2 = base + merged.reshape_as(base)
    ours2 = METHODS["ramplus_tl"](base, xs, params={})
    res[f"ramplus {dt}"] = (ours2.dtype, mk2.dtype, float((ours2.float() - mk2.float()).abs().max()))
    # slerp: mergekit's takes t as a tensor and a leading batch axis
    for n in (1000, 3_000_000):
        a = torch.randn(n, generator=g).to(dt); b = (0.6 * a.float() + 0.8 * torch.randn(n, generator=g)).to(dt)
        mk3 = mk_slerp(torch.tensor([0.3]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
        ours3 = METHODS["slerp"](a, [b], params={"t": 0.3})
        res[f"slerp {n} {dt}"] = (ours3.dtype, mk3.dtype, float((ours3.float() - mk3.float()).abs().max()))
    same = torch.ones(64, dtype=dt)
    mk4 = mk_slerp(torch.tensor([0.5]), same.unsqueeze(0), same.unsqueeze(0)).squeeze(0)
    ours4 = METHODS["slerp"](same, [same], params={"t": 0.5})
    res[f"slerp parallel {dt}"] = (bool(torch.isfinite(mk4).all()), bool(torch.isfinite(ours4).all()),
                                   float((ours4.float() - mk4.float()).abs().max()))
for dt in (torch.float32, torch.float64, torch.bfloat16):
    ts = [torch.randn(500, 300, generator=g).to(dt) for _ in range(3)]
    mk5 = karcher_merge_tensors(ts, [1/3]*3, max_iter=10, tol=1e-5)
    ours5 = METHODS["karcher"](None, ts, params={})
    res[f"karcher {dt}"] = (ours5.dtype, mk5.dtype, float((ours5.double() - mk5.double()).abs().max()))
for k, v in res.items(): print(k, v)
