"""run_merge: a mergekit-shaped config (config.py) -> a merged HF folder, streamed tensor by tensor.

Three phases, so a bad config costs nothing:
1. validate_config (config.py): the config alone (keys, method, parameter names and values, model counts);
2. plan (plan.py): safetensors headers only (tensor names, shapes, tied embeddings, per-tensor parameters);
3. merge (here): read each tensor from every model, merge in `dtype`, cast, write it into its place in the
   shards (their headers come from the plan) in a temp folder that is renamed into place at the end.
   `workers` tensors are merged at once; peak memory is about one tensor per input model per worker.
"""

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint, ShardWriter
from .config import MergeSpec, plain_data, validate_config
from .methods.base import MergeConfigError
from .plan import TensorJob, model_scope_trim, output_config, plan
from .vocab import Vocabulary, build_vocabulary, resolve_chat_template
from .values import tensor_generator

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)

MAX_SHARD_SIZE = 5_000_000_000  # mergekit's out_shard_size



def run_merge(
    config: Mapping, out_dir: str | os.PathLike, *, seed: int, max_shard_size: int = MAX_SHARD_SIZE,
    overwrite: bool = False, record: dict | None = None, workers: int = 2,
) -> dict:
    """Merge the models of a mergekit-style config into the HF folder `out_dir` (written atomically).

    `seed` drives DARE / DELLA masks: each tensor draws from a generator derived from (seed, tensor
    name). `record` replaces what merge_config.json records (default: the config and seed). `workers`
    tensors are merged at once (the output is the same for any number): torch's sort, which the trimming
    methods spend their time in, runs on one core per tensor, so two in flight use two cores; peak memory
    grows by one tensor per input model per extra worker.
    Returns {method, n_tensors, n_shards, seconds}.
    """
    start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers: expected >= 1; got {workers}")
    spec = validate_config(config)
    out_dir = Path(out_dir)
    out_real = out_dir.resolve()
    named_source = spec.tokenizer_source not in (None, "base", "union")
    for path in [*spec.inputs, *([spec.tokenizer_source] if named_source else [])]:
        # never replace what is being read, overwrite or not
        real = Path(path).resolve()
        if real == out_real or out_real in real.parents:
            raise MergeConfigError(f"output folder {out_dir} is {'' if real == out_real else 'a parent of '}the "
                                   f"input {path}: merging into it would destroy it; choose another output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    ckpts = [Checkpoint(p) for p in spec.inputs]
    if named_source and not Path(spec.tokenizer_source).is_dir():
        raise MergeConfigError(f"tokenizer_source: {spec.tokenizer_source!r} is neither 'base', 'union' nor a folder")
    vocab = build_vocabulary(spec, ckpts) if spec.tokenizer_source is not None else None
    rows = vocab.rows if vocab is not None else None
    jobs = model_scope_trim(spec, ckpts, plan(spec, ckpts, rows))
    log.info("merge %s: %d tensors from %d models", spec.method.name, len(jobs), len(ckpts))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would make the merged model unreadable to anyone else (umask applies here)
    layout = [(job.name, job.out_dtype, job.shape) for job in jobs]
    writer = None
    try:
        writer = ShardWriter(tmp, max_shard_size, layout)  # headers from the plan; tensors stream into place
        merged = _merged_in_order(spec, ckpts, jobs, seed, workers, vocab)
        for job, tensor in tqdm(zip(jobs, merged), total=len(jobs), desc=f"merge {spec.method.name}", unit="tensor"):
            writer.add(job.name, tensor)
        files = writer.finish()
        (tmp / "config.json").write_text(json.dumps(output_config(spec, ckpts, jobs, rows), indent=2) + "\n")
        ref = Path(spec.inputs[spec.reference])
        if (ref / "generation_config.json").exists():
            shutil.copy(ref / "generation_config.json", tmp)
        _write_tokenizer(spec, vocab, tmp)
        record = record if record is not None else {"config": plain_data(config), "seed": seed}
        (tmp / "merge_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"method": spec.method.name, "n_tensors": len(jobs), "n_shards": len(files),
            "seconds": round(time.perf_counter() - start, 3)}


def _write_tokenizer(spec: MergeSpec, vocab: Vocabulary | None, out: Path) -> None:
    """The reference's tokenizer files, copied as they are; re-saved by transformers when the vocabulary was
    built (tokenizer_source) or a chat_template is set (as mergekit does)."""
    tokenizer = vocab.tokenizer if vocab is not None else None
    if tokenizer is None and spec.chat_template is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.inputs[spec.reference])
    if tokenizer is None:
        ref = Path(spec.inputs[spec.reference])
        for file in TOKENIZER_FILES:
            if (ref / file).exists():
                shutil.copy(ref / file, out / file)
        return
    if spec.chat_template is not None:
        template = resolve_chat_template(spec)
        if template is not None:
            tokenizer.chat_template = template
    tokenizer.save_pretrained(out)


def _merged_in_order(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob], seed: int,
                     workers: int, vocab: Vocabulary | None = None) -> Iterator[torch.Tensor]:
    """Each job's output tensor, in job order, with up to `workers` tensors being merged at a time.

    Jobs are submitted ahead while the inputs of the not-yet-written ones fit in `workers` times the largest
    job's inputs, so one slow tensor (a sort over the embeddings) does not idle the other workers, and memory
    stays what `workers` jobs of the largest tensor would take.
    """
    def job_bytes(job: TensorJob) -> int:
        return sum(math.prod(ckpts[i].shape(src)) * (spec.dtype or ckpts[i].dtype(src)).itemsize
                   for i, src in zip(job.inputs, job.sources))

    sizes = [job_bytes(job) for job in jobs]
    budget = workers * max(sizes, default=0)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[Future, int]] = deque()
        queued = 0
        for job, size in zip(jobs, sizes):
            while pending and queued + size > budget:
                future, done = pending.popleft()
                queued -= done
                yield future.result()
            pending.append((pool.submit(_merge_tensor, spec, ckpts, job, seed, vocab), size))
            queued += size
        while pending:
            yield pending.popleft()[0].result()


def _merge_tensor(spec: MergeSpec, ckpts: list[Checkpoint], job: TensorJob, seed: int,
                  vocab: Vocabulary | None = None) -> torch.Tensor:
    if job.params is None:
        return ckpts[job.inputs[job.reference]].get(job.sources[job.reference])
    # Without a `dtype` key each tensor is merged in the dtype it is stored in, as mergekit does (bf16 checkpoints
    # merge in bf16; slerp and the like take their coefficients in float32 themselves).
    xs = [ckpts[i].get(src) if spec.dtype is None else ckpts[i].get(src).to(spec.dtype)
          for i, src in zip(job.inputs, job.sources)]
    if job.vocab:
        xs = vocab.align(xs, list(job.inputs))
    base = xs.pop(job.base) if job.base is not None else None
    out = spec.method.fn(base, xs, job.models, job.params, tensor_generator(seed, job.name))
    if tuple(out.shape) != job.shape:
        raise RuntimeError(
            f"{spec.method.name} returned shape {list(out.shape)} for {job.name}; expected {list(job.shape)}"
        )
    out = out.to(job.out_dtype)
    # A merge never writes NaN / inf its inputs did not hold (one pass over the output; the inputs are looked at
    # only when it fails): the folder is not published, nothing half-merged is left behind.
    if not bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for x in [*xs, base]
                                                   if x is not None):
        bad = int((~torch.isfinite(out)).sum())
        raise RuntimeError(f"{spec.method.name} produced {bad} non-finite value(s) in {job.name} from finite inputs "
                           f"(out_dtype {str(job.out_dtype).removeprefix('torch.')} overflow?); nothing was written")
    return out


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an existing folder is swapped out, then deleted."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
