"""The artifact store: atomic writes, digests, and rebuilding (never trusting) missing or corrupt artifacts."""
import hashlib
import json
import os

import pytest

from tasks.common import execute, make_job
from tasks.store import MANIFEST, Store, stable_hash


def _job(tmp_path, config=None, refresh=False):
    return make_job("demo/x", config or {"a": 1}, {}, ["tasks/store.py"], str(tmp_path), refresh)


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
    assert ref.digest == stable_hash(files)
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
