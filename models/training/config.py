"""Settings of the training stages: branch SFT (`sft:`, conf/sft/) and RL on the merged model (`rl:`, conf/rl/).

One object per method, every knob documented once (TRL's SFTConfig / GRPOConfig); the trainers take the object
(`train_sft(cfg, ...)`, `train_grpo(cfg, ...)`). Allowed values and cross-field rules are checked here, once.
Importable without torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from branchmerge.models.lm.config import Dtype
from branchmerge.models.settings import Settings

Precision = Literal["32-true", "bf16-mixed"]


class LoraConfig(Settings):
    """peft LoRA: rank `r`, scale `alpha` / r, `dropout` on the adapter input, `target_modules` = "all-linear"
    (every linear layer but the LM head) or module names (a list: suffix match; a string: a full-name regex)."""

    r: int = Field(gt=0)
    """LoRA rank."""
    alpha: float = Field(gt=0)
    """LoRA scale numerator: the adapter output is scaled by alpha / r."""
    dropout: float = Field(ge=0, lt=1)
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: str | list[str] = Field(min_length=1)
    """'all-linear' (every linear layer but the LM head), a list of name suffixes, or a full-name regex."""


class SFTConfig(Settings):
    """Branch SFT (models/training/sft.py; DMT and curriculum stages in models/training/recipes.py).

    Optimisation: AdamW (`lr`, `betas`, `weight_decay`, decay on matrices only) with a `scheduler` (cosine to 0 or
    constant) after `warmup_ratio` of the steps; `epochs` passes or `max_steps` optimizer steps (-1: no limit),
    whichever ends first; `batch_size` rows per micro-batch, `grad_accum` micro-batches per step.
    Data: examples cut to `max_length` tokens; `packing` packs them whole into rows (batch_size counts rows).
    Numerics: `precision` (32-true | bf16-mixed autocast, float32 master weights), `loss_impl` (plain logits |
    chunked: no [tokens, vocab] logits), `gradient_checkpointing`, `shared_prefix` (a batch's common prompt prefix
    read once), weights saved in `save_dtype`.
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
    """AdamW peak learning rate."""
    epochs: int = Field(gt=0)
    """Passes over the branch's data (fewer if max_steps ends first)."""
    max_steps: int = Field(ge=-1)
    """Most optimizer steps; -1: no limit (all epochs)."""
    batch_size: int = Field(gt=0)
    """Rows per micro-batch (packed rows when packing)."""
    grad_accum: int = Field(gt=0)
    """Micro-batches per optimizer step."""
    max_length: int = Field(gt=8)
    """Tokens per example (longer ones are cut) and per packed row."""
    packing: bool
    """Pack examples whole into rows of max_length tokens (batch_size counts rows); not with loss=poft."""
    loss_impl: Literal["plain", "chunked"]
    """plain (full logits) or chunked (only target positions projected, no [tokens, vocab] logits)."""
    warmup_ratio: float = Field(ge=0, lt=1)
    """Fraction of the steps spent on learning-rate warmup, in [0, 1)."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay, on matrices only."""
    betas: tuple[float, float]
    """AdamW betas, each in [0, 1)."""
    scheduler: Literal["cosine", "constant_with_warmup"]
    """Learning-rate schedule after warmup: cosine (to 0) or constant_with_warmup."""
    precision: Precision
    """32-true (float32) or bf16-mixed (bf16 autocast, float32 master weights)."""
    save_dtype: Dtype
    """Dtype of the saved weights (small SFT deltas vanish in bf16; merges need them)."""
    finetune: Literal["full", "lora"]
    """full (every weight) or lora (peft adapters per `lora`, merged into the saved model)."""
    lora: LoraConfig
    """LoRA settings, used when finetune=lora."""
    gradient_checkpointing: bool
    """Recompute activations in backward: less memory for some more time."""
    shared_prefix: bool
    """Read the prompt prefix a batch's rows share (system prompt, few-shot turns) once, not once per row
    (loss_impl=chunked, unpacked batches; not with gradient_checkpointing)."""
    checkpoint_every: int = Field(ge=0)
    """Optimizer steps between resumable checkpoints (0: none); a rerun resumes from the last."""
    loss: Literal["nll", "poft"]
    """nll, or poft: -log sigmoid(r_model - r_reference), r = the target's log-likelihood."""
    poft_reference: Literal["base", "teacher"]
    """PoFT's reference model: base (the student before SFT) or teacher (the local teacher model)."""
    poft_length_normalize: bool
    """PoFT's r per target token (true) or summed over the target (false)."""
    recipe: Literal["single", "dmt", "curriculum"]
    """Data stages (models/training/recipes.py): single, dmt or curriculum."""
    dmt_k: float = Field(ge=0, le=1)
    """dmt: fraction of the branch's own data replayed in stage 2 with the other domains' data."""
    hard_fraction: float = Field(gt=0, le=1)
    """curriculum: stage 2 trains on this fraction of examples the teacher solved least often."""
    mixture: bool
    """Also train the mixed-data baseline: one SFT on the union of the branches' data, same budget."""

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
        if self.shared_prefix and self.gradient_checkpointing:
            raise ValueError("sft.shared_prefix=true reads the rows' rest against the shared prefix's KV cache, which "
                             "transformers' checkpointed layers drop: set sft.gradient_checkpointing=false or "
                             "sft.shared_prefix=false")
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
    """Run the RL stage (and evaluate its model)."""
    steps: int = Field(gt=0)
    """GRPO steps (one optimizer step each)."""
    prompts_per_step: int = Field(gt=0)
    """Training prompts sampled per step; at most train_size x number of domains."""
    num_generations: int = Field(ge=2)
    """Completions per prompt (the group of group-relative advantages), at least 2."""
    lr: float = Field(gt=0)
    """AdamW learning rate."""
    beta: float = Field(ge=0)
    """Weight of the k3 KL to the merged model (0: no reference model)."""
    epsilon: float = Field(gt=0)
    """Lower clip of the policy ratio: 1 - epsilon."""
    epsilon_high: float = Field(gt=0)
    """Upper clip of the policy ratio: 1 + epsilon_high; at least epsilon (DAPO uses 0.28)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"]
    """How token losses are aggregated, as in TRL: grpo, bnpo, dr_grpo or dapo."""
    scale_rewards: Literal["group", "batch", "none"]
    """Divide advantages by the reward std of the group, of the batch, or none."""
    max_new_tokens: int = Field(gt=0)
    """Most tokens per completion."""
    temperature: float = Field(gt=0)
    """Sampling temperature of the completions (log-probs are taken at it too)."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus top_p of the sampling, in (0, 1]."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay."""
    logprob_impl: Literal["plain", "chunked"]
    """plain, or chunked (log-probs and entropy without [B, K, V] logits; fused Triton kernel on CUDA)."""
    shared_prefix: bool
    """Read each prompt once for its num_generations completions in the update (logprob_impl=chunked), not once
    per completion."""
    precision: Precision
    """32-true (float32) or bf16-mixed (bf16 autocast, float32 master weights)."""
    save_dtype: Dtype
    """Dtype of the saved weights: float32, bfloat16 or float16."""

    @model_validator(mode="after")
    def _asymmetric_clip(self) -> "RLConfig":
        if self.epsilon_high < self.epsilon:
            raise ValueError(f"rl.epsilon_high={self.epsilon_high} < rl.epsilon={self.epsilon}: the upper clip "
                             "(DAPO's clip-higher) must not be tighter than the lower one")
        return self
