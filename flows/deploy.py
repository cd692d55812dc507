"""Serve the branchmerge flow on a nightly cron schedule: `python -m flows.deploy cron="0 3 * * *"`.

Settings in conf/deploy.yaml. The deployment's parameters are Hydra overrides, so a scheduled run composes
conf/ inside the flow exactly as the CLI would; the Prefect UI shows them (and the typed config) as a form.
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from branchmerge.flows.config import CONF_DIR

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def deployment(name: str, cron: str, timezone: str, overrides: list[str]):
    import zoneinfo

    from prefect.schedules import Cron

    from branchmerge.flows.config import compose
    from branchmerge.flows.pipeline import branchmerge

    # what each scheduled run will compose, checked now: a bad override fails here, as on the command line,
    # not at 2 a.m. (the overrides are registered as given; `${today:}` resolves again in each run)
    compose(list(overrides))
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError:
        raise ValueError(f"deploy.cron={cron!r} is not a valid cron expression (e.g. '0 2 * * *')") from None
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"deploy.timezone={timezone!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')"
                         ) from None
    return branchmerge.to_deployment(name=name, schedules=[schedule],
                                     parameters={"overrides": list(overrides)},
                                     description="Branch-Merge distillation, nightly retrain")


@hydra.main(config_path=str(CONF_DIR), config_name="deploy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from prefect import serve

    from branchmerge.flows.schema import ConfigError

    try:
        dep = deployment(cfg.name, cfg.cron, cfg.timezone, list(cfg.overrides))
    except ConfigError as err:
        print(f"deploy.overrides={list(cfg.overrides)}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.serve:
        serve(dep)
    else:
        deployment_id = dep.apply()
        print(f"registered deployment branchmerge/{cfg.name} ({deployment_id}) cron={cfg.cron!r} tz={cfg.timezone}")


if __name__ == "__main__":
    main()
