"""The Branch-Merge flow: mix -> teacher -> sft[branch] x N -> merge -> rl -> eval -> report.

Read top to bottom: the stage graph comes from tasks/registry.py; every job whose inputs exist is planned (its
cache key from its settings and its inputs' digests) and submitted as one Prefect task run, a wave at a time;
each is tracked as one nested MLflow run and recorded in the run summary. Everything heavy lives in tasks/ and
models/; this file only wires them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

for _var, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "branchmerge",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false",
                     # transformers' own bars ("Loading weights", "Writing model shards") on every load and save:
                     # the terminal's bars are generation's and training's (read when huggingface_hub is imported)
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     # the store's log lines go to Prefect's API inside a flow run, and only to the terminal outside
                     "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}.items():
    os.environ.setdefault(_var, _value)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import TaskRunContext, get_run_context  # noqa: E402
from prefect.states import Completed  # noqa: E402
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner  # noqa: E402

from branchmerge.flows.config import compose, resolve  # noqa: E402
from branchmerge.flows.schema import PipelineConfig  # noqa: E402
from branchmerge.flows.preflight import preflight  # noqa: E402
from branchmerge.flows.tracking import FinalModel, Tracker, eval_set_hash  # noqa: E402
from branchmerge.tasks.common import Job, execute, write_json  # noqa: E402
from branchmerge.tasks import eval as eval_stage  # noqa: E402
from branchmerge.tasks import rl as rl_stage  # noqa: E402
from branchmerge.tasks.registry import REGISTRY, STAGES, Stage  # noqa: E402
from branchmerge.tasks.store import ArtifactRef, Store, stable_hash, unique_run_dir  # noqa: E402

log = logging.getLogger("branchmerge")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call is noise


def artifact_cache_key(ctx: TaskRunContext, inputs: dict[str, Any]) -> str | None:
    """Prefect's cache key: the artifact's key *and its verified digest* in this store. A missing or corrupt
    artifact yields no key (the task runs and rebuilds it); a rebuilt one has a new digest, so the reference
    Prefect hands back is always the one the store holds now, never an older one."""
    job: Job = inputs["job"]
    if job.refresh:
        return None
    ref = Store(job.store).load(job.stage, job.key)
    if ref is None:
        return None
    # Prefect's result records are shared by every store under one PREFECT_HOME: the store is in the key too.
    store = stable_hash(str(Path(job.store).resolve()))[:12]
    return f"{job.stage.replace('/', '-')}-{job.key}-{ref.digest[:16]}-{store}"


@task(cache_key_fn=artifact_cache_key, persist_result=True, cache_result_in_memory=False)
def run_stage(job: Job, stage: str, mlflow_run: Future | str | None = None, tracking_uri: str | None = None
              ) -> ArtifactRef:
    """One artifact as one Prefect task run: the stage's build, through the store (tasks/common.execute).
    `mlflow_run`: the stage's MLflow run id, or a Future of it (threads: created while the job starts)."""
    build = REGISTRY[stage].module.build

    def build_with_logger(job: Job, out: Path) -> dict[str, Any]:
        logger = None
        if mlflow_run is not None and stage in ("sft", "rl"):  # lightning costs seconds to import: only to train
            from lightning.pytorch.loggers import MLFlowLogger

            run_id = mlflow_run.result() if isinstance(mlflow_run, Future) else mlflow_run
            logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
        return build(job, out, logger=logger)

    ref = execute(job, build_with_logger)
    # A stage the store reuses shows as Cached whoever runs the flow (CLI, a served deployment, a schedule):
    # Prefect's own cache hit needs its result storage, which a served run in another process may not share.
    return Completed(name="Cached", data=ref, message=f"reused {ref.path}") if ref.status == "reused" else ref


class Stages:
    """Submits jobs to Prefect, tracks each in MLflow and remembers what happened for the summary."""

    def __init__(self, cfg: PipelineConfig, tracker: Tracker, runner: TaskRunner):
        self.cfg, self.tracker, self.runner = cfg, tracker, runner
        self.records: dict[str, dict[str, Any]] = {}
        self.pending: dict[tuple[str, str], tuple[Any, Future | None, float]] = {}

    def submit(self, stage: Stage, job: Job):
        slot = (job.stage, job.key)
        if slot in self.pending:  # e.g. teacher model == student model: one artifact, one task run
            return
        # an MLflow run for a stage computed here; a reused one is a tag on the parent run (a cached rerun is
        # one run in MLflow, not one per stage)
        reused = not job.refresh and Store(job.store).load(job.stage, job.key) is not None
        run_id = None if reused else self.tracker.stage_run(job.stage, job.config)
        params = {"job": job, "stage": stage.name, "mlflow_run": run_id, "tracking_uri": self.cfg.tracking.tracking_uri}
        placement = contextlib.nullcontext()
        if self.cfg.runner.kind == "ray":
            from prefect_ray.context import remote_options

            # a Ray task's arguments travel pickled: the MLflow run's id, not the Future that will hold it
            params["mlflow_run"] = run_id.result() if run_id is not None else None
            ray_cfg = self.cfg.runner.ray
            placement = remote_options(**ray_cfg.for_stage(stage.name).model_dump(), max_retries=ray_cfg.max_retries)
        with placement:
            future = self.runner.submit(run_stage.with_options(task_run_name=job.stage), params)
        self.pending[slot] = (future, run_id, time.perf_counter())

    def result(self, job: Job) -> ArtifactRef:
        future, run_id, t0 = self.pending[(job.stage, job.key)]
        try:
            ref: ArtifactRef = future.result()
        except Exception as err:
            if type(err).__module__.startswith("ray."):  # a dead worker or node does not say which job it ran
                raise RuntimeError(f"{job.stage} (key {job.key}): {type(err).__name__}: {err}") from err
            raise
        if future.state.name == "Cached":
            ref = ref.model_copy(update={"status": "reused"})
        ref = ref.model_copy(update={"seconds": time.perf_counter() - t0 if ref.status == "reused" else ref.seconds})
        if job.stage not in self.records:
            if future.state.name == "Cached" and not (future.state.message or "").startswith("reused"):
                log.info("%s: reused %s", job.stage, ref.path)  # Prefect's own cache hit: the task did not run
            self.tracker.finish_stage(run_id, ref)
            self.records[job.stage] = {"status": ref.status, "path": ref.path, "digest": ref.digest,
                                       "key": ref.key, "seconds": round(ref.seconds, 3),
                                       "build_seconds": ref.build_seconds}
        return ref


def run_stages(cfg: PipelineConfig, stages: Stages) -> dict[str, ArtifactRef]:
    """Every artifact of the graph, by name: each wave submits every job whose inputs exist, then waits for them."""
    todo = [(stage, item) for stage in STAGES for item in stage.items(cfg)]
    refs: dict[str, ArtifactRef] = {}
    while todo:
        wave = [(stage, item) for stage, item in todo if all(n in refs for n in stage.module.needs(cfg, item))]
        if not wave:
            raise RuntimeError(f"stage graph: nothing can run; waiting: {[s.artifact(i) for s, i in todo]}")
        jobs = {stage.artifact(item): (stage, stage.module.plan(cfg, item, refs)) for stage, item in wave}
        for stage, job in jobs.values():
            stages.submit(stage, job)
        for name, (stage, job) in jobs.items():
            refs[name] = stages.result(job)
        todo = [t for t in todo if t not in wave]
    return refs


def rl_final_dtype(cfg: PipelineConfig) -> str:
    """The dtype the last RL stage saved its weights in."""
    return cfg.rl.dpo.save_dtype if cfg.rl.stages[-1] == "dpo" else cfg.rl.save_dtype


def task_runner_for(cfg: PipelineConfig) -> TaskRunner:
    """Built per run from the config (a deployment's overrides may change it), not fixed on the decorator."""
    if cfg.runner.kind == "ray":
        from branchmerge.flows.ray_runner import ray_task_runner

        return ray_task_runner(cfg.runner.ray)
    if cfg.runner.kind == "threads" and cfg.runner.max_workers > 1:
        import transformers  # resolve its lazy imports once here: concurrent first imports in threads fail

        transformers.AutoModel, transformers.AutoModelForCausalLM  # noqa: B018
    return ThreadPoolTaskRunner(max_workers=1 if cfg.runner.kind == "sequential" else cfg.runner.max_workers)


def send_logs_to_prefect() -> None:
    """The pipeline's own log lines (computing / computed / reused, paths) in the flow run's logs in Prefect, for
    a run started from the CLI, a served deployment or a schedule alike: PREFECT_LOGGING_EXTRA_LOGGERS (set above)
    only counts when this module is imported before Prefect sets up logging, which a served run does not do."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("branchmerge")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    if logger.getEffectiveLevel() > logging.INFO:  # a served run's root logger is at WARNING
        logger.setLevel(logging.INFO)


# conf/ composed once: the flow's `config` parameter defaults to it, so the Prefect form shows every key with its
# value (and its description, from the schema)
DEFAULT_CONFIG = compose([])


@flow(name="branchmerge", log_prints=True, persist_result=False)
def branchmerge(config: PipelineConfig | None = DEFAULT_CONFIG, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole loop: mix -> teacher -> sft per branch -> merge -> rl -> eval -> report.

    Args:
        config: The pipeline's settings (conf/ composed; every key described in the form). Edit values here,
            or leave it and give overrides.
        overrides: Hydra overrides applied on top of config, as on the command line, e.g. experiment=tiny,
            merge.method=ties, data.seed=${today:}.
    """
    cfg = resolve(config, overrides or [], DEFAULT_CONFIG)
    send_logs_to_prefect()
    started = time.perf_counter()
    preflight(cfg)
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment)
    tracker.start(cfg.run.name, cfg.model_dump(), {"overrides": " ".join(overrides or [])})
    try:
        with task_runner_for(cfg) as runner:
            stages = Stages(cfg, tracker, runner)
            refs = run_stages(cfg, stages)
    except BaseException as err:
        tracker.finish({}, [], status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return finish(cfg, stages, tracker, refs, started)


def training_cost(cfg: PipelineConfig, records: dict[str, dict[str, Any]]) -> str | None:
    """Branch-Merge's training cost (every branch SFT, and the merge) beside the mixed-data baseline's, from
    what building each took (whenever it was built)."""
    seconds = {stage: rec["build_seconds"] for stage, rec in records.items() if rec.get("build_seconds")}
    branches = [seconds.get(f"sft/{d}") for d in cfg.data.domains]
    if None in branches or "merge" not in seconds:
        return None
    text = (f"branches {' + '.join(f'{b:.0f}' for b in branches)} = {sum(branches):.0f} s (longest {max(branches):.0f}"
            f" s) + merge {seconds['merge']:.1f} s = {sum(branches) + seconds['merge']:.0f} s")
    if "sft/mixture" in seconds:
        text += f"; mixed-data baseline {seconds['sft/mixture']:.0f} s"
    return text


def optimized_metric(cfg: PipelineConfig, refs: dict[str, ArtifactRef]) -> dict[str, Any] | None:
    """run.optimized_metric's value (what a sweeper's search maximises): the final model's greedy pass@1 on the
    dev split, with its interval and prompt count; None when it is null."""
    if cfg.run.optimized_metric is None:
        return None
    model = eval_stage.final_model(cfg)
    metrics = refs[f"eval/dev/{model}"].meta
    pass1 = metrics["overall"]["pass@1"]
    return {"name": cfg.run.optimized_metric, "model": model, "value": pass1["value"], "ci": pass1["ci"],
            "prompts": metrics["n"]}


def finish(cfg: PipelineConfig, stages: Stages, tracker: Tracker, refs: dict[str, ArtifactRef],
           started: float) -> dict[str, Any]:
    from branchmerge.models.eval.report import results_table_plain, table_rows

    logger = get_run_logger()
    report_ref = refs["report"]
    results, intervals = report_ref.meta["results"], report_ref.meta["intervals"]
    table = results_table_plain(results, intervals=intervals)
    markdown = (Path(report_ref.path) / "results.md").read_text()
    run_dir = unique_run_dir(Path(cfg.run.store) / "runs", cfg.run.name)
    overall = {name: sum(scores.values()) / len(scores) for name, scores in results.items()}
    objective = optimized_metric(cfg, refs)
    cost = training_cost(cfg, stages.records)
    summary = {"name": cfg.run.name, "seconds": round(time.perf_counter() - started, 3),
               "stages": stages.records, "results": results, "overall": overall, "intervals": intervals,
               "objective": objective,
               "comparisons": report_ref.meta["comparisons"], "training_cost": cost,
               "teacher": refs["teacher"].meta.get("domains"), "report": report_ref.path,
               "mlflow_run_id": tracker.parent_id, "prefect_flow_run_id": str(get_run_context().flow_run.id),
               "config": cfg.model_dump()}
    summary_path = run_dir / "summary.json"
    write_json(summary_path, summary)

    create_table_artifact(key="branchmerge-results", table=table_rows(results),
                          description=f"greedy pass@1 on held-out prompts ({cfg.run.name})")
    create_markdown_artifact(key="branchmerge-report", markdown=markdown + f"\n\nsummary: `{summary_path}`\n")
    ci = {f"pass_at_1_ci_{end}.{name}": bounds["overall"][i] for name, bounds in intervals.items()
          for i, end in enumerate(("low", "high"))}
    # the final model: rl's, else the merged one (its artifact, its evaluation, the dtype it was saved in)
    rl_final = rl_stage.final(cfg) if cfg.rl.enabled else None
    final_stage, final_eval, final_dtype = ((rl_final, "eval/rl", rl_final_dtype(cfg)) if rl_final in refs
                                            else ("merge", "eval/merged", cfg.merge.out_dtype))
    final = refs[final_stage]
    model = None
    if cfg.tracking.registered_model and stages.records[final.stage]["status"] == "computed":
        generations = Path(refs[final_eval].path) / "generations.jsonl"
        model = FinalModel(name=cfg.tracking.registered_model, path=final.path, dtype=final_dtype, stage=final_stage,
                           generations=str(generations), eval_set=eval_set_hash(generations))
    rows_with_intervals = [row | {f"{col}_ci_{end}": bounds[i] for col, bounds in intervals[row["model"]].items()
                                  for i, end in enumerate(("low", "high"))} for row in table_rows(results)]
    decision = tracker.finish(
        {f"pass_at_1.{name}": v for name, v in overall.items()} | ci
        | ({objective["name"].replace("@", "_at_"): objective["value"]} if objective else {}),  # MLflow: no "@"
        [str(summary_path), str(Path(report_ref.path) / "results.md"), str(Path(report_ref.path) / "results.png")],
        tags={f"stage.{stage}": rec["status"] for stage, rec in stages.records.items()},
        tables={"results.json": rows_with_intervals}, model=model)
    reused = sum(r["status"] == "reused" for r in stages.records.values())
    logger.info("stages: %d computed, %d reused", len(stages.records) - reused, reused)
    prompts = report_ref.meta["prompts"]
    logger.info("results (greedy pass@1 [95%% interval], held-out: %s prompts):\n%s",
                ", ".join(f"{d} {n}" for d, n in prompts.items()), table)
    for c in report_ref.meta["comparisons"]:
        logger.info("%s - %s: %+.3f [%+.3f, %+.3f], p = %.3f", c["a"], c["b"], c["difference"], *c["ci"], c["p"])
    if objective:
        logger.info("%s (run.optimized_metric, %s, %d prompts): %.4f [%.4f, %.4f]", objective["name"],
                    objective["model"], objective["prompts"], objective["value"], *objective["ci"])
    if cost:
        logger.info("training cost: %s", cost)
    if decision:
        logger.info("mlflow model %s", decision)
    logger.info("summary: %s", summary_path)
    return {"summary": str(summary_path), "overall": overall, "results": results, "table": table,
            "objective": objective["value"] if objective else None,
            "report": report_ref.path, "final_model": final.path,
            "flow_run_id": str(get_run_context().flow_run.id)}
