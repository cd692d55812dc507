"""GRPO (group relative policy optimisation) with TRL GRPOTrainer semantics, as a Lightning module.

Each step: sample `prompts_per_step` items, generate `num_generations` completions per prompt, score them with
`reward_fn` (DAPO's overlong shaping on top), keep only groups whose rewards differ when `dynamic_sampling` (and
draw more prompts until the step is full), turn rewards into advantages (`advantage_estimator`: grpo | rloo |
reinforce_pp), then take `num_iterations` optimizer steps on that batch: the ratio is to the sampling policy's
log-probs, taken once before the first of them, so with num_iterations > 1 clipping acts (TRL's mu).

Public API:
    group_advantages(rewards, num_generations, scale_rewards) -> advantages
    compute_advantages(rewards, num_generations, estimator, scale_rewards, lengths) -> advantages
    kl_per_token(logps, ref_logps, estimator) -> k1 | k2 | k3 per token
    high_entropy_mask(entropy, mask, quantile) -> tokens kept by top_entropy_quantile
    overlong_penalty(lengths, max_new_tokens, buffer_len, factor) -> DAPO's soft overlong punishment
    informative_groups(rewards, num_generations) -> groups whose rewards are not all equal
    logprobs_from_logits(logits, ids, temperature) -> per-token log-probs (row-chunked)
    entropy_from_hidden(hidden, weight, bias, temperature) -> per-token entropy without the full logits
    logprobs_and_entropy(model, input_ids, attention_mask, logits_to_keep, *, temperature, impl, entropy)
        -> (per-token log-probs, per-token entropy or None)
    selective_logprobs(model, input_ids, attention_mask, logits_to_keep, *, temperature, impl) -> per-token log-probs
    grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, *, ...) -> (loss, metrics)
    GRPOModule(model, tokenizer, reward_fn, build_messages, cfg, *, ref_model, seed, micro_batch_size)
    train_grpo(cfg, model_dir, items, reward_fn, build_messages, out_dir, *, seed, ...) -> dict

Every setting comes from one RLConfig (models/training/config.py, conf/rl/).

Reward function (TRL signature): reward_fn(prompts=[messages]*, completions=[str]*, completion_ids=[[int]]*,
**columns) -> list[float | None], one entry per completion (B*G, grouped by prompt); `prompts` are the chat
messages from build_messages, `completions` the decoded text up to the end-of-turn token, `columns` every field
of the items (repeated per completion). None = "no opinion": left out of the group baseline, advantage 0.

Log-probs (logprob_impl): "plain" runs the model's lm_head and keeps the [B, K, V] logits of the completion
tokens; "chunked" takes the decoder's hidden states and the lm_head weight to kernels.linear_ce's
chunked_linear_logprobs (custom backward, fused Triton kernel on CUDA) and the entropy metric in token chunks,
so no [B, K, V] tensor exists. float32: the same numbers up to float rounding. bf16-mixed: they differ by bf16
rounding of the logits (the CPU reference rounds each chunk's logits to bf16 as the lm_head does, the Triton
kernel keeps them in float32); the entropy metric is computed as the plain path's on both.

Loss (grpo_loss, TRL 1.x _compute_loss): w = exp(log-ratio) per token, or per sequence with
importance_sampling_level=sequence (GSPO: the mean log-ratio over the completion); clipped surrogate
-min(w A, clip(w, 1 - eps, 1 + eps_high) A) with w capped at `delta` first (two-sided, INTELLECT-2); cispo:
-clip(w, max=eps_high).detach() A log pi (MiniMax-M1); sapo: -sigmoid(tau (w - 1)) 4 / tau A (tau by the sign
of A). Tokens outside top_entropy_quantile (the 80/20 paper) are dropped, then beta x KL (k1 | k2 | k3) is added.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.kernels.linear_ce import DEFAULT_CHUNK_SIZE, chunked_linear_logprobs
from branchmerge.models.lm.chat import stop_token_ids
from branchmerge.models.lm.generation import generate_ids, left_padded, prompt_ids
from branchmerge.models.lm.hf import save_model_folder
from branchmerge.models.training import DivergedError
from branchmerge.models.training.config import RLConfig
from branchmerge.models.training.toolkit import (
    check_finite_weights,
    decoder_hidden,
    guard_loss,
    load_for_training,
    make_optimizer,
    make_trainer,
    quiet_warnings,
)

log = logging.getLogger(__name__)

# Config keys of heads that post-process h W^T (softcap, scale): the chunked path would silently drop that step.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
ADAM_BETAS = (0.9, 0.999)  # HF TrainingArguments defaults, which TRL's GRPO uses
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


# ----------------------------------------------------------------------------------------------- math


def _nan_std(x: torch.Tensor, valid: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased std (torch.std's default, as TRL) over valid entries; 0 where fewer than 2 are valid."""
    n = valid.sum(dim=dim)
    x0 = torch.where(valid, x, 0.0)
    mean = x0.sum(dim=dim) / n.clamp(min=1)
    centred = torch.where(valid, x - (mean.unsqueeze(-1) if dim is not None else mean), 0.0)
    var = (centred**2).sum(dim=dim) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))


def group_stats(rewards: torch.Tensor, num_generations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and unbiased std of the rewards that are not NaN, shape [B] each."""
    grouped = rewards.view(-1, num_generations)
    valid = ~grouped.isnan()
    mean = torch.where(valid, grouped, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    return mean, _nan_std(grouped, valid, dim=-1)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Â_i = (R_i - mean of its group) / (std + 1e-4), as TRL GRPOTrainer.

    rewards: [B*G] float, consecutive blocks of `num_generations` share a prompt. NaN (a reward_fn None) is
    left out of the group mean/std and gets advantage 0. scale_rewards: "group" divides by the group's std,
    "batch" by the std of the whole batch (group mean still subtracted), "none" does not divide (Dr. GRPO).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of num_generations={num_generations}")
    rewards = rewards.float()
    mean, std = group_stats(rewards, num_generations)
    adv = rewards - mean.repeat_interleave(num_generations)
    if scale_rewards == "group":
        adv = adv / (std.repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        adv = adv / (_nan_std(rewards, ~rewards.isnan()) + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected group, batch or none")
    return torch.nan_to_num(adv, nan=0.0)


def compute_advantages(rewards: torch.Tensor, num_generations: int, estimator: str, scale_rewards: str,
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-completion advantages [B*G] from rewards [B*G] (NaN: no opinion, advantage 0).

    grpo: group_advantages (TRL). rloo: R_i - mean of the other valid rewards of its group (leave-one-out, as
    verl's / OpenRLHF's RLOO; a group with one valid reward gets 0). reinforce_pp: REINFORCE++ with baseline
    (verl's compute_reinforce_plus_plus_baseline_outcome_advantage, OpenRLHF's reinforce_baseline): R_i - group
    mean, then whitened over the batch's completion tokens (each completion counts `lengths` times, the token
    mean subtracted, divided by sqrt(unbiased token variance + 1e-8)).
    """
    if estimator == "grpo":
        return group_advantages(rewards, num_generations, scale_rewards)
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of num_generations={num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    valid = ~grouped.isnan()
    x = torch.where(valid, grouped, 0.0)
    n = valid.sum(-1, keepdim=True)
    if estimator == "rloo":
        others = (n - 1).clamp(min=1)
        adv = torch.where(valid & (n >= 2), x - (x.sum(-1, keepdim=True) - x) / others, 0.0)
        return adv.reshape(-1)
    if estimator == "reinforce_pp":
        if lengths is None:
            raise ValueError("reinforce_pp whitens over completion tokens: pass the completions' lengths")
        centred = torch.where(valid, x - x.sum(-1, keepdim=True) / n.clamp(min=1), 0.0).reshape(-1)
        w = torch.where(valid.reshape(-1), lengths.float(), 0.0)  # tokens each completion's advantage covers
        total = w.sum()
        if total <= 1:
            return torch.zeros_like(centred)
        mean = (centred * w).sum() / total
        var = ((centred - mean) ** 2 * w).sum() / total * (total / (total - 1))  # Bessel, as verl's masked_var
        return torch.where(valid.reshape(-1), (centred - mean) * torch.rsqrt(var + 1e-8), 0.0)
    raise ValueError(f"advantage_estimator={estimator!r}: expected grpo, rloo or reinforce_pp")


def informative_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[B] bool: groups whose valid rewards are not all equal (at least two, with a spread): DAPO's dynamic
    sampling keeps only these, the others give every completion advantage 0."""
    grouped = rewards.view(-1, num_generations)
    valid = ~grouped.isnan()
    hi = torch.where(valid, grouped, -math.inf).amax(-1)
    lo = torch.where(valid, grouped, math.inf).amin(-1)
    return (valid.sum(-1) >= 2) & (hi > lo)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (verl's DAPO reward manager): 0 up to max_new_tokens - buffer_len tokens,
    then falling linearly to -factor at max_new_tokens: min(-(L - (max - buffer)) / buffer * factor, 0)."""
    if buffer_len <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    exceed = lengths.float() - (max_new_tokens - buffer_len)
    return torch.clamp(-exceed / buffer_len * factor, max=0.0)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL(pi || pi_ref) estimated per sampled token from x = log pi_ref - log pi (Schulman's k1, k2, k3):
    k1 = -x (unbiased, can be negative), k2 = x^2 / 2, k3 = exp(x) - x - 1 (unbiased, >= 0; TRL's)."""
    x = ref_logps - logps
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.exp(x) - x - 1
    raise ValueError(f"kl_estimator={estimator!r}: expected k1, k2 or k3")


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Tokens whose entropy is at least the (1 - quantile) quantile of the masked tokens' (TRL's
    get_high_entropy_mask with threshold = 1 - top_entropy_quantile): the 80/20 paper's forking tokens."""
    valid = mask.bool()
    local = entropy[valid].float()
    if local.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(local, 1 - quantile)
    return ((entropy * mask.float()) >= threshold) & valid


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[ids] per position, [B, K, V] -> [B, K], in float32.

    One row (sequence) at a time, so at most one [K, V] float32 temporary exists in the forward pass (the
    full-batch log_softmax would copy all of [B, K, V]); gather - logsumexp never materialises log_softmax.
    """
    rows = []
    for row_logits, row_ids in zip(logits, ids):
        row = row_logits.float() / temperature
        rows.append(row.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, [B, K, V] -> [B, K] (a metric: no gradient)."""
    rows = []
    for row_logits in logits:
        row = row_logits.float() / temperature
        lse = torch.logsumexp(row, dim=-1, keepdim=True)
        rows.append((lse - (torch.exp(row - lse) * row).sum(-1, keepdim=True)).squeeze(-1))
    return torch.stack(rows)


@torch.no_grad()
def entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """entropy_from_logits(F.linear(hidden, weight, bias), T): [..., H] -> [...], `chunk_size` tokens at a time.

    The logits are computed as the lm_head does (its dtype, autocast included), so this is the plain path's
    metric with at most [chunk_size, V] logits alive.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    parts = [entropy_from_logits(F.linear(flat[s : s + chunk_size], weight, bias).unsqueeze(0), temperature)[0]
             for s in range(0, flat.size(0), chunk_size)]
    return torch.cat(parts).view(hidden.shape[:-1])


def mask_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from the attention mask, as in generate(): with left padding the first real token is at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
    """Logits predicting the last `logits_to_keep` tokens, [B, K, V].

    Positions follow the mask (mask_position_ids), so the log-probs here are those of the distribution the
    completions were sampled from.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=mask_position_ids(attention_mask),
                logits_to_keep=logits_to_keep + 1, use_cache=False)
    return out.logits[:, :-1]  # the last position predicts the token after the sequence: drop it


def completion_hidden(model, input_ids, attention_mask, logits_to_keep: int, group_size: int = 0) -> torch.Tensor:
    """Last hidden states [B, K, H] that completion_logits passes to the lm_head (same positions and mask).

    group_size > 0: rows come in groups of that many completions of one prompt ([p0g0, p0g1, ..., p1g0, ...]);
    each group's prompt is read once (toolkit.decoder_hidden), not once per completion."""
    positions = mask_position_ids(attention_mask)
    if group_size <= 0:
        return decoder_hidden(model, input_ids, attention_mask, positions,
                              shared_prefix=False)[:, -logits_to_keep - 1 : -1]
    groups = [slice(g, g + group_size) for g in range(0, input_ids.shape[0], group_size)]
    return torch.cat([decoder_hidden(model, input_ids[g], attention_mask[g], positions[g], shared_prefix=True)
                      [:, -logits_to_keep - 1 : -1] for g in groups])


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias or None) of the output embedding: the model's logits are F.linear(h, weight, bias)."""
    for key in LOGIT_TRANSFORMS:
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"logprob_impl='chunked': the model's head applies {key}={getattr(model.config, key)} "
                             "to its logits, which the chunked kernel does not; use logprob_impl='plain'")
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def logprobs_and_entropy(model, input_ids, attention_mask, logits_to_keep: int, *, temperature: float,
                         impl: str = "plain", entropy: bool = True, group_size: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, K], entropy [B, K] or None) of the last K = logits_to_keep tokens under model at T.

    The log-probs carry the gradient, the entropy (a metric) does not. impl "plain" keeps the [B, K, V] logits;
    "chunked" never builds them (kernels.linear_ce.chunked_linear_logprobs, entropy_from_hidden) and, with
    group_size, reads each prompt once for its group of completions (completion_hidden).
    """
    if impl not in ("plain", "chunked"):
        raise ValueError(f"logprob_impl={impl!r}: expected plain or chunked")
    ids = input_ids[:, -logits_to_keep:]
    if impl == "plain":
        logits = completion_logits(model, input_ids, attention_mask, logits_to_keep)
        ent = entropy_from_logits(logits.detach(), temperature) if entropy else None
        return logprobs_from_logits(logits, ids, temperature), ent
    weight, bias = lm_head_params(model)
    hidden = completion_hidden(model, input_ids, attention_mask, logits_to_keep, group_size)
    ent = entropy_from_hidden(hidden.detach(), weight, bias, temperature) if entropy else None
    return chunked_linear_logprobs(hidden, weight, ids, temperature=temperature, bias=bias), ent


def selective_logprobs(model, input_ids, attention_mask, logits_to_keep: int, *, temperature: float,
                       impl: str = "plain", group_size: int = 0) -> torch.Tensor:
    """Per-token log-probs [B, K] of the last K = logits_to_keep tokens of input_ids under model at temperature T.

    input_ids = [left-padded prompt | completion]; TRL divides the logits by the sampling temperature too.
    """
    return logprobs_and_entropy(model, input_ids, attention_mask, logits_to_keep, temperature=temperature,
                                impl=impl, entropy=False, group_size=group_size)[0]


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
                   num_items_in_batch=None) -> torch.Tensor:
    """Reduce [B, K] per-token losses to a scalar the way TRL's loss_type says (see module docstring)."""
    if loss_type in ("grpo", "sapo"):  # token mean per sequence, then mean over sequences (length-biased)
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":  # token mean over this (local) batch
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":  # constant normaliser: no length bias
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    if loss_type in ("dapo", "cispo"):  # token mean over the global batch (all micro-batches of the step)
        total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        return (per_token * mask).sum() / total.clamp(min=1.0)
    raise ValueError(f"loss_type={loss_type!r}: expected grpo, bnpo, dr_grpo, dapo, cispo or sapo")


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, *, epsilon: float, epsilon_high: float | None,
              beta: float, loss_type: str, max_completion_length: int, delta: float | None,
              importance_sampling_level: str, kl_estimator: str, sapo_temperature_pos: float,
              sapo_temperature_neg: float, num_items_in_batch=None, entropy_mask=None):
    """Policy loss + beta x KL per token, aggregated by loss_type (TRL's _compute_loss). Returns (loss, metrics).

    logps/old_logps/ref_logps: [B, K]; advantages: [B]; completion_mask: [B, K] (1 = real completion token);
    entropy_mask: [B, K] bool or None (top_entropy_quantile). w = exp(logp - old) per token, or exp(mean over the
    completion) per sequence (importance_sampling_level=sequence). grpo/bnpo/dr_grpo/dapo: -min(min(w, delta) A,
    clip(w, 1-eps, 1+eps_high) A); cispo: -clip(w, max=eps_high).detach() A logp; sapo: -sigmoid(tau (w-1)) 4/tau A.
    epsilon_high=None means eps_high = eps. num_items_in_batch: active tokens in the whole step (dapo / cispo;
    None = this batch's). metrics: TRL's clip_ratio/low_mean, high_mean, region_mean (cispo: cispo_clip_ratio;
    sapo: none) as means over tokens (over sequences at sequence level), and kl when beta != 0.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: expected token or sequence")
    coef_1 = torch.exp(log_w)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps
    elif loss_type == "sapo":
        temperature = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(coef_1.dtype)
        per_token = -torch.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature * adv
    else:
        coef_2 = coef_1.clamp(1 - epsilon, 1 + epsilon_high)
        if delta is not None:  # two-sided clipping: the unclipped term is capped too
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        kl = kl_per_token(logps, ref_logps, kl_estimator)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        def masked_mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # one value per sequence
                return float(x.squeeze(1).float().mean())
            return float((x.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0))

        if loss_type == "cispo":
            metrics = {"cispo_clip_ratio": masked_mean((coef_1 > epsilon_high) & (adv > 0))}
        elif loss_type == "sapo":  # a soft gate, nothing is clipped (TRL logs no clip ratio either)
            metrics = {}
        else:
            low = (coef_1 < 1 - epsilon) & (adv < 0)
            high = (coef_1 > 1 + epsilon_high) & (adv > 0)
            metrics = {"clip_ratio/low_mean": masked_mean(low), "clip_ratio/high_mean": masked_mean(high),
                       "clip_ratio/region_mean": masked_mean(low | high)}
        if kl is not None:
            metrics["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1.0))
    return loss, metrics


# ----------------------------------------------------------------------------------------------- module


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first end token, 0 after; rows without one (truncated) are all 1."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    width = completion_ids.size(1)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], width, dtype=torch.long))
    return (torch.arange(width, device=completion_ids.device)[None, :] <= first[:, None]).long()


class GRPOModule(L.LightningModule):
    """One GRPO step per batch (a list of item dicts): roll out, score, advantages, num_iterations optimizer steps.

    Manual optimisation: the update may be split into micro-batches of `micro_batch_size` completions (None =
    all B*G at once) with the loss normalised over the whole step, so the result does not depend on the split
    (bnpo: TRL's per-micro-batch normalisation, averaged; top_entropy_quantile: per micro-batch, as TRL).
    `draw(n)` gives more items for dynamic sampling. `history` holds each step's metrics.
    """

    def __init__(self, model, tokenizer, reward_fn, build_messages, cfg: RLConfig, *, ref_model, seed: int,
                 micro_batch_size: int | None = None, draw=None):
        super().__init__()
        if cfg.beta != 0.0 and ref_model is None:
            raise ValueError("rl.beta != 0 needs a reference model")
        if cfg.dynamic_sampling and draw is None:
            raise ValueError("rl.dynamic_sampling needs a source of more prompts (draw)")
        self.automatic_optimization = False
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.reward_fn, self.build_messages, self.draw = reward_fn, build_messages, draw
        self.cfg, self.micro_batch_size, self.seed = cfg, micro_batch_size, seed
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.history: list[dict] = []
        self.tokens = 0
        self.generation_step = 0

    def configure_optimizers(self):
        return make_optimizer(self.model.parameters(), lr=self.cfg.lr, betas=ADAM_BETAS,
                              weight_decay=self.cfg.weight_decay)

    @torch.no_grad()
    def rollout(self, items: list[dict], attempt: int) -> tuple[list, list[list[int]], list[list[list[int]]]]:
        """(messages, prompt token ids, G completions each) from the pipeline's generation engine
        (models/lm/generation.py); a completion ends at its stop token (kept) or after max_new_tokens."""
        cfg = self.cfg
        messages = [self.build_messages(it) for it in items]
        prompts = prompt_ids(self.tokenizer, messages)
        was_training = self.model.training
        self.model.eval()
        try:
            completions = generate_ids(
                self.model, self.tokenizer, prompts, n=cfg.num_generations, temperature=cfg.temperature,
                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, batch_size=len(prompts) * cfg.num_generations,
                seed=(self.seed * 1_000_003 + self.generation_step) * 101 + attempt, progress=False)
        except RuntimeError as err:  # torch.multinomial on NaN / inf probabilities: the last update diverged
            if "inf" in str(err) and "nan" in str(err):
                raise DivergedError("rollouts sampled from non-finite probabilities", self.trainer.global_step + 1
                                    ) from err
            raise
        finally:
            self.model.train(was_training)
        return messages, prompts, completions

    def collate(self, messages: list, prompts: list[list[int]], completions: list[list[list[int]]]) -> dict:
        """Tensors of a rollout: rows grouped by prompt ([p0g0, p0g1, ..., p1g0, ...]), prompts left-padded,
        completions right-padded; completion_mask is 1 up to the first stop token (masked_completion_mask also 0
        on truncated rows when mask_truncated_completions)."""
        G = self.cfg.num_generations
        prompt_ids_, prompt_mask = left_padded([p for p in prompts for _ in range(G)], self.pad_id)
        rows = [c for per_prompt in completions for c in per_prompt]
        width = max(len(r) for r in rows)
        completion_ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows])
        prompt_ids_, prompt_mask, completion_ids = (t.to(self.device) for t in (prompt_ids_, prompt_mask,
                                                                                completion_ids))
        completion_mask = completion_mask_from_ids(completion_ids, self.stop_ids)
        truncated = ~torch.isin(completion_ids, torch.tensor(self.stop_ids, device=self.device)).any(1)
        loss_mask = completion_mask * (~truncated).unsqueeze(1) if self.cfg.mask_truncated_completions \
            else completion_mask
        return {
            "messages": messages, "input_ids": torch.cat([prompt_ids_, completion_ids], 1),
            "completion_ids": completion_ids, "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
            "completion_mask": completion_mask, "loss_mask": loss_mask, "truncated": truncated,
        }

    def score(self, items: list[dict], batch: dict) -> torch.Tensor:
        """reward_fn with TRL's keyword signature (None -> NaN), plus DAPO's overlong penalty. [B*G] float32."""
        cfg, G = self.cfg, self.cfg.num_generations
        ids = [row[m.bool()].tolist() for row, m in zip(batch["completion_ids"], batch["completion_mask"])]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        columns = {k: [it[k] for it in items for _ in range(G)] for k in items[0]}
        prompts = [m for m in batch["messages"] for _ in range(G)]
        rewards = self.reward_fn(prompts=prompts, completions=texts, completion_ids=ids, **columns)
        if len(rewards) != len(texts):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(texts)} completions")
        rewards = torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float32)
        lengths = batch["completion_mask"].sum(1).cpu()
        return rewards + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer_len,
                                          cfg.overlong_penalty_factor)

    def sample(self, items: list[dict]) -> tuple[list[dict], dict | None, torch.Tensor, dict]:
        """The step's items, batch and rewards. dynamic_sampling (DAPO): groups whose rewards are all equal are
        dropped and more prompts are drawn until prompts_per_step informative groups are held or
        max_sampling_tries rollouts were made; a step that gives up trains on the groups it has (warning with the
        count), one with none takes no update (batch None)."""
        cfg, G = self.cfg, self.cfg.num_generations
        kept: list[tuple[dict, list, list[int], list[list[int]], torch.Tensor]] = []
        seen = dropped = attempt = 0
        first_rewards = None
        while True:
            messages, prompts, completions = self.rollout(items, attempt)
            rewards = self.score(items, self.collate(messages, prompts, completions))
            first_rewards = rewards if first_rewards is None else first_rewards
            keep = informative_groups(rewards, G) if cfg.dynamic_sampling else torch.ones(len(items), dtype=torch.bool)
            for g, it in enumerate(items):
                if keep[g]:
                    kept.append((it, messages[g], prompts[g], completions[g], rewards[g * G:(g + 1) * G]))
            seen += len(items)
            dropped += int((~keep).sum())
            attempt += 1
            if not cfg.dynamic_sampling or len(kept) >= cfg.prompts_per_step or attempt >= cfg.max_sampling_tries:
                break
            items = self.draw(cfg.prompts_per_step)
        kept = kept[:cfg.prompts_per_step]
        stats = {"sampling/rollouts": float(attempt), "sampling/groups_dropped": float(dropped),
                 "sampling/groups_kept": float(len(kept))}
        if cfg.dynamic_sampling and len(kept) < cfg.prompts_per_step:
            log.warning("dynamic sampling: %d of %d informative groups after %d rollouts of %d prompts "
                        "(rl.max_sampling_tries=%d); training on those", len(kept), cfg.prompts_per_step, attempt,
                        seen, cfg.max_sampling_tries)
        if not kept:
            return [], None, first_rewards, stats
        items_, messages, prompts, completions, rewards = map(list, zip(*kept))
        return items_, self.collate(messages, prompts, completions), torch.cat(rewards), stats

    @torch.no_grad()
    def logps(self, model, batch: dict) -> torch.Tensor:
        """Per-token log-probs [B*G, K] of the completions under `model`, micro-batched, no gradient (the sampling
        policy's for num_iterations > 1, the reference's for the KL)."""
        cfg = self.cfg
        n, K = batch["completion_ids"].shape
        mb = self.micro_batch_size or n
        group = cfg.num_generations if cfg.shared_prefix and mb % cfg.num_generations == 0 else 0
        return torch.cat([selective_logprobs(model, batch["input_ids"][s:s + mb], batch["attention_mask"][s:s + mb],
                                             K, temperature=cfg.temperature, impl=cfg.logprob_impl, group_size=group)
                          for s in range(0, n, mb)])

    def policy_update(self, batch: dict, advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
                      ref_logps: torch.Tensor | None = None) -> dict:
        """One optimizer step over all completions, micro-batched; returns loss, clip ratios, kl, entropy.
        old_logps None: the sampling policy is the current one (num_iterations 1), its detached log-probs."""
        cfg = self.cfg
        n, K = batch["completion_ids"].shape
        mask = batch["loss_mask"]
        total_tokens = mask.sum()
        mb = self.micro_batch_size or n
        opt = self.optimizers()
        opt.zero_grad()
        sums: dict[str, float] = {}
        for s in range(0, n, mb):
            rows = slice(s, min(s + mb, n))
            ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
            # micro-batches hold whole groups when mb is a multiple of G (n always is): read each prompt once
            group = cfg.num_generations if cfg.shared_prefix and mb % cfg.num_generations == 0 else 0
            logps, entropy = logprobs_and_entropy(self.model, ids, attn, K, temperature=cfg.temperature,
                                                  impl=cfg.logprob_impl, group_size=group)
            old = logps.detach() if old_logps is None else old_logps[rows]
            ref = None if ref_logps is None else ref_logps[rows]
            emask = high_entropy_mask(entropy, mask[rows], cfg.top_entropy_quantile) \
                if cfg.top_entropy_quantile < 1 else None
            loss, metrics = grpo_loss(
                logps, old, ref, advantages[rows].to(logps.device), mask[rows], epsilon=cfg.epsilon,
                epsilon_high=cfg.epsilon_high, beta=cfg.beta, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_new_tokens, num_items_in_batch=total_tokens, delta=cfg.delta,
                importance_sampling_level=cfg.importance_sampling_level, kl_estimator=cfg.kl_estimator,
                sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
                entropy_mask=emask,
            )
            if cfg.loss_type not in ("dapo", "cispo"):  # those are already normalised over the whole step
                loss = loss * (rows.stop - rows.start) / n
            self.manual_backward(loss)
            # Token-weighted sums so the step's metrics are token means over all micro-batches.
            w = float(mask[rows].sum()) / max(float(total_tokens), 1.0)
            metrics["entropy"] = float((entropy * mask[rows]).sum() / mask[rows].sum().clamp(min=1))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        guard_loss(sums["loss"], self.trainer.global_step + 1)  # before the update: a NaN step is never applied
        opt.step()
        return sums

    def training_step(self, items, batch_idx):
        start = time.perf_counter()
        cfg = self.cfg
        if self.ref_model is not None:
            self.ref_model.eval()  # frozen: keep it in eval mode whatever mode the caller or Lightning set
        items, batch, rewards, metrics = self.sample(items)
        self.generation_step += 1
        if batch is None:  # dynamic sampling found no group with a signal: nothing to learn from this step
            metrics.update({"reward": float(rewards.nanmean()), "skipped": 1.0})
            self.history.append(metrics)
            return
        lengths = batch["completion_mask"].sum(1).float()
        advantages = compute_advantages(rewards, cfg.num_generations, cfg.advantage_estimator, cfg.scale_rewards,
                                        batch["loss_mask"].sum(1).cpu())
        ref = self.logps(self.ref_model, batch) if cfg.beta != 0.0 else None
        old = self.logps(self.model, batch) if cfg.num_iterations > 1 else None
        updates = [self.policy_update(batch, advantages, old, ref) for _ in range(cfg.num_iterations)]
        for k in updates[0]:  # mean over the iterations on this batch
            metrics[k] = sum(u[k] for u in updates) / len(updates)

        _, std = group_stats(rewards, cfg.num_generations)
        self.tokens += int(batch["attention_mask"].sum())
        metrics.update({
            "reward": float(rewards.nanmean()), "reward_std": float(std.mean()),
            "frac_reward_zero_std": float((std < 1e-6).float().mean()),
            "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(batch["truncated"].float().mean()),
            "tokens": float(self.tokens),
        })
        metrics.update(getattr(self.reward_fn, "last_means", {}))  # each reward's mean (rewards.combine)
        self.history.append(metrics)  # deterministic numbers only: the history is part of the artifact
        for k, v in metrics.items():
            self.log(f"train/{k}", v, on_step=True, prog_bar=k in ("reward", "loss"), batch_size=len(items))
        self.log("train/step_time", time.perf_counter() - start, on_step=True, batch_size=len(items))


def item_stream(n_items: int, seed: int):
    """Item indices forever: seeded permutations of all items, a new one each pass (TRL's sampler)."""
    rng = random.Random(seed)
    while True:
        perm = list(range(n_items))
        rng.shuffle(perm)
        yield from perm


def step_items(n_items: int, steps: int, prompts_per_step: int, seed: int) -> list[list[int]]:
    """Item indices per step: walk seeded permutations of all items (a new one each pass), like TRL's sampler."""
    stream = item_stream(n_items, seed)
    return [[next(stream) for _ in range(prompts_per_step)] for _ in range(steps)]


def load_rl_models(cfg: RLConfig, model_dir):
    """(tokenizer, policy to train, frozen float32 reference or None when cfg.beta == 0) from model_dir."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ref_model = None
    if cfg.beta != 0.0:
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    return tokenizer, load_for_training(model_dir, lora=None, gradient_checkpointing=False), ref_model


def train_grpo(cfg: RLConfig, model_dir, items: list[dict], reward_fn, build_messages, out_dir, *, seed: int,
               logger=None, progress: bool = True, micro_batch_size: int | None = None) -> dict:
    """GRPO-train the model in `model_dir` for cfg.steps steps on `items`, save an HF folder to `out_dir`.

    build_messages(item) -> chat messages for the prompt. The reference model (cfg.beta != 0) is a frozen copy
    of model_dir. Dynamic sampling draws its extra prompts from a second seeded stream over the same items.
    Raises DivergedError at the first non-finite loss or if the trained weights are not finite.
    Returns {"steps", "reward" (last step), "history" (per-step metrics), "tokens"}.
    """
    if not items:
        raise ValueError("rl: no items to train on")
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer, policy, ref_model = load_rl_models(cfg, model_dir)
    extra = item_stream(len(items), seed + 1)
    module = GRPOModule(policy, tokenizer, reward_fn, build_messages, cfg, ref_model=ref_model, seed=seed,
                        micro_batch_size=micro_batch_size, draw=lambda n: [items[next(extra)] for _ in range(n)])
    batches = [[items[i] for i in idx] for idx in step_items(len(items), cfg.steps, cfg.prompts_per_step, seed)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    with tempfile.TemporaryDirectory() as root, quiet_warnings():
        trainer = make_trainer(max_steps=cfg.steps * cfg.num_iterations, max_epochs=1, grad_accum=1,
                               precision=cfg.precision, logger=logger, progress=progress, root_dir=root,
                               strategy="auto", devices=1, num_nodes=1)
        trainer.fit(module, train_dataloaders=loader)

    check_finite_weights(module.model, trainer.global_step)
    save_model_folder(module.model, tokenizer, out_dir, cfg.save_dtype)
    return {"steps": len(module.history), "reward": module.history[-1]["reward"], "history": module.history,
            "tokens": module.tokens}
