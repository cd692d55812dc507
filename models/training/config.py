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
# The reward registry's names (models/training/rewards.py imports the verifiers); a test checks they agree.
REWARD_NAMES = ("correctness", "format", "partial", "length")


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


class AioliSettings(Settings):
    """Aioli's online mixture over the domains for the mixed-data baseline (sft.mixing=aioli; models/data/aioli.py,
    models/training/aioli_sft.py). The run's steps are split into `rounds` equal rounds; each starts with
    LearnParams (`lp_rounds` sweeps over the domains, `lp_steps` steps per domain on a smoothed one-hot mixture,
    `one_hot_factor` on that domain) measuring the dev split's per-domain losses, then trains the rest of the round
    on p, updated by p <- p exp(eta sum_i A[i, :]) (or the EMA variant)."""

    eta: float = Field(gt=0)
    """Step size of the exponentiated update (paper: 0.1, 0.2 or 0.5)."""
    lp_rounds: int = Field(ge=1)
    """LearnParams sweeps over the domains per round (paper: 4-6; fewer fit a short SFT)."""
    lp_steps: int = Field(ge=1)
    """Steps per domain per sweep (paper: 4)."""
    one_hot_factor: float = Field(gt=0, le=1)
    """A LearnParams mixture's weight on its own domain, the rest spread over the others (paper: 0.625)."""
    rounds: int = Field(ge=1)
    """Mixture updates over the run: a round is total steps // rounds (LearnParams included)."""
    ema: float | None = Field(ge=0, lt=1)
    """None: multiplicative update of p; a factor in [0, 1): the reference's EMA of the A's."""


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
    strategy: Literal["auto", "ddp", "fsdp"]
    """Lightning strategy: auto (one process), ddp (a process per device, gradients all-reduced; gloo on CPU) or
    fsdp (parameters sharded over the devices; CUDA only)."""
    devices: int = Field(gt=0)
    """Processes on this node for ddp / fsdp (launched by the stage with torchrun); batch_size is per device."""
    num_nodes: int = Field(gt=0)
    """Nodes for ddp / fsdp; > 1 needs the stage started on every node by a launcher (torchrun, srun)."""
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
    mixing: Literal["static", "aioli"]
    """The mixed-data baseline's mixture over the domains: static (the data as drawn) or aioli (online, `aioli`)."""
    aioli: AioliSettings
    """Aioli's settings (mixing=aioli)."""

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
        if self.strategy == "auto" and (self.devices, self.num_nodes) != (1, 1):
            raise ValueError(f"sft.devices={self.devices}, sft.num_nodes={self.num_nodes} with sft.strategy=auto "
                             "(one process): set sft.strategy=ddp (or fsdp on GPUs) to train on several devices")
        if self.strategy != "auto" and self.mixing == "aioli":
            raise ValueError(f"sft.mixing=aioli draws each batch from its live mixture in one process: it does not "
                             f"run with sft.strategy={self.strategy}; use sft.mixing=static")
        return self


class DPOConfig(Settings):
    """DPO (models/training/dpo.py; Light-R1's third stage) with TRL DPOTrainer's names: preference pairs
    (`pairs_from`: teacher = a verified teacher response as chosen, a failed one for the same prompt as rejected;
    policy = the same from `num_samples` samples of the model being trained, semi-on-policy as Light-R1), at most
    `max_pairs`, trained `steps` AdamW steps (`lr`, `batch_size` pairs each) on `loss_type` (sigmoid | ipo) at
    `beta` against the frozen starting model."""

    steps: int = Field(gt=0)
    """Optimizer steps."""
    batch_size: int = Field(gt=0)
    """Pairs per optimizer step."""
    lr: float = Field(gt=0)
    """AdamW learning rate."""
    beta: float = Field(gt=0)
    """TRL's beta: the inverse temperature of sigmoid, the regulariser of ipo."""
    loss_type: Literal["sigmoid", "ipo"]
    """sigmoid: -log sigmoid(beta * margin) (the DPO paper); ipo: (margin - 1 / (2 beta))^2 on length-averaged
    log-ratios (the IPO paper, as TRL)."""
    pairs_from: Literal["teacher", "policy"]
    """teacher: chosen/rejected from the teacher's verified/failed samples; policy: from the policy's own samples."""
    num_samples: int = Field(ge=2)
    """pairs_from=policy: samples per prompt to find a correct and a wrong one."""
    max_pairs: int = Field(gt=0)
    """Most pairs kept (in prompt order)."""
    max_new_tokens: int = Field(gt=0)
    """pairs_from=policy: most tokens per sample."""
    temperature: float = Field(gt=0)
    """pairs_from=policy: sampling temperature."""
    precision: Precision
    """32-true (float32) or bf16-mixed."""
    save_dtype: Dtype
    """Dtype of the saved weights."""


class SASRConfig(Settings):
    """SASR (models/training/sasr.py): `warmup_steps` SFT steps on the teacher's kept responses (`sft_lr`,
    `sft_batch_size`), G_warmup = the last one's gradient norm; then each of `steps` steps is SFT or GRPO, SFT with
    probability p = G_last / (G_last + gamma * G_warmup), G_last the latest SFT gradient norm (see the module
    docstring for what was followed)."""

    warmup_steps: int = Field(ge=1)
    """SFT steps before the hybrid phase; the last one's gradient norm is G_warmup."""
    steps: int = Field(gt=0)
    """Hybrid steps after the warm-up, each SFT or GRPO."""
    gamma: float = Field(gt=0)
    """Weight of the warm-up gradient norm in p = G_last / (G_last + gamma * G_warmup)."""
    sft_lr: float = Field(gt=0)
    """Learning rate of the SFT steps (GRPO steps use rl.lr)."""
    sft_batch_size: int = Field(gt=0)
    """Examples per SFT step."""
    max_length: int = Field(gt=8)
    """Tokens per SFT example (longer ones are cut), as sft.max_length."""


class RLConfig(Settings):
    """RL on the merged model: `stages` run in order, each its own cached artifact (grpo | dpo | sasr).

    GRPO (models/training/grpo.py), TRL GRPOTrainer's names and semantics: each of `steps` steps samples
    `prompts_per_step` training prompts and `num_generations` completions each (`temperature`, `top_p`, at most
    `max_new_tokens`; `dynamic_sampling` redraws prompts whose group rewards are all equal, at most
    `max_sampling_tries` batches), scores them with `rewards` weighted by `reward_weights` (the reward registry,
    models/training/rewards.py; DAPO's overlong shaping with `overlong_buffer_len` / `overlong_penalty_factor`),
    turns rewards into advantages (`advantage_estimator`: grpo | rloo | reinforce_pp; `scale_rewards`) and takes
    `num_iterations` AdamW steps (`lr`, `weight_decay`) on that batch: the clipped surrogate (`epsilon`,
    `epsilon_high`, two-sided `delta`; `importance_sampling_level` token | sequence = GSPO) or `loss_type` cispo /
    sapo, + `beta` x KL (`kl_estimator` k1 | k2 | k3) to the merged model (0: no reference), over the tokens
    `mask_truncated_completions` and `top_entropy_quantile` keep, aggregated by `loss_type`. `logprob_impl`:
    plain | chunked; `precision`; weights saved in `save_dtype`. `dpo`, `sasr`: those stages' settings.
    """

    enabled: bool
    """Run the RL stages (and evaluate their models)."""
    stages: list[Literal["grpo", "dpo", "sasr"]] = Field(min_length=1)
    """RL stages in order, e.g. [dpo, grpo] (Light-R1); each is cached as its own artifact."""
    steps: int = Field(gt=0)
    """GRPO steps (each num_iterations optimizer steps on one generation batch)."""
    prompts_per_step: int = Field(gt=0)
    """Training prompts per step (informative ones with dynamic_sampling); at most train_size x domains."""
    num_generations: int = Field(ge=2)
    """Completions per prompt (the group of group-relative advantages), at least 2."""
    num_iterations: int = Field(ge=1)
    """TRL's mu: optimizer steps per generation batch; > 1 makes the ratio to the sampling policy act."""
    lr: float = Field(gt=0)
    """AdamW learning rate."""
    beta: float = Field(ge=0)
    """Weight of the KL to the merged model (0: no reference model)."""
    kl_estimator: Literal["k1", "k2", "k3"]
    """KL estimator per token, x = log pi_ref - log pi: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1 (TRL's)."""
    epsilon: float = Field(gt=0)
    """Lower clip of the policy ratio: 1 - epsilon."""
    epsilon_high: float = Field(gt=0)
    """Upper clip of the policy ratio: 1 + epsilon_high (DAPO: 0.28); cispo: the weight's cap (ScaleRL: 5.0)."""
    delta: float | None = Field(gt=1)
    """Two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at delta; null: off."""
    importance_sampling_level: Literal["token", "sequence"]
    """token: a ratio per token; sequence: the mean log-ratio over the completion, one ratio per sequence (GSPO)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
    """TRL's loss types: grpo, bnpo, dr_grpo, dapo (aggregation of the clipped surrogate), cispo (clipped, detached
    IS weight x advantage x log-prob) and sapo (a sigmoid gate instead of the clip)."""
    sapo_temperature_pos: float = Field(gt=0)
    """sapo: gate temperature for positive advantages."""
    sapo_temperature_neg: float = Field(gt=0)
    """sapo: gate temperature for non-positive advantages."""
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"]
    """grpo: reward - group mean (/ std per scale_rewards); rloo: reward - mean of the group's others;
    reinforce_pp: REINFORCE++ with baseline, reward - group mean normalised by the batch std (OpenRLHF / verl)."""
    scale_rewards: Literal["group", "batch", "none"]
    """advantage_estimator=grpo: divide by the reward std of the group, of the batch, or none."""
    mask_truncated_completions: bool
    """Leave completions that hit max_new_tokens out of the loss (DAPO)."""
    top_entropy_quantile: float = Field(ge=0, le=1)
    """Keep in the policy loss only the top quantile of tokens by entropy (1: all; the 80/20 paper: 0.2)."""
    dynamic_sampling: bool
    """DAPO: drop groups whose rewards are all equal and draw more prompts until prompts_per_step informative
    groups (or max_sampling_tries batches)."""
    max_sampling_tries: int = Field(ge=1)
    """dynamic_sampling: most batches of prompts_per_step prompts generated for one step."""
    overlong_buffer_len: int = Field(ge=0)
    """DAPO's soft overlong punishment: the last this-many tokens before max_new_tokens are penalised linearly
    (0: off)."""
    overlong_penalty_factor: float = Field(ge=0)
    """DAPO's overlong penalty at max_new_tokens (reward - factor at the limit)."""
    rewards: list[str] = Field(min_length=1)
    """Reward functions by registry name (models/training/rewards.py), e.g. [correctness, format]."""
    reward_weights: list[float] | None
    """One weight per reward (null: 1 each); the reward is their weighted sum."""
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
    dpo: DPOConfig
    """The dpo stage's settings."""
    sasr: SASRConfig
    """The sasr stage's settings."""

    @field_validator("rewards")
    @classmethod
    def _registered(cls, rewards: list[str]) -> list[str]:
        unknown = [r for r in rewards if r not in REWARD_NAMES]
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; registered: {', '.join(REWARD_NAMES)}")
        return rewards

    @model_validator(mode="after")
    def _consistent(self) -> "RLConfig":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"rl.reward_weights={self.reward_weights} has {len(self.reward_weights)} weight(s) for "
                             f"{len(self.rewards)} reward(s) rl.rewards={self.rewards}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"rl.stages={self.stages}: a stage is listed twice")
        if self.loss_type in ("cispo", "sapo"):
            return self  # epsilon_high is cispo's cap, unrelated to epsilon; sapo does not clip
        if self.epsilon_high < self.epsilon:
            raise ValueError(f"rl.epsilon_high={self.epsilon_high} < rl.epsilon={self.epsilon}: the upper clip "
                             "(DAPO's clip-higher) must not be tighter than the lower one")
        return self
