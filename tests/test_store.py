"""The artifact store: atomic writes, digests, verified manifests, one writer per key, and rebuilding (never
trusting) missing, corrupt or edited artifacts."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from branchmerge.tasks.common import execute, make_job
from branchmerge.tasks.store import MANIFEST, Store, stable_hash


def _job(tmp_path, config=None, refresh=False):
    return make_job("demo/x", config or {"a": 1}, {}, "branchmerge.tasks.store", str(tmp_path), refresh)


def _build(calls):
    def build(job, out):
        calls.append(job.key)
        (out / "data.txt").write_text("hello " + json.dumps(job.config))
        (out / "sub").mkdir()
        (out / "sub" / "w.bin").write_bytes(os.urandom(1000))
        return {"n": 1}
    return build


def test_digest_is_hash_of_file_hashes(tmp_path):
    calls = []
    ref = execute(_job(tmp_path), _build(calls))
    files = {p: hashlib.sha256((tmp_path / "demo/x" / ref.key / p).read_bytes()).hexdigest()
             for p in ("data.txt", "sub/w.bin")}
    assert ref.digest == stable_hash({"files": files, "meta": {"n": 1}})  # content and meta, nothing else
    assert ref.status == "computed" and ref.meta == {"n": 1}
    assert json.loads((tmp_path / "demo/x" / ref.key / MANIFEST).read_text())["digest"] == ref.digest


def test_rerun_reuses_and_key_follows_config(tmp_path):
    calls = []
    first = execute(_job(tmp_path), _build(calls))
    again = execute(_job(tmp_path), _build(calls))
    assert len(calls) == 1 and again.status == "reused" and again.digest == first.digest
    other = execute(_job(tmp_path, {"a": 2}), _build(calls))
    assert len(calls) == 2 and other.key != first.key
    assert Store(tmp_path).is_valid("demo/x", first.key)  # the old artifact survives a config change


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "extra"])
def test_damaged_artifact_is_rebuilt(tmp_path, damage):
    calls = []
    ref = execute(_job(tmp_path), _build(calls))
    target = tmp_path / "demo/x" / ref.key / "sub" / "w.bin"
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":  # same size, same mtime: only the content hash can tell
        st = target.stat()
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        (target.parent / "stray.txt").write_text("?")
    assert not Store(tmp_path).is_valid("demo/x", ref.key)
    rebuilt = execute(_job(tmp_path), _build(calls))
    assert len(calls) == 2 and rebuilt.status == "computed"
    assert Store(tmp_path).is_valid("demo/x", ref.key)


def test_failed_build_leaves_previous_state(tmp_path):
    def boom(job, out):
        (out / "partial").write_text("x")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        execute(_job(tmp_path), boom)
    job = _job(tmp_path)
    assert not Store(tmp_path).path(job.stage, job.key).exists()
    assert not list((tmp_path / "demo/x").glob(".tmp-*"))


def test_refresh_recomputes(tmp_path):
    calls = []
    execute(_job(tmp_path), _build(calls))
    ref = execute(_job(tmp_path, refresh=True), _build(calls))
    assert len(calls) == 2 and ref.status == "computed"


# ----------------------------------------------------------------------------------------------- manifests


def _manifest(tmp_path, ref):
    return tmp_path / "demo/x" / ref.key / MANIFEST


@pytest.mark.parametrize("edit", ["meta", "digest", "no_files_key", "not_json", "list", "stage", "sha_type"])
def test_an_edited_or_malformed_manifest_means_rebuild(tmp_path, edit):
    calls = []
    ref = execute(_job(tmp_path), _build(calls))
    path = _manifest(tmp_path, ref)
    manifest = json.loads(path.read_text())
    if edit == "meta":  # a fake number in the report
        manifest["meta"]["n"] = 99
    elif edit == "digest":  # would feed a fake digest into downstream keys
        manifest["digest"] = "0" * 64
    elif edit == "no_files_key":
        del manifest["files"]
    elif edit == "list":
        manifest = [manifest]
    elif edit == "stage":
        manifest["stage"] = "other/stage"
    elif edit == "sha_type":
        manifest["files"]["data.txt"]["sha256"] = 5
    path.write_text("{not json" if edit == "not_json" else json.dumps(manifest))
    assert not Store(tmp_path).is_valid("demo/x", ref.key)
    rebuilt = execute(_job(tmp_path), _build(calls))
    assert len(calls) == 2 and rebuilt.status == "computed" and rebuilt.meta == {"n": 1}
    assert rebuilt.digest != "0" * 64 and Store(tmp_path).is_valid("demo/x", ref.key)


def test_a_read_only_store_still_verifies(tmp_path):
    ref = execute(_job(tmp_path), _build([]))
    (tmp_path / "demo/x" / f".{ref.key}.state.json").unlink()
    os.chmod(tmp_path / "demo/x", 0o555)
    try:
        assert Store(tmp_path).load("demo/x", ref.key).digest == ref.digest
    finally:
        os.chmod(tmp_path / "demo/x", 0o755)


# ----------------------------------------------------------------------------------------------- one writer


def test_two_threads_build_an_artifact_once(tmp_path):
    calls, refs = [], []

    def slow_build(job, out):
        calls.append(job.key)
        time.sleep(0.5)
        (out / "data.txt").write_text("x")
        return {}

    threads = [threading.Thread(target=lambda: refs.append(execute(_job(tmp_path), slow_build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.status for r in refs) == ["computed", "reused"] and refs[0].digest == refs[1].digest


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from branchmerge.tasks.store import Store
    store, key = Store(sys.argv[1]), sys.argv[2]
    with store.lock("demo/x", key):
        (store.root / "demo/x" / f".tmp-{key}-deadbeef").mkdir(parents=True)  # a half-written artifact
        print("locked", flush=True)
        time.sleep(600)
""")


def hold_lock(tmp_path, key):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), key],
                              cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_dead_writers_locks_are_taken_over_and_their_temp_folders_swept(tmp_path):
    job = _job(tmp_path)
    dead = [hold_lock(tmp_path, key) for key in (job.key, "0ther0key")]  # this key's writer, another key's
    live = hold_lock(tmp_path, "busykey")  # a writer at work on a third key
    try:
        for holder in dead:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        ref = execute(job, _build([]))  # would block forever if the dead writer's lock were still held
        assert ref.status == "computed"
        left = sorted(p.name for p in (tmp_path / "demo/x").glob(".tmp-*"))
        assert left == [".tmp-busykey-deadbeef"]  # the live writer's folder is not touched
    finally:
        live.kill()
        live.wait()


def test_a_live_writers_lock_is_waited_for(tmp_path):
    job = _job(tmp_path)
    store = Store(tmp_path)
    # flock is per open file: a second acquisition from another thread waits even in the same process
    t0 = time.perf_counter()
    with store.lock("demo/x", job.key):
        waiter = threading.Thread(target=lambda: execute(job, _build([])))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # blocked on our lock
    waiter.join()
    assert time.perf_counter() - t0 >= 0.5 and Store(tmp_path).is_valid("demo/x", job.key)


def test_a_model_with_non_finite_weights_is_never_sealed(tmp_path):
    import torch
    from safetensors.torch import save_file

    from branchmerge.tasks.common import StageError

    def nan_model(job, out):
        save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, out / "model.safetensors")
        return {}

    job = make_job("merge", {"a": 1}, {}, "branchmerge.tasks.store", str(tmp_path), False, hint="merge.parameters")
    with pytest.raises(StageError, match=r"merge: refusing to seal a model with non-finite weights "
                                         r"\(model.safetensors: b\); look at merge.parameters"):
        execute(job, nan_model)
    assert not Store(tmp_path).path("merge", job.key).exists() and not list((tmp_path / "merge").glob(".tmp-*"))
