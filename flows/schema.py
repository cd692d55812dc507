"""The one typed schema of a pipeline run: Hydra composes conf/, this validates it before any compute.

Each stage's settings model lives beside its code (models/*/config.py) and is composed here with the run's own
sections. The same model is the Prefect flow's parameter, so the Prefect UI renders it as a form. Every check a
run needs happens here, whatever is cached: field types and ranges, cross-field rules (in the stage models),
and the rules across sections below (the merge against the branches, sizes against the prompt pool, LoRA targets
against the student's modules, task configs through reasoning-gym). A failure names the key path and the value.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from branchmerge.models.data.config import DataConfig
from branchmerge.models.eval.config import EvalConfig
from branchmerge.models.lm.config import ModelConfig, TeacherConfig
from branchmerge.models.merging.config import MergeConfig
from branchmerge.models.settings import Settings
from branchmerge.models.training.config import RLConfig, SFTConfig
from branchmerge.tasks.registry import STAGE_NAMES

# A run's name becomes a folder (runs/<time>-<name>-<id>) and an MLflow run name: one path component, short.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RunConfig(Settings):
    """`name` of the run (folder and MLflow name), the artifact `store`, the `seed` of every random choice, and the
    stages to `refresh` (recompute even when cached)."""

    name: str
    """Run name, 1-64 of letters, digits, '.', '_', '-': names the run folder (runs/<time>-<name>) and MLflow run."""
    store: str
    """Artifact store folder shared by every run and sweep job: the cache and runs/ live here."""
    seed: int = Field(ge=0)  # numpy's and Lightning's seeding take no negative seed
    """Seed of the teacher, sft, merge, rl and eval stages (in their cache keys); data.seed draws the data."""
    refresh: list[Literal[STAGE_NAMES]]  # type: ignore[valid-type]
    """Stages to recompute even when cached: any of model, mix, teacher, sft, merge, rl, eval, report."""
    optimized_metric: Literal["dev/pass@1"] | None
    """What the run returns to a Hydra sweeper that optimises (conf/hparams_search/): "dev/pass@1", the final
    model's greedy pass@1 on the dev split (an extra eval item, eval/dev/<model>); null: nothing. Never the
    held-out split: a search that read it would report an optimistic held-out score."""

    @field_validator("name")
    @classmethod
    def _one_short_path_component(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError(f"run.name {name[:80]!r}{'...' if len(name) > 80 else ''} ({len(name)} characters) "
                             "names a folder: 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit")
        return name


class StageResources(Settings):
    num_cpus: float = Field(ge=0)
    """CPUs a job of this stage reserves on its Ray node (Ray schedules by reservations, not by measured use)."""
    num_gpus: float = Field(ge=0)
    """GPUs a job of this stage reserves; fractions share a GPU (e.g. 0.5: two evaluations on one card)."""


class RayConfig(Settings):
    address: str | None
    """Ray cluster to run on: null starts a local Ray for the run (stopped after it); "auto" joins the cluster this
    machine is part of; "host:6379" a head's GCS address; "ray://host:10001" a remote cluster through Ray Client."""
    num_cpus: int | None = Field(gt=0)
    """CPUs of the local Ray the run starts (null: every core); not read with an address."""
    max_retries: int = Field(ge=0)
    """Times Ray reruns a stage job whose worker died (SIGKILL, OOM, a lost node); the store discards the dead
    attempt's unsealed folder and lock, so a retry starts clean. 0: the run fails naming the stage."""
    resources: dict[str, StageResources]
    """Per stage (model, mix, climb, teacher, sft, merge, rl, eval, report; `default` for the rest): what each of its
    jobs reserves. Jobs that fit run at once: the branches' SFT, the evaluations."""

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, resources: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(resources) - {*STAGE_NAMES, "default"})
        if unknown:
            raise ValueError(f"runner.ray.resources: {unknown} are not stages; use any of {list(STAGE_NAMES)} "
                             "or default")
        if "default" not in resources:
            raise ValueError("runner.ray.resources needs a `default` entry (stages not listed reserve it)")
        return resources

    def for_stage(self, stage: str) -> StageResources:
        return self.resources.get(stage, self.resources["default"])


class RunnerConfig(Settings):
    kind: Literal["threads", "sequential", "ray"]
    """Prefect task runner: threads (a pool of max_workers threads), sequential (one stage job at a time) or ray
    (prefect-ray's RayTaskRunner: each stage job a Ray task, on a local Ray or a cluster; runner.ray)."""
    max_workers: int = Field(gt=0)
    """Stage jobs run at once with kind=threads; on a 2-core CPU 1 is fastest (torch uses both cores)."""
    ray: RayConfig | None
    """kind=ray's cluster, retries and per-stage resources (conf/runner/ray.yaml); null with the other kinds."""

    @model_validator(mode="after")
    def _ray_settings(self) -> RunnerConfig:
        if self.kind == "ray" and self.ray is None:
            raise ValueError("runner.kind=ray needs runner.ray (select it with runner=ray, not runner.kind=ray)")
        return self


class TrackingConfig(Settings):
    enabled: bool
    """Log the run and its stages to MLflow; false: no tracking."""
    tracking_uri: str | None
    """MLflow tracking URI (e.g. sqlite:///mlflow.db); null: MLflow's own default URI."""
    experiment: str = Field(min_length=1)
    """MLflow experiment the runs are logged under (created if missing)."""
    registered_model: str | None
    """Registered model the final model is logged to as a new version (alias champion if it wins); null: none."""


class PipelineConfig(Settings):
    run: RunConfig
    """The run's name, artifact store, seed and the stages to refresh."""
    data: DataConfig
    """Data (mix) stage: reasoning-gym domains (the branches), split sizes, shots, clustering, mixture weights."""
    student: ModelConfig
    """The student model: the base of every branch SFT and of the merge."""
    teacher: TeacherConfig
    """The teacher: its model, where it generates, and the rejection sampling of its responses."""
    sft: SFTConfig
    """Branch SFT of the student on each domain's teacher data (and the mixed-data baseline)."""
    merge: MergeConfig
    """Merge of the branch students onto the student: one mergekit method or a mergekit recipe file."""
    rl: RLConfig
    """GRPO on the merged model with the tasks' verifiers as rewards."""
    eval: EvalConfig
    """Evaluation of base, branches, mixture, merged and rl models on the held-out prompts."""
    runner: RunnerConfig
    """Prefect task runner for the stage jobs."""
    tracking: TrackingConfig
    """MLflow tracking of the run and its stages."""

    @model_validator(mode="after")
    def _sections_fit_together(self) -> "PipelineConfig":
        from branchmerge.tasks import merge

        domains = list(self.data.domains)
        pool = self.data.train_size * len(domains)
        if self.rl.enabled and self.rl.prompts_per_step > pool:
            raise ValueError(f"rl.prompts_per_step={self.rl.prompts_per_step} exceeds the training pool of {pool} "
                             f"prompts (data.train_size={self.data.train_size} x {len(domains)} domains)")
        if self.sft.recipe == "dmt" and len(domains) < 2:
            raise ValueError(f"sft.recipe='dmt' trains stage 2 on the other domains' data; data.domains has only "
                             f"{domains}: add a domain or use sft.recipe=single")
        if self.sft.mixing == "aioli" and (self.sft.mixture or self.sft.recipe == "dmt"):
            if len(domains) < 2:
                raise ValueError(f"sft.mixing=aioli mixes domains; data.domains has only {domains}")
            if self.data.dev_size < 1:
                raise ValueError("sft.mixing=aioli measures each domain's loss on the dev split: data.dev_size is 0")
            if self.sft.loss != "nll":
                raise ValueError(f"sft.mixing=aioli trains with the nll loss; sft.loss={self.sft.loss!r}")
        if self.run.optimized_metric and self.data.dev_size < 1:
            raise ValueError(f"run.optimized_metric={self.run.optimized_metric!r} scores the dev split: "
                             "data.dev_size is 0")
        merge.check(self.merge, domains)
        self.teacher.check_backend("teacher")
        self.eval.check_backend("eval")
        if self.sft.loss == "poft" and self.sft.poft_reference == "teacher" and not self.teacher.uses_local_model():
            raise ValueError(f"sft.poft_reference=teacher scores with the local teacher model, but "
                             f"teacher.openai.model={self.teacher.openai.model!r} exists only on the server: use "
                             "sft.poft_reference=base, or teacher.openai.model=null to serve the model/teacher folder")
        served = self.eval.openai.model
        if self.eval.backend == "openai" and served is not None and "{item}" not in served:
            raise ValueError(f"eval.openai.model={served!r} would answer for every evaluated model (base, branches, "
                             "merged, ...): use null (each artifact's folder) or a name with {item}")
        if self.sft.finetune == "lora":
            from branchmerge.models.training.lora_targets import check_lora_targets

            check_lora_targets(self.sft.lora, self.student)
        return self


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
        elif not path:  # a rule across sections: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
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
