"""The stage graph, written once: every stage, what it reads, which config sections key it, one artifact per item.

The Prefect flow (flows/pipeline.py), the DVC single-stage CLI (flows/stage.py) and the dvc.yaml generator read
this list; a stage's code version is its module's import closure (tasks/code.py).

A stage module offers:
    needs(cfg, item) -> [artifact names]     what plan() reads ("mix", "model/student", "sft/gcd", ...)
    plan(cfg, item, refs) -> Job             the cache key, from settings and upstream digests; no model touched
    build(job, out, logger) -> meta          the work, into a temp folder the store seals
An artifact's name is `stage` or `stage/item`; it is also its folder under dvc/ in the DVC pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from branchmerge.tasks import eval as eval_stage
from branchmerge.tasks import climb, merge, mix, model, report, rl, sft, teacher
from branchmerge.tasks.common import Job
from branchmerge.tasks.store import ArtifactRef, Store

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType
    upstreams: tuple[str, ...]  # stages whose artifacts it reads
    params: tuple[str, ...]  # config sections hashed into its keys (DVC's params)
    items: Callable[["PipelineConfig"], list[str]]  # one artifact per item ("" = the stage itself)
    # DVC: one stage per item, over these items (a tuple) or a params mapping's keys ("${data.domains}");
    # None: a stage with items builds them all in one DVC stage
    dvc_foreach: tuple[str, ...] | str | None = None

    def artifact(self, item: str) -> str:
        return f"{self.name}/{item}" if item else self.name


def _one(cfg) -> list[str]:
    return [""]


STAGES = (
    Stage("model", model, (), ("student", "teacher.model"), model.items, dvc_foreach=("student", "teacher")),
    Stage("mix", mix, (), ("data",), _one),
    Stage("teacher", teacher, ("mix", "model"), ("teacher", "run.seed"), _one),
    Stage("climb", climb, ("mix", "model", "teacher"), ("data", "sft", "run.seed"), climb.items),
    Stage("sft", sft, ("model", "teacher", "mix", "climb"), ("sft", "data", "run.seed"), sft.items),
    Stage("merge", merge, ("model", "sft"), ("merge", "run.seed"), _one),
    Stage("rl", rl, ("merge", "mix", "teacher"), ("rl", "run.seed"), rl.items),
    Stage("eval", eval_stage, ("model", "sft", "merge", "rl", "mix"), ("eval", "run.optimized_metric"), eval_stage.items),
    Stage("report", report, ("eval",), (), _one),
)
REGISTRY = {stage.name: stage for stage in STAGES}
STAGE_NAMES = tuple(REGISTRY)


def dry_run(cfg: PipelineConfig) -> dict[str, tuple[Job, ArtifactRef | None]]:
    """Every artifact's job and its stored artifact (None: it would be computed), without computing anything.
    An artifact not in the store stands in for its inputs' consumers with a digest derived from its key, so the
    keys of everything downstream of something to compute are placeholders too (they change once it is built,
    unless its content comes out the same)."""
    store, refs, plans = Store(cfg.run.store), {}, {}
    for stage in STAGES:
        for item in stage.items(cfg):
            job = stage.module.plan(cfg, item, refs)
            ref = None if job.refresh else store.load(job.stage, job.key)
            plans[stage.artifact(item)] = (job, ref)
            refs[stage.artifact(item)] = ref or ArtifactRef(stage=job.stage, key=job.key, digest=f"planned:{job.key}",
                                                            path=str(store.path(job.stage, job.key)))
    return plans
