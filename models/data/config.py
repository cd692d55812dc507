"""The data stage's settings (`data:` in conf/data/): reasoning-gym domains, pool sizes, shots, clustering, weights.

Importable without torch. A task's `config` is checked by reasoning-gym's own config class (its field types, then
its `validate()`), so a bad difficulty setting fails before any compute with its key path, e.g.
`data.domains.gcd.tasks.0.config.min_value`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

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


class ClimbConfig(Settings):
    """CLIMB's mixture search over the clusters (models/data/climb.py; tasks/climb.py runs it): `budget` proxy runs
    split over `rounds` by `ratios` (4:2:1 in the paper), each a short SFT of the student on `proxy_examples`
    teacher examples drawn by the candidate mixture, scored on the dev split."""

    budget: int = Field(gt=0)
    """Proxy runs in total, split over the rounds by `ratios` (every round needs at least one)."""
    rounds: int = Field(gt=0)
    """Search iterations: round 1 samples from the Dirichlet prior, later ones from the predictor's top set."""
    ratios: list[float] = Field(min_length=1)
    """Share of the budget per round, one per round (CLIMB: 4:2:1)."""
    candidates: int = Field(gt=0)
    """Mixtures the predictor scores per round to pick the next ones (CLIMB: 100k)."""
    proxy_examples: int = Field(gt=0)
    """Teacher examples each proxy run trains on, drawn by its mixture over the clusters."""
    proxy_steps: int = Field(gt=0)
    """Optimizer steps of each proxy run."""
    proxy_batch_size: int = Field(gt=0)
    """Examples per proxy optimizer step."""
    proxy_lr: float = Field(gt=0)
    """Learning rate of the proxy runs."""
    proxy_finetune: Literal["lora", "full"]
    """Proxy runs train LoRA adapters (sft.lora's settings) or the full model."""

    @model_validator(mode="after")
    def _budget_fills_every_round(self) -> "ClimbConfig":
        if len(self.ratios) != self.rounds:
            raise ValueError(f"data.climb.ratios has {len(self.ratios)} entries for data.climb.rounds={self.rounds}")
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"data.climb.ratios={self.ratios}: every ratio must be > 0")
        # climb.round_budgets' split (largest remainder), here so that this module imports nothing of the search
        exact = [self.budget * r / sum(self.ratios) for r in self.ratios]
        runs = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: (runs[i] - exact[i], i))[: self.budget - sum(runs)]:
            runs[i] += 1
        if min(runs) < 1:
            raise ValueError(f"data.climb.budget={self.budget} cannot fill {self.rounds} rounds with ratios "
                             f"{self.ratios}: it splits into {runs} proxy runs, and every round needs one")
        return self


# Fewer dev prompts per domain than this and a proxy's dev loss cannot rank mixtures (CLIMB scores on held-apart
# validation tasks; at our scale, the gold worked answers of the dev prompts).
MIN_DEV_FOR_CLIMB = 8
MIXTURES = ("natural", "uniform", "proportional", "custom", "climb")


class DataConfig(Settings):
    """`domains` are the branches: name -> reasoning-gym tasks. Per domain, `train_size` prompts feed the teacher
    and RL, `dev_size` prompts are for anything that tunes (mixture and merge searches, checkpoint choice) and
    `eval_size` held-out prompts only ever feed the final report; the three are disjoint by question. `shots`
    worked examples per task precede each question; `embed` clusters the training prompts; `mixture` says how
    SFT data is drawn over those clusters."""

    domains: dict[str, DomainConfig] = Field(min_length=1)
    """The branches: domain name (ASCII letters, digits, '_'; not 'mixture') -> its reasoning-gym tasks."""
    train_size: int = Field(gt=0)
    """Training prompts per domain: the teacher samples on them, RL trains on them."""
    dev_size: int = Field(ge=0)
    """Prompts per domain for tuning (mixture and merge searches, checkpoint choice); never in the report."""
    eval_size: int = Field(gt=0)
    """Held-out prompts per domain, only for the final report."""
    seed: int = Field(ge=0)  # numpy's generators take no negative seed
    """Seed of the drawn prompts, the train/dev/held-out split, the shots and the clustering."""
    shots: int = Field(ge=0)
    """Worked examples per task, given as previous chat turns before each question."""
    embed: EmbedConfig
    """Clustering of the training prompts (sentence embeddings, then k-means)."""
    mixture: Literal["natural", "uniform", "proportional", "custom", "climb"]
    """How SFT data is drawn over the clusters (the mixed-data baseline, each branch's own clusters, DMT's
    general data): natural (the teacher's data as it is), uniform, proportional (each cluster's share of question
    text ** temperature: CLIMB's prior), custom (`custom_weights`) or climb (searched: `climb`)."""
    temperature: float = Field(gt=0)
    """Exponent on the clusters' shares for the proportional prior and CLIMB's Dirichlet prior (CLIMB: 0.5)."""
    custom_weights: dict[int, float] | None
    """mixture=custom: cluster id -> weight (normalised to sum 1); ids are 0 .. embed.clusters - 1."""
    climb: ClimbConfig
    """CLIMB's search (mixture=climb)."""

    @model_validator(mode="after")
    def _mixture_is_runnable(self) -> "DataConfig":
        if self.mixture == "custom":
            if not self.custom_weights:
                raise ValueError("data.mixture=custom needs data.custom_weights: {cluster id: weight}")
            bad = sorted(k for k in self.custom_weights if not 0 <= k < self.embed.clusters)
            if bad:
                raise ValueError(f"data.custom_weights: cluster(s) {', '.join(map(str, bad))} do not exist: the "
                                 "clusters are "
                                 f"0 .. {self.embed.clusters - 1} (data.embed.clusters={self.embed.clusters})")
            if any(w < 0 for w in self.custom_weights.values()) or sum(self.custom_weights.values()) <= 0:
                raise ValueError(f"data.custom_weights={self.custom_weights}: weights must be >= 0 with a positive sum")
        if self.mixture == "climb" and self.dev_size < MIN_DEV_FOR_CLIMB:
            raise ValueError(f"data.dev_size={self.dev_size} is too small for data.mixture=climb: the proxy runs "
                             f"are scored on the dev split, at least {MIN_DEV_FOR_CLIMB} prompts per domain")
        return self

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
