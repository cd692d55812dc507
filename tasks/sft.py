"""SFT stage: one branch = the base student fine-tuned on the teacher's kept responses for one domain, through
the data recipe of conf/sft (models/training/recipes.py), resumable from the store's scratch folder after a crash.
Items: the domains, and `mixture` (sft.mixture): the mixed-data baseline on the union of every domain's data."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.training.config import SFTConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl
from branchmerge.tasks.store import ArtifactRef, Store

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

log = logging.getLogger("branchmerge")

MIXTURE = "mixture"


def items(cfg: PipelineConfig) -> list[str]:
    return [*cfg.data.domains, *([MIXTURE] if cfg.sft.mixture else [])]


def settings(cfg: PipelineConfig, item: str) -> SFTConfig:
    """The branch's settings; the mixture's: one stage over the union (dmt has no "other domains" there), and the
    branches' step budget together."""
    if item != MIXTURE:
        return cfg.sft
    return cfg.sft.model_copy(update={
        "recipe": "single" if cfg.sft.recipe == "dmt" else cfg.sft.recipe,
        "max_steps": cfg.sft.max_steps * len(cfg.data.domains) if cfg.sft.max_steps > 0 else cfg.sft.max_steps})


def mixture_settings(cfg: PipelineConfig) -> dict[str, Any] | None:
    """How the data is drawn over the clusters (data.mixture), None for the data as it is (natural)."""
    if cfg.data.mixture == "natural":
        return None
    return cfg.data.model_dump(include={"mixture", "temperature", "custom_weights"})


def aioli(cfg: PipelineConfig, item: str) -> bool:
    """Whether the item has a multi-domain stage trained with Aioli's online mixture (sft.mixing=aioli): the
    mixed-data baseline, and DMT's stage 2 (models/training/recipes.online_mixing)."""
    return cfg.sft.mixing == "aioli" and (item == MIXTURE or cfg.sft.recipe == "dmt")


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    reference = ["model/teacher"] if cfg.sft.loss == "poft" and cfg.sft.poft_reference == "teacher" else []
    mixture = {"natural": [], "climb": ["mix", "climb"]}.get(cfg.data.mixture, ["mix"])
    if aioli(cfg, item) and "mix" not in mixture:
        mixture = ["mix"]  # the dev split it measures the per-domain losses on
    return ["model/student", "teacher", *reference, *mixture]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    upstream = {"base": refs["model/student"], "teacher": refs["teacher"]}
    if "model/teacher" in needs(cfg, item):
        upstream["teacher_model"] = refs["model/teacher"]
    for name in ("mix", "climb"):
        if name in needs(cfg, item):
            upstream[name] = refs[name]
    mixture = mixture_settings(cfg)
    config = {"sft": settings(cfg, item).model_dump(), "branch": item, "seed": cfg.run.seed,
              **({"mixture": mixture} if mixture else {})}
    # sft.mixing / sft.aioli enter only the keys of what mixes domains online: switching keeps the other branches
    key = config if aioli(cfg, item) else config | {
        "sft": {k: v for k, v in config["sft"].items() if k not in ("mixing", "aioli")}}
    return make_job(f"sft/{item}", config, upstream, __name__, cfg.run.store, "sft" in cfg.run.refresh,
                    hint=f"sft.lr={cfg.sft.lr} (lower it), sft.precision={cfg.sft.precision}", key_config=key)


def examples_for(teacher_dir: str, branch: str) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(Path(teacher_dir) / "sft.jsonl") if branch in (MIXTURE, r["domain"])]
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


def weighted_draw(job: Job, seed: int):
    """examples -> as many drawn by the mixture's weights over the clusters of their prompts (restricted to the
    clusters present: a branch's own, or the other domains' for DMT's general data)."""
    from branchmerge.models.data import mixing

    mix = Path(job.upstream["mix"].path)
    m = job.config["mixture"]
    if m["mixture"] == "climb":
        weights = read_json(Path(job.upstream["climb"].path) / "weights.json")
    else:
        weights = mixing.cluster_weights(m["mixture"], read_json(mix / "mix.json")["cluster_sizes"],
                                         temperature=m["temperature"], custom=m["custom_weights"])
    cluster = {it["id"]: str(it["cluster"]) for it in read_jsonl(mix / "train.jsonl")}

    def draw(rows: list[dict]) -> list[dict]:
        groups = [cluster[r["id"]] for r in rows]
        return mixing.draw_by_weights(rows, groups, mixing.restrict(weights, groups), len(rows), seed)

    return draw


def dev_examples(job: Job) -> dict[str, list[dict]]:
    """The dev split's gold worked answers per domain: what Aioli measures each domain's loss on."""
    from branchmerge.models.data import domains

    mix = Path(job.upstream["mix"].path)
    return domains.dev_examples(read_jsonl(mix / "dev.jsonl"), read_json(mix / "shots.json"))


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.training.recipes import recipe_stages, train_recipe

    cfg, branch, seed = SFTConfig.model_validate(job.config["sft"]), job.config["branch"], job.config["seed"]
    teacher_dir = job.upstream["teacher"].path
    examples = examples_for(teacher_dir, branch)
    general = general_examples(teacher_dir, branch) if cfg.recipe == "dmt" else []
    if "mixture" in job.config:  # the branch's clusters (the mixture's: all), DMT's general data: by the weights
        draw = weighted_draw(job, seed)
        examples, general = draw(examples), draw(general) if general else general
    stages = recipe_stages(cfg, examples, general=general,
                           pass_rates=pass_rates(teacher_dir, examples) if cfg.recipe == "curriculum" else [],
                           seed=seed)
    reference = job.upstream["teacher_model" if cfg.poft_reference == "teacher" else "base"]
    checkpoints = Store(job.store).scratch(job.stage, job.key)  # kept across crashes, deleted once sealed
    metrics = train_recipe(cfg, job.upstream["base"].path, stages, out, seed=seed, checkpoint_dir=checkpoints,
                           dev=dev_examples(job) if cfg.mixing == "aioli" and "mix" in job.upstream else None,
                           reference_dir=reference.path if cfg.loss == "poft" else None, logger=logger)
    # Where training resumed is how this build went, not what it made (a resumed branch's weights equal an
    # uninterrupted one's): kept out of the meta, which the digest covers, so nothing downstream is rebuilt for it.
    resumed = max([metrics.pop("resumed_from_step", 0), *(s.pop("resumed_from_step", 0)
                                                           for s in metrics.get("stages", []))])
    if resumed:
        log.info("%s: resumed from its checkpoint at step %d", job.stage, resumed)
    # "examples": the branch's teacher examples; each stage's metrics count what it trained on
    return {**metrics, "examples": len(examples), "stage_examples": [len(s) for s in stages]}
