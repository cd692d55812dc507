"""A stage run is a Job: its name, its cache key and its inputs. `execute` reuses or builds its artifact.

Every stage module in tasks/ offers `plan(...) -> Job` (cheap: no model is touched) and
`build(job, out_dir) -> meta` (the work). The flow, the DVC stage CLI and tests all go through `execute`,
so caching behaves the same whoever runs a stage.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel

from tasks.store import ArtifactRef, Store, artifact_key, code_version

log = logging.getLogger("branchmerge")


class Job(BaseModel):
    stage: str                       # e.g. "sft/arithmetic": also the artifact's folder under the store
    key: str
    store: str
    refresh: bool
    config: dict[str, Any]           # the settings the build uses (hashed into the key)
    upstream: dict[str, ArtifactRef]  # the artifacts it reads (their digests are hashed into the key)


def make_job(stage: str, config: dict[str, Any], upstream: dict[str, ArtifactRef], code_files: Iterable[str],
             store: str, refresh: bool) -> Job:
    key = artifact_key(stage, config, {k: v.digest for k, v in upstream.items()}, code_version(*code_files))
    return Job(stage=stage, key=key, store=store, refresh=refresh, config=config, upstream=upstream)


def execute(job: Job, build: Callable[[Job, Path], dict[str, Any]]) -> ArtifactRef:
    store = Store(job.store)
    t0 = time.perf_counter()
    if not job.refresh:
        ref = store.load(job.stage, job.key)
        if ref is not None:
            log.info("%s: reused %s", job.stage, ref.path)
            return ref.model_copy(update={"seconds": time.perf_counter() - t0})
        if store.path(job.stage, job.key).exists():
            log.warning("%s: artifact %s is incomplete or corrupt; rebuilding it", job.stage, job.key)
    log.info("%s: computing (key %s)", job.stage, job.key)
    meta: dict[str, Any] = {}
    with store.writer(job.stage, job.key, meta) as tmp:
        meta.update(build(job, tmp))
    # Trainers, models and optimizer states sit in reference cycles (Lightning): free them before the next
    # stage loads its model, or a long run holds every stage's memory at once.
    gc.collect()
    ref = store.sealed_ref(job.stage, job.key, time.perf_counter() - t0)
    shutil.rmtree(store.scratch(job.stage, job.key), ignore_errors=True)
    log.info("%s: computed in %.1f s -> %s", job.stage, ref.seconds, ref.path)
    return ref


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
