"""MLflow: one parent run per pipeline run, one nested run per stage and branch.

Uses MlflowClient with explicit run ids (not the fluent, thread-local active run) because stages run in
Prefect's worker threads. Training stages get a Lightning MLFlowLogger bound to their nested run.
"""
from __future__ import annotations

import os
from typing import Any

from tasks.store import ArtifactRef

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def preload() -> None:
    """Import MLflow (~2-4 s) in a background thread so it overlaps with Prefect's server start-up."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("mlflow.tracking",), daemon=True).start()


def _flat(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


class Tracker:
    """No-op when disabled, so the pipeline code never branches on tracking."""

    def __init__(self, enabled: bool, tracking_uri: str | None, experiment: str):
        self.enabled = enabled
        self.parent_id: str | None = None
        if not enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self._params(self.parent_id, _flat("", config, {}))

    def stage_run(self, name: str, config: dict[str, Any]) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_id, "stage": name.split("/")[0]})
        self._params(run.info.run_id, _flat("", config, {}))
        return run.info.run_id

    def lightning_logger(self, run_id: str | None):
        if run_id is None:
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=self.uri, run_id=run_id)

    def finish_stage(self, run_id: str | None, ref: ArtifactRef) -> None:
        if run_id is None:
            return
        for k, v in {"status": ref.status, "key": ref.key, "digest": ref.digest, "path": ref.path}.items():
            self.client.set_tag(run_id, k, v)
        metrics = {k: float(v) for k, v in _flat("", ref.meta, {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["seconds"] = ref.seconds
        self._metrics(run_id, metrics)
        self.client.set_terminated(run_id)

    def finish(self, metrics: dict[str, float], artifacts: list[str], status: str = "FINISHED") -> None:
        if not self.enabled or self.parent_id is None:
            return
        self._metrics(self.parent_id, metrics)
        for path in artifacts:
            self.client.log_artifact(self.parent_id, path)
        self.client.set_terminated(self.parent_id, status=status)

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_")[:250], v, ts, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, metrics=items[i:i + 100])
