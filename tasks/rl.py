"""RL stage: GRPO on the merged model, rewarded by the tasks' own verifiers on the training prompts."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.training.config import RLConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return ["merge", "mix"]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    return make_job("rl", {"rl": cfg.rl.model_dump(), "seed": cfg.run.seed},
                    {"model": refs["merge"], "mix": refs["mix"]}, __name__, cfg.run.store, "rl" in cfg.run.refresh,
                    hint=f"rl.lr={cfg.rl.lr} (lower it), rl.beta={cfg.rl.beta}, rl.precision={cfg.rl.precision}")


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import domains
    from branchmerge.models.training.grpo import train_grpo

    mix = Path(job.upstream["mix"].path)
    items = read_jsonl(mix / "train.jsonl")
    shots = read_json(mix / "shots.json")
    return train_grpo(RLConfig.model_validate(job.config["rl"]), job.upstream["model"].path, items,
                      domains.reward_fn, lambda item: domains.build_messages(item, shots[item["domain"]]), out,
                      seed=job.config["seed"], logger=logger)
