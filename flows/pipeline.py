"""The Branch-Merge flow: mix -> teacher -> sft[branch] x N -> merge -> rl -> eval -> report.

Read top to bottom: each stage is planned (its cache key from its config and its inputs' digests), run as one
Prefect task run (reused when its artifact is intact), tracked as one nested MLflow run, and recorded in the
run summary. Everything heavy lives in tasks/ and models/; this file only wires them.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

for _var, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "branchmerge",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _value)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.config import compose  # noqa: E402
from flows.schema import PipelineConfig  # noqa: E402
from flows.tracking import Tracker  # noqa: E402
from tasks import eval as eval_stage  # noqa: E402
from tasks import merge, mix, model, report, rl, sft, teacher  # noqa: E402
from tasks.common import Job, execute, write_json  # noqa: E402
from tasks.store import ArtifactRef, Store, stable_hash  # noqa: E402

log = logging.getLogger("branchmerge")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call is noise


def artifact_cache_key(ctx: TaskRunContext, inputs: dict[str, Any]) -> str | None:
    """Prefect's cache key is the artifact key, but only while the artifact is intact: a missing or corrupt
    artifact yields no key, so the task runs and rebuilds it instead of returning a stale reference."""
    job: Job = inputs["job"]
    store = Store(job.store)
    if job.refresh or not store.is_valid(job.stage, job.key):
        return None
    # Prefect's result records are shared by every store under one PREFECT_HOME: the same artifact key in
    # another store (a sweep's, a test's) must not answer for this one.
    return f"{job.stage.replace('/', '-')}-{job.key}-{stable_hash(str(store.root))[:12]}"


@task(cache_key_fn=artifact_cache_key, persist_result=True, cache_result_in_memory=False)
def run_stage(job: Job, module: str, mlflow_run: Future | None = None, tracking_uri: str | None = None
              ) -> ArtifactRef:
    """One stage as one Prefect task run; `module` names the tasks/ module whose `build` does the work."""
    build = importlib.import_module(module).build
    if "logger" not in inspect.signature(build).parameters:
        return execute(job, build)

    def build_with_logger(job: Job, out: Path) -> dict[str, Any]:
        logger = None
        if mlflow_run is not None:  # imported only when training really runs: lightning costs seconds to import
            from lightning.pytorch.loggers import MLFlowLogger

            logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=mlflow_run.result())
        return build(job, out, logger=logger)

    return execute(job, build_with_logger)


class Stages:
    """Submits jobs to Prefect, tracks each in MLflow and remembers what happened for the summary."""

    def __init__(self, cfg: PipelineConfig, tracker: Tracker, runner: ThreadPoolTaskRunner):
        self.cfg, self.tracker, self.runner = cfg, tracker, runner
        self.records: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, tuple[Any, Future | None, float]] = {}

    def submit(self, job: Job, module: str):
        if job.stage in self.pending:  # e.g. teacher model == student model: one artifact, one task run
            return self.pending[job.stage][0]
        run_id = self.tracker.stage_run(job.stage, job.config)
        future = self.runner.submit(run_stage.with_options(task_run_name=job.stage),
                                    {"job": job, "module": module, "mlflow_run": run_id,
                                     "tracking_uri": self.cfg.tracking.tracking_uri})
        self.pending[job.stage] = (future, run_id, time.perf_counter())
        return future

    def result(self, job: Job) -> ArtifactRef:
        future, run_id, t0 = self.pending[job.stage]
        ref: ArtifactRef = future.result()
        if future.state.name == "Cached":
            ref = ref.model_copy(update={"status": "reused"})
        ref = ref.model_copy(update={"seconds": time.perf_counter() - t0 if ref.status == "reused" else ref.seconds})
        if job.stage not in self.records:
            self.tracker.finish_stage(run_id, ref)
            self.records[job.stage] = {"status": ref.status, "path": ref.path, "digest": ref.digest,
                                       "key": ref.key, "seconds": round(ref.seconds, 3)}
        return ref

    def run(self, job: Job, module: str) -> ArtifactRef:
        self.submit(job, module)
        return self.result(job)

    def run_all(self, jobs: dict[str, Job], module: str) -> dict[str, ArtifactRef]:
        for job in jobs.values():
            self.submit(job, module)
        return {name: self.result(job) for name, job in jobs.items()}


def task_runner_for(cfg: PipelineConfig) -> ThreadPoolTaskRunner:
    """Built per run from the config (a deployment's overrides may change it), not fixed on the decorator."""
    if cfg.runner.kind == "threads" and cfg.runner.max_workers > 1:
        import transformers  # resolve its lazy imports once here: concurrent first imports in threads fail

        transformers.AutoModel, transformers.AutoModelForCausalLM  # noqa: B018
    return ThreadPoolTaskRunner(max_workers=1 if cfg.runner.kind == "sequential" else cfg.runner.max_workers)


@flow(name="branchmerge", log_prints=True, persist_result=False)
def branchmerge(config: PipelineConfig | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole loop. From the CLI `config` comes composed by Hydra; from a deployment or the UI, pass
    Hydra `overrides` (e.g. ["experiment=tiny", "merge.method=ties"]) and the flow composes conf/ itself."""
    cfg = config if config is not None else compose(overrides or [])
    started = time.perf_counter()
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment)
    tracker.start(cfg.run.name, cfg.model_dump(), {"overrides": " ".join(overrides or [])})
    try:
        with task_runner_for(cfg) as runner:
            report_ref, teacher_ref, stages = run_stages(cfg, tracker, Stages(cfg, tracker, runner))
    except BaseException:
        tracker.finish({}, [], status="FAILED")
        raise
    return finish(cfg, stages, tracker, report_ref, teacher_ref, started)


def run_stages(cfg: PipelineConfig, tracker: Tracker, stages: Stages) -> tuple[ArtifactRef, ArtifactRef, Stages]:
    logger = get_run_logger()
    store, refresh = cfg.run.store, set(cfg.run.refresh)

    def fresh(stage: str) -> bool:
        return stage in refresh

    # Data: prompt pools per domain, shots, clusters and weights.
    mix_job = mix.plan(cfg.data.model_dump(), store, fresh("mix"))
    if not Store(store).is_valid(mix_job.stage, mix_job.key):
        # Expensive work lies ahead: a merge config that cannot run must fail now, not after training.
        merge.check(cfg.merge.model_dump(), list(cfg.data.domains))

    # Models: the student's base folder and the teacher's (one artifact if they are the same model).
    base_job = model.plan(cfg.student.model_dump(), store, fresh("model"))
    teacher_model_job = model.plan(cfg.teacher.model.model_dump(), store, fresh("model"))
    stages.submit(base_job, "tasks.model")
    stages.submit(teacher_model_job, "tasks.model")
    mix_ref = stages.run(mix_job, "tasks.mix")
    base_ref, teacher_model_ref = stages.result(base_job), stages.result(teacher_model_job)

    # Teacher: sample, verify, keep.
    teacher_ref = stages.run(teacher.plan(cfg.teacher.model_dump(), cfg.run.seed, mix_ref, teacher_model_ref,
                                          store, fresh("teacher")), "tasks.teacher")
    logger.info("teacher pass rates: %s", teacher_ref.meta.get("domains"))

    # Branches: one SFT run per domain, all from the same base.
    branches = stages.run_all({d: sft.plan(cfg.sft.model_dump(), d, cfg.run.seed, base_ref, teacher_ref, store,
                                           fresh("sft"), teacher_model=teacher_model_ref)
                               for d in cfg.data.domains}, "tasks.sft")

    # Merge the branches onto the base, then refine with RL.
    merged_ref = stages.run(merge.plan(cfg.merge.model_dump(), cfg.run.seed, base_ref, branches, store,
                                       fresh("merge")), "tasks.merge")
    models = {"base": base_ref} | {f"branch/{d}": ref for d, ref in branches.items()} | {"merged": merged_ref}
    if cfg.rl.enabled:
        models["rl"] = stages.run(rl.plan(cfg.rl.model_dump(), cfg.run.seed, merged_ref, mix_ref, store,
                                          fresh("rl")), "tasks.rl")

    # Evaluate every model on the held-out prompts, then one report.
    evals = stages.run_all({name: eval_stage.plan(cfg.eval.model_dump(), name, ref, mix_ref, store, fresh("eval"))
                            for name, ref in models.items()}, "tasks.eval")
    report_ref = stages.run(report.plan(evals, store, fresh("report")), "tasks.report")
    return report_ref, teacher_ref, stages


def finish(cfg: PipelineConfig, stages: Stages, tracker: Tracker, report_ref: ArtifactRef,
           teacher_ref: ArtifactRef, started: float) -> dict[str, Any]:
    from models.report import results_table_plain, table_rows

    logger = get_run_logger()
    results = report_ref.meta["results"]
    table = results_table_plain(results)
    markdown = (Path(report_ref.path) / "results.md").read_text()
    run_dir = Path(cfg.run.store) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    overall = {name: sum(scores.values()) / len(scores) for name, scores in results.items()}
    summary = {"name": cfg.run.name, "seconds": round(time.perf_counter() - started, 3),
               "stages": stages.records, "results": results, "overall": overall,
               "teacher": teacher_ref.meta.get("domains"), "report": report_ref.path,
               "mlflow_run_id": tracker.parent_id, "config": cfg.model_dump()}
    summary_path = run_dir / "summary.json"
    write_json(summary_path, summary)

    create_table_artifact(key="branchmerge-results", table=table_rows(results),
                          description=f"greedy pass@1 on held-out prompts ({cfg.run.name})")
    create_markdown_artifact(key="branchmerge-report", markdown=markdown + f"\n\nsummary: `{summary_path}`\n")
    tracker.finish({f"pass_at_1.{name}": v for name, v in overall.items()},
                   [str(summary_path), str(Path(report_ref.path) / "results.md"),
                    str(Path(report_ref.path) / "results.png")])
    reused = sum(r["status"] == "reused" for r in stages.records.values())
    logger.info("stages: %d computed, %d reused", len(stages.records) - reused, reused)
    logger.info("results (greedy pass@1, held-out):\n%s", table)
    logger.info("summary: %s", summary_path)
    return {"summary": str(summary_path), "overall": overall, "results": results, "table": table,
            "report": report_ref.path}
