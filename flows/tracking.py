"""MLflow: one parent run per pipeline run (`<run.name>-<time>`, tagged with the git commit and the overrides),
one nested run per stage computed in it (a reused stage is a tag on the parent, not a run), the results as an
MLflow table, and the final model logged as an MLflow transformers model, registered, with the `champion` alias
moved only when its evaluation beats the champion's on the same held-out prompts (paired bootstrap).

Uses MlflowClient with explicit run ids (not the fluent, thread-local active run) because stages run in
Prefect's worker threads. Every MLflow call goes through one background writer thread, in order: importing
MLflow and opening its store costs seconds and each SQLite write tens of milliseconds, and none of that should
sit on the pipeline's critical path (a fully cached rerun would otherwise spend more time logging than running).
`finish` waits for the writer, so a returned run is completely logged.

Runs never stay RUNNING: a failed or interrupted flow ends its parent and every open stage run FAILED or KILLED,
and a process killed outright (SIGKILL, power loss) has its runs ended KILLED by the next pipeline run that
starts on the same host (each run is tagged with its host and process).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from branchmerge.tasks.store import ArtifactRef, Unavailable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow logs to its own stream handler, past our terminal filter: "Creating initial MLflow database tables..."
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

_WRITERS: dict[tuple[str | None, str], tuple[ThreadPoolExecutor, Future]] = {}


def _connect(tracking_uri: str | None, experiment: str) -> tuple[Any, str, str]:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    with _sqlite_init_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        return client, uri, exp.experiment_id if exp else client.create_experiment(experiment)


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    """Two runs started together on a new SQLite database would both create MLflow's tables (and the experiment),
    and one fails ("table ... already exists"): one process at a time opens it, under an flock beside the file."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///").split("?", 1)[0] + ".lock")
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def preload(tracking_uri: str | None, experiment: str) -> None:
    """Start importing MLflow and opening its store now (e.g. while Prefect starts its server)."""
    if (tracking_uri, experiment) not in _WRITERS:
        writer = ThreadPoolExecutor(1, thread_name_prefix="mlflow")
        _WRITERS[(tracking_uri, experiment)] = (writer, writer.submit(_connect, tracking_uri, experiment))


def _flat(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def process_token(pid: int) -> str:
    """pid plus the process's start time (Linux /proc): a pid reused by a later process reads differently."""
    try:
        start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def alive(token: str) -> bool:
    pid = int(token.split(":", 1)[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_token(pid) == token or token.endswith(":?")


def end_orphaned_runs(client, experiment_id: str) -> list[str]:
    """End KILLED the RUNNING runs this host's dead pipeline processes left behind; returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                              f"tags.`branchmerge.host` = '{host}'", max_results=1000)
    ended = []
    for run in runs:
        token = run.data.tags.get("branchmerge.process")
        if token and not alive(token):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


class Tracker:
    """No-op when disabled, so the pipeline code never branches on tracking."""

    def __init__(self, enabled: bool, tracking_uri: str | None, experiment: str):
        self.enabled = enabled
        self.parent_id: str | None = None
        self.uri = tracking_uri
        self.owner = {"branchmerge.host": socket.gethostname(), "branchmerge.process": process_token(os.getpid())}
        self.open_runs: dict[int, Future] = {}  # stage runs not finished yet
        if enabled:
            preload(tracking_uri, experiment)
            self._writer, self._connection = _WRITERS[(tracking_uri, experiment)]

    def _submit(self, fn, *args) -> Future:
        def call():
            try:
                client, self.uri, experiment_id = self._connection.result()
                return fn(client, experiment_id, *args)
            except Unavailable:
                raise
            except Exception as err:  # a database that filled up or went away, a server that died mid-run
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise Unavailable(f"tracking.tracking_uri={self.uri!r}: MLflow failed ({type(err).__name__}: "
                                  f"{first}); the artifacts are sealed and a rerun reuses them") from err

        return self._writer.submit(call)

    def start(self, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> None:
        """The parent run, named `<run_name>-<YYYYmmdd-HHMMSS>` (one name per run, not one per config) and tagged
        with the git commit of the code that ran."""
        if not self.enabled:
            return
        name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = tags | ({"mlflow.source.git.commit": commit} if (commit := git_commit()) else {})

        def create(client, experiment_id):
            end_orphaned_runs(client, experiment_id)
            run = client.create_run(experiment_id, run_name=name, tags=tags | self.owner)
            self.parent_id = run.info.run_id
            _log(client, self.parent_id, params=_flat("", config, {}))

        # waited for: a database that is full, read-only or broken fails the run here, before any stage computes
        # (MLflow's import and connection overlapped Prefect's start-up: preload)
        self._submit(create).result()

    def stage_run(self, name: str, config: dict[str, Any]) -> Future | None:
        """A nested run, created in the background: the Future gives its id (Lightning's logger needs it)."""
        if not self.enabled:
            return None

        def create(client, experiment_id):
            run = client.create_run(experiment_id, run_name=name, tags={
                "mlflow.parentRunId": self.parent_id, "stage": name.split("/")[0]} | self.owner)
            _log(client, run.info.run_id, params=_flat("", config, {}))
            return run.info.run_id

        future = self._submit(create)
        self.open_runs[id(future)] = future
        return future

    def finish_stage(self, run: Future | None, ref: ArtifactRef) -> None:
        if run is None:
            return
        self.open_runs.pop(id(run), None)
        metrics = {k: float(v) for k, v in _flat("", ref.meta, {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["seconds"] = ref.seconds
        tags = {"status": ref.status, "key": ref.key, "digest": ref.digest, "path": ref.path}

        def close(client, experiment_id):
            run_id = run.result()
            _log(client, run_id, metrics=metrics, tags=tags)
            client.set_terminated(run_id)

        self._submit(close)

    def finish(self, metrics: dict[str, float], artifacts: list[str], status: str = "FINISHED",
               tags: dict[str, str] | None = None, tables: dict[str, list[dict]] | None = None,
               model: FinalModel | None = None) -> str | None:
        """End the parent run with `status` after logging `metrics`, `tags`, `artifacts` (files), `tables`
        (MLflow tables, by artifact file name) and the final `model`; stage runs still open (a failed or
        interrupted flow) end with it. Returns the champion decision when a model was registered."""
        if not self.enabled:
            return None
        unfinished, self.open_runs = list(self.open_runs.values()), {}

        def close(client, experiment_id):
            for run in unfinished:
                client.set_terminated(run.result(), status=status)
            if self.parent_id is None:
                return None
            _log(client, self.parent_id, metrics=metrics, tags=tags)
            for path in artifacts:
                client.log_artifact(self.parent_id, path)
            for file, rows in (tables or {}).items():
                client.log_table(self.parent_id, data={k: [r.get(k) for r in rows] for k in rows[0]},
                                 artifact_file=file)
            decision = register(client, self.uri, self.parent_id, model) if model is not None else None
            client.set_terminated(self.parent_id, status=status)
            return decision

        return self._submit(close).result()


class FinalModel(dict):
    """What `finish` registers: {"name": registered model, "path": HF folder, "dtype": its weights' dtype,
    "stage": its artifact, "generations": its eval's generations.jsonl, "eval_set": hash of the held-out prompts}."""


def git_commit() -> str | None:
    """The commit of the checkout the code runs from (None outside a git repository)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def eval_set_hash(generations: str | Path) -> str:
    """The held-out prompts an evaluation answered (ids and questions, in order): two evaluations are comparable
    prompt by prompt exactly when these are equal."""
    rows = [json.loads(line) for line in Path(generations).read_text().splitlines() if line.strip()]
    return hashlib.sha256(json.dumps([[r["id"], r["question"]] for r in rows]).encode()).hexdigest()[:16]


def champion_decision(new: list[dict], champion: list[dict] | None, champion_set: str | None, new_set: str
                      ) -> tuple[bool, str]:
    """Whether the new model takes the `champion` alias, and why: it must beat the champion on the same
    held-out prompts by a paired bootstrap (95 % interval of the pass@1 difference above 0)."""
    from branchmerge.models.eval.metrics import paired

    if champion is None:
        return True, "no champion yet"
    if champion_set != new_set:
        return False, "champion kept: it was evaluated on other held-out prompts (no paired comparison)"
    c = paired(new, champion)
    verdict = "beats" if c["ci"][0] > 0 else "does not beat"
    text = (f"{verdict} the champion: pass@1 {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], "
            f"p = {c['p']:.3f}, {c['n']} prompts")
    return c["ci"][0] > 0, text


def register(client, uri: str, run_id: str, model: FinalModel) -> str:
    """Log the model folder as an MLflow transformers model of the run, register it as a new version of
    model["name"], and move the `champion` alias to it if it beats the current champion; returns the decision."""
    import mlflow
    import torch
    import transformers
    from mlflow.exceptions import MlflowException

    from branchmerge.models.lm.hf import load_model, load_tokenizer

    # a local checkpoint path trips mlflow 3.17 on transformers 5 (pipeline classes are strings there): log the
    # loaded components; quiet: no loading / writing bars, no "model card" / "license" warnings for a local model
    mlflow_logger, components = logging.getLogger("mlflow"), None
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        components = {"model": load_model(model["path"], model["dtype"]), "tokenizer": load_tokenizer(model["path"])}
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):  # the fluent API is thread-local: this writer thread only
            info = mlflow.transformers.log_model(
                components, name="model", task="text-generation",
                # explicit: inferring them would load the model again in a subprocess
                pip_requirements=[f"transformers=={transformers.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}"])
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
        mlflow_logger.setLevel(level)
        del components
    try:  # client calls, not mlflow.register_model: that one prints to stderr
        client.create_registered_model(model["name"])
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    version = client.create_model_version(model["name"], source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                          tags={"eval_set": model["eval_set"], "generations": model["generations"],
                                                "stage": model["stage"]})
    new = [json.loads(line) for line in Path(model["generations"]).read_text().splitlines() if line.strip()]
    try:
        current = client.get_model_version_by_alias(model["name"], "champion")
    except MlflowException:
        current = None
    if current is None:
        moved, why = champion_decision(new, None, None, model["eval_set"])
    elif not Path(current.tags.get("generations", "")).is_file():
        moved, why = False, "champion kept: its evaluation is no longer in the store (no paired comparison)"
    else:
        rows = Path(current.tags["generations"]).read_text().splitlines()
        champion = [json.loads(line) for line in rows if line.strip()]
        moved, why = champion_decision(new, champion, current.tags.get("eval_set"), model["eval_set"])
    if moved:
        client.set_registered_model_alias(model["name"], "champion", version.version)
    decision = (f"{model['name']} v{version.version}: " + ("champion" if moved else "registered, not champion")
                + f" ({why})")
    client.set_model_version_tag(model["name"], version.version, "champion_decision", why)
    client.set_tag(run_id, "champion_decision", decision)
    return decision


def _log(client, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
         tags: dict[str, str] | None = None) -> None:
    """One log_batch per 100 entries (MLflow's batch limit) instead of one call per value."""
    from mlflow.entities import Metric, Param, RunTag

    ts = int(time.time() * 1000)
    items = [Param(k[:250], str(v)[:6000]) for k, v in (params or {}).items()]
    items += [Metric(k.replace("@", "_at_")[:250], v, ts, 0) for k, v in (metrics or {}).items()]
    items += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(items), 100):
        chunk = items[i:i + 100]
        client.log_batch(run_id, params=[x for x in chunk if isinstance(x, Param)],
                         metrics=[x for x in chunk if isinstance(x, Metric)],
                         tags=[x for x in chunk if isinstance(x, RunTag)])
