"""Compose conf/ with Hydra (from the CLI, a test, a Prefect deployment or DVC) and validate it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flows.schema import ConfigError, PipelineConfig, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("hydra", None)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """What `python -m flows.run <overrides>` would run, for callers that are not the Hydra CLI."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose config with overrides {list(overrides)}: {err}") from None
    return validate(to_dict(cfg))
