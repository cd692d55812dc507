"""Cached-rerun cost: our whole fully cached pipeline vs a bare Prefect flow with the same number of cached
tasks (Prefect's own floor), each a fresh process, against Prefect's temporary server and a persistent one.

    .venv/bin/python bench/cached_rerun.py [--experiment tiny] [--repeats 3]

Prints wall times and our overhead on top of Prefect's (the difference of the medians).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

BARE_FLOW = textwrap.dedent("""
    from pathlib import Path
    from prefect import flow, task

    @task(cache_key_fn=lambda ctx, inputs: "bare-%d" % inputs["i"], persist_result=True)
    def step(i: int) -> dict:
        return {"i": i}

    @flow
    def bare(n: int):
        return [step(i) for i in range(n)]

    bare(N_TASKS)
""")


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(env: dict, experiment: str, n_tasks: int, repeats: int) -> tuple[list[float], list[float]]:
    ours = [PY, "-m", "flows.run", f"experiment={experiment}"]
    bare = [PY, "-c", BARE_FLOW.replace("N_TASKS", str(n_tasks))]
    timed(ours, env), timed(bare, env)  # warm: fill caches and databases
    return [timed(bare, env) for _ in range(repeats)], [timed(ours, env) for _ in range(repeats)]


def report(label: str, bare: list[float], ours: list[float]) -> None:
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{label:<28} bare Prefect {b:6.2f} s   branchmerge {o:6.2f} s   overhead {o - b:+.2f} s   "
          f"ratio {o / b:.2f}x   (runs: {', '.join(f'{x:.1f}' for x in ours)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bm-bench-"))
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               BRANCHMERGE_STORE=os.environ.get("BRANCHMERGE_STORE", str(ROOT / "artifacts")),
               MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
               PREFECT_LOCAL_STORAGE_PATH=str(work / "results"))
    env.pop("PREFECT_API_URL", None)
    n_tasks = 15  # tiny and default: 1 model, mix, teacher, 3 sft, merge, rl, 6 evals, report
    report("temporary server", *measure(env, args.experiment, n_tasks, args.repeats))

    port = free_port()
    server = subprocess.Popen([str(Path(PY).parent / "prefect"), "server", "start", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/api"
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        report("persistent `prefect server`", *measure(env | {"PREFECT_API_URL": url}, args.experiment, n_tasks,
                                                        args.repeats))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
