"""RL stage: GRPO on the merged model, rewarded by the tasks' own verifiers on the training prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job, read_json, read_jsonl
from tasks.store import ArtifactRef

CODE = ("tasks/rl.py", "models/grpo.py", "models/domains.py", "kernels/linear_ce.py")  # chunked log-probs


def plan(rl: dict[str, Any], seed: int, model: ArtifactRef, mix: ArtifactRef, store: str, refresh: bool) -> Job:
    config = {k: v for k, v in rl.items() if k != "enabled"} | {"seed": seed}
    return make_job("rl", config, {"model": model, "mix": mix}, CODE, store, refresh)


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from models import domains
    from models.grpo import train_grpo

    mix = Path(job.upstream["mix"].path)
    items = read_jsonl(mix / "train.jsonl")
    shots = read_json(mix / "shots.json")
    return train_grpo(job.upstream["model"].path, items, domains.reward_fn,
                      lambda item: domains.build_messages(item, shots[item["domain"]]), out, **job.config,
                      logger=logger)
