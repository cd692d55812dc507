"""runner=ray (issue 15, point 1): prefect-ray's RayTaskRunner on a Ray head this module starts on loopback.

The tiny experiment through Ray gives the thread runner's artifacts digest for digest, every stage job is a task
run in the flow's Prefect API and trains into its MLflow run from the worker; a worker SIGKILLed in the middle of
an SFT job is retried by Ray and leaves no half artifact or lock; with retries off the run fails naming the stage,
and a rerun finishes it reusing everything sealed before.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from uuid import UUID

import psutil
import pytest

from tests.test_ops import free_port

pytestmark = pytest.mark.slow  # a Ray head and three tiny pipelines

# SFT long enough (~2 s per branch) for the killer below to catch one in the middle
OVERRIDES = ["experiment=tiny", "tracking.registered_model=null", "sft.max_steps=60", "sft.epochs=1000"]


@pytest.fixture(scope="module")
def ray_head():
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # short: Ray's unix socket paths under its temp dir must stay within 107 characters
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    # a loopback test cluster: no token to share between the head, its workers and this driver
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def run(store, *overrides):
    from branchmerge.flows.pipeline import branchmerge

    result = branchmerge(overrides=[*OVERRIDES, f"run.store={store}", *overrides])
    return json.loads(Path(result["summary"]).read_text())


def digests(summary):
    return {stage: rec["digest"] for stage, rec in summary["stages"].items()}


def debris(store: Path) -> list[Path]:
    """Unsealed folders a dead writer could leave (tasks/store.py: .tmp-<key>-*, .old-*)."""
    return [p for p in store.rglob(".*") if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def threads_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("threads")
    return run(store, "runner=threads")


def test_ray_runner_gives_the_thread_runners_artifacts(ray_head, threads_run, tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    summary = run(tmp_path, "runner=ray", f"runner.ray.address={ray_head}")
    assert {rec["status"] for rec in summary["stages"].values()} == {"computed"}
    assert digests(summary) == digests(threads_run)  # the same bytes, whichever process built them

    # every job was a task run of this flow run in the flow's own Prefect API, reported from its Ray worker
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(summary["prefect_flow_run_id"]))
        # this flow run's task runs (the test session's Prefect holds every earlier test's too); limit and sort
        # given: this Prefect's client sends null for them, which its server refuses (422)
        mine = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                     limit=200, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    assert sorted(t.name for t in mine) == sorted(summary["stages"])
    assert {t.state.type.value for t in mine} == {"COMPLETED"}

    # the SFT jobs trained into their stage's MLflow run from the worker (Lightning's MLFlowLogger there)
    runs = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'",
                              output_format="list", search_all_experiments=True)
    sft = [r for r in runs if r.info.run_name.startswith("sft/")]
    assert len(sft) == 4 and all(any(k.startswith("train") for k in r.data.metrics) for r in sft)


def kill_first_sft_worker(store: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the Ray worker that is building an SFT artifact, once (its unsealed folder tells it is running)."""
    while not stop.is_set() and not killed:
        if list(store.glob("sft/*/.tmp-*")):
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::run_stage"):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
        time.sleep(0.02)


def with_killer(store: Path, *overrides):
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_first_sft_worker, args=(store, killed, stop), daemon=True)
    killer.start()
    try:
        return run(store, *overrides), killed
    finally:
        stop.set()
        killer.join()


def test_a_killed_worker_is_retried_and_leaves_nothing_half_written(ray_head, threads_run, tmp_path):
    summary, killed = with_killer(tmp_path, "runner=ray", f"runner.ray.address={ray_head}",
                                  "runner.ray.max_retries=1")
    assert killed, "no SFT job was caught running"
    assert digests(summary) == digests(threads_run)  # the retried job built the same artifact
    assert not debris(tmp_path)
    assert not [p for p in tmp_path.rglob(".lock-*") if _locked(p)]


def test_without_retries_the_run_fails_naming_the_stage_and_a_rerun_finishes(ray_head, threads_run, tmp_path):
    from branchmerge.tasks.store import Store

    with pytest.raises(Exception) as failure:
        with_killer(tmp_path, "runner=ray", f"runner.ray.address={ray_head}", "runner.ray.max_retries=0")
    assert "sft/" in str(failure.value)  # which job died
    store = Store(tmp_path)
    sealed = [(f"sft/{p.parent.name}", p.name) for p in tmp_path.glob("sft/*/*") if not p.name.startswith(".")]
    assert all(store.is_valid(stage, key) for stage, key in sealed)  # nothing half written was sealed

    summary = run(tmp_path, "runner=ray", f"runner.ray.address={ray_head}")
    assert digests(summary) == digests(threads_run)
    assert summary["stages"]["mix"]["status"] == "reused"  # sealed before the kill: kept
    assert not debris(tmp_path)


def _locked(path: Path) -> bool:
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
