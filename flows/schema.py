"""The one typed schema of a pipeline run: Hydra composes conf/, this validates it before any compute.

The same model is the Prefect flow's parameter, so the Prefect UI renders it as a form. Field names equal the
config keys and the arguments of the functions that use them. Defaults live in conf/, not here: every field is
required, so a config that forgot a key fails loudly instead of silently taking a second default.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
STAGES = ("model", "mix", "teacher", "sft", "merge", "rl", "eval", "report")
# Names of the merge registry (models/merge.py); checked against it in tests, kept here so validating a
# config never imports torch.
MERGE_METHODS = ("arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
                 "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "sce", "slerp",
                 "task_arithmetic", "ties")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Strict):
    name: str
    store: str
    seed: int
    refresh: list[Literal[STAGES]]  # type: ignore[valid-type]


class TaskSpec(Strict):
    name: str
    weight: float = Field(gt=0)
    config: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        known = reasoning_gym_tasks()
        if name not in known:
            raise ValueError(f"unknown reasoning-gym task {name!r}; known tasks: {', '.join(known)}")
        return name


def reasoning_gym_tasks() -> list[str]:
    """Registered reasoning-gym task names, cached on disk per installed version: importing reasoning-gym
    takes seconds, and a cached rerun must not pay that just to validate its config."""
    import json
    import os
    from importlib.metadata import version
    from pathlib import Path

    cache = Path(os.environ.get("BRANCHMERGE_CACHE", "~/.cache/branchmerge")).expanduser()
    path = cache / f"reasoning_gym-{version('reasoning-gym')}-tasks.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        import reasoning_gym

        names = sorted(reasoning_gym.factory.DATASETS)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(path)
        return names


class DomainConfig(Strict):
    tasks: list[TaskSpec] = Field(min_length=1)


class EmbedConfig(Strict):
    batch_size: int = Field(gt=0)
    clusters: int = Field(gt=0)
    merge_threshold: float = Field(ge=0)


class DataConfig(Strict):
    domains: dict[str, DomainConfig] = Field(min_length=1)
    train_size: int = Field(gt=0)
    eval_size: int = Field(gt=0)
    seed: int
    shots: int = Field(ge=0)
    embed: EmbedConfig
    weights: Literal["uniform", "proportional"]
    temperature: float = Field(gt=0)

    @field_validator("domains")
    @classmethod
    def _domain_names_are_paths(cls, domains: dict) -> dict:
        for name in domains:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"domain name {name!r} must be letters, digits and underscores (it names folders)")
        return domains


class ModelConfig(Strict):
    name: str
    source: dict[str, Any]
    dtype: Dtype

    @field_validator("source")
    @classmethod
    def _known_kind(cls, source: dict) -> dict:
        kinds = ("gguf_package", "gguf_parts", "hf", "tiny")
        if source.get("kind") not in kinds:
            raise ValueError(f"source.kind={source.get('kind')!r}; allowed: {', '.join(kinds)}")
        return source


class TeacherConfig(Strict):
    model: ModelConfig
    n: int = Field(gt=0)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    keep_per_prompt: int = Field(gt=0)
    keep: Literal["verified", "well_formed", "all"]


class LoraConfig(Strict):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: str | list[str]


class SFTConfig(Strict):
    lr: float = Field(gt=0)
    epochs: int = Field(gt=0)
    max_steps: int = Field(ge=-1)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    max_length: int = Field(gt=8)
    packing: bool
    loss_impl: Literal["plain", "chunked"]
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    scheduler: Literal["cosine", "constant_with_warmup"]
    precision: Literal["32-true", "bf16-mixed"]
    save_dtype: Dtype
    finetune: Literal["full", "lora"]
    lora: LoraConfig
    gradient_checkpointing: bool
    checkpoint_every: int = Field(ge=0)
    loss: Literal["nll", "poft"]
    poft_reference: Literal["base", "teacher"]
    poft_length_normalize: bool
    recipe: Literal["single", "dmt", "curriculum"]
    dmt_k: float = Field(ge=0, le=1)
    hard_fraction: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _poft_scores_whole_examples(self) -> "SFTConfig":
        if self.loss == "poft" and self.packing:
            raise ValueError("sft.loss=poft scores whole examples: set sft.packing=false")
        return self


class MergeConfig(Strict):
    # Either one method over every branch (method + parameters, dtype, out_dtype) or a mergekit recipe file
    # (recipe: one mergekit YAML or a multi-step mergekit-multimerge file; its documents carry their own dtypes).
    method: str | None
    parameters: dict[str, Any]
    dtype: Dtype
    out_dtype: Dtype
    recipe: str | None

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str | None) -> str | None:
        if method is not None and method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; allowed: {', '.join(MERGE_METHODS)}")
        return method

    @model_validator(mode="after")
    def _one_of_method_or_recipe(self) -> "MergeConfig":
        if (self.method is None) == (self.recipe is None):
            raise ValueError(f"set exactly one of merge.method (got {self.method!r}) and merge.recipe "
                             f"(got {self.recipe!r}): a recipe file replaces method and parameters")
        return self


class RLConfig(Strict):
    enabled: bool
    steps: int = Field(gt=0)
    prompts_per_step: int = Field(gt=0)
    num_generations: int = Field(ge=2)
    lr: float = Field(gt=0)
    beta: float = Field(ge=0)
    epsilon: float = Field(gt=0)
    epsilon_high: float = Field(gt=0)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"]
    scale_rewards: Literal["group", "batch", "none"]
    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0)
    logprob_impl: Literal["plain", "chunked"]
    precision: Literal["32-true", "bf16-mixed"]
    save_dtype: Dtype


class EvalConfig(Strict):
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    dtype: Dtype


class RunnerConfig(Strict):
    kind: Literal["threads", "sequential"]
    max_workers: int = Field(gt=0)


class TrackingConfig(Strict):
    enabled: bool
    tracking_uri: str | None
    experiment: str


class PipelineConfig(Strict):
    run: RunConfig
    data: DataConfig
    student: ModelConfig
    teacher: TeacherConfig
    sft: SFTConfig
    merge: MergeConfig
    rl: RLConfig
    eval: EvalConfig
    runner: RunnerConfig
    tracking: TrackingConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad key path, its value and what is allowed."""


def validate(cfg: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(cfg)
    except ValidationError as err:
        raise ConfigError(format_errors(err, cfg)) from None


def format_errors(err: ValidationError, cfg: dict[str, Any]) -> str:
    lines = [f"invalid branchmerge config ({err.error_count()} error(s)):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (typo?)")
        elif e["type"] == "missing":
            lines.append(f"  {path}: missing")
        else:
            lines.append(f"  {path}={_lookup(cfg, e['loc'])!r}: {e['msg']}")
    return "\n".join(lines)


def _lookup(cfg: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            cfg = cfg[part]
        except (KeyError, IndexError, TypeError):
            return None
    return cfg
