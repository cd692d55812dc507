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

DMT and curriculum stages are data schedules over train_sft calls: models/sft_recipes.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from kernels.linear_ce import chunked_linear_logprobs, shifted_linear_cross_entropy
from models.packing import IGNORE_INDEX, pack_examples, packed_collate, packed_model_inputs

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "constant_with_warmup")
LOSS_IMPLS = ("plain", "chunked")  # chunked: linear CE in token chunks (kernels/linear_ce.py)
PRECISIONS = ("32-true", "bf16-mixed")
FINETUNES = ("full", "lora")
LOSSES = ("nll", "poft")
CHECKPOINT = "last.ckpt"
FINGERPRINT = "run_fingerprint.txt"  # which run wrote the checkpoint beside it (run_fingerprint)
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
    """Yields length-grouped batches; each pass over the data (epoch) reshuffles with seed + epoch.

    Its state is the epoch in progress and how many of its batches were handed out; load_state_dict makes the
    next pass resume there (what a resumed run needs to see the batches an uninterrupted run would).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
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
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._current, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        epoch, served = state["epoch"], state["served"]
        if served >= len(self):  # saved at an epoch's last batch: the next pass is the next epoch
            epoch, served = epoch + 1, 0
        self.epoch, self._skip = epoch, served


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader whose state (its batch sampler's) Lightning saves in checkpoints and restores on resume."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


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
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if "ref_logp" in rows[0]:  # PoFT: the reference model's r(x, y) per example
        batch["ref_logps"] = torch.tensor([r["ref_logp"] for r in rows], dtype=torch.float32)
    return batch


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


def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to release
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory that CPU tensors freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc serves allocations under 32 MB (most activations) from heaps it keeps after they are freed, so a CPU
    step's peak RSS also held the previous phase's free memory: trimming before the backward and after the
    optimizer step lowered SmolLM2's peak by 0.5 GB at no measurable time (bench/sft_vs_trl.py).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def make_optimizer(params, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases, norms and 1-D params are not decayed, as in HF/nanoGPT)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel per parameter group instead of a dozen elementwise ops per tensor (CPU and CUDA); ~0.2 s
    # of a SmolLM2-135M step on CPU (bench/sft_vs_trl.py); float32 / bfloat16 parameters only.
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


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

    def __init__(self, model, *, lr, betas, weight_decay, scheduler, warmup_ratio, total_steps, loss_impl,
                 loss="nll", poft_length_normalize=True):
        super().__init__()
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"sft.loss_impl={loss_impl!r}: expected one of {LOSS_IMPLS}")
        if loss not in LOSSES:
            raise ValueError(f"sft.loss={loss!r}: expected one of {LOSSES}")
        self.model = model
        self.loss_impl = loss_impl
        self.loss_name, self.poft_length_normalize = loss, poft_length_normalize
        self.resumed_from_step = 0
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
        """Masked next-token loss (or PoFT); "chunked" never materialises the [tokens, vocab] logits
        (kernels/linear_ce.py)."""
        if self.loss_name == "poft":
            r = sequence_logps(self.token_logps(batch), batch["labels"], self.poft_length_normalize)
            return poft_loss(r, batch["ref_logps"].to(r.device))
        if self.loss_impl == "plain":
            return masked_lm_loss(self.model(**model_inputs(self.model, batch), use_cache=False).logits,
                                  batch["labels"])
        return shifted_linear_cross_entropy(self.hidden(batch), self.model.get_output_embeddings().weight,
                                            batch["labels"])

    def hidden(self, batch) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H]: what the LM head would project."""
        return self.model.get_decoder()(**model_inputs(self.model, batch), use_cache=False).last_hidden_state

    def token_logps(self, batch) -> torch.Tensor:
        """target_logprobs of the batch under the model being trained, [B, T - 1]."""
        if self.loss_impl == "plain":
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


class StepCheckpoint(Callback):
    """Every `every` optimizer steps, a full Lightning checkpoint at dirpath/last.ckpt, replaced atomically (a
    kill while writing leaves the previous one whole). Written right after an optimizer step, never between the
    micro-batches of an accumulation, so the saved data position and the saved weights agree."""

    def __init__(self, dirpath, every: int, fingerprint: str):
        self.dirpath, self.every, self.fingerprint, self.saved = Path(dirpath), every, fingerprint, 0

    def on_train_start(self, trainer, pl_module):
        self.saved = trainer.global_step  # a resumed run does not rewrite the checkpoint it started from

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.saved or step % self.every or step >= pl_module.hp["total_steps"]:
            return  # (the last step's weights are saved as the model right after)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / FINGERPRINT).write_text(self.fingerprint)
        tmp = self.dirpath / f".{CHECKPOINT}.tmp"
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.dirpath / CHECKPOINT)
        self.saved = step


def make_trainer(*, max_steps: int, max_epochs: int, grad_accum: int, precision: str, logger, progress: bool,
                 root_dir: str, callbacks: list | None = None) -> L.Trainer:
    """Lightning Trainer on the default accelerator: no model summary, metrics logged every step, no checkpoints
    but those of `callbacks` (StepCheckpoint)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return L.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=grad_accum, precision=precision,
        logger=logger if logger is not None else False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=root_dir, callbacks=callbacks or [],
    )


def load_for_training(model_dir, *, finetune: str = "full", lora: dict | None = None,
                      gradient_checkpointing: bool = False):
    """float32 master weights (bf16 runs autocast), train mode (transformers 5 loads in eval mode); LoRA adapters
    when finetune="lora"; activations recomputed in the backward pass when gradient_checkpointing."""
    if finetune not in FINETUNES:
        raise ValueError(f"sft.finetune={finetune!r}: expected one of {FINETUNES}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (LoRA's frozen embeddings) and under autocast.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if finetune == "lora":
        model = with_lora(model, lora)
    return model.train()


LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def with_lora(model, lora: dict | None):
    """peft LoRA adapters on `lora["target_modules"]` ("all-linear": every linear layer but the LM head)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def lora_config(lora: dict | None):
    """conf/sft's lora settings as a peft LoraConfig, checked."""
    from peft import LoraConfig

    lora = dict(lora or {})
    if sorted(lora) != sorted(LORA_KEYS):
        raise ValueError(f"sft.lora={lora}: expected exactly the keys {', '.join(LORA_KEYS)}")
    if not (isinstance(lora["r"], int) and lora["r"] > 0):
        raise ValueError(f"sft.lora.r={lora['r']!r}: expected a positive integer")
    if not 0 <= lora["dropout"] < 1:
        raise ValueError(f"sft.lora.dropout={lora['dropout']!r}: expected a value in [0, 1)")
    target = lora["target_modules"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], task_type="CAUSAL_LM",
                      target_modules=target if isinstance(target, str) else list(target))


def trained_model(model):
    """The plain transformers model to save: LoRA adapters merged into the weights they adapt."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """checkpoint_dir's last checkpoint if there is one; refuses one written by a run with other settings or data."""
    if not (checkpoint_dir / CHECKPOINT).exists():
        return None
    saved = (checkpoint_dir / FINGERPRINT).read_text() if (checkpoint_dir / FINGERPRINT).exists() else None
    if saved != fingerprint:
        raise ValueError(f"{checkpoint_dir / CHECKPOINT} was written by another SFT run (settings, model or data "
                         f"differ: fingerprint {saved}, this run {fingerprint}); delete {checkpoint_dir} to start over")
    log.info("sft: resuming from %s", checkpoint_dir / CHECKPOINT)
    return checkpoint_dir / CHECKPOINT


def run_fingerprint(settings: dict, rows: list[dict]) -> str:
    """Hash of the settings and the tokenized data: a checkpoint resumes only the run that wrote it."""
    blob = json.dumps({"settings": settings, "rows": rows}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def train_sft(model_dir, examples: list[dict], out_dir, *, lr: float, epochs: int, max_steps: int, batch_size: int,
              grad_accum: int, max_length: int, warmup_ratio: float, weight_decay: float, betas: tuple[float, float],
              scheduler: str, precision: str, seed: int, save_dtype: str, packing: bool,
              loss_impl: str, finetune: str, lora: dict | None, gradient_checkpointing: bool, loss: str,
              poft_length_normalize: bool, checkpoint_every: int, reference_dir=None, checkpoint_dir=None,
              logger=None, progress: bool = True) -> dict:
    """Fine-tune the model in `model_dir` on `examples` ({"messages", "completion"}) and save it to `out_dir`.

    Stops after `epochs` passes or `max_steps` optimizer steps, whichever comes first (max_steps=-1: no step
    limit). packing: pack examples into rows of at most max_length tokens (batch_size then counts rows).
    checkpoint_dir + checkpoint_every > 0: resumable checkpoints (see the module docstring); a run that finds one
    there resumes from it. loss="poft" needs reference_dir (the reference model's folder).
    Returns {"loss" (last step), "loss_history", "steps", "tokens", "target_tokens", "examples", "rows",
    "dropped", "resumed_from_step", "wall_time_s"}; rows = training rows (packed rows, or examples when not packing).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sft.scheduler={scheduler!r}: expected one of {SCHEDULERS}")
    if max_steps == 0 or max_steps < -1 or epochs < 1:
        raise ValueError(f"sft.max_steps={max_steps}, sft.epochs={epochs}: need max_steps -1 or > 0 and epochs >= 1")
    if loss not in LOSSES:
        raise ValueError(f"sft.loss={loss!r}: expected one of {LOSSES}")
    if loss == "poft" and packing:
        raise ValueError("sft.loss='poft' scores whole examples: set sft.packing=false (packed rows are not "
                         "supported by the PoFT loss)")
    if loss == "poft" and reference_dir is None:
        raise ValueError("sft.loss='poft' needs a reference model (sft.poft_reference)")
    if checkpoint_every < 0:
        raise ValueError(f"sft.checkpoint_every={checkpoint_every}: expected 0 (no checkpoints) or a step count")
    if finetune not in FINETUNES:
        raise ValueError(f"sft.finetune={finetune!r}: expected one of {FINETUNES}")
    if finetune == "lora":
        lora_config(lora)  # a bad lora setting fails before any work
    settings = dict(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                    max_length=max_length, warmup_ratio=warmup_ratio, weight_decay=weight_decay, betas=list(betas),
                    scheduler=scheduler, precision=precision, seed=seed, packing=packing, loss_impl=loss_impl,
                    finetune=finetune, lora=lora if finetune == "lora" else None, loss=loss,
                    poft_length_normalize=poft_length_normalize, model=str(model_dir), reference=str(reference_dir))
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
    if loss == "poft":
        kept_examples = [e for e, r in zip(examples, rows) if any(x != IGNORE_INDEX for x in r["labels"][1:])]
        ref = reference_logps(reference_dir, kept_examples, max_length=max_length,
                              length_normalize=poft_length_normalize, batch_size=batch_size)
        kept = [r | {"ref_logp": x} for r, x in zip(kept, ref)]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if packing:
        train_rows, collate = pack_examples(kept, max_length, seed), packed_collate
        fill = sum(len(r["input_ids"]) for r in kept) / (len(train_rows) * max_length)
        log.info("sft: packed %d examples into %d rows of sft.max_length=%d (%.0f%% full)", len(kept),
                 len(train_rows), max_length, 100 * fill)
    else:
        train_rows, collate = kept, pad_collate
    loader = ResumableLoader(
        train_rows, batch_sampler=LengthBatchSampler([len(r["input_ids"]) for r in train_rows], batch_size, seed),
        collate_fn=lambda b: collate(b, pad_id),
    )
    steps_per_epoch = math.ceil(len(loader) / grad_accum)  # Lightning steps on a partial accumulation at epoch end
    total_steps = epochs * steps_per_epoch if max_steps == -1 else min(max_steps, epochs * steps_per_epoch)

    callbacks, resume = [], None
    if checkpoint_dir is not None and checkpoint_every > 0:
        fingerprint = run_fingerprint(settings, train_rows)
        callbacks.append(StepCheckpoint(checkpoint_dir, checkpoint_every, fingerprint))
        resume = resumable_checkpoint(Path(checkpoint_dir), fingerprint)

    model = load_for_training(model_dir, finetune=finetune, lora=lora, gradient_checkpointing=gradient_checkpointing)
    module = SFTModule(model, lr=lr, betas=betas, weight_decay=weight_decay, scheduler=scheduler,
                       warmup_ratio=warmup_ratio, total_steps=total_steps, loss_impl=loss_impl, loss=loss,
                       poft_length_normalize=poft_length_normalize)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = make_trainer(max_steps=max_steps, max_epochs=epochs, grad_accum=grad_accum, precision=precision,
                               logger=logger, progress=progress, root_dir=root, callbacks=callbacks)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)

    save_model_folder(trained_model(module.model), tokenizer, out_dir, save_dtype)
    return {
        "loss": module.history[-1], "loss_history": module.history, "steps": trainer.global_step,
        "tokens": module.tokens, "target_tokens": module.target_tokens, "examples": len(kept), "rows": len(train_rows),
        "dropped": len(rows) - len(kept), "resumed_from_step": module.resumed_from_step,
        "wall_time_s": time.perf_counter() - start,
    }
