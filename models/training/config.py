"""Settings of the training stages: branch SFT (`sft:`, conf/sft/) and RL on the merged model (`rl:`, conf/rl/).

One object per method, every knob documented once (TRL's SFTConfig / GRPOConfig); the trainers take the object
(`train_sft(cfg, ...)`, `train_grpo(cfg, ...)`). Allowed values and cross-field rules are checked here, once.
Importable without torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from models.lm.config import Dtype
from models.settings import Settings

Precision = Literal["32-true", "bf16-mixed"]


class LoraConfig(Settings):
    """peft LoRA: rank `r`, scale `alpha` / r, `dropout` on the adapter input, `target_modules` = "all-linear"
    (every linear layer but the LM head) or module names (a list: suffix match; a string: a full-name regex)."""

    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: str | list[str] = Field(min_length=1)


class SFTConfig(Settings):
    """Branch SFT (models/training/sft.py; DMT and curriculum stages in models/training/recipes.py).

    Optimisation: AdamW (`lr`, `betas`, `weight_decay`, decay on matrices only) with a `scheduler` (cosine to 0 or
    constant) after `warmup_ratio` of the steps; `epochs` passes or `max_steps` optimizer steps (-1: no limit),
    whichever ends first; `batch_size` rows per micro-batch, `grad_accum` micro-batches per step.
    Data: examples cut to `max_length` tokens; `packing` packs them whole into rows (batch_size counts rows).
    Numerics: `precision` (32-true | bf16-mixed autocast, float32 master weights), `loss_impl` (plain logits |
    chunked: no [tokens, vocab] logits), `gradient_checkpointing`, weights saved in `save_dtype`.
    `finetune`: full | lora (`lora` settings; adapters merged into the saved model).
    `checkpoint_every`: optimizer steps between resumable checkpoints (0: none).
    `loss`: nll | poft (PoFT: -log sigmoid(r_model - r_ref) against `poft_reference` = base | teacher, r per token
    when `poft_length_normalize`).
    `recipe`: single | dmt (stage 2 = other domains + `dmt_k` of the branch's data) | curriculum (stage 2 = the
    `hard_fraction` of examples the teacher solved least often).
    `mixture`: also train the mixed-data baseline, one SFT from the same base on the union of every branch's data
    with the branches' settings and their budget together (the same examples and epochs; max_steps times the
    number of domains), in one stage (recipe single, curriculum kept).
    """

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
    precision: Precision
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
    mixture: bool

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, max_steps: int) -> int:
        if max_steps == 0:
            raise ValueError("max_steps=0 trains nothing: use -1 (all epochs) or a positive step count")
        return max_steps

    @field_validator("betas")
    @classmethod
    def _adam_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW betas must each lie in [0, 1); got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _poft_scores_whole_examples(self) -> "SFTConfig":
        if self.loss == "poft" and self.packing:
            raise ValueError("sft.loss=poft scores whole examples: set sft.packing=false")
        return self


class RLConfig(Settings):
    """GRPO with TRL GRPOTrainer semantics and names (models/training/grpo.py).

    `enabled`: run the stage. Each of `steps` steps samples `prompts_per_step` training prompts and
    `num_generations` completions each (`temperature`, `top_p`, at most `max_new_tokens`), scores them with the
    tasks' verifiers, turns rewards into group-relative advantages (`scale_rewards`: group | batch | none) and takes
    one AdamW step (`lr`, `weight_decay`) on the clipped surrogate (`epsilon`, `epsilon_high`) + `beta` * k3 KL to
    the merged model (0: no reference), aggregated by `loss_type` (grpo | bnpo | dr_grpo | dapo). `logprob_impl`:
    plain | chunked; `precision`; weights saved in `save_dtype`.
    """

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
    precision: Precision
    save_dtype: Dtype

    @model_validator(mode="after")
    def _asymmetric_clip(self) -> "RLConfig":
        if self.epsilon_high < self.epsilon:
            raise ValueError(f"rl.epsilon_high={self.epsilon_high} < rl.epsilon={self.epsilon}: the upper clip "
                             "(DAPO's clip-higher) must not be tighter than the lower one")
        return self
