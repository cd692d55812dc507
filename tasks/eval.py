"""Eval stage: greedy pass@1 per domain on the held-out split; every generation is kept for inspection.
Items: the models (base, branch/<domain>, merged, rl)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.eval.config import EvalConfig
from tasks.common import Job, make_job, read_json, read_jsonl, write_json, write_jsonl
from tasks.store import ArtifactRef

if TYPE_CHECKING:
    from flows.schema import PipelineConfig


def models(cfg: PipelineConfig) -> list[str]:
    """The evaluated models, in report order; each names the artifact it evaluates (model_artifact)."""
    return ["base", *(f"branch/{d}" for d in cfg.data.domains), "merged", *(["rl"] if cfg.rl.enabled else [])]


def model_artifact(item: str) -> str:
    if item == "base":
        return "model/student"
    if item.startswith("branch/"):
        return f"sft/{item.removeprefix('branch/')}"
    return {"merged": "merge", "rl": "rl"}[item]


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return [model_artifact(item), "mix"]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    # The model's name is not in the key: the same weights evaluated under two names are evaluated once.
    return make_job(f"eval/{item}", {"eval": cfg.eval.model_dump()},
                    {"model": refs[model_artifact(item)], "mix": refs["mix"]}, __name__, cfg.run.store,
                    "eval" in cfg.run.refresh)


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from models.data import domains
    from models.eval.metrics import accuracy_by_domain
    from models.lm import generation
    from models.lm.hf import load_model, load_tokenizer

    cfg, mix = EvalConfig.model_validate(job.config["eval"]), Path(job.upstream["mix"].path)
    items = read_jsonl(mix / "eval.jsonl")
    shots = read_json(mix / "shots.json")
    model_dir = job.upstream["model"].path
    model, tokenizer = load_model(model_dir, cfg.dtype), load_tokenizer(model_dir)
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    outputs = generation.generate(model, tokenizer, conversations, n=1, temperature=0.0, top_p=1.0,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=0,
                                  desc=f"eval {job.stage.split('/', 1)[1]}")
    rows = []
    for item, (c,) in zip(items, outputs):
        answer = domains.extract_answer(c["text"])
        rows.append({"id": item["id"], "domain": item["domain"], "question": item["question"],
                     "reference": item["answer"], "completion": c["text"], "answer": answer,
                     "score": domains.score(item, answer), "num_tokens": c["num_tokens"]})
    metrics = accuracy_by_domain(rows)
    write_jsonl(out / "generations.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    return metrics
