"""Compose conf/ with Hydra (from the CLI, a test, a Prefect deployment or DVC) and validate it."""
from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from branchmerge.flows.schema import ConfigError, PipelineConfig, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# `${today:}`: the date the config is composed, as an int (20261130). A nightly deployment registered with the
# override `data.seed=${today:}` draws new prompts each night: mix and everything after it are recomputed, while
# the converted models (keyed by their own settings) stay cached.
if not OmegaConf.has_resolver("today"):
    OmegaConf.register_new_resolver("today", lambda: int(date.today().strftime("%Y%m%d")))


def to_dict(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed config as plain data, where an override `key={}` means what it says: empty.

    Hydra merges a dict override into the dict it replaces, so `data.domains={}` would silently keep every
    domain and `merge.parameters={}` every parameter. Here such a key is emptied, then the overrides after it
    that set or delete keys below it are applied again (`merge.parameters={} ++merge.parameters.weight=1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for i, override in enumerate(parsed):
        if override.is_delete() or override.is_sweep_override() or override.value() != {}:
            continue
        key = override.key_or_group
        _set(data, key, {})
        for later in parsed[i + 1:]:
            if later.key_or_group.startswith(key + ".") and not later.is_sweep_override():
                _set(data, later.key_or_group, None if later.is_delete() else later.value(), delete=later.is_delete())
    return data


def _set(data: dict, key: str, value: Any, delete: bool = False) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    if delete:
        data.pop(last, None)
    else:
        data[last] = value


def compose(overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """What `python -m flows.run <overrides>` would run, for callers that are not the Hydra CLI."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside a @hydra.main of conf/ (flows.deploy)
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose config with overrides {list(overrides)}: {err}") from None
    return validate(to_dict(cfg, overrides))


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (`key=<this>`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "[" + ",".join(hydra_value(v) for v in value) + "]"


def as_overrides(base: dict[str, Any], target: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra overrides that turn config `base` into `target`: a changed value `key=v`, a new key `++key=v`, a
    removed one `~key`."""
    out = []
    for key, value in target.items():
        path = f"{prefix}{key}"
        if key not in base:
            out.append(f"++{path}={hydra_value(value)}")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            out += as_overrides(base[key], value, path + ".")
        elif value != base[key]:
            out.append(f"{path}={hydra_value(value)}")
    return out + [f"~{prefix}{key}" for key in base if key not in target]


def resolve(config: PipelineConfig | None, overrides: Sequence[str], default: PipelineConfig) -> PipelineConfig:
    """The config a flow run runs: `overrides` applied on top of `config`.

    From the CLI, `config` is what Hydra composed from these very overrides: used as it is. From the Prefect form,
    `config` is the conf/ default (`default`) as the user edited it: the edits become overrides placed before
    the given ones, so a group override (`experiment=tiny`) and the form's values combine and a key named in
    both takes the override's value, as on the command line."""
    composed = compose(list(overrides))
    if config is None or config == composed:
        return composed
    return compose([*as_overrides(default.model_dump(mode="json"), config.model_dump(mode="json")), *overrides])


# `branchmerge --help` (conf/config.yaml hydra.help): the keys most runs change, with their schema descriptions
HELP_KEYS = ("run.name", "run.seed", "run.store", "run.refresh", "data.train_size", "data.eval_size", "data.seed",
             "teacher.n", "teacher.backend", "sft.lr", "sft.epochs", "sft.finetune", "sft.mixture", "merge.method",
             "merge.parameters", "rl.enabled", "rl.steps", "eval.n", "eval.backend", "tracking.enabled")


def help_keys() -> str:
    """One line per HELP_KEYS entry: the key, its description and its conf/ default."""
    default, lines = compose([]), []
    for key in HELP_KEYS:
        model, value = type(default), default
        for part in key.split("."):
            field, value = model.model_fields[part], getattr(value, part)
            model = field.annotation
        shown = value.model_dump() if hasattr(value, "model_dump") else value
        lines.append(f"  {key:<18} {field.description} [{shown}]")
    return "\n".join(lines)


if not OmegaConf.has_resolver("branchmerge_help_keys"):
    OmegaConf.register_new_resolver("branchmerge_help_keys", help_keys)
