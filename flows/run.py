"""Hydra entry point: `python -m flows.run experiment=tiny merge.method=linear,ties -m`.

Hydra composes conf/ (and sweeps it with -m: the sweep ends with one comparison over its jobs, flows/compare.py);
the schema validates it before any compute; the Prefect flow runs it. Returns the RL (else merged) model's mean
pass@1 so an Optuna sweeper can optimise it unchanged.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flows.config import CONF_DIR, to_dict
from flows.schema import ConfigError, validate


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    try:
        config = validate(to_dict(cfg, overrides))
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from None

    from flows.pipeline import branchmerge
    from flows.tracking import preload

    if config.tracking.enabled:
        preload(config.tracking.tracking_uri, config.tracking.experiment)  # overlaps Prefect's start-up

    result = branchmerge(config=config, overrides=overrides)
    # the job folder keeps the run's summary: a multirun's comparison (flows/compare.py) reads it there
    shutil.copy(result["summary"], Path(HydraConfig.get().runtime.output_dir) / "summary.json")
    print("\n" + result["table"])
    print(f"report:  {result['report']}/results.md (+ results.png)")
    print(f"summary: {result['summary']}")
    overall = result["overall"]
    return overall.get("rl", overall["merged"])


if __name__ == "__main__":
    main()
