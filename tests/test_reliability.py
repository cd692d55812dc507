"""Reliability: what a SIGKILL in each stage, two runs of different configs on one store, and a store that is
read-only or full do to the artifacts. After each kill the rerun reuses everything sealed before, builds the
killed stage again from its inputs (resuming its checkpoint where it has one), and the chain ends with the same
bytes as a run that was never interrupted. (Bad input and unreachable endpoints: tests/test_bad_inputs.py; a Ray
worker killed mid-stage: tests/test_ray_runner.py.)"""
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from branchmerge.tasks.store import MANIFEST, Store

pytestmark = pytest.mark.slow  # the tiny pipeline, several times, in subprocesses

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = re.compile(r"[0-9a-f]{20}")

# Runs the pipeline CLI in this process after hooking `target` (a function or Class.method): its nth call made
# while `stage`'s build runs SIGKILLs the process (no cleanup of any kind: no finally, no atexit, no flush).
KILLER = textwrap.dedent("""
    import importlib, os, runpy, signal, sys, threading
    stage, target, nth, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.argv = ["branchmerge", *sys.argv[5:]]
    from branchmerge.tasks.registry import REGISTRY

    module, active = REGISTRY[stage].module, threading.Event()
    build = module.build

    def flagged(job, out, logger=None):
        active.set()
        try:
            return build(job, out, logger=logger)
        finally:
            active.clear()

    module.build = flagged
    path, attr = target.rsplit(".", 1)
    try:
        owner = importlib.import_module(path)
    except ModuleNotFoundError:
        mod, cls = path.rsplit(".", 1)
        owner = getattr(importlib.import_module(mod), cls)
    original, calls = getattr(owner, attr), [0]

    def hooked(*args, **kwargs):
        if active.is_set():
            calls[0] += 1
            if calls[0] == nth:
                with open(mark, "w") as f:
                    f.write(stage)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attr, hooked)
    runpy.run_module("branchmerge.flows.run", run_name="__main__")
""")

# (stage, what to hook, which call): mid-generation, mid-training (after a step and its checkpoint), mid-write
KILLS = [
    ("teacher", "branchmerge.models.lm.generation.next_tokens", 3),
    ("sft", "branchmerge.models.training.sft.SFTModule.training_step", 3),
    ("merge", "branchmerge.models.merging.checkpoint.ShardWriter.add", 5),
    ("rl", "branchmerge.models.training.grpo.GRPOModule.training_step", 2),
    ("eval", "branchmerge.models.lm.generation.next_tokens", 3),
]
TINY = ["experiment=tiny", "sft.checkpoint_every=1"]


def env_for(store: Path, tmp: Path) -> dict:
    return dict(os.environ, BRANCHMERGE_STORE=str(store), MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")


def run(store: Path, tmp: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "flows.run", *TINY, *overrides], cwd=ROOT, env=env_for(store, tmp),
                          capture_output=True, text=True, timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> dict:
    path = re.search(r"^summary:\s+(\S+)", proc.stdout, re.M)
    assert proc.returncode == 0 and path, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(Path(path.group(1)).read_text())


def digests(s: dict) -> dict[str, str]:
    return {name: rec["digest"] for name, rec in s["stages"].items()}


def sealed(store: Path) -> dict[str, str]:
    """Every artifact folder in the store (stage/key -> digest), each of which must verify: a folder under a
    key that does not is a half artifact."""
    out = {}
    for folder in store.rglob("*"):
        if folder.is_dir() and KEY.fullmatch(folder.name) and "runs" not in folder.parts:
            stage = str(folder.parent.relative_to(store))
            ref = Store(store).load(stage, folder.name)
            assert ref is not None, f"half artifact: {folder}"
            out[f"{stage}/{folder.name}"] = ref.digest
    return out


def assert_no_held_lock(store: Path) -> None:
    for lock in store.rglob(".lock-*"):
        with open(lock, "a+") as handle:  # a dead writer's flock went with its process
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The tiny pipeline, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    return summary(run(tmp / "store", tmp))


def test_sigkill_in_each_stage_then_rerun(reference, tmp_path):
    store, killed_before = tmp_path / "store", None
    for stage, target, nth in KILLS:
        mark, out = tmp_path / f"killed-{stage}", tmp_path / f"killed-{stage}.log"
        with open(out, "w") as log_file:  # a file, not a pipe: the killed run's orphans would hold a pipe open
            proc = subprocess.Popen([PY, "-c", KILLER, stage, target, str(nth), str(mark), *TINY], cwd=ROOT,
                                    env=env_for(store, tmp_path), stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            proc.wait(timeout=900)
        with contextlib.suppress(ProcessLookupError):  # the run's orphans (Prefect's temporary server) go too
            os.killpg(proc.pid, signal.SIGKILL)
        log = out.read_text()
        assert proc.returncode == -signal.SIGKILL and mark.read_text() == stage, log[-3000:]
        sealed(store)  # no half artifact anywhere
        assert_no_held_lock(store)
        if killed_before:  # this run rebuilt the stage the previous one killed; everything before it was reused
            assert re.search(rf"{killed_before}\S*: computing", log), log[-3000:]
        killed_before = stage
    final = summary(run(store, tmp_path))
    assert any(rec["status"] == "computed" for name, rec in final["stages"].items() if name.startswith("eval/"))
    assert {rec["status"] for name, rec in final["stages"].items() if not name.startswith(("eval/", "report"))} \
        == {"reused"}
    # the interrupted chain ends with the uninterrupted run's bytes, with no debris and nothing left RUNNING
    assert digests(final) == digests(reference)
    assert not [p for p in store.rglob(".tmp-*")] and not [p for p in store.rglob(".old-*")]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    running = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="attributes.status = 'RUNNING'")
    assert not running, [r.info.run_name for r in running]


def test_two_configs_at_once_on_one_store(reference, tmp_path):
    """Two different configs started together share the upstream stages: each is built once (the other waits
    on its lock, then reuses it) and both runs end with what they would have alone."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([PY, "-m", "flows.run", *TINY, *extra], cwd=ROOT, env=env_for(store, tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["merge=ties", "eval.max_new_tokens=6"])]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        results.append(summary(subprocess.CompletedProcess(p.args, p.returncode, out, err)))
    alone, other = results
    assert digests(alone) == digests(reference)
    shared = [name for name in alone["stages"] if name.startswith(("model/", "mix", "teacher", "sft/"))]
    for name in shared:
        assert other["stages"][name]["digest"] == alone["stages"][name]["digest"], name
        assert sorted([alone["stages"][name]["status"], other["stages"][name]["status"]]) == ["computed", "reused"]
    assert other["stages"]["merge"]["digest"] != alone["stages"]["merge"]["digest"]
    sealed(store)
    assert_no_held_lock(store)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def limited(tmp_path):
    """A folder on its own small filesystem (a tmpfs), unmounted afterwards; root only."""
    folder = tmp_path / "fs"
    folder.mkdir()
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if probe.returncode != 0:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    subprocess.run(["umount", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_store_fails_naming_it_and_keeps_every_artifact(reference, tmp_path, limited):
    store = Path(reference["stages"]["mix"]["path"]).parents[1]
    before = sealed(store)
    mount("--bind", str(store), str(limited))
    mount("-o", "remount,bind,ro", str(limited))
    proc = run(limited, tmp_path, "merge=ties")
    assert proc.returncode == 2 and f"run.store={str(limited)!r} is not writable (Read-only file system)" in proc.stderr
    assert sealed(store) == before


def test_a_read_only_mlflow_database_fails_naming_it(reference, tmp_path, limited):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "mlflow.db").write_bytes(b"")
    mount("--bind", str(tmp_path / "db"), str(limited))
    mount("-o", "remount,bind,ro", str(limited))
    proc = run(tmp_path / "store", tmp_path, f"tracking.tracking_uri=sqlite:///{limited}/mlflow.db")
    assert proc.returncode == 2 and "tracking.tracking_uri=" in proc.stderr and "read-only" in proc.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob(MANIFEST))


def test_a_full_mlflow_database_fails_naming_it_before_any_stage(tmp_path, limited):
    mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(limited))  # too small for MLflow's tables
    proc = run(tmp_path / "store", tmp_path, f"tracking.tracking_uri=sqlite:///{limited}/mlflow.db")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"tracking.tracking_uri='sqlite:///{limited}/mlflow.db': MLflow failed" in proc.stderr
    assert "full" in proc.stderr and not list((tmp_path / "store").rglob(MANIFEST))


def test_a_full_store_fails_naming_the_stage_seals_nothing_half_and_resumes_when_space_returns(reference, tmp_path,
                                                                                              limited):
    # room for the student, the mix and the teacher's data, not for the first branch's weights and checkpoints
    ref_store = Path(reference["stages"]["mix"]["path"]).parents[1]
    upstream = sum(f.stat().st_size for name in ("model", "mix", "teacher")
                   for f in (ref_store / name).rglob("*") if f.is_file())
    mount("-t", "tmpfs", "-o", f"size={upstream + 2_000_000}", "tmpfs", str(limited))
    proc = run(limited, tmp_path)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr and re.search(r"sft/\w+", proc.stderr), proc.stderr[-3000:]
    kept = sealed(limited)  # whatever was sealed verifies; the stage that ran out left no half artifact
    assert any(k.startswith("teacher/") for k in kept) and not any(k.startswith("sft/") for k in kept)
    assert not list(limited.rglob(".tmp-*"))
    mount("-o", "remount,size=2g", str(limited))
    final = summary(run(limited, tmp_path))
    assert final["stages"]["teacher"]["status"] == "reused" and digests(final) == digests(reference)
