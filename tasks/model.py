"""Model stage: any model source (GGUF in a wheel, split GGUF, local HF folder, tiny random) -> an HF folder.

Items: `student` and `teacher` (not when only a server has it). Both come through here, keyed by their settings,
so a GGUF is converted once and every later run, branch and sweep job reuses the same folder (and a teacher equal
to the student is one artifact).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.lm.config import ModelConfig
from branchmerge.tasks.common import Job, make_job
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


def items(cfg: PipelineConfig) -> list[str]:
    """The student, and the teacher unless only a server has it (teacher.openai.model)."""
    return ["student", *(["teacher"] if cfg.teacher.uses_local_model() else [])]


def settings(cfg: PipelineConfig, item: str) -> ModelConfig:
    return cfg.student if item == "student" else cfg.teacher.model


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return []


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    model = settings(cfg, item)
    return make_job(f"model/{model.name}", {"model": model.model_dump()}, {}, __name__, cfg.run.store,
                    "model" in cfg.run.refresh)


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.lm.hf import materialize_model

    model = ModelConfig.model_validate(job.config["model"])
    materialize_model(model.source, out, model.dtype)
    return {"name": model.name, "dtype": model.dtype}
