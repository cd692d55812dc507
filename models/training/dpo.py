"""DPO (direct preference optimisation) with TRL DPOTrainer's math, as a Lightning module: Light-R1's third stage.

What it optimises. A preference pair is a prompt x, a chosen response y_w (verified correct) and a rejected one y_l
(failed), built by models/data/pairs.py from the teacher's or the policy's own samples. DPO trains the policy pi
so that its log-likelihood ratio to a frozen reference pi_ref grows more on y_w than on y_l:

    logratio(y) = log pi(y | x) - log pi_ref(y | x)        (TRL: chosen_logratios / rejected_logratios)
    delta       = logratio(y_w) - logratio(y_l)            (TRL: delta_score, f_divergence_type="reverse_kl")
    sigmoid:  loss = -log sigmoid(beta * delta)            (the DPO paper, eq. 7; TRL label_smoothing = 0)
    ipo:      loss = (delta_avg - 1 / (2 beta))^2          (the IPO paper, eq. 17, beta = its tau), where each
              log-ratio is divided by its completion's token count first, as TRL does ("confirmed with the IPO
              authors"): delta_avg = logratio(y_w) / |y_w| - logratio(y_l) / |y_l|

averaged over the batch's pairs. log pi(y | x) is the sum of the log-probs of the completion tokens only (the prompt
is masked), the completion being the response plus the chat template's end-of-turn token, tokenized exactly as SFT
tokenizes its targets (sft.tokenize_example: what SFT and GRPO see). sigmoid's beta is the inverse temperature of
the implicit reward; ipo's is the regulariser (a margin of 1 / (2 beta) per token is the target).

The reference is the starting model: a frozen copy of model_dir, evaluated on every batch (TRL's default,
precompute_ref_log_probs=False), so at step 1 policy == reference, every log-ratio is 0 and the sigmoid loss is
ln 2. TRL's metrics, per optimizer step (before its update, as TRL logs them): rewards/chosen and rewards/rejected
= beta * logratio (summed log-probs, for ipo too, as TRL), rewards/accuracies = share of pairs with chosen > rejected
reward, rewards/margins = mean chosen - rejected reward, logps/chosen and logps/rejected = the policy's summed
log-probs.

Optimisation: AdamW with TRL's (HF TrainingArguments') defaults, betas (0.9, 0.999), no weight decay, dropout off in
both models (TRL's disable_dropout=True); a constant learning rate (TRL inherits HF's linear decay; this repo's GRPO
and DPO keep lr constant over their few steps). Each of cfg.steps steps takes cfg.batch_size pairs, walking seeded
permutations of all pairs (a new one each pass, grpo.step_items). No truncation (TRL's max_length): responses are
bounded by the sampler's max_new_tokens.

Public API:
    dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, loss_type,
             chosen_lengths=None, rejected_lengths=None) -> (losses [B], chosen_rewards [B], rejected_rewards [B])
    tokenize_pair(tokenizer, pair) -> {"prompt_ids", "chosen_ids", "rejected_ids"}
    collate_pairs(rows, pad_id) -> batch of [chosen rows..., rejected rows...]
    sequence_logps(model, batch) -> (summed completion log-probs [2B], completion token counts [2B])
    DPOModule(model, ref_model, cfg)
    train_dpo(cfg, model_dir, pairs, out_dir, *, seed, logger=None, progress=True) -> dict
"""
from __future__ import annotations

import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from branchmerge.models.data.packing import IGNORE_INDEX
from branchmerge.models.lm.hf import save_model_folder
from branchmerge.models.training.config import DPOConfig
from branchmerge.models.training.grpo import ADAM_BETAS, selective_logprobs, step_items
from branchmerge.models.training.sft import tokenize_example
from branchmerge.models.training.toolkit import (
    check_finite_weights,
    guard_loss,
    load_for_training,
    make_optimizer,
    make_trainer,
    quiet_warnings,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

LOSS_TYPES = ("sigmoid", "ipo")
NO_TRUNCATION = 1 << 62  # tokenize_example's max_length when nothing may be cut


# ----------------------------------------------------------------------------------------------- math


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [B] and the implicit rewards beta * (policy - reference) [B] of chosen and rejected
    (detached), TRL DPOTrainer's formulas (module docstring).

    The log-probs are per sequence, [B] each. ipo: with chosen_lengths / rejected_lengths (completion token counts)
    the log-ratios are averaged over them inside the loss, as TRL (the rewards stay summed); without them the
    log-probs passed must already be per-token averages.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "ipo":
        chosen_avg, rejected_avg = chosen_logratios, rejected_logratios
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("dpo_loss: give both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None:
            chosen_avg = chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1.0)
            rejected_avg = rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"rl.dpo.loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------------------------- data


def tokenize_pair(tokenizer, pair: dict) -> dict:
    """Prompt ids (chat template + generation prompt) and the chosen / rejected completion ids (response +
    end-of-turn token), tokenized as SFT tokenizes an example (sft.tokenize_example), nothing truncated."""
    out = {}
    for key in ("chosen", "rejected"):
        ex = tokenize_example(tokenizer, pair["prompt"], pair[key], NO_TRUNCATION)
        n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
        prompt, completion = ex["input_ids"][:n_prompt], ex["input_ids"][n_prompt:]
        if out.setdefault("prompt_ids", prompt) != prompt:  # the template does not depend on the response
            raise ValueError(f"pair {pair.get('id')!r}: chosen and rejected tokenize to different prompts")
        out[f"{key}_ids"] = completion
    return out


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """B tokenized pairs -> 2B rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] (TRL's concatenated
    forward), laid out as GRPO's rollouts: [left-padded prompt | right-padded completion].

    Returns input_ids, attention_mask [2B, P + K] and completion_mask [2B, K] (1 = a completion token)."""
    prompts = [r["prompt_ids"] for r in rows] * 2
    completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    P, K = max(map(len, prompts)), max(map(len, completions))
    ids = torch.full((len(prompts), P + K), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P + K), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": attn[:, P:].clone()}


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(token) over each row's completion tokens [2B] in float32, completion token counts [2B]).

    grpo.selective_logprobs at temperature 1 (positions follow the mask, so a padded row scores as it would alone);
    the prompt and padding are masked out."""
    mask = batch["completion_mask"]
    logps = selective_logprobs(model, batch["input_ids"], batch["attention_mask"], mask.size(1), temperature=1.0)
    return (logps * mask).sum(-1), mask.sum(-1)


def disable_dropout(model) -> None:
    """TRL's disable_dropout_in_model: every nn.Dropout's p set to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ----------------------------------------------------------------------------------------------- module


class DPOModule(L.LightningModule):
    """One optimizer step per batch of pairs: policy and reference log-probs of the 2B rows, dpo_loss, its mean.

    Automatic optimisation: unlike GRPO's step (generation, scoring, micro-batches inside one step), a DPO step is
    one forward and backward of one batch, which Lightning's automatic loop (closure: training_step, backward,
    optimizer step, zero_grad; bf16 autocast by its precision plugin) does as is. guard_loss raises inside
    training_step, so a non-finite loss stops the run before its update. `history` holds each step's metrics.
    """

    def __init__(self, model, ref_model, cfg: DPOConfig):
        super().__init__()
        if cfg.loss_type not in LOSS_TYPES:
            raise ValueError(f"rl.dpo.loss_type={cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        self.model, self.ref_model, self.cfg = model, ref_model, cfg
        self.history: list[dict] = []
        self.tokens = 0

    def configure_optimizers(self):
        return make_optimizer(self.model.parameters(), lr=self.cfg.lr, betas=ADAM_BETAS, weight_decay=0.0)

    def training_step(self, batch, batch_idx):
        start = time.perf_counter()
        cfg = self.cfg
        self.ref_model.eval()  # frozen: keep it in eval mode whatever mode the caller or Lightning set
        logps, lengths = sequence_logps(self.model, batch)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(self.ref_model, batch)
        B = logps.size(0) // 2
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=cfg.beta, loss_type=cfg.loss_type,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        loss = losses.mean()
        guard_loss(loss.item(), self.trainer.global_step + 1)  # before this step's update, not after

        self.tokens += int(batch["attention_mask"].sum())
        metrics = {
            "loss": float(loss.detach()),
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(logps[:B].detach().mean()),
            "logps/rejected": float(logps[B:].detach().mean()),
            "tokens": float(self.tokens),
        }
        self.history.append(metrics)  # deterministic numbers only: the history is part of the artifact
        for k, v in metrics.items():
            self.log(f"train/{k}", v, on_step=True, prog_bar=k in ("loss", "rewards/margins"), batch_size=B)
        self.log("train/step_time", time.perf_counter() - start, on_step=True, batch_size=B)
        return loss


# ----------------------------------------------------------------------------------------------- run


def train_dpo(cfg: DPOConfig, model_dir, pairs: list[dict], out_dir, *, seed: int, logger=None,
              progress: bool = True) -> dict:
    """DPO-train the model in `model_dir` for cfg.steps steps on `pairs` ({"prompt", "chosen", "rejected"}, as
    models/data/pairs.py builds them), save an HF folder to `out_dir`.

    The reference is a frozen copy of model_dir. Raises ValueError when there are no pairs, DivergedError at the
    first non-finite loss or if the trained weights are not finite (nothing saved then).
    Returns {"steps", "history" (per-step loss, rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected, tokens), "pairs" (how many pairs there were)}.
    """
    if not pairs:
        raise ValueError(f"rl.dpo: no preference pairs to train on (pairs_from={cfg.pairs_from}: no prompt had both "
                         "a verified and a failed response); sample more (rl.dpo.num_samples, teacher.n) or drop "
                         "dpo from rl.stages")
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenize_pair(tokenizer, p) for p in pairs]
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    policy = load_for_training(model_dir, lora=None, gradient_checkpointing=False)
    disable_dropout(policy)
    disable_dropout(ref_model)
    module = DPOModule(policy, ref_model, cfg)
    batches = step_items(len(rows), cfg.steps, cfg.batch_size, seed)
    # batch_size=None: no auto-collation, collate_fn turns each step's index list into its batch
    loader = torch.utils.data.DataLoader(batches, batch_size=None,
                                         collate_fn=lambda idx: collate_pairs([rows[i] for i in idx], pad_id))
    with tempfile.TemporaryDirectory() as root, quiet_warnings():
        trainer = make_trainer(max_steps=cfg.steps, max_epochs=1, grad_accum=1, precision=cfg.precision,
                               logger=logger, progress=progress, root_dir=root,
                               strategy="auto", devices=1, num_nodes=1)
        trainer.fit(module, train_dataloaders=loader)

    check_finite_weights(module.model, trainer.global_step)
    save_model_folder(module.model, tokenizer, out_dir, cfg.save_dtype)
    return {"steps": len(module.history), "history": module.history, "pairs": len(pairs)}
