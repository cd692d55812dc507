"""SASR (step-wise adaptive SFT <-> RL): an SFT warm-up, then each step SFT or GRPO, chosen by gradient norms.

What we follow (no official code was found; the rule is corroborated by two public reimplementations and is
what ../shared/reference/training-and-rl.md gives; warm-up length W and gamma are config with documented
defaults, rl.sasr):
1. warm-up: W SFT steps on the teacher's kept responses; G_warmup = the SFT gradient norm of the last of them
   (the L2 norm over every parameter's gradient, before the optimizer step), and G_last = G_warmup;
2. then, each of `steps` steps: p = G_last / (G_last + gamma * G_warmup); with probability p (a seeded uniform
   draw u < p) an SFT step, which sets G_last to its gradient norm, else a GRPO step (GRPOModule's own, with
   rl.* settings). A large SFT gradient (the policy still far from the data) keeps p high; as SFT's gradient
   shrinks below the warm-up's, RL takes over.

One model and one AdamW: an SFT step runs at rl.sasr.sft_lr, a GRPO step at rl.lr. SASR is the one trainer
built over another's module (GRPOModule), because its RL steps are exactly GRPO's.
"""
from __future__ import annotations

import math
import random
import tempfile

import lightning as L
import torch
from branchmerge.models.lm.hf import save_model_folder
from branchmerge.models.training.config import RLConfig
from branchmerge.models.training.grpo import GRPOModule, item_stream, load_rl_models, step_items
from branchmerge.models.training.toolkit import (
    check_finite_weights,
    guard_loss,
    make_trainer,
    masked_lm_loss,
    pad_collate,
    quiet_warnings,
    tokenize_example,
)


class SASRSchedule:
    """The SFT-or-GRPO choice: warmup(G) once, then choose() per step; record_sft(G) after every SFT step."""

    def __init__(self, gamma: float, seed: int):
        self.gamma, self.rng = gamma, random.Random(seed)
        self.g_warmup: float | None = None
        self.g_last: float | None = None

    def warmup(self, grad_norm: float) -> None:
        self.g_warmup = self.g_last = grad_norm

    def p_sft(self) -> float:
        if self.g_warmup is None:
            raise RuntimeError("SASR: choose() before the warm-up recorded its gradient norm")
        denominator = self.g_last + self.gamma * self.g_warmup
        return self.g_last / denominator if denominator > 0 else 0.0

    def choose(self) -> str:
        return "sft" if self.rng.random() < self.p_sft() else "grpo"

    def record_sft(self, grad_norm: float) -> None:
        self.g_last = grad_norm


def grad_norm(params) -> float:
    """L2 norm over every gradient (what clip_grad_norm_ would measure)."""
    total = sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None)
    return math.sqrt(total)


class SASRModule(GRPOModule):
    """GRPOModule whose batches are either GRPO steps or SFT steps, as SASRSchedule says."""

    def __init__(self, *args, sft_rows: list[dict], **kwargs):
        super().__init__(*args, **kwargs)
        if not sft_rows:
            raise ValueError("rl.sasr: no SFT examples (the teacher kept no responses)")
        self.sft_rows = sft_rows
        self.schedule = SASRSchedule(self.cfg.sasr.gamma, self.seed)
        self.sft_order = item_stream(len(sft_rows), self.seed + 2)
        self.choices: list[str] = []

    def sft_step(self) -> dict:
        """One SFT step on the next sft_batch_size examples; returns its loss and gradient norm."""
        sasr = self.cfg.sasr
        rows = [self.sft_rows[next(self.sft_order)] for _ in range(sasr.sft_batch_size)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.pad_id
        batch = {k: v.to(self.device) for k, v in pad_collate(rows, pad).items()}
        opt = self.optimizers()
        for group in opt.param_groups:
            group["lr"] = sasr.sft_lr
        opt.zero_grad()
        loss = masked_lm_loss(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).logits, batch["labels"])
        guard_loss(float(loss.detach()), self.trainer.global_step + 1)
        self.manual_backward(loss)
        norm = grad_norm(self.model.parameters())
        opt.step()
        return {"loss": float(loss.detach()), "grad_norm": norm}

    def training_step(self, items, batch_idx):
        warmup = batch_idx < self.cfg.sasr.warmup_steps
        p = None if warmup else self.schedule.p_sft()
        kind = "sft" if warmup else self.schedule.choose()
        self.choices.append(kind)
        if kind == "grpo":
            for group in self.optimizers().param_groups:
                group["lr"] = self.cfg.lr
            super().training_step(items, batch_idx)
            self.history[-1].update({"kind": "grpo", "p_sft": p})
            return
        metrics = self.sft_step()
        if warmup:
            self.schedule.warmup(metrics["grad_norm"])  # the last warm-up step's norm is G_warmup
        else:
            self.schedule.record_sft(metrics["grad_norm"])
        self.history.append({"kind": "sft", "p_sft": p, "sft_loss": metrics["loss"],
                             "grad_norm": metrics["grad_norm"]})
        self.log("train/sft_loss", metrics["loss"], on_step=True, batch_size=len(items))
        self.log("train/grad_norm", metrics["grad_norm"], on_step=True, batch_size=len(items))


def train_sasr(cfg: RLConfig, model_dir, items: list[dict], reward_fn, build_messages, sft_examples: list[dict],
               out_dir, *, seed: int, logger=None, progress: bool = True) -> dict:
    """SASR on the model in `model_dir`: cfg.sasr.warmup_steps SFT steps on `sft_examples` ({"messages",
    "completion"}), then cfg.sasr.steps steps each SFT or GRPO (on `items`, rewarded by reward_fn). Saves an HF
    folder to out_dir; returns {"steps", "choices", "history", "tokens"}."""
    if not items:
        raise ValueError("rl: no items to train on")
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer, policy, ref_model = load_rl_models(cfg, model_dir)
    rows = [tokenize_example(tokenizer, e["messages"], e["completion"], cfg.sasr.max_length) for e in sft_examples]
    extra = item_stream(len(items), seed + 1)
    module = SASRModule(policy, tokenizer, reward_fn, build_messages, cfg, ref_model=ref_model, seed=seed,
                        draw=lambda n: [items[next(extra)] for _ in range(n)], sft_rows=rows)
    total = cfg.sasr.warmup_steps + cfg.sasr.steps
    batches = [[items[i] for i in idx] for idx in step_items(len(items), total, cfg.prompts_per_step, seed)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    with tempfile.TemporaryDirectory() as root, quiet_warnings():
        trainer = make_trainer(max_steps=total * cfg.num_iterations, max_epochs=1, grad_accum=1,
                               precision=cfg.precision, logger=logger, progress=progress, root_dir=root,
                               strategy="auto", devices=1, num_nodes=1)
        trainer.fit(module, train_dataloaders=loader)

    check_finite_weights(module.model, trainer.global_step)
    save_model_folder(module.model, tokenizer, out_dir, cfg.save_dtype)
    return {"steps": len(module.history), "choices": module.choices, "history": module.history,
            "tokens": module.tokens}
