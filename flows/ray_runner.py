"""runner=ray: prefect-ray's RayTaskRunner, set up so that every Ray worker reports to this flow's Prefect API and
runs with the pipeline's environment.

A worker is a separate process (on another node, maybe): it sees neither the flow's temporary Prefect server (the
flow process started it; without PREFECT_API_URL a worker would start its own and its task runs would be lost to
the UI) nor the variables flows/pipeline.py sets at import. Both travel in the job's runtime_env. Per-stage
resources and retries are set per submission (flows/pipeline.py, runner.ray.resources / max_retries).
"""
from __future__ import annotations

import logging
import os

from branchmerge.flows.schema import RayConfig

# The variables flows/pipeline.py sets for its own process, and the ones a user set for the run, that a worker
# must share: Prefect's API and home (the cache's result records), MLflow, offline hubs, the store's default. Not
# PYTHONPATH or the venv: a cluster's nodes run the same installed package (README), at their own paths.
SHARED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
              "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "MLFLOW_DISABLE_TELEMETRY",
              "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "HF_HUB_DISABLE_PROGRESS_BARS", "BRANCHMERGE_STORE")


def prefect_api_url() -> str:
    """The API this flow run reports to: PREFECT_API_URL, or the temporary server Prefect started for the run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def setup_worker() -> None:
    """Run by Ray in each worker before its first task: the worker's terminal lines (forwarded to the flow's
    terminal, prefixed with the task and pid) are what the flow shows with the thread runner: the pipeline's own
    lines and warnings, not Prefect's per-task state lines (those stay in the Prefect API)."""
    from prefect.logging.configuration import ensure_logging_setup

    from branchmerge.flows.terminal import TerminalFilter

    ensure_logging_setup()  # now, not at the first task run: its console handler gets the filter below

    logging.getLogger("branchmerge").setLevel(logging.INFO)  # the stage events, as the flow process logs them
    for name in ("", "prefect", "branchmerge"):  # Prefect's console handler sits on the root logger
        for handler in logging.getLogger(name or None).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(f, TerminalFilter) for f in handler.filters):
                handler.addFilter(TerminalFilter())


def ray_task_runner(cfg: RayConfig):
    from prefect_ray import RayTaskRunner

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry prompt or upload
    env = {k: os.environ[k] for k in SHARED_ENV if k in os.environ}
    env["PREFECT_API_URL"] = prefect_api_url()
    runtime_env = {"env_vars": env, "worker_process_setup_hook": f"{__name__}.setup_worker"}
    init = {"runtime_env": runtime_env, "logging_level": logging.WARNING, "configure_logging": True}
    if cfg.address is None:
        # a Ray for this run only, on this machine: no dashboard, and no token to set up for a cluster nobody
        # else joins (Ray warns about it otherwise)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init |= {"num_cpus": cfg.num_cpus, "include_dashboard": False}
    return RayTaskRunner(address=cfg.address, init_kwargs=init)
