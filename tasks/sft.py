"""SFT stage: one branch = the base student fine-tuned on the teacher's kept responses for one domain, through
the data recipe of conf/sft (models/sft_recipes.py), resumable from the store's scratch folder after a crash."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks.common import Job, make_job, read_jsonl
from tasks.store import ArtifactRef, Store

CODE = ("tasks/sft.py", "models/sft.py", "models/sft_recipes.py", "models/packing.py", "kernels/linear_ce.py")
# conf/sft keys this task resolves itself; the rest are train_sft's arguments
RECIPE_KEYS = ("recipe", "dmt_k", "hard_fraction")


def plan(sft: dict[str, Any], branch: str, seed: int, base: ArtifactRef, teacher: ArtifactRef, store: str,
         refresh: bool, teacher_model: ArtifactRef | None = None) -> Job:
    upstream = {"base": base, "teacher": teacher}
    if sft["loss"] == "poft" and sft["poft_reference"] == "teacher":
        if teacher_model is None:
            raise ValueError("sft.poft_reference=teacher: the teacher model's artifact is needed")
        upstream["teacher_model"] = teacher_model
    return make_job(f"sft/{branch}", sft | {"branch": branch, "seed": seed}, upstream, CODE, store, refresh)


def examples_for(teacher_dir: str, branch: str) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(Path(teacher_dir) / "sft.jsonl") if r["domain"] == branch]
    if not rows:
        raise ValueError(f"teacher kept no responses for domain {branch!r} ({teacher_dir}/sft.jsonl): raise "
                         "teacher.n or teacher.max_new_tokens, ease the domain's task config, or set teacher.keep=all")
    return rows


def general_examples(teacher_dir: str, branch: str) -> list[dict[str, Any]]:
    """DMT's general data: the teacher's kept responses of every other domain."""
    return [r for r in read_jsonl(Path(teacher_dir) / "sft.jsonl") if r["domain"] != branch]


def pass_rates(teacher_dir: str, examples: list[dict[str, Any]]) -> list[float]:
    """The teacher's pass rate on each example's prompt (its mean score over the n samples)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for row in read_jsonl(Path(teacher_dir) / "samples.jsonl"):
        scores[row["id"]].append(row["score"])
    return [sum(scores[e["id"]]) / len(scores[e["id"]]) for e in examples]


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from models.sft_recipes import recipe_stages, train_recipe

    cfg = dict(job.config)
    branch, recipe = cfg.pop("branch"), {k: cfg.pop(k) for k in RECIPE_KEYS}
    teacher_dir = job.upstream["teacher"].path
    examples = examples_for(teacher_dir, branch)
    stages = recipe_stages(recipe["recipe"], examples, general=general_examples(teacher_dir, branch)
                           if recipe["recipe"] == "dmt" else [],
                           pass_rates=pass_rates(teacher_dir, examples) if recipe["recipe"] == "curriculum" else [],
                           dmt_k=recipe["dmt_k"], hard_fraction=recipe["hard_fraction"], seed=cfg["seed"])
    reference = {"base": job.upstream["base"], "teacher": job.upstream.get("teacher_model")}[cfg.pop("poft_reference")]
    checkpoints = Store(job.store).scratch(job.stage, job.key)  # kept across crashes, deleted once sealed
    metrics = train_recipe(job.upstream["base"].path, stages, out, checkpoint_dir=checkpoints,
                           reference_dir=reference.path if cfg["loss"] == "poft" else None, **cfg, logger=logger)
    # "examples": the branch's teacher examples; each stage's metrics count what it trained on
    return {**metrics, "examples": len(examples), "stage_examples": [len(s) for s in stages]}
