"""Content-addressed artifact store: every stage output lives in `<root>/<stage>/<key>/`.

A stage's key hashes its config section, the digests of its upstream artifacts and its code version, so the
same inputs always land in the same folder and a changed input lands in a new one (old artifacts survive).
Writes go to a temp folder that is renamed into place, so a crash never leaves a half-written artifact under a
valid key. Each artifact carries `_manifest.json` with per-file sha256, size and mtime; reuse checks size and
mtime (and ctime, which no tool can set back) like DVC's state cache and rehashes only files whose stat changed, so verifying gigabytes of unchanged
weights costs milliseconds while a truncated, edited or deleted file is caught.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

MANIFEST = "_manifest.json"


class ArtifactRef(BaseModel):
    """What a task returns: where the artifact is and what it contains, never the tensors themselves."""

    stage: str
    key: str
    path: str
    digest: str
    status: str = "computed"  # computed | reused
    seconds: float = 0.0
    meta: dict[str, Any] = {}


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def code_version(*files: str | Path) -> str:
    """Hash of the source files a stage's result depends on: editing them invalidates the stage's cache."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode())
        h.update((root / f).read_bytes())
    return h.hexdigest()[:16]


def artifact_key(stage: str, config: Any, upstream: dict[str, str], code: str) -> str:
    return stable_hash({"stage": stage, "config": config, "upstream": upstream, "code": code})[:20]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, stage: str, key: str, meta: dict[str, Any]) -> dict[str, list[int]]:
    """Seal a folder; returns the stat signatures of what was hashed (renaming the folder keeps them)."""
    entries, state = {}, {}
    for p in _files(folder):
        st = p.stat()
        rel = p.relative_to(folder).as_posix()
        entries[rel] = {"sha256": file_sha256(p), "size": st.st_size}
        state[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    digest = stable_hash({k: v["sha256"] for k, v in entries.items()})
    manifest = {"stage": stage, "key": key, "digest": digest, "files": entries, "meta": meta,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return state


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def scratch(self, stage: str, key: str) -> Path:
        """A folder for a build's resumable state (training checkpoints): it outlives a crashed build, so the
        rerun under the same key resumes, and `execute` deletes it once the artifact is sealed."""
        return self.root / stage / f".scratch-{key}"

    def load(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact under this key if it is complete and intact, else None (then the caller rebuilds it)."""
        folder = self.path(stage, key)
        manifest = self._verified_manifest(folder)
        if manifest is None:
            return None
        return ArtifactRef(stage=stage, key=key, path=str(folder), digest=manifest["digest"], status="reused",
                           meta=manifest.get("meta", {}))

    def is_valid(self, stage: str, key: str) -> bool:
        return self._verified_manifest(self.path(stage, key)) is not None

    def _verified_manifest(self, folder: Path) -> dict | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        state_file = folder.parent / f".{folder.name}.state.json"
        state = _read_json(state_file)
        on_disk = {p.relative_to(folder).as_posix() for p in _files(folder)}
        if on_disk != set(manifest["files"]):
            return None
        fresh_state = {}
        for rel, want in manifest["files"].items():
            st = (folder / rel).stat()
            sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            if st.st_size != want["size"]:
                return None
            if state.get(rel) != sig and file_sha256(folder / rel) != want["sha256"]:
                return None
            fresh_state[rel] = sig
        if fresh_state != state:
            _write_json_atomic(state_file, fresh_state)
        return manifest

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Yield a temp folder; on success it is sealed with a manifest (with `meta`, which the caller may fill
        while writing) and renamed to its key.

        An existing artifact under the key (a corrupt one: valid ones are never rewritten) is moved aside and
        deleted only after the new one is in place.
        """
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            state = write_manifest(tmp, stage, key, meta)
            old = None
            if final.exists():
                old = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            _write_json_atomic(final.parent / f".{key}.state.json", state)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def sealed_ref(self, stage: str, key: str, seconds: float) -> ArtifactRef:
        ref = self.load(stage, key)
        assert ref is not None, f"artifact {stage}/{key} failed verification right after writing"
        return ref.model_copy(update={"status": "computed", "seconds": seconds})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
