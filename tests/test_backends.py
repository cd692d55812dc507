"""teacher.backend / eval.backend: the openai backend against a real `transformers serve` on a loopback port (the
tiny float32 model, loaded by the server from the model artifact's folder), the cache key, the request log that
lets a killed stage resume, a server that is down; the vllm backend where vLLM is importable."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from branchmerge.flows.config import ConfigError, compose
from branchmerge.tasks import eval as eval_stage
from branchmerge.tasks import teacher
from branchmerge.tasks.common import execute
from branchmerge.tasks.registry import REGISTRY, STAGES
from branchmerge.tasks.store import Store

# The tiny model with larger random weights: its greedy tokens differ from step to step (the default tiny model
# repeats one token), so equal outputs mean equal decoding.
TINY = ["experiment=tiny", "+student.source.config.initializer_range=0.2", "tracking=none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(cfg, upto: str) -> dict:
    """Every artifact of the stages before `upto`, built (or reused) in cfg.run.store: name -> ArtifactRef."""
    refs = {}
    for stage in STAGES:
        if stage.name == upto:
            return refs
        for item in stage.items(cfg):
            refs[stage.artifact(item)] = execute(stage.module.plan(cfg, item, refs), stage.module.build)
    raise AssertionError(upto)


class Proxy:
    """A counting HTTP proxy in front of the server: what each run asked for, and with which Authorization."""

    def __init__(self, upstream: str, delay: float = 0.0):
        proxy = self
        self.requests: list[dict] = []
        self.auth: set[str | None] = set()
        self.delay = delay

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.requests.append(json.loads(body))
                proxy.auth.add(self.headers.get("Authorization"))
                time.sleep(proxy.delay)
                reply = httpx.post(upstream + self.path, content=body, timeout=300,
                                   headers={"Content-Type": "application/json"})
                self.send_response(reply.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(store):
    """`transformers serve` on a free loopback port (models load by id on request: an artifact's folder path)."""
    port = free_port()
    log = open(store / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            assert proc.poll() is None, (store / "serve.log").read_text()
        else:
            raise AssertionError("transformers serve did not come up: " + (store / "serve.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def openai(url: str, *extra: str, section: str = "teacher") -> list[str]:
    return [f"{section}.backend=openai", f"{section}.openai.base_url={url}/v1", *extra]


def rows(ref, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(ref.path) / name).read_text().splitlines()]


def keys(*overrides: str) -> dict[str, str]:
    from branchmerge.tasks.registry import dry_run

    return {name: job.key for name, (job, _) in dry_run(compose([*TINY, *overrides])).items()}


def test_the_key_holds_the_served_model_and_the_sampling_not_where_the_server_is(tmp_path, monkeypatch):
    monkeypatch.setenv("BM_TEST_KEY", "x")
    store = f"run.store={tmp_path}"
    a = keys(store, *openai("http://127.0.0.1:1", "teacher.openai.model=teacher-7b"))
    b = keys(store, *openai("https://example.org:8443", "teacher.openai.model=teacher-7b",
                            "teacher.openai.api_key_env=BM_TEST_KEY", "teacher.openai.concurrency=64",
                            "teacher.openai.timeout_s=5", "teacher.openai.retries=0", "teacher.openai.backoff_s=9"))
    assert a == b
    assert "model/teacher" not in a  # the server's own model: no local teacher to convert
    assert keys(store, *openai("http://127.0.0.1:1", "teacher.openai.model=teacher-70b"))["teacher"] != a["teacher"]
    assert keys(store, *openai("http://127.0.0.1:1", "teacher.openai.model=teacher-7b",
                               "teacher.top_p=0.9"))["teacher"] != a["teacher"]
    hf = keys(store)
    assert keys(store, "teacher.openai.base_url=http://elsewhere/v1", "eval.openai.concurrency=3") == hf
    assert hf["teacher"] != keys(store, *openai("http://127.0.0.1:1"))["teacher"]  # same model, another engine
    served_eval = keys(store, *openai("http://a/v1", section="eval"))
    assert served_eval == keys(store, *openai("http://b/v1", "eval.openai.timeout_s=1", section="eval"))
    assert served_eval["eval/base"] != hf["eval/base"] and served_eval["teacher"] == hf["teacher"]


@pytest.mark.parametrize("overrides, fragment", [
    (["teacher.backend=openai"], "teacher.openai.base_url is required with teacher.backend=openai"),
    (openai("http://127.0.0.1:1", "teacher.openai.api_key_env=BM_UNSET_KEY_VAR"),
     "teacher.openai.api_key_env='BM_UNSET_KEY_VAR': that environment variable is not set"),
    (["eval.openai.base_url=127.0.0.1:8000"], "eval.openai.base_url='127.0.0.1:8000': Value error, base_url="),
    (openai("http://127.0.0.1:1", "eval.openai.model=my-model", section="eval"),
     "eval.openai.model='my-model' would answer for every evaluated model"),
    (["teacher.backend=tgi"], "teacher.backend='tgi'"),
    (openai("http://127.0.0.1:1", "teacher.openai.model=big", "sft.loss=poft", "sft.poft_reference=teacher"),
     "sft.poft_reference=teacher scores with the local teacher model, but teacher.openai.model='big'"),
    (["eval.openai.concurrency=0"], "eval.openai.concurrency=0"),
])
def test_a_backend_that_cannot_run_fails_naming_the_key(overrides, fragment, monkeypatch):
    monkeypatch.delenv("BM_UNSET_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose([*TINY, *overrides])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_fails_before_compute():
    with pytest.raises(ConfigError, match=re.escape("eval.backend=vllm needs vLLM in this environment")):
        compose([*TINY, "eval.backend=vllm"])


@pytest.mark.slow  # a real server process
def test_teacher_through_the_server_equals_the_in_process_teacher_and_keeps_the_key_off_the_disk(
        server, store, monkeypatch):
    greedy = [f"run.store={store}", "teacher.temperature=0"]
    cfg_hf = compose([*TINY, *greedy])
    refs = build(cfg_hf, "teacher")
    local = execute(teacher.plan(cfg_hf, "", refs), teacher.build)

    monkeypatch.setenv("BM_TEST_KEY", "sekrit-7b1f")
    proxy = Proxy(server)
    try:
        cfg = compose([*TINY, *greedy, *openai(proxy.url, "teacher.openai.api_key_env=BM_TEST_KEY",
                                                 "teacher.openai.concurrency=3")])
        served = execute(teacher.plan(cfg, "", refs), teacher.build)
    finally:
        proxy.close()
    ours, theirs = rows(local, "samples.jsonl"), rows(served, "samples.jsonl")
    assert len(theirs) == len(ours) == 8 * 3 * 2  # train_size x domains x n
    # greedy float32: the server's `generate` and our engine give the same tokens, verified and kept alike
    assert [(r["id"], r["completion"], r["answer"], r["score"], r["finished"]) for r in theirs] == \
        [(r["id"], r["completion"], r["answer"], r["score"], r["finished"]) for r in ours]
    assert rows(served, "sft.jsonl") == rows(local, "sft.jsonl")
    assert len(proxy.requests) == 8 * 3  # greedy: one request per prompt, its answer repeated n times
    assert {r["model"] for r in proxy.requests} == {refs["model/teacher"].path}  # openai.model null: the folder
    assert proxy.auth == {"Bearer sekrit-7b1f"}
    secret = b"sekrit-7b1f"
    assert not any(secret in p.read_bytes() for p in Path(store).rglob("*") if p.is_file())
    assert served.key != local.key  # another backend, another artifact


@pytest.mark.slow
def test_eval_through_the_server_equals_the_in_process_eval(server, store):
    cfg_hf = compose([*TINY, f"run.store={store}"])
    refs = build(cfg_hf, "teacher") | {}
    local = execute(eval_stage.plan(cfg_hf, "base", refs), eval_stage.build)
    served = execute(eval_stage.plan(compose([*TINY, f"run.store={store}", *openai(server, section="eval")]),
                                     "base", refs), eval_stage.build)
    ours, theirs = rows(local, "generations.jsonl"), rows(served, "generations.jsonl")
    assert [(r["completion"], r["score"]) for r in theirs] == [(r["completion"], r["score"]) for r in ours]
    m_ours, m_theirs = (json.loads((Path(r.path) / "metrics.json").read_text()) for r in (local, served))
    assert m_theirs["overall"]["pass@1"] == m_ours["overall"]["pass@1"]


KILLED_RUN = """
import sys
from branchmerge.flows.config import compose
from branchmerge.tasks import teacher
from branchmerge.tasks.common import execute
from branchmerge.tasks.registry import STAGES
cfg = compose(sys.argv[1:])
refs = {}
for stage in STAGES[:2]:
    for item in stage.items(cfg):
        refs[stage.artifact(item)] = execute(stage.module.plan(cfg, item, refs), stage.module.build)
execute(teacher.plan(cfg, "", refs), teacher.build)
"""


@pytest.mark.slow
def test_a_killed_teacher_resumes_asking_only_what_is_missing(server, store, tmp_path):
    proxy = Proxy(server, delay=0.3)  # slow enough to kill it mid-way
    try:
        overrides = [*TINY, f"run.store={store}", *openai(proxy.url, "teacher.openai.concurrency=2"),
                     "teacher.temperature=0.8"]
        cfg = compose(overrides)
        refs = build(cfg, "teacher")
        job = teacher.plan(cfg, "", refs)
        request_log = Store(store).scratch(job.stage, job.key) / "requests.jsonl"
        child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *overrides], cwd=Path(__file__).parents[1],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and (not request_log.exists() or len(request_log.read_text().splitlines()) < 10):
            assert child.poll() is None
            time.sleep(0.1)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        assert Store(store).load(job.stage, job.key) is None  # nothing sealed
        answered = len(request_log.read_text().splitlines())
        total = 8 * 3 * 2  # sampling: one request per sample
        assert 10 <= answered < total
        before = len(proxy.requests)
        ref = execute(job, teacher.build)
        asked = proxy.requests[before:]
        assert len(asked) == total - answered  # only the missing ones
        assert not request_log.exists()  # the scratch folder (and its log) is gone once the artifact is sealed
        assert len(rows(ref, "samples.jsonl")) == total
        seeds = [r["seed"] for r in proxy.requests]
        assert len(set(seeds)) == total  # one seed per (prompt, sample), the same on the rerun
    finally:
        proxy.close()


def test_a_server_that_is_down_fails_naming_the_url_after_the_retries_and_seals_nothing(tmp_path):
    # its own store: the module's store may hold this very artifact, built through a live server (same served model
    # and sampling: the same key whatever the URL), and would rightly reuse it
    store = tmp_path
    url = f"http://127.0.0.1:{free_port()}"
    cfg = compose([*TINY, f"run.store={store}",
                   *openai(url, "teacher.openai.retries=2", "teacher.openai.backoff_s=0.05")])
    refs = build(cfg, "teacher")
    job = teacher.plan(cfg, "", refs)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=rf"teacher\.openai\.base_url='{url}/v1': no answer after 3 tries") as err:
        execute(job, teacher.build)
    assert "APIConnectionError" in str(err.value)
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # it waited between the tries
    assert Store(store).load(job.stage, job.key) is None
    assert not Store(store).path(job.stage, job.key).exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the `vllm` extra)")
@pytest.mark.gpu
def test_vllm_teacher_runs_the_tiny_model(store):
    cfg = compose([*TINY, f"run.store={store}", "teacher.backend=vllm", "teacher.temperature=0"])
    refs = build(cfg, "teacher")
    ref = execute(teacher.plan(cfg, "", refs), teacher.build)
    assert len(rows(ref, "samples.jsonl")) == 8 * 3 * 2
