"""Our merge engine vs mergekit on three real fine-tunes of SmolLM2-135M-Instruct: same answers, time, memory.

    flock /tmp/bm_cpu.lock .venv/bin/python bench/merge_vs_mergekit.py [--methods ties,linear] [--repeats 3]
        [--variants float32,bfloat16] [--keep] [--out results.json]

For every method both registries have at run time, one mergekit-shaped config (merge_config below) is merged by
`mergekit-yaml` and by our `run_merge`, each in a fresh process wrapped so that its wall time and peak RSS are
its own. Then every output tensor is compared in float32; deterministic methods must agree to 1e-6. The
random ones (DARE / DELLA masks, arcee_fusion's quantile subsample of tensors over 1e6 elements) cannot
share mergekit's RNG: their difference is printed but not judged, and for DARE / DELLA a one-model probe
merge checks instead that each tool keeps a `density` fraction of the delta.

First use builds, under $BRANCHMERGE_CACHE (default ~/.cache/branchmerge):
- mergekit-venv/: mergekit in its own virtual environment (torch==2.13.0 first: the CPU wheel on disk; a
  plain torch requirement would pull a multi-GB CUDA build);
- bench/merge_vs_mergekit/: the SmolLM2 base as an fp32 HF folder, and three fine-tunes of it, one per
  domain of conf/data/reasoning_gym.yaml: SFT_STEPS optimizer steps of our SFT (conf/sft/full.yaml) on the
  domain's one-shot prompts with reasoning-gym's gold answers as worked completions (no teacher needed);
- bench/merge_vs_mergekit-bf16/: the same four models stored in bfloat16, as real checkpoints are. Their
  configs have no `dtype` key, so both tools merge in the stored bf16 (mergekit's default; slerp-like
  methods take their coefficients in float32 inside), and must still agree to 1e-6.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
# mergekit-yaml flags. Measured here (linear x3, ties x1): default 7.0-8.9 / 46.3 s, --no-write-model-card
# 7.0-7.9 / 49.1 s, + -j 2 6.4-7.9 / 45.9 s, + --async-write 6.9-9.2 / 45.8 s: all within noise, so the
# cheapest work: no model card, torch threads = the 2 cores. The rest are its defaults (no lazy unpickle: the
# inputs are safetensors; 5B-parameter shards: one output file, like ours).
MERGEKIT_FLAGS = ["--copy-tokenizer", "--no-write-model-card", "-j", "2"]
DOMAINS = ("arithmetic", "gcd", "lcm")
SFT_STEPS = 24  # optimizer steps per fine-tune (batch 8, conf/sft/full.yaml otherwise)
TOLERANCE = 1e-6  # max |ours - mergekit| for deterministic methods, float32
KEPT_TOLERANCE = 0.005  # |kept fraction - density| for the random sparsifiers
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}  # every tensor's mask is drawn
QUANTILE_SAMPLE = 1_000_000  # arcee_fusion subsamples tensors larger than this at random (both tools)

# A wrapper process per measured run: RUSAGE_CHILDREN's peak is then that one run's (it is the max over all
# children a process ever waited for, so the bench itself cannot ask it twice).
MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
seconds = time.perf_counter() - t0
print(json.dumps({"rc": p.returncode, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr": p.stderr.decode(errors="replace")[-4000:]}))
"""
OURS = """
import json, sys
from branchmerge.models.merging.run import run_merge
run_merge(json.load(open(sys.argv[1])), sys.argv[2], seed=0, overwrite=True)
"""
MERGEKIT_METHODS = """
import json
from mergekit.merge_methods import registry
names = ([m.spec.name for m in registry.registered_methods()] if hasattr(registry, "registered_methods")
         else list(registry.REGISTERED_MERGE_METHODS))
print(json.dumps(sorted(names)))
"""


# ----------------------------------------------------------------------------------------------- setup


def cache_root() -> Path:
    from branchmerge.models.cache import cache_root as root  # $BRANCHMERGE_CACHE or ~/.cache/branchmerge

    return root()


def pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ours(*packages: str) -> tuple[str, ...]:
    """Pins of our own installed versions, for a peer venv that must run the same code (e.g. transformers' model
    code): read at run time, so an upgrade here cannot leave a peer on the old version unnoticed."""
    from importlib.metadata import version

    return tuple(f"{p}=={version(p)}" for p in packages)


def peer_venv(name: str, *requirements: str) -> Path:
    """A peer tool's own venv under the cache (its pins need not agree with ours), created on first use.
    `requirements` include TORCH, installed first: the CPU build on disk then satisfies the tool's torch
    requirement (a plain one would pull a multi-GB CUDA build)."""
    venv = cache_root() / name
    marker = venv / f".installed-{'-'.join(requirements)}"
    if marker.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a half-built venv: start over (venvs cannot be moved into place)
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    pip(venv, TORCH)
    pip(venv, *requirements)
    marker.write_text(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], check=True,
                                     capture_output=True, text=True).stdout)
    return venv


def mergekit_venv() -> Path:
    return peer_venv("mergekit-venv", MERGEKIT, TORCH)


def mergekit_methods(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", MERGEKIT_METHODS], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def sft_examples(domain: str, size: int) -> list[dict]:
    """One-shot prompts of the domain with the gold answer, worked, as the completion."""
    from branchmerge.models.data import domains

    data = yaml.safe_load((ROOT / "conf/data/reasoning_gym.yaml").read_text())
    tasks = data["domains"][domain]["tasks"]
    items = domains.build_items(domain, tasks, size=size, seed=data["seed"])
    shots = domains.make_shots(tasks, k=data["shots"], seed=10_000, exclude={it["question"] for it in items})
    return [{"messages": domains.build_messages(it, shots),
             "completion": domains.worked_response(it["task"], it["entry"])} for it in items]


def prepare_models() -> tuple[Path, list[Path]]:
    """The base (materialized SmolLM2, fp32) and one fine-tune per domain, built once and cached."""
    from branchmerge.models.lm.hf import atomic_dir, publish_dir

    folder = cache_root() / "bench" / "merge_vs_mergekit"
    base = folder / "base"
    if not (base / "config.json").exists():
        from branchmerge.models.lm.hf import materialize_model

        source = yaml.safe_load((ROOT / "conf/student/smollm2.yaml").read_text())["source"]
        tmp = atomic_dir(base)
        materialize_model(source, tmp, "float32")
        publish_dir(tmp, base)
    fts = []
    for domain in DOMAINS:
        ft = folder / f"ft-{domain}"
        fts.append(ft)
        if (ft / "config.json").exists():
            continue
        from branchmerge.models.training.config import SFTConfig
        from branchmerge.models.training.sft import train_sft

        sft = yaml.safe_load((ROOT / "conf/sft/full.yaml").read_text())
        cfg = SFTConfig(**sft | dict(epochs=10, max_steps=SFT_STEPS, save_dtype="float32"))  # steps bound it
        examples = sft_examples(domain, SFT_STEPS * cfg.batch_size * cfg.grad_accum)
        tmp = atomic_dir(ft)
        t0 = time.perf_counter()
        metrics = train_sft(cfg, str(base), examples, tmp, seed=0, progress=False)
        publish_dir(tmp, ft)
        losses = metrics["loss_history"]
        print(f"fine-tuned {ft.name}: {metrics['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return base, fts


def bf16_models(base: Path, fts: list[Path]) -> tuple[Path, list[Path]]:
    """The four models cast to bfloat16 (config dtype too), built once and cached."""
    import torch
    from safetensors.torch import load_file, save_file

    from branchmerge.models.lm.hf import atomic_dir, publish_dir

    folder = cache_root() / "bench" / "merge_vs_mergekit-bf16"
    out = []
    for src in (base, *fts):
        dst = folder / src.name
        out.append(dst)
        if (dst / "config.json").exists():
            continue
        tmp = atomic_dir(dst)
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()}
                save_file(tensors, tmp / f.name, metadata={"format": "pt"})
            elif f.name == "config.json":
                config = json.loads(f.read_text())
                config.update({k: "bfloat16" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "bfloat16"})
                (tmp / f.name).write_text(json.dumps(config, indent=2))
            elif f.is_file():
                shutil.copy(f, tmp / f.name)
        publish_dir(tmp, dst)
    return out[0], out[1:]


# ----------------------------------------------------------------------------------------------- configs


def merge_config(method: str, base: Path, fts: list[Path], variant: str = "float32") -> dict | None:
    """One mergekit config per method, parameters chosen so each method does real work on these models
    (densities < 1, unequal weights, lambda != 1). None: a method this bench has no config for yet. bfloat16:
    no `dtype` key (each tool merges in the inputs' bf16)."""
    b, (a, g, c) = str(base), map(str, fts)

    def models(paths, **per_model):
        return [{"model": p, "parameters": {k: v[i] for k, v in per_model.items()}} for i, p in enumerate(paths)]

    weights = [1.0, 0.8, 0.6]
    three = [a, g, c]
    configs = {
        "linear": {"models": models(three, weight=[0.5, 0.3, 0.2]), "parameters": {"normalize": True}},
        "task_arithmetic": {"base_model": b, "models": models(three, weight=weights), "parameters": {"lambda": 0.9}},
        "ties": {"base_model": b, "models": models(three, weight=weights, density=[0.4, 0.5, 0.6]),
                 "parameters": {"normalize": True}},
        "breadcrumbs": {"base_model": b, "models": models(three, weight=weights, density=[0.8, 0.85, 0.9],
                                                          gamma=[0.01, 0.02, 0.01])},
        "breadcrumbs_ties": {"base_model": b, "models": models(three, weight=weights, density=[0.8, 0.85, 0.9],
                                                               gamma=[0.01, 0.02, 0.01])},
        "dare_linear": {"base_model": b, "models": models(three, weight=weights, density=[0.5, 0.5, 0.5])},
        "dare_ties": {"base_model": b, "models": models(three, weight=weights, density=[0.5, 0.5, 0.5])},
        "della": {"base_model": b, "models": models(three, weight=weights, density=[0.5, 0.5, 0.5],
                                                    epsilon=[0.1, 0.1, 0.1])},
        "della_linear": {"base_model": b, "models": models(three, weight=weights, density=[0.5, 0.5, 0.5],
                                                           epsilon=[0.1, 0.1, 0.1])},
        "sce": {"base_model": b, "models": models(three), "parameters": {"select_topk": 0.5}},
        "model_stock": {"base_model": b, "models": models(three)},
        "slerp": {"base_model": b, "models": models([b, a]), "parameters": {"t": 0.4}},
        "nearswap": {"base_model": b, "models": models([b, a]), "parameters": {"t": 1e-4}},
        "passthrough": {"models": models([a], scale=[0.5])},
        "nuslerp": {"base_model": b, "models": models([a, g], weight=[0.6, 0.4])},
        "multislerp": {"base_model": b, "models": models(three, weight=[0.5, 0.3, 0.2])},
        "karcher": {"models": models(three), "parameters": {"max_iter": 10, "tol": 1e-5}},
        "arcee_fusion": {"base_model": b, "models": models([b, a])},
        "ram": {"base_model": b, "models": models(three), "parameters": {"epsilon": 1e-4}},
        "ramplus_tl": {"base_model": b, "models": models(three), "parameters": {"r": 0.5, "alpha": 0.4,
                                                                             "epsilon": 1e-4}},
    }
    if method not in configs:
        return None
    config = {"merge_method": method, **configs[method], **({"dtype": "float32"} if variant == "float32" else {})}
    for m in config["models"]:
        if not m["parameters"]:
            del m["parameters"]
    return config


def probe_config(method: str, config: dict, base: Path, ft: Path) -> dict:
    """The random method on one fine-tune with weight 1: output - base = its sparsified delta alone."""
    params = dict(next(m for m in config["models"] if m["model"] != str(base))["parameters"], weight=1.0)
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(ft), "parameters": params}],
            **({"dtype": config["dtype"]} if "dtype" in config else {})}


# ----------------------------------------------------------------------------------------------- running


def measured(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run([PY, "-c", MEASURE, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    run = json.loads(proc.stdout)
    if run["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {run['rc']}:\n{run['stderr']}")
    return run


def run_ours(config_json: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return measured([PY, "-c", OURS, str(config_json), str(out)], env)


def run_mergekit(venv: Path, config_yaml: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return measured([str(venv / "bin" / "mergekit-yaml"), str(config_yaml), str(out), *MERGEKIT_FLAGS], env)


def warm_page_cache(folders: list[Path]) -> None:
    """Read the inputs once, so neither tool pays for the first cold read."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# ----------------------------------------------------------------------------------------------- comparing


def weights(folder: Path) -> dict[str, tuple[Path, str]]:
    """tensor name -> (file, name) over a folder's safetensors files."""
    from safetensors import safe_open

    names = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names.update({n: (f, n) for n in h.keys()})
    return names


def load(where: tuple[Path, str]):
    from safetensors import safe_open

    with safe_open(str(where[0]), framework="pt") as h:
        return h.get_tensor(where[1]).float()


def stored_dtype(where: tuple[Path, str]) -> str:
    from safetensors import safe_open

    with safe_open(str(where[0]), framework="pt") as h:
        return h.get_slice(where[1]).get_dtype()


def compare(ours: Path, theirs: Path, random_tensor) -> dict:
    """max |ours - mergekit| over every shared tensor (float32), split into judged and random tensors."""
    import torch

    a, b = weights(ours), weights(theirs)
    judged, rand, dtypes = (0.0, None), (0.0, None), []
    for name in sorted(set(a) & set(b)):
        x, y = load(a[name]), load(b[name])
        if x.shape != y.shape:
            raise RuntimeError(f"{name}: ours {list(x.shape)} vs mergekit {list(y.shape)}")
        if stored_dtype(a[name]) != stored_dtype(b[name]):  # same values in another dtype are not the same file
            dtypes.append(f"{name}: ours {stored_dtype(a[name])}, mergekit {stored_dtype(b[name])}")
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = (x - y).abs().masked_fill(both_nan, 0)
        worst = float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0
        key = "rand" if random_tensor(name, x) else "judged"
        if key == "rand" and worst >= rand[0]:
            rand = (worst, name)
        elif key == "judged" and worst >= judged[0]:
            judged = (worst, name)
    return {"max_abs": judged[0], "worst_tensor": judged[1], "random_max_abs": rand[0], "random_worst": rand[1],
            "dtype_mismatches": dtypes,
            "only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a))}


def kept_fraction(out: Path, base: Path, ft: Path) -> float:
    """Share of the fine-tune's nonzero delta entries that survive in a one-model merge (out != base there)."""
    o, b, f = weights(out), weights(base), weights(ft)
    kept = total = 0
    for name in o:
        if name not in b or name not in f:
            continue
        x, y, z = load(o[name]), load(b[name]), load(f[name])
        moved = z != y
        kept += int((moved & (x != y)).sum())
        total += int(moved.sum())
    return kept / max(total, 1)


# ----------------------------------------------------------------------------------------------- main


def random_tensors(method: str):
    if method in RANDOM:
        return lambda name, t: True
    if method == "arcee_fusion":
        return lambda name, t: t.numel() > QUANTILE_SAMPLE
    return lambda name, t: False


def bench_method(method: str, config: dict, venv: Path, base: Path, fts: list[Path], work: Path, repeats: int,
                 env: dict, keep: bool, variant: str = "float32") -> dict:
    from branchmerge.models.merging.config import validate_config

    validate_config(config)  # a config ours rejects fails here, before any timing
    d = work / f"{method}-{variant}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    ours, theirs = [], []
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
        try:
            theirs.append(run_mergekit(venv, d / "config.yml", d / "mergekit", env))
        except RuntimeError as err:  # mergekit refuses what we merge: a row that says so, the bench goes on
            ours.append(run_ours(d / "config.json", d / "ours", env))
            last = [line for line in str(err).splitlines() if line.strip()][-1]
            row = {"method": method, "variant": variant, "config": config, "status": "mergekit-error",
                   "mergekit_error": last, "ours_s": ours[-1]["seconds"], "ours_rss_mb": ours[-1]["peak_rss_mb"],
                   "ours_runs_s": [round(ours[-1]["seconds"], 2)], "mergekit_runs_s": []}
            if not keep:
                shutil.rmtree(d, ignore_errors=True)
            return row
        ours.append(run_ours(d / "config.json", d / "ours", env))
    row = {"method": method, "variant": variant, "config": config,
           "ours_s": statistics.median(r["seconds"] for r in ours),
           "mergekit_s": statistics.median(r["seconds"] for r in theirs),
           "ours_rss_mb": statistics.median(r["peak_rss_mb"] for r in ours),
           "mergekit_rss_mb": statistics.median(r["peak_rss_mb"] for r in theirs),
           "ours_runs_s": [round(r["seconds"], 2) for r in ours],
           "mergekit_runs_s": [round(r["seconds"], 2) for r in theirs],
           **compare(d / "ours", d / "mergekit", random_tensors(method))}
    row["time_ratio"] = row["ours_s"] / row["mergekit_s"]
    row["rss_ratio"] = row["ours_rss_mb"] / row["mergekit_rss_mb"]
    if method in RANDOM:
        row["status"] = "random"
        probe = probe_config(method, config, base, fts[0])
        (d / "probe.json").write_text(json.dumps(probe, indent=2))
        (d / "probe.yml").write_text(yaml.safe_dump(probe, sort_keys=False))
        run_ours(d / "probe.json", d / "probe-ours", env)
        run_mergekit(venv, d / "probe.yml", d / "probe-mergekit", env)
        density = probe["models"][0]["parameters"]["density"]
        row["density"] = density
        row["kept_ours"] = kept_fraction(d / "probe-ours", base, fts[0])
        row["kept_mergekit"] = kept_fraction(d / "probe-mergekit", base, fts[0])
        row["kept_ok"] = all(abs(row[k] - density) <= KEPT_TOLERANCE for k in ("kept_ours", "kept_mergekit"))
    else:
        row["status"] = "ok" if row["max_abs"] <= TOLERANCE and not row["dtype_mismatches"] else "FAIL"
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    return row


def print_table(rows: list[dict]) -> None:
    """A Markdown table (pastes into bench/RESULTS.md), then notes and a summary line."""
    print("| method | inputs | max\\|Δ\\| | pass | ours s | mergekit s | time ratio | ours peak RSS MB | "
          "mergekit peak RSS MB | RSS ratio |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    failed = [r for r in rows if r["status"] == "mergekit-error"]
    rows = [r for r in rows if r["status"] != "mergekit-error"]
    for r in rows:
        status = {"ok": "yes", "FAIL": "**NO**", "random": "random (not comparable)"}[r["status"]]
        diff = r["random_max_abs"] if r["status"] == "random" else r["max_abs"]
        print(f"| {r['method']} | {r['variant']} | {diff:.2e} | {status} | {r['ours_s']:.2f} | {r['mergekit_s']:.2f} | "
              f"{r['time_ratio']:.2f}x | {r['ours_rss_mb']:.0f} | {r['mergekit_rss_mb']:.0f} | {r['rss_ratio']:.2f}x |")
    for r in rows:
        notes, label = [], f"{r['method']} ({r['variant']})"
        if r["status"] == "FAIL":
            notes.append(f"worst tensor {r['worst_tensor']} (|Δ| {r['max_abs']:.3e})")
        if r.get("dtype_mismatches"):
            notes.append(f"{len(r['dtype_mismatches'])} tensors in another dtype, e.g. {r['dtype_mismatches'][0]}")
        if r["status"] == "random":
            notes.append(f"kept fraction at density {r['density']}: ours {r['kept_ours']:.4f}, mergekit "
                         f"{r['kept_mergekit']:.4f} ({'ok' if r['kept_ok'] else 'OFF'}, tolerance {KEPT_TOLERANCE})")
        if r["random_worst"] and r["status"] != "random":
            notes.append(f"random subsample in {r['random_worst']}: |Δ| {r['random_max_abs']:.3e} (not judged; "
                         f"max|Δ| is over the other tensors)")
        if r["only_ours"] or r["only_mergekit"]:
            notes.append(f"only in ours: {r['only_ours']}, only in mergekit: {r['only_mergekit']}")
        for n in notes:
            print(f"- {label}: {n}")
    for r in failed:
        print(f"- {r['method']} ({r['variant']}): mergekit fails ({r['mergekit_error'][:300]}); ours "
              f"{r['ours_s']:.2f} s, {r['ours_rss_mb']:.0f} MB")
    judged = [r for r in rows if r["status"] != "random"]
    passed = sum(r["status"] == "ok" for r in judged)
    geo = lambda xs: statistics.geometric_mean(xs) if xs else float("nan")  # noqa: E731
    times, rss = [r["time_ratio"] for r in rows], [r["rss_ratio"] for r in rows]
    print(f"summary: {passed}/{len(judged)} deterministic methods within {TOLERANCE:g}; "
          f"{sum(r.get('kept_ok', False) for r in rows)}/{len(rows) - len(judged)} random methods keep their density; "
          f"time ratio geomean {geo(times):.2f}x, max {max(times):.2f}x, {sum(t <= 0.5 for t in times)}/{len(rows)} "
          f"<= 0.5x (goal); RSS ratio geomean {geo(rss):.2f}x, max {max(rss):.2f}x, {sum(m <= 1.0 for m in rss)}/"
          f"{len(rows)} <= 1.0x (goal)")


def startup(venv: Path, repeats: int, env: dict) -> tuple[float, float]:
    """Each tool's fixed cost per run: importing our merge package; mergekit-yaml's CLI start-up (--help)."""
    ours = [measured([PY, "-c", "import models.merging.run"], env)["seconds"] for _ in range(repeats)]
    theirs = [measured([str(venv / "bin" / "mergekit-yaml"), "--help"], env)["seconds"] for _ in range(repeats)]
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma list (default: every method both registries have)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and method; the median is reported")
    parser.add_argument("--variants", default="float32,bfloat16",
                        help="input dtypes: float32 (dtype: float32 configs), bfloat16 (bf16 models, no dtype key)")
    parser.add_argument("--keep", action="store_true", help="keep the merged folders (printed at the end)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    from branchmerge.models.merging.registry import method_names

    venv = mergekit_venv()
    ours, theirs = set(method_names()), set(mergekit_methods(venv))
    shared = sorted(ours & theirs)
    print(f"{MERGEKIT} ({venv}), flags: {' '.join(MERGEKIT_FLAGS)}")
    print(f"shared methods: {', '.join(shared)}")
    print(f"only ours: {', '.join(sorted(ours - theirs)) or '-'}; "
          f"only mergekit: {', '.join(sorted(theirs - ours)) or '-'}")
    if theirs - ours:  # a method users can run in mergekit and not here is a gap to close, not to skip
        raise SystemExit(f"mergekit has methods we lack: {', '.join(sorted(theirs - ours))}")
    methods = args.methods.split(",") if args.methods else shared
    unknown = [m for m in methods if m not in shared]
    if unknown:
        raise SystemExit(f"--methods: {unknown} not in both registries; shared: {shared}")

    variants = args.variants.split(",")
    if set(variants) - {"float32", "bfloat16"}:
        raise SystemExit(f"--variants: {variants}; allowed: float32, bfloat16")
    base, fts = prepare_models()
    models = {"float32": (base, fts)}
    if "bfloat16" in variants:
        models["bfloat16"] = bf16_models(base, fts)
    warm_page_cache([p for b, f in models.values() for p in (b, *f)])
    work = Path(tempfile.mkdtemp(prefix="merge-vs-mergekit-", dir=cache_root() / "bench"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    ours_start, mergekit_start = startup(venv, args.repeats, env)
    print(f"start-up per run: ours (import models.merging.run) {ours_start:.2f} s, mergekit (mergekit-yaml --help) "
          f"{mergekit_start:.2f} s", flush=True)
    rows = []
    for variant in variants:
        for method in methods:
            vbase, vfts = models[variant]
            config = merge_config(method, vbase, vfts, variant)
            if config is None:
                raise SystemExit(f"{method}: no config for it in merge_config(): add one, the bench skips nothing")
            t0 = time.perf_counter()
            rows.append(bench_method(method, config, venv, vbase, vfts, work, args.repeats, env, args.keep,
                                     variant))
            r = rows[-1]
            if args.out:  # after every method: a crash later keeps what was measured
                Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
            if r["status"] == "mergekit-error":
                print(f"{method} ({variant}): mergekit fails: {r['mergekit_error'][:200]}", flush=True)
                continue
            diff = r["random_max_abs"] if r["status"] == "random" else r["max_abs"]
            print(f"{method} ({variant}): ours {r['ours_runs_s']} s, mergekit {r['mergekit_runs_s']} s, max|Δ| {diff:.2e} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for variant in variants:  # one table and summary per input dtype
        print()
        if any(r["variant"] == variant for r in rows):
            print_table([r for r in rows if r["variant"] == variant])
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    if args.keep:
        print(f"outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
