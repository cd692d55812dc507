"""Supervised fine-tuning (SFT) of a causal LM on chat examples, as a Lightning module.

One example is {"messages": [...chat...], "completion": str}. The prompt is the chat template with the
generation prompt appended; the target is the completion plus the template's end-of-turn token. Only target
tokens count in the loss.

Public API:
    tokenize_example(tokenizer, messages, completion, max_length) -> {"input_ids", "labels"}
    masked_lm_loss(logits, labels) -> scalar loss
    model_inputs(model, batch) -> forward kwargs for a padded or a packed batch
    SFTModule(model, *, lr, betas, weight_decay, scheduler, warmup_ratio, total_steps, loss_impl)
    train_sft(model_dir, examples, out_dir, *, ...) -> dict
    save_model_folder(model, tokenizer, out_dir, save_dtype)

With packing=True, train_sft packs the tokenized examples into rows of at most max_length tokens
(models/packing.py: each example whole, position ids restarting, no attention across examples, first label of
each example masked); batch_size then counts packed rows. The loss stays the mean over all target tokens of the
batch, so it equals the unpacked loss over the same examples.

Not here yet (see DESIGN.md): chunked/fused linear cross-entropy, LoRA, resume from a checkpoint, PoFT loss.
DMT and curriculum stages are data schedules: call train_sft once per stage.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from kernels.linear_ce import shifted_linear_cross_entropy
from models.packing import IGNORE_INDEX, pack_examples, packed_collate, packed_model_inputs

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "constant_with_warmup")
LOSS_IMPLS = ("plain", "chunked")  # chunked: linear CE in token chunks (kernels/linear_ce.py)
PRECISIONS = ("32-true", "bf16-mixed")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------- data


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template writes right after an assistant message (e.g. "<|im_end|>" for ChatML).

    Found by rendering a conversation with a sentinel assistant reply and reading what follows it; trailing
    whitespace is dropped because generation stops at the end-of-turn token itself. Falls back to the EOS token
    for templates that write nothing after the reply.
    """
    sentinel = "\u2063SENTINEL\u2063"  # invisible separator: cannot collide with real template text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    after = rendered.split(sentinel, 1)[1].rstrip() if sentinel in rendered else ""
    # Llama-3 style templates may write several special tokens; keep only up to the first one's end.
    special = sorted((t for t in tokenizer.all_special_tokens if t and after.startswith(t)), key=len)
    if special:
        return special[-1]
    if after:
        return after
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither a chat template end-of-turn marker nor an eos_token")
    return tokenizer.eos_token


def tokenize_example(tokenizer, messages: list[dict], completion: str, max_length: int) -> dict:
    """Token ids and labels for one SFT example; labels are -100 on prompt tokens.

    Prompt and target are tokenized separately (as at inference, where the model continues the prompt's ids),
    so no BPE merge crosses the boundary. If prompt + target exceed max_length, tokens are dropped from the
    end of the completion (the prompt is kept whole); the end-of-turn token is then lost too. A prompt longer
    than max_length leaves no target token: all labels are -100 (train_sft drops such examples).
    """
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(completion + end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


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
    """Yields length-grouped batches; each pass over the data (epoch) reshuffles with seed + epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        # Count epochs ourselves: Lightning calls set_epoch only on samplers, not on batch samplers.
        batches = length_batches(self.lengths, self.batch_size, self.seed + self.epoch)
        self.epoch += 1
        return iter(batches)


def pad_collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch to its longest row (dynamic padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def model_inputs(model, batch: dict) -> dict:
    """Forward kwargs (without use_cache) for a pad_collate batch or a packed_collate batch (it has position_ids)."""
    if "position_ids" in batch:
        return packed_model_inputs(batch, model.config._attn_implementation, model.dtype)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def count_tokens(batch: dict) -> int:
    """Non-pad tokens in a padded or packed batch."""
    return batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())


# ----------------------------------------------------------------------------------------------- loss


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; mean over labels != -100.

    Computed in float32 whatever the logits' dtype. A batch without any target token gives 0 (not NaN).
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------- module


def make_optimizer(params, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases, norms and 1-D params are not decayed, as in HF/nanoGPT)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def make_scheduler(optimizer, *, scheduler: str, warmup_ratio: float, total_steps: int):
    """HF schedules: warmup steps = ceil(warmup_ratio * total_steps), linear from 0; then cosine to 0 or constant."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if scheduler == "constant_with_warmup":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ValueError(f"sft.scheduler={scheduler!r}: expected one of {SCHEDULERS}")


class SFTModule(L.LightningModule):
    """Masked next-token loss over any AutoModelForCausalLM; AdamW + per-step LR schedule.

    Logs train/loss, train/lr and train/tokens (cumulative non-pad tokens). `history` holds the mean loss of
    each optimizer step (over its accumulated micro-batches).
    """

    def __init__(self, model, *, lr, betas, weight_decay, scheduler, warmup_ratio, total_steps, loss_impl):
        super().__init__()
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"sft.loss_impl={loss_impl!r}: expected one of {LOSS_IMPLS}")
        self.model = model
        self.loss_impl = loss_impl
        self.hp = dict(lr=lr, betas=betas, weight_decay=weight_decay, scheduler=scheduler,
                       warmup_ratio=warmup_ratio, total_steps=total_steps)
        self.history: list[float] = []
        self.tokens = 0
        self.target_tokens = 0
        self._pending: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.tokens += count_tokens(batch)
        self.target_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self._pending.append(loss.item())
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens), on_step=True)
        return loss

    def loss(self, batch) -> torch.Tensor:
        """Masked next-token loss; "chunked" never materialises the [tokens, vocab] logits (kernels/linear_ce.py)."""
        if self.loss_impl == "plain":
            return masked_lm_loss(self.model(**model_inputs(self.model, batch), use_cache=False).logits,
                                  batch["labels"])
        hidden = self.model.get_decoder()(**model_inputs(self.model, batch), use_cache=False).last_hidden_state
        return shifted_linear_cross_entropy(hidden, self.model.get_output_embeddings().weight, batch["labels"])

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # All micro-batches of this step have run (Lightning calls this after the last one).
        self.history.append(sum(self._pending) / len(self._pending))
        self._pending = []

    def configure_optimizers(self):
        hp = self.hp
        opt = make_optimizer(self.model.parameters(), lr=hp["lr"], betas=hp["betas"], weight_decay=hp["weight_decay"])
        sched = make_scheduler(opt, scheduler=hp["scheduler"], warmup_ratio=hp["warmup_ratio"],
                               total_steps=hp["total_steps"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------- run


def save_model_folder(model, tokenizer, out_dir, save_dtype: str) -> Path:
    """Write an HF folder (safetensors, config, generation_config, tokenizer) in `save_dtype`."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}: expected one of {sorted(SAVE_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(SAVE_DTYPES[save_dtype]).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_trainer(*, max_steps: int, max_epochs: int, grad_accum: int, precision: str, logger, progress: bool,
                 root_dir: str) -> L.Trainer:
    """Lightning Trainer on the default accelerator: no checkpoints, no model summary, metrics logged every step."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return L.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=grad_accum, precision=precision,
        logger=logger if logger is not None else False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=root_dir,
    )


def load_for_training(model_dir):
    """float32 master weights (bf16 runs autocast), train mode (transformers 5 loads in eval mode)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def train_sft(model_dir, examples: list[dict], out_dir, *, lr: float, epochs: int, max_steps: int, batch_size: int,
              grad_accum: int, max_length: int, warmup_ratio: float, weight_decay: float, betas: tuple[float, float],
              scheduler: str, precision: str, seed: int, save_dtype: str, packing: bool,
              loss_impl: str, logger=None,
              progress: bool = True) -> dict:
    """Fine-tune the model in `model_dir` on `examples` ({"messages", "completion"}) and save it to `out_dir`.

    Stops after `epochs` passes or `max_steps` optimizer steps, whichever comes first (max_steps=-1: no step
    limit). packing: pack examples into rows of at most max_length tokens (batch_size then counts rows).
    Returns {"loss" (last step), "loss_history", "steps", "tokens", "target_tokens", "examples", "rows",
    "dropped", "wall_time_s"}; rows = training rows (packed rows, or examples when not packing).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sft.scheduler={scheduler!r}: expected one of {SCHEDULERS}")
    if max_steps == 0 or max_steps < -1 or epochs < 1:
        raise ValueError(f"sft.max_steps={max_steps}, sft.epochs={epochs}: need max_steps -1 or > 0 and epochs >= 1")
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [tokenize_example(tokenizer, e["messages"], e["completion"], max_length) for e in examples]
    kept = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
    if len(kept) < len(rows):
        log.warning("sft: dropped %d of %d examples whose prompt fills sft.max_length=%d",
                    len(rows) - len(kept), len(rows), max_length)
    if not kept:
        raise ValueError(f"sft: no example has a target token within max_length={max_length}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if packing:
        train_rows, collate = pack_examples(kept, max_length, seed), packed_collate
        fill = sum(len(r["input_ids"]) for r in kept) / (len(train_rows) * max_length)
        log.info("sft: packed %d examples into %d rows of sft.max_length=%d (%.0f%% full)", len(kept),
                 len(train_rows), max_length, 100 * fill)
    else:
        train_rows, collate = kept, pad_collate
    loader = torch.utils.data.DataLoader(
        train_rows, batch_sampler=LengthBatchSampler([len(r["input_ids"]) for r in train_rows], batch_size, seed),
        collate_fn=lambda b: collate(b, pad_id),
    )
    steps_per_epoch = math.ceil(len(loader) / grad_accum)  # Lightning steps on a partial accumulation at epoch end
    total_steps = epochs * steps_per_epoch if max_steps == -1 else min(max_steps, epochs * steps_per_epoch)

    module = SFTModule(load_for_training(model_dir), lr=lr, betas=betas, weight_decay=weight_decay,
                       scheduler=scheduler, warmup_ratio=warmup_ratio, total_steps=total_steps, loss_impl=loss_impl)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = make_trainer(max_steps=max_steps, max_epochs=epochs, grad_accum=grad_accum, precision=precision,
                               logger=logger, progress=progress, root_dir=root)
        trainer.fit(module, train_dataloaders=loader)

    save_model_folder(module.model, tokenizer, out_dir, save_dtype)
    return {
        "loss": module.history[-1], "loss_history": module.history, "steps": trainer.global_step,
        "tokens": module.tokens, "target_tokens": module.target_tokens, "examples": len(kept), "rows": len(train_rows),
        "dropped": len(rows) - len(kept), "wall_time_s": time.perf_counter() - start
    }
