"""SFT over several domains with Aioli's online mixture (sft.mixing=aioli): the mixed-data baseline whose
mixture over the domains is learned while it trains (models/data/aioli.py is the controller; this file drives it
from Lightning).

Each optimizer step draws its own batch: the schedule says which mixture the step samples from (a LearnParams
block: a smoothed one-hot on one domain, exact counts per domain as the reference's interleaved batches; a
training step: p, counts drawn from a multinomial), and when the per-domain losses must be measured, here on the
dev split's gold worked answers (models.training.toolkit.group_losses). Within a domain the examples are taken
in a seeded random order, reshuffled once all are used. The step's batch is built inside training_step rather
than by a DataLoader: Lightning fetches one batch ahead, and a batch drawn before the losses that decide its
mixture were measured would be a step late.

The run's steps are sft.epochs passes over the union or sft.max_steps, as train_sft counts them, cut to a
multiple of sft.aioli.rounds. Not resumable from a checkpoint (the schedule's state is not saved): a crash
retrains the baseline from the start. The proportions of every round go to MLflow (aioli/p/<domain>) and into
the model folder as aioli.json and aioli.png.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from transformers import AutoTokenizer

from branchmerge.models.data.aioli import AioliConfig, AioliSchedule, batch_counts, history_records, plot_proportions
from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.sft import SFTModule
from branchmerge.models.data.packing import IGNORE_INDEX
from branchmerge.models.lm.hf import save_model_folder
from branchmerge.models.training.toolkit import (check_finite_weights, group_losses, load_for_training, make_trainer,
                                                 pad_collate, quiet_warnings, tokenize_example, trained_model)

DEV_BATCH = 16  # dev prompts per forward when measuring the per-domain losses


def aioli_config(cfg: SFTConfig, groups: list[str], total_steps: int, seed: int) -> tuple[AioliConfig, int]:
    """The controller's settings for `total_steps` (cut to whole rounds) and the steps actually run."""
    a = cfg.aioli
    update_steps = total_steps // a.rounds
    lp = a.lp_rounds * len(groups) * a.lp_steps
    if update_steps <= lp:
        raise ValueError(f"sft.aioli: a round has {update_steps} steps ({total_steps} steps / sft.aioli.rounds="
                         f"{a.rounds}) but its LearnParams take sft.aioli.lp_rounds x domains x sft.aioli.lp_steps = "
                         f"{lp}: lower them or sft.aioli.rounds, or train longer")
    config = AioliConfig(groups=tuple(groups), eta=a.eta, lp_rounds=a.lp_rounds, lp_steps=a.lp_steps,
                         one_hot_factor=a.one_hot_factor, update_steps=update_steps, ema=a.ema, prior=None,
                         prior_steps=0, normalize_A=True, diagonal=False, seed=seed)
    return config, update_steps * a.rounds


class AioliSFTModule(SFTModule):
    """SFTModule whose batches the Aioli schedule draws (module docstring); the loss is SFTModule's."""

    def __init__(self, model, cfg: SFTConfig, schedule: AioliSchedule, pools: dict[str, list[dict]],
                 dev: dict[str, list[dict]], tokenizer, seed: int):
        super().__init__(model, cfg, schedule.n_rounds * schedule.config.update_steps)
        self.schedule, self.pools, self.dev, self.tokenizer = schedule, pools, dev, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rng = np.random.default_rng(seed)
        self.order = {g: [] for g in pools}  # the rest of each domain's current pass, in draw order

    def take(self, group: str, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order[group]:
                self.order[group] = [int(i) for i in self.rng.permutation(len(self.pools[group]))]
            out.append(self.pools[group][self.order[group].pop()])
        return out

    def training_step(self, step, batch_idx):
        schedule = self.schedule
        while schedule.needs_eval():
            schedule.record_losses(group_losses(self.model, self.tokenizer, self.dev, max_length=self.cfg.max_length,
                                                batch_size=DEV_BATCH))
        learn_params = schedule.phase == "learn_params"
        mixture = schedule.next_mixture()
        p = np.array([mixture[g] for g in self.pools])
        counts = batch_counts(p, self.cfg.batch_size) if learn_params else self.rng.multinomial(self.cfg.batch_size, p)
        rows = [r for g, c in zip(self.pools, counts) for r in self.take(g, int(c))]
        batch = {k: v.to(self.device) for k, v in pad_collate(rows, self.pad_id).items()}
        return super().training_step(batch, batch_idx)


def train_sft_aioli(cfg: SFTConfig, model_dir, groups: dict[str, list[dict]], dev: dict[str, list[dict]], out_dir,
                    *, seed: int, logger=None, progress: bool = True) -> dict:
    """Train the model in `model_dir` on `groups` (domain -> {"messages", "completion"} examples) with Aioli's
    mixture, the per-domain losses measured on `dev` (domain -> gold examples); save to `out_dir`. Returns
    train_sft's metrics plus "aioli" (the proportions per round and the schedule's step counts; A per round is in
    aioli.json)."""
    if set(dev) != set(groups):
        raise ValueError(f"sft.mixing=aioli: dev domains {sorted(dev)} differ from the training domains "
                         f"{sorted(groups)}")
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pools = {}
    for g, examples in groups.items():
        rows = [tokenize_example(tokenizer, e["messages"], e["completion"], cfg.max_length) for e in examples]
        pools[g] = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
        if not pools[g]:
            raise ValueError(f"sft.mixing=aioli: domain {g!r} has no example with a target token within "
                             f"sft.max_length={cfg.max_length}")
    n = sum(len(p) for p in pools.values())
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)  # train_sft's count over the union
    steps = steps if cfg.max_steps == -1 else min(cfg.max_steps, steps)
    config, steps = aioli_config(cfg, list(pools), steps, seed)
    schedule = AioliSchedule(config, steps)

    with tempfile.TemporaryDirectory() as root, quiet_warnings():
        model = load_for_training(model_dir, lora=cfg.lora if cfg.finetune == "lora" else None,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
        module = AioliSFTModule(model, cfg, schedule, pools, dev, tokenizer, seed)
        trainer = make_trainer(max_steps=steps, max_epochs=1, grad_accum=1, precision=cfg.precision, logger=logger,
                               progress=progress, root_dir=root,
                               strategy="auto", devices=1, num_nodes=1)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(range(steps), batch_size=None))
        final = trained_model(module.model)
    check_finite_weights(final, trainer.global_step)
    out_dir = Path(out_dir)
    records = history_records(schedule.history)
    if logger is not None:
        for rec in schedule.history:
            logger.log_metrics(rec.metrics(), step=rec.step)
    save_model_folder(final, tokenizer, out_dir, cfg.save_dtype)
    (out_dir / "aioli.json").write_text(json.dumps({"groups": list(pools), "rounds": records,
                                                    "counts": schedule.counts}, indent=1))
    plot_proportions(schedule.history, out_dir / "aioli.png")
    return {"loss": module.history[-1], "loss_history": module.history, "steps": trainer.global_step,
            "tokens": module.tokens, "target_tokens": module.target_tokens, "examples": n, "rows": n,
            "dropped": sum(len(e) for e in groups.values()) - n, "resumed_from_step": 0,
            "aioli": {"proportions": [r["proportions"] for r in records], "counts": schedule.counts}}
