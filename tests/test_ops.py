"""Operations around the flow, each against the real tool: a Hydra multirun sweep, `dvc repro` in a fresh git
repo, and a nightly deployment registered on a real local Prefect server started here."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the whole tiny pipeline, for real

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def env_with(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def summaries(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "runs").glob("*/summary.json"))]


def test_hydra_multirun_sweep_shares_upstream(tmp_path):
    store = tmp_path / "store"
    proc = subprocess.run([PY, "-m", "flows.run", "experiment=tiny", "merge.method=linear,ties",
                           f"hydra.sweep.dir={tmp_path}/multirun", "-m"],
                          cwd=ROOT, env=env_with(BRANCHMERGE_STORE=store), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = summaries(store)
    assert [s["config"]["merge"]["method"] for s in (first, second)] == ["linear", "ties"]
    assert set(s["status"] for s in first["stages"].values()) == {"computed"}
    reused = {k for k, v in second["stages"].items() if v["status"] == "reused"}
    assert {"model/tiny-llama", "mix", "teacher", "sft/arithmetic", "sft/gcd", "sft/lcm", "sft/mixture",
            "eval/base", "eval/mixture"} <= reused
    assert second["stages"]["merge"]["status"] == "computed"
    # the multirun ends with one comparison of its jobs (flows/compare.py through the Hydra callback)
    comparison = json.loads((tmp_path / "multirun" / "comparison.json").read_text())
    assert comparison["swept"] == ["merge.method"] and comparison["jobs"] == 2
    rows = {(r["group"], r["model"]): r for r in comparison["table"]}
    for summary in (first, second):
        row = rows[(f"merge.method={summary['config']['merge']['method']}", "merged")]
        assert row["overall"] == {"mean": summary["overall"]["merged"], "std": 0.0} and row["jobs"] == 1
    assert "comparison:" in proc.stdout and (tmp_path / "multirun" / "comparison.png").exists()
    # a quiet terminal: the pipeline's lines, no third-party chatter; each job ends saying where things are
    terminal = proc.stdout + proc.stderr
    for noise in ("litlogger", "GPU available", "FutureWarning", "DeprecationWarning", "Starting temporary server",
                  "Using bfloat16", "v_num", "prefect.task_runs", "Loading weights", "Writing model shards"):
        assert noise not in terminal, noise
    for end in ("final model: ", "report:      ", "summary:     ", "log:         ", "mlflow:      mlflow ui"):
        assert terminal.count(end) == 2, end
    assert terminal.count("results (greedy pass@1") == 2  # the table once per job
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    study = client.get_run(comparison["mlflow_run_id"])
    assert study.data.tags["study"] == "multirun" and study.info.status == "FINISHED"
    assert set(study.data.tags["jobs"].split(",")) == {first["mlflow_run_id"], second["mlflow_run_id"]}


@pytest.mark.parametrize("override, fragment", [
    ("merge.method=foo", "merge.method='foo'"),
    ("data.domains={}", "data.domains={}"),  # through the Hydra CLI too: {} empties, it does not merge
])
def test_bad_override_fails_before_compute(tmp_path, override, fragment):
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([PY, "-m", "flows.run", "experiment=tiny", override], cwd=cwd,
                          env=env_with(BRANCHMERGE_STORE=store, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()  # nothing was computed or written
    assert not list(cwd.iterdir())  # not even Hydra's outputs/<date>/<time> folder


def test_dvc_yaml_is_generated_from_the_stage_registry():
    from branchmerge.flows.stage import REGENERATE, dvc_yaml

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), f"dvc.yaml is out of date: run `{REGENERATE}`"


def test_two_identical_runs_started_together_compute_each_artifact_once(tmp_path):
    store = tmp_path / "store"
    cmd = [PY, "-m", "flows.run", "experiment=tiny", "tracking=none"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env_with(BRANCHMERGE_STORE=store), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    first, second = summaries(store)  # two run folders: neither summary overwrote the other
    assert len(list((store / "runs").iterdir())) == 2
    for stage in first["stages"]:
        statuses = [first["stages"][stage]["status"], second["stages"][stage]["status"]]
        assert sorted(statuses) == ["computed", "reused"], (stage, statuses)
        assert first["stages"][stage]["digest"] == second["stages"][stage]["digest"]


def test_dvc_as_the_readme_says(tmp_path):
    """The README's DVC commands, as written, in a fresh copy of the repo (a new git repo: no `dvc init`, the
    committed .dvc/ and params.yaml serve; dvc.yaml runs the venv's interpreter, not the `python` on PATH)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "artifacts", "outputs", "multirun",
                                                              "dvc", "*.db", "__pycache__", ".pytest_cache"))
    (repo / ".venv").symlink_to(Path(PY).parent.parent)
    # PATH without the venv: dvc.yaml must not depend on an activated venv
    path = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(Path(PY).parent.parent)))
    env = env_with(BRANCHMERGE_STORE=tmp_path / "store", DVC_NO_ANALYTICS=1, DVC_SITE_CACHE_DIR=tmp_path / "dvc-site",
                   DVC_GLOBAL_CONFIG_DIR=tmp_path / "dvc-global", PATH=path, GIT_AUTHOR_NAME="t",
                   GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    readme = (ROOT / "README.md").read_text()

    def sh(*cmd):
        assert cmd[0] in ("git", "ls") or " ".join(cmd) in readme, f"{' '.join(cmd)!r} is not the README's"
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "clone")
    assert "mix" in sh(".venv/bin/dvc", "dag")  # works before anything is composed
    sh(".venv/bin/python", "-m", "flows.stage", "params", "experiment=tiny", "tracking=none")
    out = sh(".venv/bin/dvc", "repro")
    for stage in ("model@student", "mix", "teacher", "sft", "merge", "rl", "eval", "report"):
        assert f"'{stage}'" in out
    metrics = json.loads((repo / "dvc/metrics.json").read_text())
    assert set(metrics) == {"base", "branch/arithmetic", "branch/gcd", "branch/lcm", "mixture", "merged", "rl"}
    assert (repo / "dvc/merge/model.safetensors").exists() and (repo / "dvc/merge/config.json").exists()
    again = sh(".venv/bin/dvc", "repro")
    assert "Data and pipelines are up to date" in again, again
    # An experiment on a merge parameter keeps the composed experiment (tiny) and reruns merge and what follows
    out = sh(".venv/bin/dvc", "exp", "run", "-S", "merge.method=task_arithmetic")
    assert "Running stage 'merge'" in out and "Running stage 'sft" not in out, out
    assert "Running stage 'teacher'" not in out and "Running stage 'mix'" not in out, out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["student"]["name"] == "tiny-llama" and params["merge"]["method"] == "task_arithmetic"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    # the scheduler looks for due schedules every 2 s instead of every 60 s
    env = env_with(PREFECT_HOME=tmp_path / "prefect-home", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=2)
    server = subprocess.Popen([str(Path(PY).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prefect server did not become healthy in 60 s")
        yield url, env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_deployment_registers_nightly_schedule(prefect_server):
    import httpx

    url, env = prefect_server
    env = env | {"PREFECT_API_URL": url}
    proc = subprocess.run([PY, "-m", "flows.deploy", "serve=false", "name=nightly-test", "cron=30 3 * * *",
                           "timezone=Europe/Berlin", "overrides=['experiment=tiny','merge.method=ties']"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dep = httpx.get(f"{url}/deployments/name/branchmerge/nightly-test", timeout=10).json()
    assert dep["parameters"] == {"overrides": ["experiment=tiny", "merge.method=ties"]}
    (schedule,) = dep["schedules"]
    assert schedule["schedule"]["cron"] == "30 3 * * *"
    assert schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] is True
    # The UI form: the flow's parameters are typed by the pydantic schema.
    schema = dep["parameter_openapi_schema"]
    assert "config" in schema["properties"] and "PipelineConfig" in json.dumps(schema)
    # ... with conf/'s value and a description for every key, and choices as selects
    from branchmerge.flows.config import compose

    default = schema["properties"]["config"]["default"]
    assert default == json.loads(compose([]).model_dump_json())
    defs = schema["definitions"]
    undescribed = [(name, key) for name, d in defs.items() for key, p in d.get("properties", {}).items()
                   if not p.get("description")]
    assert not undescribed and len(defs) >= 10
    assert "ties" in defs["MergeConfig"]["properties"]["method"]["enum"]
    assert defs["TeacherConfig"]["properties"]["backend"]["enum"] == ["hf", "openai", "vllm"]
    assert "on top of config" in schema["properties"]["overrides"]["description"]

    bad = subprocess.run([PY, "-m", "flows.deploy", "serve=false", "cron=not a cron"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "deploy.cron='not a cron'" in bad.stderr
    # a bad override fails at registration with the CLI's message, and nothing is registered
    cli = subprocess.run([PY, "-m", "flows.run", "experiment=tiny", "merge.method=foo"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    bad = subprocess.run([PY, "-m", "flows.deploy", "serve=false", "name=bad-override",
                          "overrides=['experiment=tiny','merge.method=foo']"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert cli.returncode == bad.returncode == 2
    message = cli.stderr.strip().splitlines()
    assert message and "merge.method='foo'" in cli.stderr and all(line in bad.stderr for line in message)
    assert httpx.get(f"{url}/deployments/name/branchmerge/bad-override", timeout=10).status_code == 404


def test_a_served_schedule_fires_and_its_run_completes(prefect_server, tmp_path):
    """The schedule as users rely on it: the server's scheduler creates the run when it is due and the served
    deployment runs it to completion (with sqlalchemy 2.1 the scheduler failed every loop and never did)."""
    import httpx

    url, env = prefect_server
    env = env | {"PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2", "BRANCHMERGE_STORE": str(tmp_path)}
    served = subprocess.Popen([PY, "-m", "flows.deploy", "serve=true", "name=every-minute", "cron=* * * * *",
                               "overrides=['experiment=tiny','tracking=none','rl.enabled=false']"], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, runs = time.time() + 420, []
        while time.time() < deadline:
            assert served.poll() is None, "flows.deploy stopped serving"
            time.sleep(3)
            runs = httpx.post(f"{url}/flow_runs/filter", timeout=10, json={
                "deployments": {"name": {"any_": ["every-minute"]}}}).json()
            if any(r["state_type"] == "COMPLETED" for r in runs):
                break
            assert not any(r["state_type"] in ("FAILED", "CRASHED") for r in runs), runs
        done = sorted((r for r in runs if r["state_type"] == "COMPLETED"), key=lambda r: r["expected_start_time"])
        assert done, f"no scheduled run completed within 7 minutes: {[(r['name'], r['state_type']) for r in runs]}"
        assert done[0]["auto_scheduled"] is True and done[0]["parameters"]["overrides"][0] == "experiment=tiny"
        assert summaries(tmp_path)  # the run wrote its summary into the store it was given

        def logs(run, fragment):
            """The run's log lines, once as many contain `fragment` as the run has task runs (logs arrive in
            batches, possibly after the run's final state)."""
            for _ in range(30):
                lines = [r["message"] for r in httpx.post(f"{url}/logs/filter", timeout=10, json={
                    "logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}).json()]
                if sum(m.count(fragment) for m in lines if "computed in" in m or " reused " in m) >= len(
                        task_states(run)):
                    break
                time.sleep(1)
            return lines

        def task_states(run):
            return {r["name"]: r["state_name"] for r in httpx.post(f"{url}/task_runs/filter", timeout=10, json={
                "flow_runs": {"id": {"any_": [run["id"]]}}}).json()}

        # the pipeline's own lines reach the API from a served run
        # (runs due every minute overlap: a later one reuses what an earlier one built, and shows it Cached)
        first, states = logs(done[0], ": "), task_states(done[0])
        assert len(states) >= 10 and set(states.values()) <= {"Completed", "Cached"}
        assert sum("computed in" in m for m in first) == list(states.values()).count("Completed"), first
        assert sum(" reused " in m for m in first) == list(states.values()).count("Cached"), first
        # a second run of the deployment, started through the API: every stage reused, shown as Cached
        again = httpx.post(f"{url}/deployments/{done[0]['deployment_id']}/create_flow_run", json={},
                           timeout=10).json()
        while time.time() < deadline + 300:
            again = httpx.get(f"{url}/flow_runs/{again['id']}", timeout=10).json()
            if again["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(3)
        assert again["state_type"] == "COMPLETED"
        states = task_states(again)
        assert len(states) >= 10 and set(states.values()) == {"Cached"}, states
        assert sum(" reused " in m for m in logs(again, " reused ")) == len(states)
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(60)
