"""Compose conf/ with Hydra (from the CLI, a test, a Prefect deployment or DVC) and validate it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from flows.schema import ConfigError, PipelineConfig, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def to_dict(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed config as plain data, with `key={}` overrides meaning empty (see empty_overrides)."""
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("hydra", None)
    for path in empty_overrides(overrides):
        node = cfg
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = {}
    return cfg


def empty_overrides(overrides: Sequence[str]) -> list[str]:
    """Key paths an override sets to `{}`. Hydra merges a dict override into the dict it replaces, so
    `data.domains={}` would silently keep every domain; here it means what it says: empty."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    paths = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_delete() and not override.is_sweep_override():
            value = override.value()
            if isinstance(value, dict) and not value:
                paths.append(override.key_or_group)
    return paths


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
    return validate(to_dict(cfg, overrides))
