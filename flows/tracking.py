"""MLflow: one parent run per pipeline run, one nested run per stage and branch.

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

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tasks.store import ArtifactRef

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_WRITERS: dict[tuple[str | None, str], tuple[ThreadPoolExecutor, Future]] = {}


def _connect(tracking_uri: str | None, experiment: str) -> tuple[Any, str, str]:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, uri, exp.experiment_id if exp else client.create_experiment(experiment)


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
            client, self.uri, experiment_id = self._connection.result()
            return fn(client, experiment_id, *args)

        return self._writer.submit(call)

    def start(self, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.enabled:
            return

        def create(client, experiment_id):
            end_orphaned_runs(client, experiment_id)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags | self.owner)
            self.parent_id = run.info.run_id
            _log(client, self.parent_id, params=_flat("", config, {}))

        self._submit(create)

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

    def finish(self, metrics: dict[str, float], artifacts: list[str], status: str = "FINISHED") -> None:
        """End the parent run with `status`; stage runs still open (a failed or interrupted flow) end with it."""
        if not self.enabled:
            return
        unfinished, self.open_runs = list(self.open_runs.values()), {}

        def close(client, experiment_id):
            for run in unfinished:
                client.set_terminated(run.result(), status=status)
            if self.parent_id is None:
                return
            _log(client, self.parent_id, metrics=metrics)
            for path in artifacts:
                client.log_artifact(self.parent_id, path)
            client.set_terminated(self.parent_id, status=status)

        self._submit(close).result()


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
