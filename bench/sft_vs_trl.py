"""Our SFT (models.training.sft.train_sft, Lightning) vs TRL's SFTTrainer on SmolLM2-135M-Instruct: tokens/s, peak RSS.

    flock /tmp/bm_cpu.lock .venv/bin/python bench/sft_vs_trl.py [--steps 20] [--batch-size 8] [--max-length 256]
        [--seed 0] [--repeats 1] [--ours [KEY=VALUE ...]]... [--trl [KEY=VALUE ...]]... [--out results.json]

Both sides train the same fp32 model on the same reasoning-gym one-shot prompts (the three domains of
conf/data/reasoning_gym.yaml, interleaved), with the gold answer, worked, as the completion and the loss on the
completion only, for the same number of optimizer steps at the same batch size, max length and seed. Each run is
a fresh process in a wrapper, so that its peak RSS (whole process: imports, model, data, training) is its own.

Throughput is non-pad tokens trained per second of training loop: the time in Lightning's Trainer.fit (ours) or
SFTTrainer.train (TRL), so model loading, tokenization and (ours) saving are outside it; optimizer set-up and the
first, slower step are inside it on both sides (the table also shows the first step and the median later step).
Ours counts train_sft's `tokens`, TRL its `num_tokens` metric (attention-mask sum, or the flattened length when
padding-free): the same quantity. The targets differ by one token an example: TRL's completion is the chat
template's rendering, which ends "<|im_end|>\n", ours ends at "<|im_end|>".

- Ours: conf/sft/full.yaml as the SFTConfig train_sft takes (keys added there are picked up; the SFT task's own,
  e.g. the data recipe, do nothing in one run and are printed), then --ours overrides (OmegaConf dotlist, e.g.
  `--ours packing=true loss_impl=chunked`). Steps, batch size, max length and seed come from the flags above;
  epochs is raised so that the steps, not the data, end the run.
- TRL: SFTConfig gets conf/sft/full.yaml's lr, betas, weight decay, warmup ratio, scheduler, precision
  (bf16-mixed -> bf16=True with use_cpu=True: CPU autocast, as Lightning's) and grad accumulation, and logs every
  step as ours does (loss per step, no checkpoints or trackers). Everything else is TRL's default, printed at the
  end; where it differs from ours: gradient_checkpointing=True, random batches (ours groups by length, so pads
  less), fused AdamW (ours: torch's default single-tensor AdamW), the entropy and token-accuracy metrics every
  step. Packing is off on both sides by default. --trl overrides any SFTConfig field
  (`--trl packing=true gradient_checkpointing=false`).

Each --ours / --trl flag is one variant (a bare flag: the defaults), and every ours variant is compared with every
TRL variant; runs alternate, --repeats times, medians reported. Goal: ours >= 1.3x TRL's tokens/s and <= 0.7x
its peak RSS.

First use builds, under $BRANCHMERGE_CACHE (default ~/.cache/branchmerge):
- trl-venv/: TRL in its own virtual environment: torch==2.13.0 first (the CPU wheel on disk; a plain torch
  requirement would pull a multi-GB CUDA build), then trl with our transformers and accelerate versions, so that
  both sides run the same model code;
- bench/merge_vs_mergekit/base: SmolLM2-135M-Instruct as an fp32 HF folder (shared with merge_vs_mergekit.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.merge_vs_mergekit import DOMAINS, cache_root, measured, ours, peer_venv, sft_examples  # noqa: E402

TRL = "trl==1.16.0"
TORCH = "torch==2.13.0"
TRL_PINS = ours("transformers", "accelerate")  # the same model code and autocast on both sides
# Bench flags, not --ours keys: both sides must share them.
SHARED = {"max_steps", "batch_size", "max_length", "seed", "epochs"}
# conf/sft/full.yaml keys TRL mirrors: an --ours override of one makes the comparison no longer like for like.
MIRRORED = {"lr", "betas", "weight_decay", "warmup_ratio", "scheduler", "precision", "grad_accum"}
EPOCHS = 1000  # ours stops at max_steps or after `epochs` passes: let the steps decide
DATA_FACTOR = 2  # examples per (steps x batch x accum): a packed run (2+ examples a row) still sees little twice
# TRL settings printed with the results: those that change the work per step or its memory.
# The trainer's value where it has one: it turns padding_free and completion_only_loss on by itself.
TRL_REPORTED = ("gradient_checkpointing", "packing", "packing_strategy", "padding_free", "completion_only_loss",
                "optim", "bf16", "train_sampling_strategy", "pad_to_multiple_of", "loss_type", "activation_offloading",
                "use_liger_kernel", "torch_compile", "dataloader_num_workers", "warmup_steps", "lr_scheduler_type")

# Prepended to both child scripts: current (not peak) RSS at the start of training, to split a peak into what
# loading cost and what training added.
COMMON = """
import json, os, sys, time

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

job = json.load(open(sys.argv[1]))
examples = json.load(open(job["examples"]))
"""
OURS = COMMON + """
import lightning as L

fit, timed = L.Trainer.fit, {"step_ends": []}


def timed_fit(self, *args, **kwargs):  # train_sft's wall_time_s also holds tokenizing, loading and saving
    timed["rss_before_train_mb"] = rss_mb()
    timed["t0"] = time.perf_counter()
    fit(self, *args, **kwargs)
    timed["train_s"] = time.perf_counter() - timed["t0"]


L.Trainer.fit = timed_fit
from branchmerge.models.training.sft import SFTModule, train_sft

optimizer_step = SFTModule.optimizer_step


def timed_step(self, *args, **kwargs):
    optimizer_step(self, *args, **kwargs)
    timed["step_ends"].append(time.perf_counter())


SFTModule.optimizer_step = timed_step

from branchmerge.models.training.config import SFTConfig

settings = dict(job["settings"])
seed = settings.pop("seed")
reference = job["model"] if settings["loss"] == "poft" else None  # poft_reference=base
m = train_sft(SFTConfig(**settings), job["model"], examples, job["out"], seed=seed, reference_dir=reference,
              logger=None, progress=False)
json.dump({**timed, "tokens": m["tokens"], "steps": m["steps"], "losses": m["loss_history"]}, open(job["result"], "w"))
"""
THEIRS = COMMON + """
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepEnds(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


# Conversational prompt-completion: TRL masks the prompt (completion_only_loss), as ours does.
data = Dataset.from_list([{"prompt": e["messages"], "completion": [{"role": "assistant", "content": e["completion"]}]}
                          for e in examples])
tokenizer = AutoTokenizer.from_pretrained(job["model"])
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)  # fp32 master weights, as ours
args = SFTConfig(output_dir=job["out"], **job["settings"])
steps = StepEnds()
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[steps])
rss = rss_mb()
t0 = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - t0
effective = {k: str(getattr(trainer, k, getattr(args, k, None))) for k in job["reported"]}
json.dump({"rss_before_train_mb": rss, "t0": t0, "train_s": train_s, "step_ends": steps.ends,
           "tokens": trainer._total_train_tokens, "steps": trainer.state.global_step,
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "version": trl.__version__,
           "effective": effective}, open(job["result"], "w"))
"""


# ----------------------------------------------------------------------------------------------- setup


def trl_venv() -> Path:
    return peer_venv("trl-venv", TRL, TORCH, *TRL_PINS)


def base_model() -> Path:
    """merge_vs_mergekit.py's fp32 SmolLM2 base folder, built here if that bench has not run yet."""
    from branchmerge.models.lm.hf import atomic_dir, materialize_model, publish_dir

    base = cache_root() / "bench" / "merge_vs_mergekit" / "base"
    if not (base / "config.json").exists():
        source = yaml.safe_load((ROOT / "conf/student/smollm2.yaml").read_text())["source"]
        tmp = atomic_dir(base)
        materialize_model(source, tmp, "float32")
        publish_dir(tmp, base)
    return base


def examples(n: int) -> list[dict]:
    """Up to n {"messages", "completion"} examples, the domains interleaved so every batch mixes them (lcm's
    small problem space may give fewer: the runs then repeat examples, which does not change the work)."""
    per_domain = [sft_examples(domain, -(-n // len(DOMAINS))) for domain in DOMAINS]
    return [e for group in itertools.zip_longest(*per_domain) for e in group if e is not None][:n]


# ----------------------------------------------------------------------------------------------- settings


def dotlist(pairs: list[str]) -> dict:
    """key=value pairs as a dict, values typed as YAML (OmegaConf: 1e-5 is a float, a.b=1 nests)."""
    from omegaconf import OmegaConf

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"expected key=value, got {bad}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(pairs), resolve=True)


def conf_sft() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sft/full.yaml"), resolve=True)


def ours_settings(overrides: dict, shared: dict) -> tuple[dict, dict]:
    """(the SFTConfig fields plus the seed, the SFT task's own keys): conf/sft/full.yaml with the overrides, then the
    shared sizes. The task's keys (the data recipe, PoFT's choice of reference) are not one train_sft run's: here
    one stage trains on one data set, and loss=poft scores against the base, the model trained."""
    clash = SHARED & set(overrides)
    if clash:
        raise SystemExit(f"--ours {sorted(clash)}: set them with the bench's flags (both sides share them)")
    mirrored = MIRRORED & set(overrides)
    if mirrored:
        print(f"warning: --ours {sorted(mirrored)} changes ours only: TRL keeps conf/sft/full.yaml's values (set "
              f"the matching --trl keys too)", flush=True)
    settings = {**conf_sft(), **overrides}
    task_keys = {k: settings[k] for k in ("recipe", "dmt_k", "hard_fraction", "poft_reference")}
    settings.update(max_steps=shared["steps"], batch_size=shared["batch_size"], max_length=shared["max_length"],
                    seed=shared["seed"], epochs=EPOCHS)
    return settings, task_keys


def trl_settings(overrides: dict, shared: dict) -> dict:
    """SFTConfig's keyword arguments: conf/sft/full.yaml's optimizer, schedule and precision, then the overrides."""
    sft = conf_sft()
    if sft["precision"] not in ("32-true", "bf16-mixed"):
        raise SystemExit(f"conf/sft/full.yaml precision={sft['precision']!r}: no TRL mapping here")
    return {
        "max_steps": shared["steps"], "per_device_train_batch_size": shared["batch_size"],
        "gradient_accumulation_steps": sft["grad_accum"], "max_length": shared["max_length"],
        "seed": shared["seed"], "data_seed": shared["seed"],
        "learning_rate": sft["lr"], "adam_beta1": sft["betas"][0], "adam_beta2": sft["betas"][1],
        "weight_decay": sft["weight_decay"],
        # transformers 5 has no warmup_ratio: a warmup_steps < 1 is one, ceil(ratio * max_steps) steps as ours
        "warmup_steps": sft["warmup_ratio"],
        "lr_scheduler_type": sft["scheduler"],
        "bf16": sft["precision"] == "bf16-mixed", "use_cpu": True,  # bf16 on CPU: accelerate's CPU autocast
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        **overrides,
    }


def label(side: str, kv: list[str]) -> str:
    return f"{side} {' '.join(kv)}" if kv else f"{side} defaults"


# ----------------------------------------------------------------------------------------------- running


def run_child(python: str, script: Path, settings: dict, model: Path, inputs: dict, work: Path, env: dict,
              reported: tuple[str, ...] = ()) -> dict:
    """One measured child run: a job file with the model, `inputs` (the child's data paths), settings and where to
    write; returns the child's result with the process's peak RSS and wall time. Shared with grpo_vs_trl.py."""
    out, result = work / "out", work / "result.json"
    shutil.rmtree(out, ignore_errors=True)
    result.unlink(missing_ok=True)
    job = work / "job.json"
    job.write_text(json.dumps({"model": str(model), **inputs, "out": str(out), "result": str(result),
                               "settings": settings, "reported": list(reported)}))
    run = measured([python, str(script), str(job)], env)
    shutil.rmtree(out, ignore_errors=True)  # ours saves a 0.5 GB model per run
    return {**json.loads(result.read_text()), "peak_rss_mb": run["peak_rss_mb"], "process_s": run["seconds"]}


def child_envs() -> tuple[dict, dict]:
    """(TRL's, ours'): ours imports this repo (PYTHONPATH); TRL's process must not: our top-level `kernels` package
    would shadow the HF `kernels` package transformers probes for (its script lies outside the repo for the same
    reason: a script's folder heads sys.path)."""
    trl = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false")
    trl.pop("PYTHONPATH", None)
    return trl, dict(trl, PYTHONPATH=str(ROOT))


def alternating(variants: list[dict]) -> list[dict]:
    """TRL and ours variants interleaved, so drift on a shared machine hits both alike."""
    sides = ([v for v in variants if v["side"] == "trl"], [v for v in variants if v["side"] == "ours"])
    return [v for pair in itertools.zip_longest(*sides) for v in pair if v is not None]


def summarize(variant: dict) -> dict:
    runs = variant["runs"]
    for r in runs:
        r["tokens_per_s"] = r["tokens"] / r["train_s"]
        # The first step also holds the loop's set-up (optimizer, first touch of its state): shown apart.
        ends = [r["t0"], *r["step_ends"]]
        r["first_step_s"] = ends[1] - ends[0]
        r["step_s"] = statistics.median(b - a for a, b in zip(ends[1:], ends[2:])) if len(ends) > 2 else float("nan")
        r["mean_loss"] = statistics.fmean(r["losses"])
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    keys = ("tokens_per_s", "peak_rss_mb", "train_s", "tokens", "rss_before_train_mb", "first_step_s", "step_s",
            "mean_loss")
    return {**variant, **{k: med(k) for k in keys}}


def print_tables(variants: list[dict], pairs: list[dict]) -> None:
    """Markdown tables (paste into bench/RESULTS.md), then TRL's effective settings and a summary line."""
    print("| run | steps | tokens | train s | first step s | median step s | tokens/s | peak RSS MB "
          "| RSS at train start MB | mean loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        print(f"| {v['label']} | {v['runs'][0]['steps']} | {v['tokens']:.0f} | {v['train_s']:.1f} | "
              f"{v['first_step_s']:.1f} | {v['step_s']:.2f} | {v['tokens_per_s']:.0f} | {v['peak_rss_mb']:.0f} | "
              f"{v['rss_before_train_mb']:.0f} | {v['mean_loss']:.3f} |")
    print()
    print("| ours | TRL | tokens/s ratio (goal >= 1.3x) | peak RSS ratio (goal <= 0.7x) |")
    print("| --- | --- | ---: | ---: |")
    for p in pairs:
        print(f"| {p['ours']} | {p['trl']} | {p['speed_ratio']:.2f}x | {p['rss_ratio']:.2f}x |")
    for v in variants:
        if v["side"] == "trl":
            eff = v["runs"][0]["effective"]
            print(f"- {v['label']} (trl {v['runs'][0]['version']}): "
                  + ", ".join(f"{k}={eff[k]}" for k in TRL_REPORTED))
    met = sum(p["speed_ratio"] >= 1.3 and p["rss_ratio"] <= 0.7 for p in pairs)
    print(f"summary: {met}/{len(pairs)} pairs meet both goals; tokens/s ratio max "
          f"{max(p['speed_ratio'] for p in pairs):.2f}x, peak RSS ratio min {min(p['rss_ratio'] for p in pairs):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (packed rows if packing)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (per packed row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; medians are reported")
    parser.add_argument("--ours", nargs="*", action="append", metavar="KEY=VALUE",
                        help="one variant of ours: conf/sft/full.yaml overrides (repeat the flag for more)")
    parser.add_argument("--trl", nargs="*", action="append", metavar="KEY=VALUE",
                        help="one variant of TRL: SFTConfig overrides (repeat the flag for more)")
    parser.add_argument("--out", help="also write the runs and ratios as JSON here")
    args = parser.parse_args()
    shared = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed}

    variants = []
    for kv in args.ours or [[]]:
        settings, left_out = ours_settings(dotlist(kv), shared)
        variants.append({"side": "ours", "label": label("ours", kv), "settings": settings, "runs": []})
    print(f"ours: conf/sft/full.yaml keys of the SFT task, unused by one train_sft run: {left_out}", flush=True)
    variants += [{"side": "trl", "label": label("TRL", kv), "settings": trl_settings(dotlist(kv), shared),
                  "runs": []} for kv in (args.trl or [[]])]
    venv = trl_venv()
    model = base_model()
    work = Path(tempfile.mkdtemp(prefix="sft-vs-trl-", dir=cache_root() / "bench"))
    try:
        ex = examples(args.steps * args.batch_size * conf_sft()["grad_accum"] * DATA_FACTOR)
        data = work / "examples.json"
        data.write_text(json.dumps(ex))
        (work / "ours_child.py").write_text(OURS)
        (work / "trl_child.py").write_text(THEIRS)  # not trl.py: it would shadow trl
        base_env, ours_env = child_envs()
        print(f"{len(ex)} examples, {args.steps} steps x batch {args.batch_size} x accum {conf_sft()['grad_accum']}, "
              f"max_length {args.max_length}; {TRL} ({venv})", flush=True)
        order = alternating(variants)
        for _ in range(args.repeats):
            for v in order:
                if v["side"] == "ours":
                    r = run_child(sys.executable, work / "ours_child.py", v["settings"], model,
                                  {"examples": str(data)}, work, ours_env)
                else:
                    r = run_child(str(venv / "bin" / "python"), work / "trl_child.py", v["settings"], model,
                                  {"examples": str(data)}, work, base_env, TRL_REPORTED)
                if r["steps"] != args.steps:
                    raise RuntimeError(f"{v['label']}: ran {r['steps']} steps, expected {args.steps}")
                v["runs"].append(r)
                print(f"{v['label']}: {r['tokens']} tokens in {r['train_s']:.1f} s = {r['tokens'] / r['train_s']:.0f} "
                      f"tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB (process {r['process_s']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    variants = [summarize(v) for v in variants]
    pairs = [{"ours": o["label"], "trl": t["label"], "speed_ratio": o["tokens_per_s"] / t["tokens_per_s"],
              "rss_ratio": o["peak_rss_mb"] / t["peak_rss_mb"]}
             for o in variants if o["side"] == "ours" for t in variants if t["side"] == "trl"]
    print()
    print_tables(variants, pairs)
    if args.out:
        Path(args.out).write_text(json.dumps({"shared": shared, "trl": TRL, "variants": variants, "pairs": pairs},
                                             indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
