"""Model stage: any model source (GGUF in a wheel, split GGUF, local HF folder, tiny random) -> an HF folder.

Base student and teacher both come through here, keyed by their source, so a GGUF is converted once and every
later run, branch and sweep job reuses the same folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job

CODE = ("tasks/model.py", "models/hf.py")


def plan(model: dict[str, Any], store: str, refresh: bool) -> Job:
    return make_job(f"model/{model['name']}", model, {}, CODE, store, refresh)


def build(job: Job, out: Path) -> dict[str, Any]:
    from models.hf import materialize_model

    materialize_model(job.config["source"], out, job.config["dtype"])
    return {"name": job.config["name"], "dtype": job.config["dtype"]}
