"""Supervised fine-tuning (SFT) of a causal LM on chat examples, as a Lightning module.

One example is {"messages": [...chat...], "completion": str}. The prompt is the chat template with the
generation prompt appended; the target is the completion plus the template's end-of-turn token. Only target
tokens count in the loss.

Public API:
    tokenize_example(tokenizer, messages, completion, max_length) -> {"input_ids", "labels"}
    masked_lm_loss(logits, labels) -> scalar loss
    model_inputs(model, batch) -> forward kwargs for a padded or a packed batch
    SFTModule(model, cfg, total_steps)
    train_sft(cfg, model_dir, examples, out_dir, *, seed, ...) -> dict

Every setting comes from one SFTConfig (models/training/config.py, conf/sft/). With packing=True, train_sft
packs the tokenized examples into rows of at most max_length tokens
(models/data/packing.py: each example whole, position ids restarting, no attention across examples, first label of
each example masked); batch_size then counts packed rows. The loss stays the mean over all target tokens of the
batch, so it equals the unpacked loss over the same examples.

finetune="lora" trains peft LoRA adapters (lora: r, alpha, dropout, target_modules) and saves the model with the
adapters merged in, so every branch is a plain HF folder the merge stage reads like any other.

Resume: with a checkpoint_dir, a Lightning checkpoint (model, optimizer, scheduler, loop and data-order state)
is written atomically every checkpoint_every optimizer steps; a later call with the same checkpoint_dir resumes
from it and ends with the weights an uninterrupted run would have (the batch sampler restores its epoch and
position, so the same batches follow). At most one checkpoint interval of work is lost.

loss="poft" (PoFT, Fan et al. 2024): -log sigmoid(r_model(x, y) - r_ref(x, y)) averaged over examples, with r
the log-likelihood of the target tokens under the trained and a fixed reference model (reference_dir, scored
once before training). poft_length_normalize=True divides each r by its number of target tokens (a per-token mean,
so long answers are not favoured for being long; the reference may tokenize differently); False uses the sum.
The gradient is the example's cross-entropy gradient weighted by sigmoid(r_ref - r_model): examples the model
already rates above the reference count less.

DMT and curriculum stages are data schedules over train_sft calls: models/training/recipes.py.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.kernels.linear_ce import chunked_linear_logprobs, shifted_linear_cross_entropy
from branchmerge.models.data.packing import IGNORE_INDEX, pack_examples, packed_collate, packed_model_inputs
from branchmerge.models.lm.hf import save_model_folder
from branchmerge.models.training import distributed
from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.toolkit import (  # noqa: F401  (tokenize_example etc.: sft's API too)
    StepCheckpoint,
    masked_lm_loss,
    pad_collate,
    tokenize_example,
    check_finite_weights,
    decoder_hidden,
    guard_loss,
    load_for_training,
    make_optimizer,
    make_scheduler,
    make_trainer,
    quiet_warnings,
    release_freed_memory,
    resumable_checkpoint,
    run_fingerprint,
    trained_model,
)

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------- data


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar length (HF `group_by_length` style), in a seeded random order.

    Shuffle, cut into mega-batches of 50 batches, sort each by length, cut into batches, shuffle the batches:
    little padding, yet every epoch sees different batch compositions.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class LengthBatchSampler(torch.utils.data.Sampler):
    """Yields length-grouped batches; each pass over the data (epoch) reshuffles with seed + epoch.

    Its state is the epoch in progress and how many of its batches were handed out; load_state_dict makes the
    next pass resume there (what a resumed run needs to see the batches an uninterrupted run would).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        # shard = (rank, world): batch_size is the global batch; this rank yields rows rank, rank + world, ...
        # of each, or, when that share of a short last batch is empty, row -1 - i: row i without targets (Rows)
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world = shard
        self.epoch, self.served = 0, 0  # next pass's epoch; batches served in the current pass
        self._current = 0
        self._skip = 0

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        # Count epochs ourselves: Lightning calls set_epoch only on samplers, not on batch samplers.
        self._current, self.served, skip = self.epoch, self._skip, self._skip
        self.epoch, self._skip = self.epoch + 1, 0
        for batch in length_batches(self.lengths, self.batch_size, self.seed + self._current)[skip:]:
            self.served += 1
            yield batch[self.rank::self.world] or [-1 - batch[0]]

    def state_dict(self) -> dict:
        return {"epoch": self._current, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        epoch, served = state["epoch"], state["served"]
        if served >= len(self):  # saved at an epoch's last batch: the next pass is the next epoch
            epoch, served = epoch + 1, 0
        self.epoch, self._skip = epoch, served


class Rows(torch.utils.data.Dataset):
    """Training rows by index; index -1 - i is row i with every label masked: a rank's stand-in when its share of
    a short last batch is empty (it trains nothing, but joins the step's collectives)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if i >= 0:
            return self.rows[i]
        row = self.rows[-1 - i]
        return row | {"labels": [IGNORE_INDEX] * len(row["labels"])}


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader whose state (its batch sampler's) Lightning saves in checkpoints and restores on resume."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def model_inputs(model, batch: dict) -> dict:
    """Forward kwargs (without use_cache) for a pad_collate batch or a packed_collate batch (it has position_ids)."""
    if "position_ids" in batch:
        return packed_model_inputs(batch, model.config._attn_implementation, model.dtype)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def count_tokens(batch: dict) -> int:
    """Non-pad tokens in a padded or packed batch."""
    return batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())


# ----------------------------------------------------------------------------------------------- loss


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t + 1] | logits[:, t]) in float32, [B, T - 1]; 0 where the label is -100."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    picked = torch.gather(logits, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked - torch.logsumexp(logits, -1), 0.0)


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """Per-row target log-likelihood [B] from target_logprobs: the sum, or the mean over target tokens."""
    total = token_logps.sum(-1)
    if not length_normalize:
        return total
    return total / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)


def poft_loss(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """PoFT: mean over examples of -log sigmoid(r_model - r_ref)."""
    return F.softplus(ref_logps - logps).mean()


@torch.no_grad()
def reference_logps(reference_dir, examples: list[dict], *, max_length: int, length_normalize: bool,
                    batch_size: int) -> list[float]:
    """The reference model's r(x, y) for each example, with its own tokenizer (scored once, before training)."""
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenize_example(tokenizer, e["messages"], e["completion"], max_length) for e in examples]
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = pad_collate(rows[start : start + batch_size], pad_id)
        logits = model(**model_inputs(model, batch), use_cache=False).logits
        out += sequence_logps(target_logprobs(logits, batch["labels"]), batch["labels"], length_normalize).tolist()
    return out


# ----------------------------------------------------------------------------------------------- module


class SFTModule(L.LightningModule):
    """Masked next-token loss over any AutoModelForCausalLM; AdamW + per-step LR schedule.

    Logs train/loss, train/lr and train/tokens (cumulative non-pad tokens). `history` holds the mean loss of
    each optimizer step (over its accumulated micro-batches).
    """

    def __init__(self, model, cfg: SFTConfig, total_steps: int):
        super().__init__()
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.resumed_from_step = 0
        self.history: list[float] = []
        self.tokens = 0
        self.target_tokens = 0
        self._pending: list[float] = []

    def training_step(self, batch, batch_idx):
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        tokens = count_tokens(batch) if targets else 0  # a stand-in row (Rows) is not data
        if self.trainer.world_size == 1:
            loss = self.loss(batch)
            value = loss.item()
        else:
            loss, value, tokens, targets = self.sharded_loss(batch, tokens, targets)
        guard_loss(value, self.trainer.global_step + 1)  # before this step's update, not after
        self.tokens += tokens
        self.target_tokens += targets
        self._pending.append(value)
        self.log("train/loss", value, on_step=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens), on_step=True)
        return loss

    def sharded_loss(self, batch, tokens: int, targets: int) -> tuple[torch.Tensor, float, int, int]:
        """This rank's share of the global batch's loss (models/training/distributed.py): the loss is a mean over
        target tokens (nll) or rows (poft), so rank r's is scaled by its count n_r over the global count N, times
        the world size W that DDP's gradient average divides by: sum_r n_r L_r / N, the one-process mean.
        Returns (that loss, the global mean, and the global token and target-token counts)."""
        world = self.trainer.world_size
        n = targets if self.cfg.loss == "nll" else int((batch["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum())
        if n:
            local = self.loss(batch)
        else:  # nothing to learn here: a zero loss that still reaches every trainable weight (DDP's buckets)
            local = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        stats = torch.tensor([float(n), local.item() * n, float(tokens), float(targets)], dtype=torch.float64)
        total, loss_sum, all_tokens, all_targets = self.trainer.strategy.reduce(stats, reduce_op="sum").tolist()
        return local * (n * world / total), loss_sum / total, int(all_tokens), int(all_targets)

    def loss(self, batch) -> torch.Tensor:
        """Masked next-token loss (or PoFT); "chunked" never materialises the [tokens, vocab] logits
        (kernels/linear_ce.py)."""
        if self.cfg.loss == "poft":
            r = sequence_logps(self.token_logps(batch), batch["labels"], self.cfg.poft_length_normalize)
            return poft_loss(r, batch["ref_logps"].to(r.device))
        if self.cfg.loss_impl == "plain":
            return masked_lm_loss(self.model(**model_inputs(self.model, batch), use_cache=False).logits,
                                  batch["labels"])
        return shifted_linear_cross_entropy(self.hidden(batch), self.model.get_output_embeddings().weight,
                                            batch["labels"])

    def hidden(self, batch) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H]: what the LM head would project (with shared_prefix, the
        prefix the rows share read once: toolkit.decoder_hidden)."""
        if self.cfg.shared_prefix and "position_ids" not in batch:
            return decoder_hidden(self.model, batch["input_ids"], batch["attention_mask"], shared_prefix=True)
        return self.model.get_decoder()(**model_inputs(self.model, batch), use_cache=False).last_hidden_state

    def token_logps(self, batch) -> torch.Tensor:
        """target_logprobs of the batch under the model being trained, [B, T - 1]."""
        if self.cfg.loss_impl == "plain":
            return target_logprobs(self.model(**model_inputs(self.model, batch), use_cache=False).logits,
                                   batch["labels"])
        return chunked_linear_logprobs(self.hidden(batch)[:, :-1], self.model.get_output_embeddings().weight,
                                       batch["labels"][:, 1:])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["branchmerge"] = {"history": self.history, "tokens": self.tokens,
                                     "target_tokens": self.target_tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint["branchmerge"]
        self.history, self.tokens, self.target_tokens = saved["history"], saved["tokens"], saved["target_tokens"]
        self.resumed_from_step = checkpoint["global_step"]

    def on_before_backward(self, loss):
        release_freed_memory()  # the forward's temporaries, before the backward's peak

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        release_freed_memory()
        # All micro-batches of this step have run (Lightning calls this after the last one).
        self.history.append(sum(self._pending) / len(self._pending))
        self._pending = []

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        sched = make_scheduler(opt, scheduler=cfg.scheduler, warmup_ratio=cfg.warmup_ratio,
                               total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------- run


def train_sft(cfg: SFTConfig, model_dir, examples: list[dict], out_dir, *, seed: int, reference_dir=None,
              checkpoint_dir=None, logger=None, progress: bool = True) -> dict:
    """Fine-tune the model in `model_dir` on `examples` ({"messages", "completion"}) as `cfg` says; save to `out_dir`.

    Stops after cfg.epochs passes or cfg.max_steps optimizer steps, whichever comes first. checkpoint_dir +
    cfg.checkpoint_every > 0: resumable checkpoints (see the module docstring); a run that finds one there resumes
    from it. cfg.loss="poft" needs reference_dir (the reference model's folder). Raises DivergedError at the first
    non-finite loss, or if the trained weights are not finite, before anything is saved.
    Returns {"loss" (last step), "loss_history", "steps", "tokens", "target_tokens", "examples", "rows",
    "dropped", "resumed_from_step"}; rows = training rows (packed rows, or examples when not packing).
    """
    if cfg.loss == "poft" and reference_dir is None:
        raise ValueError("sft.loss='poft' needs a reference model (sft.poft_reference)")
    if cfg.strategy != "auto" and not distributed.launched():  # this process launches the ranks, which come back
        return distributed.launch(cfg, model_dir, examples, out_dir, seed=seed, reference_dir=reference_dir,
                                  checkpoint_dir=checkpoint_dir, logger=logger, progress=progress)
    rank, world = distributed.world()
    # What a checkpoint must agree with to be resumed (with the tokenized data).
    settings = cfg.model_dump(mode="json", exclude={"checkpoint_every"}) | {
        "seed": seed, "model": str(model_dir), "reference": str(reference_dir)}
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [tokenize_example(tokenizer, e["messages"], e["completion"], cfg.max_length) for e in examples]
    kept = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
    if len(kept) < len(rows):
        log.warning("sft: dropped %d of %d examples whose prompt fills sft.max_length=%d",
                    len(rows) - len(kept), len(rows), cfg.max_length)
    if not kept:
        raise ValueError(f"sft: no example has a target token within sft.max_length={cfg.max_length}")
    if cfg.loss == "poft":
        kept_examples = [e for e, r in zip(examples, rows) if any(x != IGNORE_INDEX for x in r["labels"][1:])]
        ref = reference_logps(reference_dir, kept_examples, max_length=cfg.max_length,
                              length_normalize=cfg.poft_length_normalize, batch_size=cfg.batch_size)
        kept = [r | {"ref_logp": x} for r, x in zip(kept, ref)]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.packing:
        train_rows, collate = pack_examples(kept, cfg.max_length, seed), packed_collate
        fill = sum(len(r["input_ids"]) for r in kept) / (len(train_rows) * cfg.max_length)
        log.info("sft: packed %d examples into %d rows of sft.max_length=%d (%.0f%% full)", len(kept),
                 len(train_rows), cfg.max_length, 100 * fill)
    else:
        train_rows, collate = kept, pad_collate
    loader = ResumableLoader(
        Rows(train_rows), collate_fn=lambda b: collate(b, pad_id),
        batch_sampler=LengthBatchSampler([len(r["input_ids"]) for r in train_rows], cfg.batch_size * world, seed,
                                         shard=(rank, world)),
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)  # Lightning steps on a partial accumulation
    total_steps = (cfg.epochs * steps_per_epoch if cfg.max_steps == -1
                   else min(cfg.max_steps, cfg.epochs * steps_per_epoch))

    callbacks, resume = [], None
    if checkpoint_dir is not None and cfg.checkpoint_every > 0:
        fingerprint = run_fingerprint(settings, train_rows)
        callbacks.append(StepCheckpoint(checkpoint_dir, cfg.checkpoint_every, fingerprint, total_steps))
        resume = resumable_checkpoint(Path(checkpoint_dir), fingerprint)

    with tempfile.TemporaryDirectory() as root, quiet_warnings():
        model = load_for_training(model_dir, lora=cfg.lora if cfg.finetune == "lora" else None,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
        module = SFTModule(model, cfg, total_steps)
        trainer = make_trainer(max_steps=cfg.max_steps, max_epochs=cfg.epochs, grad_accum=cfg.grad_accum,
                               precision=cfg.precision, logger=logger, progress=progress, root_dir=root,
                               callbacks=callbacks, strategy=cfg.strategy, devices=cfg.devices,
                               num_nodes=cfg.num_nodes)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
        final = trained_model(module.model)
    check_finite_weights(final, trainer.global_step)
    if rank == 0:  # every rank holds the same weights (DDP); one writes them
        save_model_folder(final, tokenizer, out_dir, cfg.save_dtype)
    return {
        "loss": module.history[-1], "loss_history": module.history, "steps": trainer.global_step,
        "tokens": module.tokens, "target_tokens": module.target_tokens, "examples": len(kept), "rows": len(train_rows),
        "dropped": len(rows) - len(kept), "resumed_from_step": module.resumed_from_step,
    }
