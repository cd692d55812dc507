"""SFT stage: one branch = the base student fine-tuned on the teacher's kept responses for one domain."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job, read_jsonl
from tasks.store import ArtifactRef

CODE = ("tasks/sft.py", "models/sft.py")


def plan(sft: dict[str, Any], branch: str, seed: int, base: ArtifactRef, teacher: ArtifactRef, store: str,
         refresh: bool) -> Job:
    return make_job(f"sft/{branch}", sft | {"branch": branch, "seed": seed}, {"base": base, "teacher": teacher},
                    CODE, store, refresh)


def examples_for(teacher_dir: str, branch: str) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(Path(teacher_dir) / "sft.jsonl") if r["domain"] == branch]
    if not rows:
        raise ValueError(f"teacher kept no responses for domain {branch!r} ({teacher_dir}/sft.jsonl): raise "
                         "teacher.n or teacher.max_new_tokens, ease the domain's task config, or set teacher.keep=all")
    return rows


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from models.sft import train_sft

    cfg = dict(job.config)
    cfg.pop("branch")
    examples = examples_for(job.upstream["teacher"].path, job.config["branch"])
    metrics = train_sft(job.upstream["base"].path, examples, out, **cfg, logger=logger)
    return {"examples": len(examples), **metrics}
