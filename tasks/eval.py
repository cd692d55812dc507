"""Eval stage: greedy pass@1 (and, with eval.n, pass@n and maj@n) per domain on the held-out split, each with its
95 % interval (models/eval/metrics.py); every generation is kept for inspection and for paired comparisons.
Items: the models (base, branch/<domain>, merged, rl), and with run.optimized_metric=dev/pass@1 the final model on
the dev split (dev/merged or dev/rl): what a sweeper's search reads, so that the held-out split stays unseen."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.eval.config import EvalConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl, write_json, write_jsonl
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


def models(cfg: PipelineConfig) -> list[str]:
    """The evaluated models, in report order; each names the artifact it evaluates (model_artifact)."""
    return ["base", *(f"branch/{d}" for d in cfg.data.domains), *(["mixture"] if cfg.sft.mixture else []),
            "merged", *(["rl"] if cfg.rl.enabled else [])]


def final_model(cfg: PipelineConfig) -> str:
    """The model the run ends with: rl's, else the merged one."""
    return "rl" if cfg.rl.enabled else "merged"


def items(cfg: PipelineConfig) -> list[str]:
    """The held-out evaluations (models()), then the dev-split one a search optimises (run.optimized_metric)."""
    return [*models(cfg), *([f"dev/{final_model(cfg)}"] if cfg.run.optimized_metric else [])]


def split(item: str) -> str:
    """The mix stage's split an item evaluates on: dev.jsonl for dev/<model>, else eval.jsonl (held-out)."""
    return "dev" if item.startswith("dev/") else "eval"


def model_artifact(cfg: PipelineConfig, item: str) -> str:
    item = item.removeprefix("dev/")
    if item == "base":
        return "model/student"
    if item.startswith("branch/"):
        return f"sft/{item.removeprefix('branch/')}"
    if item == "rl":  # the last of the RL stages
        from branchmerge.tasks.rl import final

        return final(cfg)
    return {"mixture": "sft/mixture", "merged": "merge"}[item]


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return [model_artifact(cfg, item), "mix"]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    # The model's name is not in the key: the same weights evaluated under two names are evaluated once.
    # Nor is where a server runs (EvalConfig.key), nor run.seed when nothing is sampled (eval.n=0: greedy only),
    # so the base model is evaluated once for every seed of a sweep.
    seed = cfg.run.seed if cfg.eval.n else None
    return make_job(f"eval/{item}", {"eval": cfg.eval.model_dump(), "seed": seed, "split": split(item)},
                    {"model": refs[model_artifact(cfg, item)], "mix": refs["mix"]}, __name__, cfg.run.store,
                    "eval" in cfg.run.refresh, key_config={"eval": cfg.eval.key(), "seed": seed, "split": split(item)})


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import domains
    from branchmerge.models.eval.metrics import summarize
    from branchmerge.models.lm.backends import open_backend
    from branchmerge.tasks.store import Store

    cfg, mix = EvalConfig.model_validate(job.config["eval"]), Path(job.upstream["mix"].path)
    items = read_jsonl(mix / f"{job.config['split']}.jsonl")
    shots = read_json(mix / "shots.json")
    model_dir = job.upstream["model"].path
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    name = job.stage.split("/", 1)[1].removeprefix("dev/")
    label = name if job.config["split"] == "eval" else f"{name} on dev"
    backend = open_backend(cfg, section="eval", model_dir=model_dir, served_model=cfg.served_model(name, model_dir),
                           dtype=cfg.dtype, batch_size=cfg.batch_size,
                           scratch=Store(job.store).scratch(job.stage, job.key))
    greedy = backend.generate(conversations, n=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                              seed=0, desc=f"eval {label}")
    sampled = backend.generate(conversations, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, seed=job.config["seed"],
                               desc=f"eval {label} (n={cfg.n})") if cfg.n else None
    rows = []
    for i, (item, (c,)) in enumerate(zip(items, greedy)):
        answer = domains.extract_answer(c["text"])
        row = {"id": item["id"], "domain": item["domain"], "question": item["question"],
               "reference": item["answer"], "completion": c["text"], "answer": answer,
               "score": domains.score(item, answer), "num_tokens": c["num_tokens"]}
        if sampled is not None:
            answers = [domains.extract_answer(s["text"]) for s in sampled[i]]
            row |= {"sample_answers": answers, "sample_scores": [domains.score(item, a) for a in answers],
                    "sample_tokens": [s["num_tokens"] for s in sampled[i]]}
        rows.append(row)
    metrics = summarize(rows, k=cfg.n or None)
    write_jsonl(out / "generations.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    return metrics
