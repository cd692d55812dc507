"""Content-addressed artifact store: every stage output lives in `<root>/<stage>/<key>/`.

A stage's key hashes its config section, the digests of its upstream artifacts and its code version, so the
same inputs always land in the same folder and a changed input lands in a new one (old artifacts survive).

Sealing: `_manifest.json` lists every file's sha256 and size plus the stage's `meta`; the artifact's digest is
the hash of both, and is stored in the manifest too. Verification recomputes that digest from the manifest and
checks every file: an edited meta or digest, a manifest of another shape, or a changed, missing or extra file
means "not there" (the caller rebuilds), never a crash and never a trusted lie. Re-hashing gigabytes each time
would cost seconds, so like DVC's state cache a side file keeps each file's stat signature (size, mtime, ctime,
inode: ctime no tool can set back) and only files whose signature changed are re-hashed.

Digests cover content only (no paths, no wall-clock times), so the same config gives the same digests in any
store on any machine. Writes go to a temp folder renamed into place; one writer per key at a time (an flock
that the kernel releases when its owner dies, so a crashed writer's lock is simply taken over, and its temp
folders are swept by the next one).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

MANIFEST = "_manifest.json"
log = logging.getLogger("branchmerge")


class ArtifactRef(BaseModel):
    """What a task returns: where the artifact is and what it contains, never the tensors themselves."""

    stage: str
    key: str
    path: str
    digest: str
    status: str = "computed"  # computed | reused
    seconds: float = 0.0  # what it took this time (building, or verifying for reuse)
    build_seconds: float | None = None  # what building it took, whenever that was (not part of its content)
    meta: dict[str, Any] = {}


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def artifact_key(stage: str, config: Any, upstream: dict[str, str], code: str) -> str:
    return stable_hash({"stage": stage, "config": config, "upstream": upstream, "code": code})[:20]


def artifact_digest(files: dict[str, str], meta: dict[str, Any]) -> str:
    """The digest of an artifact: its files' sha256 by relative path, and its meta."""
    return stable_hash({"files": files, "meta": meta})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_manifest(folder: Path, stage: str, key: str, meta: dict[str, Any]) -> dict[str, list[int]]:
    """Seal a folder; returns the stat signatures of what was hashed (renaming the folder keeps them)."""
    meta = json.loads(json.dumps(meta, default=str))  # what the manifest will hold, exactly
    entries, state = {}, {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        entries[rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
        state[rel] = _signature(p)
    digest = artifact_digest({k: v["sha256"] for k, v in entries.items()}, meta)
    manifest = {"stage": stage, "key": key, "digest": digest, "files": entries, "meta": meta}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return state


def read_manifest(folder: Path, stage: str | None = None, key: str | None = None) -> dict | None:
    """The folder's manifest if it is well formed and its digest matches its own files and meta (and it names
    `stage` / `key` when given); None otherwise. The files themselves are checked by Store.load."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
        sizes = {rel: int(entry["size"]) for rel, entry in manifest["files"].items()}
        meta, digest = manifest["meta"], manifest["digest"]
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in files.values()):
            return None
        if digest != artifact_digest(files, meta):
            return None
        if (stage is not None and manifest["stage"] != stage) or (key is not None and manifest["key"] != key):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"stage": manifest["stage"], "key": manifest["key"], "digest": digest, "files": files, "sizes": sizes,
            "meta": meta}


class Unavailable(RuntimeError):
    """Something the run needs from its surroundings (the store, the MLflow or Prefect server) cannot be used;
    the message names the setting that points at it. Raised before any compute."""


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
        manifest = verified_manifest(folder, stage, key)
        if manifest is None:
            return None
        build = _read_json(folder.parent / f".{key}.build.json").get("seconds")
        return ArtifactRef(stage=stage, key=key, path=str(folder), digest=manifest["digest"], status="reused",
                           build_seconds=build if isinstance(build, (int, float)) else None, meta=manifest["meta"])

    def check_writable(self) -> None:
        """Create the store folder and write and delete a probe file in it, or raise Unavailable naming
        run.store: a read-only or missing mount fails here, not after the first stage's minutes of work."""
        probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as err:
            raise Unavailable(f"run.store={str(self.root)!r} is not writable ({err.strerror or err}): point it at a "
                              "writable folder (BRANCHMERGE_STORE or run.store=...)") from None

    def is_valid(self, stage: str, key: str) -> bool:
        return self.load(stage, key) is not None

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold the key's lock: one writer per artifact across threads and processes. flock locks belong to an
        open file and die with their process, so a lock whose owner was killed is free at once. Yields True once
        held; with wait=False yields False at once if another writer holds it."""
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".lock-{key}", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                log.info("%s: waiting for another writer of %s", stage, key)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def sweep(self, stage: str, held: str) -> None:
        """Delete the temp and swapped-out folders writers of this stage left when they died: those of the key
        whose lock the caller holds (`held`), and of any other key whose lock nobody holds."""
        for debris in (self.root / stage).glob(".*-*-*"):
            kind, _, rest = debris.name[1:].partition("-")
            key = rest.rpartition("-")[0]
            if kind not in ("tmp", "old") or not key:
                continue
            if key == held:
                self._remove_debris(stage, debris)
                continue
            with self.lock(stage, key, wait=False) as free:
                if free:
                    self._remove_debris(stage, debris)

    @staticmethod
    def _remove_debris(stage: str, debris: Path) -> None:
        log.info("%s: removing %s left by a writer that died", stage, debris.name)
        shutil.rmtree(debris, ignore_errors=True)

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Yield a temp folder; on success it is sealed with a manifest (with `meta`, which the caller may fill
        while writing) and renamed to its key. Call with the key's lock held.

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
        """The sealed artifact's reference; its build time is kept beside it (the summary and a later reuse
        report it; it is no part of the content, so no digest depends on the machine)."""
        with contextlib.suppress(OSError):
            _write_json_atomic(self.root / stage / f".{key}.build.json", {"seconds": round(seconds, 3)})
        ref = self.load(stage, key)
        if ref is None:
            raise RuntimeError(f"artifact {stage}/{key} failed verification right after writing")
        return ref.model_copy(update={"status": "computed", "seconds": seconds})


def verified_manifest(folder: Path, stage: str | None = None, key: str | None = None,
                      stat_cache: bool = True) -> dict | None:
    """read_manifest, plus every file present with its size and hash (re-hashed only where its stat changed;
    every file when stat_cache is False, which also writes nothing beside the folder: DVC hashes its deps)."""
    manifest = read_manifest(folder, stage, key)
    if manifest is None:
        return None
    state_file = folder.parent / f".{folder.name}.state.json"
    state = _read_json(state_file) if stat_cache else {}
    try:
        on_disk = {p.relative_to(folder).as_posix() for p in _files(folder)}
        if on_disk != set(manifest["files"]):
            return None
        fresh_state = {}
        for rel, sha in manifest["files"].items():
            sig = _signature(folder / rel)
            if sig[0] != manifest["sizes"][rel]:
                return None
            if state.get(rel) != sig and file_sha256(folder / rel) != sha:
                return None
            fresh_state[rel] = sig
    except OSError:
        return None
    if stat_cache and fresh_state != state:
        with contextlib.suppress(OSError):  # the state file only saves time; a read-only store still verifies
            _write_json_atomic(state_file, fresh_state)
    return manifest


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def unique_run_dir(root: Path, name: str) -> Path:
    """runs/<time>-<name>-<n>: a new folder for each run, even for two started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / f"{stamp}-{name}" if n == 0 else root / f"{stamp}-{name}-{n}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder under {root}")
