"""MLflow tracking: no run stays RUNNING after its pipeline process failed, was interrupted or was killed."""
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from branchmerge.flows.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent

KILLED_PIPELINE = textwrap.dedent("""
    import sys, time
    from branchmerge.flows.tracking import Tracker
    tracker = Tracker(True, sys.argv[1], "killed")
    tracker.start("doomed", {"a": 1}, {})
    tracker.stage_run("sft/gcd", {"lr": 1}).result()
    print("running", flush=True)
    time.sleep(600)
""")


def named(run) -> str:
    """A run's name without the parent's -YYYYmmdd-HHMMSS suffix."""
    return re.sub(r"-\d{8}-\d{6}$", "", run.info.run_name)


def test_runs_of_a_killed_process_end_killed_at_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PIPELINE, uri], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    orphans = client.search_runs([experiment])
    assert {named(r): r.info.status for r in orphans} == {"doomed": "RUNNING", "sft/gcd": "RUNNING"}

    tracker = Tracker(True, uri, "killed")  # the next pipeline run on this host
    tracker.start("next", {}, {})
    tracker.finish({}, [])
    runs = {named(r): r.info.status for r in client.search_runs([experiment])}
    assert runs == {"doomed": "KILLED", "sft/gcd": "KILLED", "next": "FINISHED"}


def test_a_failed_flow_ends_its_open_stage_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(True, uri, "failed")
    tracker.start("broken", {}, {})
    done = tracker.stage_run("mix", {})
    tracker.stage_run("sft/gcd", {})  # never finished: its stage raised
    from branchmerge.tasks.store import ArtifactRef

    tracker.finish_stage(done, ArtifactRef(stage="mix", key="k", path="/p", digest="d"))
    tracker.finish({}, [], status="FAILED")
    client = MlflowClient(uri)
    runs = {named(r): r.info.status
            for r in client.search_runs([client.get_experiment_by_name("failed").experiment_id])}
    assert runs == {"broken": "FAILED", "mix": "FINISHED", "sft/gcd": "FAILED"}


def test_champion_moves_only_on_a_significant_paired_win():
    from branchmerge.flows.tracking import champion_decision

    def rows(scores):
        return [{"id": f"q{i}", "domain": "d", "score": s, "answer": "1", "num_tokens": 3} for i, s in enumerate(scores)]

    base = rows([1] * 30 + [0] * 70)
    assert champion_decision(base, None, None, "A") == (True, "no champion yet")
    better = rows([1] * 60 + [0] * 40)  # +0.30 on the same 100 prompts
    moved, why = champion_decision(better, base, "A", "A")
    assert moved and why.startswith("beats the champion: pass@1 +0.300")
    slightly = rows([1] * 32 + [0] * 68)  # +0.02: inside the noise
    assert champion_decision(slightly, base, "A", "A")[0] is False
    assert champion_decision(better, base, "A", "B") == (
        False, "champion kept: it was evaluated on other held-out prompts (no paired comparison)")
