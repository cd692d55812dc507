"""CLIMB stage (data.mixture=climb): search mixture weights over the clusters of the training prompts by short
proxy runs, and hand the chosen weights to the SFT stage.

The search is models/data/climb.py (Dirichlet prior from the clusters' shares, LightGBM predictor, rounds with
a 4:2:1 budget). Its objective, here: draw `data.climb.proxy_examples` of the teacher's kept responses by the
candidate mixture over their prompts' clusters, fine-tune the student on them for `proxy_steps` steps (LoRA by
default, the SFT stage's own train_sft), and score the result on the **dev split**: minus the loss of each dev
prompt's gold worked answer, averaged over the domains. The dev split is disjoint from the training pool and the
held-out eval (the mix stage splits by question), so the search never sees the eval.

Each proxy run is recorded in the store's scratch folder for this key (kept across a crash, deleted once the
artifact is sealed), named by a hash of its mixture: a killed search rerun with the same settings draws the
same candidates and reads the finished runs back instead of training them again.

Artifact: weights.json (the chosen mixture: cluster id -> weight), search.json (every run, its round, score and
predicted score, the predictor's fit, the settings), search.png (scores per round, the chosen weights).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.training.config import SFTConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl, write_json
from branchmerge.tasks.store import ArtifactRef, Store

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

log = logging.getLogger(__name__)
DEV_BATCH = 24  # dev prompts scored at once (a domain of the default dev split: its few-shot prefix read once)


def items(cfg: PipelineConfig) -> list[str]:
    return [""] if cfg.data.mixture == "climb" else []


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return ["mix", "teacher", "model/student"]


def proxy_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The SFT settings of a proxy run: the SFT stage's, with the search's step budget, batch, learning rate and
    fine-tuning mode (no checkpoints, no recipe, plain NLL: a proxy measures data, not training tricks)."""
    climb = cfg.data.climb
    return cfg.sft.model_copy(update={
        "lr": climb.proxy_lr, "batch_size": climb.proxy_batch_size, "max_steps": climb.proxy_steps,
        "epochs": 10_000, "grad_accum": 1, "finetune": climb.proxy_finetune, "checkpoint_every": 0, "loss": "nll",
        "recipe": "single", "mixture": False, "warmup_ratio": 0.0, "scheduler": "constant_with_warmup",
        "strategy": "auto", "devices": 1, "num_nodes": 1,  # a proxy is small: one process (Ray runs several)
    }).model_dump()


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    config = {"climb": cfg.data.climb.model_dump(), "temperature": cfg.data.temperature,
              "proxy": proxy_settings(cfg), "seed": cfg.run.seed}
    return make_job("climb", config, {"mix": refs["mix"], "teacher": refs["teacher"], "base": refs["model/student"]},
                    __name__, cfg.run.store, "climb" in cfg.run.refresh,
                    hint=f"data.climb.proxy_lr={cfg.data.climb.proxy_lr} (lower it)")


def run_name(mixture: dict[str, float]) -> str:
    """A proxy run's file name: its mixture, hashed (rounded: the same draw gives the same floats, but the JSON
    round trip of a float must not matter)."""
    blob = json.dumps({k: round(v, 12) for k, v in sorted(mixture.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ray_map():
    """Under runner=ray this build runs in a Ray worker: a round's proxy runs then fan out as Ray tasks, each
    reserving what this job reserved (Ray lends a task blocked in ray.get its CPUs, so they fit). Otherwise None:
    one proxy run after another."""
    import sys

    if "ray" not in sys.modules:  # never imported: not in a Ray worker (and importing it costs seconds)
        return None
    import ray

    if not ray.is_initialized():
        return None
    assigned = ray.get_runtime_context().get_assigned_resources()
    remote_options = {"num_cpus": assigned.get("CPU", 1), "num_gpus": assigned.get("GPU", 0)}

    def run_all(objective, mixtures: list[dict[str, float]]) -> list[float]:
        proxy = ray.remote(**remote_options)(objective).options(name="climb-proxy")
        return ray.get([proxy.remote(m) for m in mixtures])

    return run_all


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import climb, domains, mixing
    from branchmerge.models.lm.hf import load_model, load_tokenizer
    from branchmerge.models.training.sft import train_sft
    from branchmerge.models.training.toolkit import group_losses

    settings, seed = job.config["climb"], job.config["seed"]
    proxy = SFTConfig.model_validate(job.config["proxy"])
    mix, teacher, base = Path(job.upstream["mix"].path), job.upstream["teacher"].path, job.upstream["base"].path
    cluster = {it["id"]: str(it["cluster"]) for it in read_jsonl(mix / "train.jsonl")}
    examples = read_jsonl(Path(teacher) / "sft.jsonl")
    if not examples:
        raise ValueError(f"data.mixture=climb: the teacher kept no responses ({teacher}/sft.jsonl); nothing to mix")
    groups = [cluster[e["id"]] for e in examples]
    # the search runs over the clusters that have teacher data (a cluster without any cannot be drawn), sized by
    # their prompts' question text as the mix stage measured it
    sizes = {c: s for c, s in read_json(mix / "mix.json")["cluster_sizes"].items() if c in set(groups)}
    dev = domains.dev_examples(read_jsonl(mix / "dev.jsonl"), read_json(mix / "shots.json"))
    if not dev:
        raise ValueError("data.mixture=climb needs a dev split: data.dev_size is 0")

    runs_dir = Store(job.store).scratch(job.stage, job.key) / "proxies"
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = len(list(runs_dir.glob("*.json")))
    if done:
        log.info("climb: resuming, %d proxy runs already done", done)
    tokenizer = load_tokenizer(base)

    def objective(mixture: dict[str, float]) -> float:
        record = runs_dir / f"{run_name(mixture)}.json"
        if record.exists():
            return read_json(record)["score"]
        drawn = mixing.draw_by_weights(examples, groups, mixture, settings["proxy_examples"], seed)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train_sft(proxy, base, drawn, tmp, seed=seed, progress=False)
            model = load_model(tmp, "float32")
            losses = group_losses(model, tokenizer, dev, max_length=proxy.max_length, batch_size=DEV_BATCH)
        score = -sum(losses.values()) / len(losses)  # domains weigh alike, whatever their dev sizes
        write_json(record, {"mixture": mixture, "score": score, "dev_loss": losses, "train_loss": metrics["loss"]})
        return score

    result = climb.search(objective, sizes, budget=settings["budget"], rounds=settings["rounds"],
                          ratios=settings["ratios"], seed=seed, temperature=job.config["temperature"],
                          n_candidates=settings["candidates"], map_rounds=ray_map(),
                          on_result=lambda r: log.info("climb: round %d, proxy %s score %.4f", r.round,
                                                       run_name(r.mixture), r.score))
    report = result.to_dict()
    report["dev_losses"] = {run_name(r.mixture): read_json(runs_dir / f"{run_name(r.mixture)}.json")["dev_loss"]
                            for r in result.runs}
    write_json(out / "weights.json", result.chosen)
    write_json(out / "search.json", report)
    climb.plot_search(result, out / "search.png")
    best = result.best_observed
    if result.chosen_from == "best_observed":
        log.warning("climb: the predictor fitted on %d proxy runs is constant (LightGBM splits no fewer than 10 "
                    "points): the chosen weights are the best proxy run's; raise data.climb.budget for a search",
                    len(result.runs))
    return {"weights": result.chosen, "chosen_from": result.chosen_from, "predicted_score": result.chosen_predicted,
            "best_observed_score": best.score, "prior": result.prior, "runs": len(result.runs), "fit": result.fit}
