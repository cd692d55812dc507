"""Our GRPO (models.training.grpo.train_grpo, Lightning) vs TRL's GRPOTrainer on SmolLM2-135M-Instruct: step time,
peak RSS.

    flock /tmp/bm_cpu.lock .venv/bin/python bench/grpo_vs_trl.py [--steps 6] [--prompts 4] [--generations 4]
        [--max-new-tokens 64] [--beta 0.0] [--seed 0] [--repeats 2] [--ours [KEY=VALUE ...]]...
        [--trl [KEY=VALUE ...]]... [--out results.json]

Both sides train the same fp32 model (the SmolLM2 base folder merge_vs_mergekit.py caches) for the same number of
optimizer steps on the same reasoning-gym prompts: the three domains of conf/data/reasoning_gym.yaml interleaved,
each item's chat messages from domains.build_messages with its domain's one-shot example (as tasks/mix.py draws
them), and the SAME prompts at every step: ours draws each step's prompts with grpo.step_items (seeded), and TRL
reads a dataset holding exactly those prompts in that order with shuffle_dataset=False. Each step samples
`--generations` completions of at most `--max-new-tokens` tokens for each of `--prompts` prompts (TRL:
per_device_train_batch_size = prompts x generations completions, gradient_accumulation_steps 1, so
generation_batch_size = that and steps_per_generation = 1: one generation per optimizer step, as ours), scores them
with the same reward, domains.reward_fn (ours gets the item fields as columns; TRL gets each item as a JSON
string column, decoded into the `item` column reward_fn reads: Arrow would fill the entries' differing
metadata keys with nulls), takes group advantages and one AdamW step on the DAPO loss. Both run fp32 (ours
precision=32-true, TRL bf16=False with use_cpu=True) and one process per run, so each peak RSS is its own.

The point of the comparison is the engines: TRL generates with transformers' `model.generate` (no vLLM on CPU),
ours with its own decode loop (models/lm/generation.py: the shared few-shot prefix read once, continuous batching,
top-p over the 256 most likely tokens), and ours computes the update's log-probs without [B, K, V] logits
(logprob_impl=chunked), reading each prompt once for its group (shared_prefix). Those are conf/rl/grpo.yaml's
settings; everything else of the algorithm is set alike.

Measured, per run:
- step time: wall time between the ends of consecutive optimizer steps inside the training loop (ours: the end
  of GRPOModule.training_step, which holds the rollout, the rewards and the manual optimizer step; TRL: a
  callback's on_step_end, after the optimizer and scheduler step). The first step is shown apart: it also holds
  the loop's set-up (the time from Trainer.fit / GRPOTrainer.train being called). Model loading is outside.
- generation: time in GRPOModule.rollout (prompt tokenizing + generate_ids) / GRPOTrainer._generate_single_turn
  (left padding + model.generate + EOS masking), and the completion tokens it returned (up to and including the
  stop token on both sides); the generation share is that time over the training loop's.
- peak RSS: the whole process's (imports, model, data, training), read by a wrapper process; "peak in train" is
  the process's own ru_maxrss right after training. Neither side saves the trained model (train_grpo's save is
  skipped in the child, TRL runs with save_strategy=no).
- prompt tokens (summed over the steps' prompts, once per prompt) must agree: the same prompts, tokenized alike.

TRL settings (GRPOConfig): conf/rl/grpo.yaml's lr, weight_decay, temperature, top_p, epsilon, epsilon_high,
delta, loss_type, scale_rewards, importance_sampling_level, mask_truncated_completions and top_entropy_quantile;
lr_scheduler_type=constant (ours has no schedule; HF's default decays linearly) and max_grad_norm=0 (ours does not
clip; HF clips at 1.0). Everything else is TRL's default, printed with the results; where it differs from ours:
gradient_checkpointing=True (ours: off) and TRL's entropy metric over the full logits each step. Both stop a
completion at the same tokens (SmolLM2: <|im_end|> and <|endoftext|>, its generation_config's EOS ids).
--trl overrides any GRPOConfig field (e.g. `--trl gradient_checkpointing=false`), --ours any conf/rl/grpo.yaml key
(e.g. `--ours logprob_impl=plain`); settings TRL has no counterpart for (advantage_estimator, kl_estimator,
dynamic_sampling, overlong shaping, num_iterations) must keep values TRL matches.

Each --ours / --trl flag is one variant (a bare flag: the defaults); every ours variant is compared with every TRL
variant; runs alternate, --repeats times; medians reported. Goal (issue 13): ours <= 0.7x TRL's step time and
<= 0.8x its peak RSS.

First use builds, under $BRANCHMERGE_CACHE (default ~/.cache/branchmerge):
- trl-grpo-venv/: TRL in its own virtual environment: torch==2.13.0 first (the CPU wheel on disk), then trl with
  our transformers and accelerate versions (the same model code on both sides) and our reasoning-gym (the reward);
- bench/merge_vs_mergekit/base: SmolLM2-135M-Instruct as an fp32 HF folder (shared with merge_vs_mergekit.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.merge_vs_mergekit import DOMAINS, cache_root, ours, peer_venv
from bench.sft_vs_trl import alternating, base_model, child_envs, dotlist, label, run_child

TRL = "trl==1.16.0"
TORCH = "torch==2.13.0"
# Ours: the same model code and generation on both sides, and the reward's reasoning-gym.
TRL_PINS = ours("transformers", "accelerate", "reasoning-gym")
# Bench flags, not --ours keys: both sides share them.
SHARED = {"steps", "prompts_per_step", "num_generations", "max_new_tokens", "beta", "precision"}
# conf/rl/grpo.yaml key -> GRPOConfig field: an --ours override of one makes the comparison no longer like for like.
MIRRORED = {"lr": "learning_rate", "weight_decay": "weight_decay", "temperature": "temperature", "top_p": "top_p",
            "epsilon": "epsilon", "epsilon_high": "epsilon_high", "delta": "delta", "loss_type": "loss_type",
            "scale_rewards": "scale_rewards", "importance_sampling_level": "importance_sampling_level",
            "mask_truncated_completions": "mask_truncated_completions",
            "top_entropy_quantile": "top_entropy_quantile"}
SAPO = {"sapo_temperature_pos": "sapo_temperature_pos", "sapo_temperature_neg": "sapo_temperature_neg"}
# Our settings TRL's GRPOTrainer has no knob for: they must hold the value TRL implies.
TRL_FIXED = {"advantage_estimator": "grpo", "kl_estimator": "k3", "dynamic_sampling": False,
             "overlong_buffer_len": 0, "num_iterations": 1}
# TRL settings printed with the results: those that change the work per step or its memory.
TRL_REPORTED = ("gradient_checkpointing", "bf16", "optim", "max_grad_norm", "lr_scheduler_type",
                "generation_batch_size", "steps_per_generation", "shuffle_dataset", "top_k", "use_vllm",
                "use_transformers_continuous_batching", "cache_implementation", "disable_dropout", "cast_lm_head_to_fp32",
                "use_liger_kernel", "torch_compile", "loss_type", "scale_rewards", "epsilon_high", "beta")

# Prepended to both child scripts.
COMMON = """
import json, os, resource, sys, time

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

job = json.load(open(sys.argv[1]))
data = json.load(open(job["data"]))
timed = {"step_ends": [], "gen_s": [], "gen_tokens": 0, "prompt_tokens": 0}
"""
OURS = COMMON + """
import lightning as L

fit = L.Trainer.fit


def timed_fit(self, *args, **kwargs):  # train_grpo also loads the models before fit
    timed["rss_before_train_mb"] = rss_mb()
    timed["t0"] = time.perf_counter()
    fit(self, *args, **kwargs)
    timed["train_s"] = time.perf_counter() - timed["t0"]
    timed["peak_in_train_mb"] = peak_mb()


L.Trainer.fit = timed_fit
from branchmerge.models.data import domains
from branchmerge.models.training import grpo
from branchmerge.models.training.config import RLConfig
from branchmerge.models.training.grpo import GRPOModule, train_grpo

grpo.save_model_folder = lambda *args, **kwargs: None  # TRL saves nothing here either (save_strategy=no)

training_step, rollout = GRPOModule.training_step, GRPOModule.rollout


def timed_step(self, *args, **kwargs):  # rollout, rewards, advantages, the optimizer step
    out = training_step(self, *args, **kwargs)
    timed["step_ends"].append(time.perf_counter())
    return out


def timed_rollout(self, items, attempt):
    t = time.perf_counter()
    messages, prompts, completions = rollout(self, items, attempt)
    timed["gen_s"].append(time.perf_counter() - t)
    timed["gen_tokens"] += sum(len(c) for per_prompt in completions for c in per_prompt)
    timed["prompt_tokens"] += sum(len(p) for p in prompts)
    return messages, prompts, completions


GRPOModule.training_step, GRPOModule.rollout = timed_step, timed_rollout
settings = dict(job["settings"])
seed = settings.pop("seed")
shots = data["shots"]
m = train_grpo(RLConfig(**settings), job["model"], data["items"], domains.reward_fn,
               lambda it: domains.build_messages(it, shots[it["domain"]]), job["out"], seed=seed, logger=None,
               progress=False)
json.dump({**timed, "steps": len(m["history"]), "tokens": m["tokens"],
           "rewards": [h["reward"] for h in m["history"]], "losses": [h["loss"] for h in m["history"]]},
          open(job["result"], "w"))
"""
THEIRS = COMMON + """
import importlib.util

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

# Our reward, loaded from its file: importing the repo's package here would shadow HF's `kernels`.
spec = importlib.util.spec_from_file_location("bench_domains", job["domains_py"])
domains = importlib.util.module_from_spec(spec)
spec.loader.exec_module(domains)


def correctness(prompts, completions, item_json, **columns):
    return domains.reward_fn(prompts, completions, item=[json.loads(s) for s in item_json])


class StepEnds(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        timed["step_ends"].append(time.perf_counter())


generate = GRPOTrainer._generate_single_turn


def timed_generate(self, prompt_ids, *args, **kwargs):
    t = time.perf_counter()
    completion_ids, logprobs = generate(self, prompt_ids, *args, **kwargs)
    timed["gen_s"].append(time.perf_counter() - t)
    timed["gen_tokens"] += sum(len(c) for c in completion_ids)
    timed["prompt_tokens"] += sum(len(p) for p in prompt_ids) // self.num_generations  # each prompt G times
    return completion_ids, logprobs


GRPOTrainer._generate_single_turn = timed_generate
shots = data["shots"]
rows = [{"prompt": domains.build_messages(it, shots[it["domain"]]), "item_json": json.dumps(it)}
        for it in data["trl_order"]]
dataset = Dataset.from_list(rows)
tokenizer = AutoTokenizer.from_pretrained(job["model"])
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)  # fp32, as ours
args = GRPOConfig(output_dir=job["out"], **job["settings"])
trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[StepEnds()])
timed["rss_before_train_mb"] = rss_mb()
timed["t0"] = time.perf_counter()
trainer.train()
timed["train_s"] = time.perf_counter() - timed["t0"]
timed["peak_in_train_mb"] = peak_mb()
logs = [h for h in trainer.state.log_history if "reward" in h]
effective = {k: str(getattr(args, k, None)) for k in job["reported"]}
json.dump({**timed, "steps": trainer.state.global_step, "tokens": int(logs[-1].get("num_tokens", 0)) if logs else 0,
           "rewards": [h["reward"] for h in logs], "losses": [h["loss"] for h in logs], "version": trl.__version__,
           "effective": effective}, open(job["result"], "w"))
"""


# ----------------------------------------------------------------------------------------------- setup


def trl_venv() -> Path:
    return peer_venv("trl-grpo-venv", TRL, TORCH, *TRL_PINS)


def prompt_data(n: int, seed: int) -> dict:
    """{"items": n reasoning-gym items, the domains interleaved, "shots": {domain: one-shot examples}}: the
    training prompts and shots as tasks/mix.py builds them (conf/data/reasoning_gym.yaml)."""
    from branchmerge.models.data import domains

    data = yaml.safe_load((ROOT / "conf/data/reasoning_gym.yaml").read_text())
    per_domain, shots = [], {}
    for domain in DOMAINS:
        tasks = data["domains"][domain]["tasks"]
        per_domain.append(domains.build_items(domain, tasks, size=-(-n // len(DOMAINS)), seed=data["seed"]))
        shots[domain] = domains.make_shots(tasks, k=data["shots"], seed=data["seed"] + 10_000)
    items = [it for group in itertools.zip_longest(*per_domain) for it in group if it is not None][:n]
    return {"items": items, "shots": shots}


# ----------------------------------------------------------------------------------------------- settings


def conf_rl() -> dict:
    return yaml.safe_load((ROOT / "conf/rl/grpo.yaml").read_text())


def ours_settings(overrides: dict, shared: dict) -> dict:
    """The RLConfig fields plus the seed: conf/rl/grpo.yaml with the overrides, then the shared sizes."""
    clash = SHARED & set(overrides)
    if clash:
        raise SystemExit(f"--ours {sorted(clash)}: set them with the bench's flags (both sides share them)")
    mirrored = (set(MIRRORED) | set(SAPO)) & set(overrides)
    if mirrored:
        print(f"warning: --ours {sorted(mirrored)} changes ours only: TRL keeps conf/rl/grpo.yaml's values (set "
              f"the matching --trl keys too)", flush=True)
    settings = {**conf_rl(), **overrides}
    unmatched = {k: settings[k] for k, v in TRL_FIXED.items() if settings[k] != v}
    if unmatched:
        raise SystemExit(f"ours {unmatched}: TRL's GRPOTrainer has no counterpart; keep {TRL_FIXED}")
    settings.update(steps=shared["steps"], prompts_per_step=shared["prompts"], num_generations=shared["generations"],
                    max_new_tokens=shared["max_new_tokens"], beta=shared["beta"], precision="32-true",
                    seed=shared["seed"])
    return settings


def trl_settings(overrides: dict, shared: dict) -> dict:
    """GRPOConfig's keyword arguments: the shared sizes, conf/rl/grpo.yaml's algorithm, then the overrides."""
    rl = conf_rl()
    mirrored = {theirs: rl[ours] for ours, theirs in MIRRORED.items()}
    if rl["loss_type"] == "sapo":
        mirrored.update({theirs: rl[ours] for ours, theirs in SAPO.items()})
    return {
        "max_steps": shared["steps"], "num_generations": shared["generations"],
        "per_device_train_batch_size": shared["prompts"] * shared["generations"], "gradient_accumulation_steps": 1,
        "max_completion_length": shared["max_new_tokens"], "beta": shared["beta"], "num_iterations": 1,
        "seed": shared["seed"], "data_seed": shared["seed"],
        "shuffle_dataset": False,  # the dataset holds ours' prompts in ours' order
        **mirrored,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 0.0,  # ours: no schedule, no clipping
        "bf16": False, "use_cpu": True, "model_init_kwargs": {"dtype": "float32"},  # fp32 (the reference model too)
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        **overrides,
    }


# ----------------------------------------------------------------------------------------------- running


def summarize(variant: dict) -> dict:
    runs = variant["runs"]
    for r in runs:
        ends = [r["t0"], *r["step_ends"]]
        steps = [b - a for a, b in itertools.pairwise(ends)]
        r["first_step_s"] = steps[0]
        r["step_s"] = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
        r["gen_step_s"] = statistics.median(r["gen_s"][1:] or r["gen_s"])
        r["gen_share"] = sum(r["gen_s"]) / r["train_s"]
        r["gen_tokens_per_s"] = r["gen_tokens"] / sum(r["gen_s"])
        r["mean_reward"] = statistics.fmean(r["rewards"]) if r["rewards"] else float("nan")
    med = lambda key: statistics.median(r[key] for r in runs)
    keys = ("step_s", "first_step_s", "train_s", "gen_step_s", "gen_share", "gen_tokens", "gen_tokens_per_s",
            "prompt_tokens", "peak_rss_mb", "peak_in_train_mb", "rss_before_train_mb", "mean_reward")
    return {**variant, **{k: med(k) for k in keys}}


def print_tables(variants: list[dict], pairs: list[dict]) -> None:
    """Markdown tables (paste into bench/RESULTS.md), then TRL's effective settings and a summary line."""
    print("| run | steps | first step s | median step s | gen s/step | gen share | completion tokens | gen tokens/s "
          "| prompt tokens | peak RSS MB | peak in train MB | RSS at train start MB | mean reward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        print(f"| {v['label']} | {v['runs'][0]['steps']} | {v['first_step_s']:.1f} | {v['step_s']:.2f} | "
              f"{v['gen_step_s']:.2f} | {v['gen_share']:.0%} | {v['gen_tokens']:.0f} | {v['gen_tokens_per_s']:.0f} | "
              f"{v['prompt_tokens']:.0f} | {v['peak_rss_mb']:.0f} | {v['peak_in_train_mb']:.0f} | "
              f"{v['rss_before_train_mb']:.0f} | {v['mean_reward']:.3f} |")
    print()
    print("| ours | TRL | step time ratio (goal <= 0.7x) | peak RSS ratio (goal <= 0.8x) |")
    print("| --- | --- | ---: | ---: |")
    for p in pairs:
        print(f"| {p['ours']} | {p['trl']} | {p['time_ratio']:.2f}x | {p['rss_ratio']:.2f}x |")
    for v in variants:
        if v["side"] == "trl":
            eff = v["runs"][0]["effective"]
            print(f"- {v['label']} (trl {v['runs'][0]['version']}): "
                  + ", ".join(f"{k}={eff[k]}" for k in TRL_REPORTED))
    met = sum(p["time_ratio"] <= 0.7 and p["rss_ratio"] <= 0.8 for p in pairs)
    print(f"summary: {met}/{len(pairs)} pairs meet both goals (<= 0.7x step time, <= 0.8x peak RSS); step time "
          f"ratio min {min(p['time_ratio'] for p in pairs):.2f}x, peak RSS ratio min "
          f"{min(p['rss_ratio'] for p in pairs):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (one generation each)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per completion")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight (> 0: a reference model on both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; medians are reported")
    parser.add_argument("--ours", nargs="*", action="append", metavar="KEY=VALUE",
                        help="one variant of ours: conf/rl/grpo.yaml overrides (repeat the flag for more)")
    parser.add_argument("--trl", nargs="*", action="append", metavar="KEY=VALUE",
                        help="one variant of TRL: GRPOConfig overrides (repeat the flag for more)")
    parser.add_argument("--out", help="also write the runs and ratios as JSON here")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (the first step is reported apart)")
    shared = {"steps": args.steps, "prompts": args.prompts, "generations": args.generations,
              "max_new_tokens": args.max_new_tokens, "beta": args.beta, "seed": args.seed}

    variants = [{"side": "ours", "label": label("ours", kv), "settings": ours_settings(dotlist(kv), shared),
                 "runs": []} for kv in (args.ours or [[]])]
    variants += [{"side": "trl", "label": label("TRL", kv), "settings": trl_settings(dotlist(kv), shared),
                  "runs": []} for kv in (args.trl or [[]])]
    venv = trl_venv()
    model = base_model()
    work = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-", dir=cache_root() / "bench"))
    try:
        from branchmerge.models.training.grpo import step_items

        data = prompt_data(args.steps * args.prompts, args.seed)
        # The prompts ours' train_grpo draws at each step, in order: TRL's dataset, read without shuffling.
        order = step_items(len(data["items"]), args.steps, args.prompts, args.seed)
        data["trl_order"] = [data["items"][i] for step in order for i in step]
        data_file = work / "data.json"
        data_file.write_text(json.dumps(data))
        # what each child reads besides its settings: the prompts, and domains.py for TRL's reward (its venv cannot
        # import this repo)
        inputs = {"data": str(data_file), "domains_py": str(ROOT / "models" / "data" / "domains.py")}
        (work / "ours_child.py").write_text(OURS)
        (work / "trl_child.py").write_text(THEIRS)  # not trl.py: it would shadow trl
        base_env, ours_env = child_envs()
        print(f"{len(data['items'])} prompts, {args.steps} steps x {args.prompts} prompts x {args.generations} "
              f"completions of <= {args.max_new_tokens} tokens, beta {args.beta}, fp32; {TRL} ({venv})", flush=True)
        runs = alternating(variants)
        for _ in range(args.repeats):
            for v in runs:
                if v["side"] == "ours":
                    r = run_child(sys.executable, work / "ours_child.py", v["settings"], model, inputs, work,
                                  ours_env)
                else:
                    r = run_child(str(venv / "bin" / "python"), work / "trl_child.py", v["settings"], model,
                                  inputs, work, base_env, TRL_REPORTED)
                if r["steps"] != args.steps:
                    raise RuntimeError(f"{v['label']}: ran {r['steps']} steps, expected {args.steps}")
                v["runs"].append(r)
                ends = [r["t0"], *r["step_ends"]]
                print(f"{v['label']}: {r['steps']} steps in {r['train_s']:.1f} s (median step "
                      f"{statistics.median(b - a for a, b in itertools.pairwise(ends[1:])):.2f} s), generation "
                      f"{sum(r['gen_s']):.1f} s for {r['gen_tokens']} tokens, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(process {r['process_s']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    variants = [summarize(v) for v in variants]
    pairs = [{"ours": o["label"], "trl": t["label"], "time_ratio": o["step_s"] / t["step_s"],
              "rss_ratio": o["peak_rss_mb"] / t["peak_rss_mb"]}
             for o in variants if o["side"] == "ours" for t in variants if t["side"] == "trl"]
    if any(math.isnan(p["time_ratio"]) for p in pairs):
        raise RuntimeError("a run has no step after the first: no median step time")
    print()
    print_tables(variants, pairs)
    if args.out:
        Path(args.out).write_text(json.dumps({"shared": shared, "trl": TRL, "variants": variants, "pairs": pairs},
                                             indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
