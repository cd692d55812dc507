"""Merge stage: the branch students merged onto the base with a mergekit method (models/merge.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job
from tasks.store import ArtifactRef

CODE = ("tasks/merge.py", "models/merge.py")


def plan(merge: dict[str, Any], seed: int, base: ArtifactRef, branches: dict[str, ArtifactRef], store: str,
         refresh: bool) -> Job:
    upstream = {"base": base} | {f"sft/{name}": ref for name, ref in branches.items()}
    return make_job("merge", merge | {"seed": seed}, upstream, CODE, store, refresh)


def mergekit_config(job: Job) -> dict[str, Any]:
    """The merge as a mergekit YAML would say it: every branch with the configured parameters, base = student."""
    cfg = job.config
    branches = [ref.path for name, ref in sorted(job.upstream.items()) if name.startswith("sft/")]
    return {"merge_method": cfg["method"], "base_model": job.upstream["base"].path,
            "models": [{"model": path, "parameters": {}} for path in branches],
            "parameters": cfg["parameters"], "dtype": cfg["dtype"], "out_dtype": cfg["out_dtype"],
            "tokenizer_source": "base"}


def build(job: Job, out: Path) -> dict[str, Any]:
    from models.merge import run_merge

    return run_merge(mergekit_config(job), out, seed=job.config["seed"])
