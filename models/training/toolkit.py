"""What every trainer here shares (torchtune's training/): loading a model for training (LoRA, activation
checkpointing), SFT examples and their loss (SFT, SASR's SFT steps, DPO's sequences), AdamW and LR schedules, the
Lightning Trainer, resumable step checkpoints, memory hygiene, and the divergence guard. Trainers (sft.py,
grpo.py, dpo.py) import this; they never import each other, except SASR (sasr.py), which schedules GRPO's own
steps (grpo.GRPOModule) between SFT steps.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM
from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from branchmerge.models.data.packing import IGNORE_INDEX
from branchmerge.models.lm.chat import end_of_turn_text
from branchmerge.models.training import DivergedError
from branchmerge.models.training.config import LoraConfig

log = logging.getLogger(__name__)

CHECKPOINT = "last.ckpt"
FINGERPRINT = "run_fingerprint.txt"  # which run wrote the checkpoint beside it (run_fingerprint)


# ----------------------------------------------------------------------------------------------- SFT examples


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


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; mean over labels != -100.

    Computed in float32 whatever the logits' dtype. A batch without any target token gives 0 (not NaN).
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)



# ----------------------------------------------------------------------------------------------- model


def load_for_training(model_dir, *, lora: LoraConfig | None, gradient_checkpointing: bool):
    """float32 master weights (bf16 runs autocast), train mode (transformers 5 loads in eval mode); LoRA adapters
    when `lora` is given; activations recomputed in the backward pass when gradient_checkpointing."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (LoRA's frozen embeddings) and under autocast.
        # transformers 5.24 renamed gradient_checkpointing_enable (deprecated, it warns) to activation_checkpointing_*.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import get_peft_model

        with quiet_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            model = get_peft_model(model, peft_lora_config(lora))
    return model.train()


# Below this many shared tokens a batch is read whole: a second forward call costs more than it saves.
MIN_SHARED_PREFIX = 16


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading positions where every row has the same token and the same mask value, leaving each row at least one
    position of its own."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == attention_mask[:1]).all(0)
    return min(int(same.int().cumprod(0).sum()), input_ids.shape[1] - 1)


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None, *, shared_prefix: bool) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] (what the LM head projects), gradients included.

    shared_prefix: the leading tokens every row shares (the system prompt and few-shot turns of one task's
    examples: ~140 of ~230 tokens on the default experiment) are read once, as one row, and the rows read only
    their own rest against that prefix's KV cache, repeated. Causal attention makes every position's state equal to
    the whole-batch forward's (up to float rounding); the gradient reaching the prefix is the sum over the rows,
    as the repeat's backward gives. Needs a model without gradient checkpointing (transformers' checkpointed
    layers drop the KV cache) and position_ids or plain left-to-right positions."""
    decoder = model.get_decoder()
    rows, width = input_ids.shape
    if position_ids is None:
        # transformers' default positions (0..T-1 whatever the mask) are what a right-padded batch gets
        position_ids = torch.arange(width, device=input_ids.device).expand(rows, -1)
    shared = shared_prefix_len(input_ids, attention_mask) if shared_prefix and rows > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    from transformers import DynamicCache

    from branchmerge.models.lm.generation import cache_kwarg

    cache, kw = DynamicCache(config=model.config), cache_kwarg(decoder)
    head = decoder(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared],
                   position_ids=position_ids[:1, :shared], use_cache=True, **{kw: cache}).last_hidden_state
    cache.batch_repeat_interleave(rows)
    tail = decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask,
                   position_ids=position_ids[:, shared:], use_cache=True, **{kw: cache}).last_hidden_state
    return torch.cat([head.expand(rows, -1, -1), tail], dim=1)


def peft_lora_config(lora: LoraConfig):
    """conf/sft's lora settings as a peft LoraConfig."""
    from peft import LoraConfig as PeftLoraConfig

    target = lora.target_modules
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                          target_modules=target if isinstance(target, str) else list(target))


def trained_model(model):
    """The plain transformers model to save: LoRA adapters merged into the weights they adapt."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def check_finite_weights(model, step: int | None) -> None:
    """Raise DivergedError naming the first parameter with a NaN or infinite value."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DivergedError(f"non-finite weights in {name}", step)


# ----------------------------------------------------------------------------------------------- optimisation


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
    return get_constant_schedule_with_warmup(optimizer, warmup)


def progress_bar():
    """Lightning's progress bar (rich when installed, as Lightning picks) showing learning rates as 5.00e-05, not
    its 0.000, and without the logger's version number."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    class ProgressBar(RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return {k: f"{float(v):.2e}" if k.endswith("lr") else v for k, v in items.items()}

    return ProgressBar()


def make_trainer(*, max_steps: int, max_epochs: int, grad_accum: int, precision: str, logger, progress: bool,
                 root_dir: str, strategy: str, devices: int, num_nodes: int, callbacks: list | None = None
                 ) -> L.Trainer:
    """Lightning Trainer on the default accelerator: no model summary, metrics logged every step, no checkpoints
    but those of `callbacks` (StepCheckpoint). strategy auto: one process; ddp / fsdp: this process is one rank
    of devices x num_nodes that a launcher started (models/training/distributed.py), and Lightning joins them."""
    # Lightning logs "GPU available", "TPU available", a litlogger tip, the precision and why fit stopped at INFO,
    # each twice (its own handler and the root's): the stage's own log line says what ran
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return L.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=grad_accum, precision=precision,
        logger=logger if logger is not None else False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=root_dir, callbacks=[*(callbacks or []), *([progress_bar()] if progress else [])],
        **({} if strategy == "auto" else {"strategy": strategy, "devices": devices, "num_nodes": num_nodes}),
    )


@contextlib.contextmanager
def quiet_warnings():
    """Silence third-party warnings that say nothing to our users (the terminal stays quiet), while training."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data: no workers needed
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # GRPO's frozen reference model
        # torch 2.13 deprecated LeafSpec, which lightning 2.6 still uses; peft asks the deprecated
        # is_gradient_checkpointing of transformers 5.24: theirs to fix, nothing for a user to do
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*", FutureWarning)
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        yield


def guard_loss(loss: float, step: int) -> None:
    """Stop at the first non-finite loss (step: the optimizer step it belongs to, 1-based): a diverged run must
    fail, not be saved as a model full of NaN."""
    if not math.isfinite(loss):
        raise DivergedError(f"loss is {loss}", step)


# ----------------------------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------------------------- checkpoints


class StepCheckpoint(Callback):
    """Every `every` optimizer steps, a full Lightning checkpoint at dirpath/last.ckpt, replaced atomically (a
    kill while writing leaves the previous one whole). Written right after an optimizer step, never between the
    micro-batches of an accumulation, so the saved data position and the saved weights agree."""

    def __init__(self, dirpath, every: int, fingerprint: str, total_steps: int):
        self.dirpath, self.every, self.fingerprint, self.total_steps = Path(dirpath), every, fingerprint, total_steps
        self.saved = 0

    def on_train_start(self, trainer, pl_module):
        self.saved = trainer.global_step  # a resumed run does not rewrite the checkpoint it started from

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.saved or step % self.every or step >= self.total_steps:
            return  # (the last step's weights are saved as the model right after)
        tmp = self.dirpath / f".{CHECKPOINT}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / FINGERPRINT).write_text(self.fingerprint)
        trainer.save_checkpoint(tmp)  # every rank calls it (a collective); rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.dirpath / CHECKPOINT)
        self.saved = step


def run_fingerprint(settings: dict, rows: list[dict]) -> str:
    """Hash of the settings and the tokenized data: a checkpoint resumes only the run that wrote it."""
    blob = json.dumps({"settings": settings, "rows": rows}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """checkpoint_dir's last checkpoint if there is a readable one; refuses one written by a run with other
    settings or data. An unreadable one (a zero-filled or truncated file: the disk, not a kill, since writes are
    atomic) is deleted with a warning and training starts over."""
    path = checkpoint_dir / CHECKPOINT
    if not path.exists():
        return None
    saved = (checkpoint_dir / FINGERPRINT).read_text() if (checkpoint_dir / FINGERPRINT).exists() else None
    if saved != fingerprint:
        raise ValueError(f"{path} was written by another SFT run (settings, model or data differ: fingerprint "
                         f"{saved}, this run {fingerprint}); delete {checkpoint_dir} to start over")
    problem = unreadable_checkpoint(path)
    if problem:
        log.warning("sft: discarding unreadable checkpoint %s (%s); training starts over", path, problem)
        path.unlink()
        return None
    log.info("sft: resuming from %s", path)
    return path


def unreadable_checkpoint(path: Path) -> str | None:
    """Why torch.load could not read this checkpoint (None if it can): its zip container and every record's CRC
    are checked, which is what a torn or zero-filled file fails."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return f"record {bad} is corrupt" if bad else None


@torch.no_grad()
def group_losses(model, tokenizer, groups: dict[str, list[dict]], *, max_length: int, batch_size: int
                 ) -> dict[str, float]:
    """Each group's mean next-token loss over its examples' target tokens ({"messages", "completion"}, tokenized
    as SFT does), token-weighted within the group: what CLIMB's proxy runs and Aioli's mixing law read off the
    dev split. The model is put in eval mode for the measurement and back as it was.

    A batch holds one group's examples, so their common prefix (one task's system prompt and few-shot turns) is
    read once (decoder_hidden), and only target positions reach the LM head, chunked: full [rows, T, vocab]
    logits of 16 few-shot dev prompts were ~2 GB and most of a CLIMB proxy run's time."""
    from branchmerge.kernels.linear_ce import chunked_linear_logprobs

    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = model.get_output_embeddings()
    out = {}
    try:
        with torch.inference_mode():
            for name, examples in groups.items():
                rows = [tokenize_example(tokenizer, e["messages"], e["completion"], max_length) for e in examples]
                rows = sorted((r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])),
                              key=lambda r: len(r["input_ids"]))  # similar lengths together: less padding
                if not rows:
                    raise ValueError(f"group {name!r}: no example has a target token within max_length={max_length}")
                total, count = 0.0, 0
                for start in range(0, len(rows), batch_size):
                    batch = pad_collate(rows[start:start + batch_size], pad_id)
                    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"], shared_prefix=True)
                    labels = batch["labels"][:, 1:]
                    targets = labels != IGNORE_INDEX  # the prompt positions never reach the LM head
                    logps = chunked_linear_logprobs(hidden[:, :-1][targets].to(head.weight.dtype), head.weight,
                                                    labels[targets], bias=head.bias)
                    total -= float(logps.sum())
                    count += int(targets.sum())
                out[name] = total / count
    finally:
        model.train(was_training)
    return out
