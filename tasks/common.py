"""A stage run is a Job: its artifact's name, its cache key and its inputs. `execute` reuses or builds it.

Every stage module in tasks/ offers `needs(cfg, item)` (the artifacts it reads), `plan(cfg, item, refs) -> Job`
(cheap: no model is touched) and `build(job, out, logger) -> meta` (the work); tasks/registry.py lists them.
The flow, the DVC stage CLI and tests all go through `execute`, so caching behaves the same whoever runs a stage.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel

from branchmerge.models.training import DivergedError
from branchmerge.tasks.code import code_version
from branchmerge.tasks.store import ArtifactRef, Store, artifact_key

log = logging.getLogger("branchmerge")


class Job(BaseModel):
    stage: str                       # e.g. "sft/arithmetic": also the artifact's folder under the store
    key: str
    store: str
    refresh: bool
    config: dict[str, Any]           # the settings the build uses (hashed into the key, less what make_job drops)
    upstream: dict[str, ArtifactRef]  # the artifacts it reads (their digests are hashed into the key)
    hint: str = ""                   # the settings to look at if the build diverges


class StageError(RuntimeError):
    """A stage could not produce a sound artifact; the message names the stage, what went wrong and what to change."""


def make_job(stage: str, config: dict[str, Any], upstream: dict[str, ArtifactRef], code: str, store: str,
             refresh: bool, hint: str = "", key_config: dict[str, Any] | None = None) -> Job:
    """`code`: the stage module whose import closure versions the build (tasks/code.py). `key_config`: what of
    `config` shapes the artifact, when not all of it does (where a server is, how long to wait for it)."""
    key = artifact_key(stage, config if key_config is None else key_config, {k: v.digest for k, v in upstream.items()},
                       code_version(code))
    return Job(stage=stage, key=key, store=store, refresh=refresh, config=config, upstream=upstream, hint=hint)


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, `ulimit -f`
# how writers that are not Python's file objects say so: safetensors (Rust io::Error), torch.save's zip writer
NO_ROOM_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "StorageFull",
                "file write failed")


def out_of_room(err: BaseException) -> bool:
    """Whether a write failed for want of space, anywhere along the exception's chain."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno in NO_ROOM) or any(t in str(err) for t in NO_ROOM_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def execute(job: Job, build: Callable[[Job, Path], dict[str, Any]]) -> ArtifactRef:
    """The artifact of `job`: the stored one when it is intact (and no refresh is asked), else built by
    build(job, temp folder) -> meta under the key's lock and sealed. A build whose model weights are not finite
    is refused: nothing diverged is ever sealed."""
    store = Store(job.store)
    t0 = time.perf_counter()
    if not job.refresh and (ref := store.load(job.stage, job.key)) is not None:
        log.info("%s: reused %s", job.stage, ref.path)
        return ref.model_copy(update={"seconds": time.perf_counter() - t0})
    with store.lock(job.stage, job.key):
        if not job.refresh and (ref := store.load(job.stage, job.key)) is not None:  # built while we waited
            log.info("%s: reused %s (built by another run)", job.stage, ref.path)
            return ref.model_copy(update={"status": "reused", "seconds": time.perf_counter() - t0})
        store.sweep(job.stage, job.key)
        if store.path(job.stage, job.key).exists() and not job.refresh:
            log.warning("%s: artifact %s is incomplete or corrupt; rebuilding it", job.stage, job.key)
        log.info("%s: computing (key %s)", job.stage, job.key)
        meta: dict[str, Any] = {}
        try:
            with store.writer(job.stage, job.key, meta) as tmp:
                try:
                    meta.update(build(job, tmp))
                except DivergedError as err:
                    raise StageError(f"{job.stage}: training diverged: {err}"
                                     + (f"; look at {job.hint}" if job.hint else "")) from err
                refuse_nonfinite(job, tmp)
        except Exception as err:
            if not out_of_room(err):
                raise
            raise StageError(f"{job.stage}: no room left in the store to write it ({err}); nothing half-written "
                             f"was kept: free space under run.store={job.store!r} and rerun (what was sealed is "
                             "reused)") from err
        # Trainers, models and optimizer states sit in reference cycles (Lightning): free them before the next
        # stage loads its model, or a long run holds every stage's memory at once.
        gc.collect()
        ref = store.sealed_ref(job.stage, job.key, time.perf_counter() - t0)
        shutil.rmtree(store.scratch(job.stage, job.key), ignore_errors=True)
    log.info("%s: computed in %.1f s -> %s", job.stage, ref.seconds, ref.path)
    return ref


def refuse_nonfinite(job: Job, folder: Path) -> None:
    """Raise StageError if a safetensors file in the folder holds NaN or infinity."""
    bad = nonfinite_tensor(folder)
    if bad is not None:
        raise StageError(f"{job.stage}: refusing to seal a model with non-finite weights ({bad})"
                         + (f"; look at {job.hint}" if job.hint else ""))


def nonfinite_tensor(folder: Path) -> str | None:
    """'<file>: <tensor>' of the first floating-point tensor with a NaN or an infinity in the folder's safetensors
    files, else None. One tensor in memory at a time."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    import torch
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"{file.name}: {name}"
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
