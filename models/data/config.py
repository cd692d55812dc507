"""The data stage's settings (`data:` in conf/data/): reasoning-gym domains, pool sizes, shots, clustering, weights.

Importable without torch. A task's `config` is checked by reasoning-gym's own config class (its field types, then
its `validate()`), so a bad difficulty setting fails before any compute with its key path, e.g.
`data.domains.gcd.tasks.0.config.min_value`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from branchmerge.models.cache import cached_json
from branchmerge.models.settings import Settings

# Set per item by the mix stage (data.seed, pool size): a task config that sets them would be overridden.
MANAGED_TASK_KEYS = ("seed", "size")


class TaskSpec(Settings):
    """One reasoning-gym dataset in a domain: `name`, its share `weight`, and `config` = its dataset kwargs."""

    name: str
    """reasoning-gym dataset name (e.g. gcd, products)."""
    weight: float = Field(gt=0)
    """The task's share of its domain's items, relative to the other tasks' weights."""
    config: dict[str, Any]
    """The dataset's kwargs (difficulty), checked by reasoning-gym; seed and size are set by the pipeline."""

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        known = reasoning_gym_tasks()
        if name not in known:
            raise ValueError(f"unknown reasoning-gym task {name!r}; known tasks: {', '.join(known)}")
        return name

    @field_validator("config")
    @classmethod
    def _valid_task_config(cls, config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" in info.data:  # else the name already failed
            check_task_config(info.data["name"], config)
        return config


class DomainConfig(Settings):
    tasks: list[TaskSpec] = Field(min_length=1)
    """The domain's reasoning-gym tasks (at least one); its items are split over them by weight."""


class EmbedConfig(Settings):
    batch_size: int = Field(gt=0)
    """Training prompts embedded at once (MiniLM-style sentence embeddings)."""
    clusters: int = Field(gt=0)
    """k of k-means over the training prompts' embeddings (at most the number of prompts)."""
    merge_threshold: float = Field(ge=0)
    """Merge clusters whose centroids are closer than this (0: no merging)."""


class DataConfig(Settings):
    """`domains` are the branches: name -> reasoning-gym tasks. Per domain, `train_size` prompts feed the teacher
    and RL, `dev_size` prompts are for anything that tunes (mixture and merge searches, checkpoint choice) and
    `eval_size` held-out prompts only ever feed the final report; the three are disjoint by question. `shots`
    worked examples per task precede each question; `embed` clusters the training prompts; `weights` are the
    mixture weights over domains."""

    domains: dict[str, DomainConfig] = Field(min_length=1)
    """The branches: domain name (ASCII letters, digits, '_'; not 'mixture') -> its reasoning-gym tasks."""
    train_size: int = Field(gt=0)
    """Training prompts per domain: the teacher samples on them, RL trains on them."""
    dev_size: int = Field(ge=0)
    """Prompts per domain for tuning (mixture and merge searches, checkpoint choice); never in the report."""
    eval_size: int = Field(gt=0)
    """Held-out prompts per domain, only for the final report."""
    seed: int
    """Seed of the drawn prompts, the train/dev/held-out split, the shots and the clustering."""
    shots: int = Field(ge=0)
    """Worked examples per task, given as previous chat turns before each question."""
    embed: EmbedConfig
    """Clustering of the training prompts (sentence embeddings, then k-means)."""
    weights: Literal["uniform", "proportional"]
    """Mixture weights over domains: uniform, or proportional (share of question text ** temperature)."""
    temperature: float = Field(gt=0)
    """Exponent on the domains' shares with weights=proportional (1: plain share; 0.5: CLIMB's prior)."""

    @field_validator("domains")
    @classmethod
    def _domain_names_are_paths(cls, domains: dict) -> dict:
        for name in domains:
            if name == "mixture":  # the mixed-data baseline's name (sft/mixture, eval/mixture)
                raise ValueError("domain name 'mixture' is taken by the mixed-data baseline; rename the domain")
            if not name.replace("_", "").isalnum() or not name.isascii():
                raise ValueError(f"domain name {name!r} must be ASCII letters, digits and underscores (it names "
                                 "folders and MLflow runs)")
        return domains


def _rg_version() -> str:
    from importlib.metadata import version

    return version("reasoning-gym")


def reasoning_gym_tasks() -> list[str]:
    """Registered reasoning-gym task names, cached per installed version: importing reasoning-gym takes a second,
    and a cached rerun must not pay that just to validate its config."""
    def compute():
        import reasoning_gym

        return sorted(reasoning_gym.factory.DATASETS)

    return cached_json(f"reasoning_gym-{_rg_version()}-tasks.json", compute)


def check_task_config(task: str, config: dict[str, Any]) -> None:
    """Raise ValueError naming the field if reasoning-gym would refuse `config` for `task` (unknown key, wrong
    type, or its own validate() assertion). Accepted configs are remembered per reasoning-gym version."""
    managed = sorted(set(config) & set(MANAGED_TASK_KEYS))
    if managed:
        raise ValueError(f"{', '.join(managed)}: set by the pipeline (data.seed, data.train_size/eval_size); "
                         "remove it from the task's config")
    blob = json.dumps(config, sort_keys=True, default=str)
    _task_config_ok(task, blob, _rg_version())


@lru_cache(maxsize=None)
def _task_config_ok(task: str, blob: str, rg_version: str) -> None:
    import hashlib

    digest = hashlib.sha256(f"{task}|{blob}".encode()).hexdigest()[:16]
    cached_json(f"reasoning_gym-{rg_version}-config-{digest}.json",
                lambda: _validate_task_config(task, json.loads(blob)))


def _validate_task_config(task: str, config: dict[str, Any]) -> bool:
    import dataclasses

    from pydantic import TypeAdapter, ValidationError
    from reasoning_gym.factory import DATASETS

    config_cls = DATASETS[task][1]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} for {task}; allowed: "
                         f"{', '.join(sorted(fields - set(MANAGED_TASK_KEYS)))}")
    try:  # the dataclass's field types, as pydantic reads them: 'abc' for an int field fails naming the field
        TypeAdapter(config_cls).validate_python(config)
    except ValidationError as err:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}"
                                   for e in err.errors())) from None
    try:
        cfg = config_cls(**config)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (AssertionError, ValueError, TypeError) as err:
        raise ValueError(f"reasoning-gym's {config_cls.__name__} refuses {config}: {err or type(err).__name__}"
                         ) from None
    return True
