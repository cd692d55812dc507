"""Bad input, through the flow itself (what the CLI, a deployment and a schedule all run): config values and
combinations, mergekit recipes, task data settings, checkpoints and endpoints. Each must fail before any stage
computes, with a message naming the setting, and leave no artifact sealed in the store; under the thread runner
and under runner=ray alike (the checks run before either starts a job)."""
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from branchmerge.flows.pipeline import branchmerge
from branchmerge.tasks.store import MANIFEST


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...]
    names: str  # what the error must say: the setting (and usually its value)
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {tmp} first


def config(id_: str, overrides: str, names: str) -> Case:
    return Case(id_, tuple(overrides.split()), names)


CONFIG = [
    config("run-name-path", "run.name=a/b", "run.name 'a/b'"),
    config("run-refresh-stage", "run.refresh=[bogus]", "run.refresh.0='bogus'"),
    config("run-seed-negative", "run.seed=-1", "run.seed=-1"),
    config("run-objective", "run.optimized_metric=dev/loss", "run.optimized_metric='dev/loss'"),
    config("run-objective-no-dev", "run.optimized_metric=dev/pass@1 data.dev_size=0", "data.dev_size is 0"),
    config("runner-kind", "runner.kind=gpu", "runner.kind='gpu'"),
    config("runner-workers", "runner.max_workers=0", "runner.max_workers=0"),
    config("ray-retries", "runner=ray runner.ray.max_retries=-1", "runner.ray.max_retries=-1"),
    config("ray-cpus", "runner=ray runner.ray.num_cpus=0", "runner.ray.num_cpus=0"),
    config("ray-gpus", "runner=ray runner.ray.resources.sft.num_gpus=-1", "runner.ray.resources.sft.num_gpus=-1"),
    config("data-train-size", "data.train_size=0", "data.train_size=0"),
    config("data-dev-size", "data.dev_size=-1", "data.dev_size=-1"),
    config("data-eval-size", "data.eval_size=0", "data.eval_size=0"),
    config("data-no-domains", "data.domains={}", "data.domains={}"),
    config("data-seed", "data.seed=-1", "data.seed=-1"),
    config("data-mixture", "data.mixture=bogus", "data.mixture='bogus'"),
    config("data-custom-without-weights", "data.mixture=custom", "data.custom_weights"),
    config("data-custom-cluster", "data.mixture=custom data.custom_weights={9:1.0}", "data.custom_weights: cluster(s) 9"),
    config("data-custom-negative", "data.mixture=custom data.custom_weights={0:-1.0}", "data.custom_weights={0: -1.0}"),
    config("data-temperature", "data.temperature=0", "data.temperature=0"),
    config("data-clusters", "data.embed.clusters=0", "data.embed.clusters=0"),
    config("data-shots", "data.shots=-1", "data.shots=-1"),
    config("climb-budget-round", "data.mixture=climb data.climb.budget=2", "data.climb"),
    config("climb-rounds", "data.climb.rounds=0", "data.climb.rounds=0"),
    config("climb-ratios", "data.mixture=climb data.climb.ratios=[1.0,2.0]", "data.climb"),
    config("climb-finetune", "data.climb.proxy_finetune=qlora", "data.climb.proxy_finetune='qlora'"),
    config("climb-no-dev", "data.mixture=climb data.dev_size=0", "data.dev_size=0"),
    config("task-name", "data.domains.gcd.tasks.0.name=no_such_task", "data.domains.gcd.tasks.0.name='no_such_task'"),
    config("task-weight", "data.domains.gcd.tasks.0.weight=-1", "data.domains.gcd.tasks.0.weight=-1"),
    config("task-config-key", "+data.domains.gcd.tasks.0.config.bogus=1", "unknown key(s) bogus for gcd"),
    config("teacher-n", "teacher.n=0", "teacher.n=0"),
    config("teacher-temperature", "teacher.temperature=-1", "teacher.temperature=-1"),
    config("teacher-top-p", "teacher.top_p=1.5", "teacher.top_p=1.5"),
    config("teacher-tokens", "teacher.max_new_tokens=0", "teacher.max_new_tokens=0"),
    config("teacher-keep", "teacher.keep=bogus", "teacher.keep='bogus'"),
    config("teacher-clean", "teacher.clean=[bogus]", "teacher.clean: unknown filter 'bogus'"),
    config("teacher-backend", "teacher.backend=bogus", "teacher.backend='bogus'"),
    config("teacher-openai-no-url", "teacher.backend=openai", "teacher.openai.base_url is required"),
    config("teacher-openai-scheme", "teacher.openai.base_url=ftp://x", "teacher.openai.base_url='ftp://x'"),
    config("teacher-openai-concurrency", "teacher.openai.concurrency=0", "teacher.openai.concurrency=0"),
    config("teacher-openai-key-env", "teacher.backend=openai teacher.openai.base_url=http://127.0.0.1:9/v1 "
                                     "teacher.openai.api_key_env=NO_SUCH_KEY_VAR", "teacher.openai.api_key_env"),
    config("student-dtype", "student.dtype=int8", "student.dtype='int8'"),
    config("student-name", "student.name=../x", "student.name='../x'"),
    config("student-source-kind", "student.source.kind=bogus", "source.kind='bogus'"),
    config("sft-lr", "sft.lr=0", "sft.lr=0"),
    config("sft-batch", "sft.batch_size=0", "sft.batch_size=0"),
    config("sft-epochs", "sft.epochs=0", "sft.epochs=0"),
    config("sft-accum", "sft.grad_accum=0", "sft.grad_accum=0"),
    config("sft-warmup", "sft.warmup_ratio=2", "sft.warmup_ratio=2"),
    config("sft-scheduler", "sft.scheduler=bogus", "sft.scheduler='bogus'"),
    config("sft-precision", "sft.precision=fp8", "sft.precision='fp8'"),
    config("sft-finetune", "sft.finetune=bogus", "sft.finetune='bogus'"),
    config("sft-loss", "sft.loss=bogus", "sft.loss='bogus'"),
    config("sft-recipe", "sft.recipe=bogus", "sft.recipe='bogus'"),
    config("sft-max-length", "sft.max_length=8", "sft.max_length=8"),
    config("sft-prefix-and-checkpointing", "sft.shared_prefix=true sft.gradient_checkpointing=true",
           "set sft.gradient_checkpointing=false"),
    config("sft-devices-without-strategy", "sft.devices=2", "sft.strategy=ddp"),
    config("sft-fsdp-without-cuda", "sft.strategy=fsdp", "sft.strategy='fsdp'"),
    config("sft-aioli-poft", "sft.mixing=aioli sft.mixture=true sft.loss=poft", "sft.loss='poft'"),
    config("lora-rank", "sft=lora sft.lora.r=0", "sft.lora.r=0"),
    config("lora-targets", "sft=lora sft.lora.target_modules=[nope_proj]", "sft.lora.target_modules=['nope_proj']"),
    config("merge-method", "merge.method=foo", "merge.method='foo'"),
    config("merge-density-range", "merge=ties merge.parameters.density=1.5", "parameters.density"),
    config("merge-unknown-parameter", "merge=ties +merge.parameters.bogus=1", "bogus"),
    config("merge-neither", "merge.method=null", "merge.method"),
    config("merge-dtype", "merge.dtype=int8", "merge.dtype='int8'"),
    config("merge-branch-name", "merge=ties +merge.branch_parameters.code.weight=1", "merge.branch_parameters.code"),
    config("merge-branch-global", "merge=ties +merge.branch_parameters.gcd.normalize=false",
           "merge.branch_parameters.gcd.normalize"),
    config("merge-recipe-missing", "merge=recipe merge.recipe=missing.yml", "merge.recipe='missing.yml'"),
    config("rl-steps", "rl.steps=0", "rl.steps=0"),
    config("rl-prompts", "rl.prompts_per_step=1000", "rl.prompts_per_step=1000"),
    config("rl-generations", "rl.num_generations=1", "rl.num_generations=1"),
    config("rl-stage", "rl.stages=[bogus]", "rl.stages.0='bogus'"),
    config("rl-no-stages", "rl.stages=[]", "rl.stages=[]"),
    config("rl-beta", "rl.beta=-1", "rl.beta=-1"),
    config("rl-lr", "rl.lr=-1", "rl.lr=-1"),
    config("eval-n", "eval.n=-1", "eval.n=-1"),
    config("eval-temperature", "eval.temperature=-1", "eval.temperature=-1"),
    config("eval-tokens", "eval.max_new_tokens=0", "eval.max_new_tokens=0"),
    config("eval-served-name", "eval.backend=openai eval.openai.base_url=http://127.0.0.1:9/v1 "
                               "eval.openai.model=fixed", "eval.openai.model='fixed'"),
    config("tracking-experiment", "tracking.experiment=", "tracking.experiment"),
]

RECIPES = [  # mergekit recipes as users write them, each wrong in one way
    Case("recipe-yaml", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "merge.recipe=",
         {"r.yml": "merge_method: linear\nmodels: [\n"}),
    Case("recipe-method", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "merge.recipe=",
         {"r.yml": "merge_method: lineer\nmodels:\n  - model: gcd\n  - model: lcm\n"}),
    Case("recipe-model", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "merge.recipe=",
         {"r.yml": "merge_method: linear\nmodels:\n  - model: geometry\n    parameters: {weight: 1.0}\n"}),
    Case("recipe-parameter", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "densty",
         {"r.yml": "merge_method: ties\nbase_model: base\nmodels:\n  - model: gcd\n    parameters: {weight: 1.0, "
                   "densty: 0.5}\n"}),
    Case("recipe-no-models", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "merge.recipe=",
         {"r.yml": "merge_method: linear\ndtype: float32\n"}),
    Case("recipe-hub-id", ("merge=recipe", "merge.recipe={tmp}/r.yml"), "merge.recipe=",
         {"r.yml": "merge_method: linear\nmodels:\n  - model: gcd\n    parameters: {weight: 1.0}\n"
                   "  - model: org/some-hub-model\n    parameters: {weight: 1.0}\n"}),
]


def safetensors(header: str, payload: int) -> bytes:
    head = header.encode()
    return struct.pack("<Q", len(head)) + head + b"\0" * payload


WEIGHTS = '{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}'
HF = ("student=hf", "student.source.path={tmp}/ckpt")
CHECKPOINTS = [  # a local Hugging Face folder as the student, broken in one way
    Case("ckpt-missing", HF, "student.source.path="),
    Case("ckpt-no-config", HF, "no config.json", {"ckpt/model.safetensors": safetensors(WEIGHTS, 64)}),
    Case("ckpt-config-garbage", HF, "config.json does not parse",
         {"ckpt/config.json": "{model_type: llama", "ckpt/model.safetensors": safetensors(WEIGHTS, 64)}),
    Case("ckpt-bin-only", HF, "no *.safetensors", {"ckpt/config.json": "{}", "ckpt/pytorch_model.bin": b"PK"}),
    Case("ckpt-truncated", HF, "model.safetensors is cut short",
         {"ckpt/config.json": "{}", "ckpt/model.safetensors": safetensors(WEIGHTS, 20)}),
    Case("ckpt-not-safetensors", HF, "model.safetensors is not a safetensors file",
         {"ckpt/config.json": "{}", "ckpt/model.safetensors": b"\x89PNG\r\n\x1a\n" + b"x" * 100}),
]

ENDPOINTS = [  # servers the config points at that do not answer ({dead}: a loopback port nobody listens on)
    Case("teacher-server-down", ("teacher.backend=openai", "teacher.openai.base_url=http://127.0.0.1:{dead}/v1"),
         "teacher.openai.base_url='http://127.0.0.1:{dead}/v1'"),
    Case("eval-server-down", ("eval.backend=openai", "eval.openai.base_url=http://127.0.0.1:{dead}/v1"),
         "eval.openai.base_url='http://127.0.0.1:{dead}/v1'"),
    Case("ray-head-down", ("runner=ray", "runner.ray.address=127.0.0.1:{dead}"),
         "runner.ray.address='127.0.0.1:{dead}'"),
    Case("mlflow-down", ("tracking.tracking_uri=http://127.0.0.1:{dead}",), "tracking.tracking_uri="),
    Case("mlflow-folder-missing", ("tracking.tracking_uri=sqlite:///{tmp}/nowhere/mlflow.db",),
         "tracking.tracking_uri="),
    Case("store-is-a-file", ("run.store={tmp}/file",), "run.store=", {"file": "not a folder"}),
]

CASES = CONFIG + RECIPES + CHECKPOINTS + ENDPOINTS


@pytest.fixture(scope="module")
def dead_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there during the test
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_there_are_at_least_fifty_distinct_cases():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("runner", ["threads", pytest.param("ray", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_setting_and_seals_nothing(case, runner, tmp_path, dead_port):
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    store = tmp_path / "store"
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{dead}", str(dead_port))

    overrides = [fill(o) for o in case.overrides]
    if not any(o.startswith("run.store=") for o in overrides):
        overrides.append(f"run.store={store}")
    if runner == "ray" and not any(o.startswith("runner") for o in overrides):
        overrides.append("runner=ray")
    with pytest.raises(Exception) as err:
        branchmerge(overrides=["experiment=tiny", *overrides])
    assert fill(case.names) in str(err.value), str(err.value)[:2000]
    assert not list(tmp_path.rglob(MANIFEST)), "an artifact was sealed"
    assert not (store / "runs").exists()


def test_a_dead_prefect_api_fails_the_cli_in_seconds(tmp_path, dead_port):
    """PREFECT_API_URL pointing at nothing: one line naming it, exit 2, before Prefect or any stage starts."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{dead_port}/api")
    proc = subprocess.run([sys.executable, "-m", "flows.run", "experiment=tiny", f"run.store={tmp_path}/store"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"PREFECT_API_URL='http://127.0.0.1:{dead_port}/api': no Prefect server answers" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob(MANIFEST))
