"""Hydra entry point: `python -m flows.run experiment=tiny merge.method=linear,ties -m`.

Hydra composes conf/ (and sweeps it with -m: the sweep ends with one comparison over its jobs, flows/compare.py);
the schema validates it before any compute; the Prefect flow runs it. Returns run.optimized_metric's value (the
final model's dev-split pass@1), what a sweeper that optimises reads (conf/hparams_search/), or None when it is
null: the held-out score is never returned, so no search can select on it.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from branchmerge.flows.config import CONF_DIR, to_dict
from branchmerge.flows.schema import ConfigError, validate


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    logging.captureWarnings(True)  # library warnings to the log file, not the terminal (flows/terminal.py)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        config = validate(to_dict(cfg, overrides))
    except ConfigError as err:
        print(err, file=sys.stderr)
        remove_job_dir(job_dir)  # a rejected invocation leaves nothing behind
        raise SystemExit(2) from None

    from branchmerge.flows.pipeline import branchmerge
    from branchmerge.flows.preflight import check_prefect_api, preflight
    from branchmerge.flows.tracking import preload
    from branchmerge.tasks.store import Unavailable

    try:  # before Prefect starts: a dead endpoint or a read-only store is one line, not a traceback minutes later
        check_prefect_api()
        preflight(config)
    except Unavailable as err:
        print(f"error: {err}", file=sys.stderr)
        remove_job_dir(job_dir)
        raise SystemExit(2) from None

    if config.tracking.enabled:
        preload(config.tracking.tracking_uri, config.tracking.experiment)  # overlaps Prefect's start-up

    try:
        result = branchmerge(config=config, overrides=overrides)
    except Unavailable as err:  # an endpoint that failed once the run had started (MLflow's database filled up)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # the job folder keeps the run's summary: a multirun's comparison (flows/compare.py) reads it there
    shutil.copy(result["summary"], job_dir / "summary.json")
    # the results table was logged above; here is where everything is
    lines = [("final model", result["final_model"]), ("report", f"{result['report']}/results.md (+ results.png)"),
             ("summary", result["summary"]), ("log", str(job_dir / f"{HydraConfig.get().job.name}.log"))]
    if config.tracking.enabled:
        lines.append(("mlflow", f"mlflow ui --backend-store-uri {config.tracking.tracking_uri}"))
    if ui := prefect_ui_url():
        lines.append(("prefect", f"{ui}/runs/flow-run/{result['flow_run_id']}"))
    print("\n" + "\n".join(f"{name + ':':<13}{value}" for name, value in lines))
    return result["objective"]


def remove_job_dir(job_dir: Path) -> None:
    """Delete this invocation's Hydra folder (outputs/<date>/<time>), and the folders above it it leaves empty."""
    shutil.rmtree(job_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        job_dir.parent.rmdir()
        job_dir.parent.parent.rmdir()


def prefect_ui_url() -> str | None:
    """The Prefect UI of the server this run reported to; None for the temporary server of a plain CLI run
    (it stops with the run)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if not PREFECT_API_URL.value():
        return None
    return PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")


if __name__ == "__main__":
    main()
