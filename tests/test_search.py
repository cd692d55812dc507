"""Search, not just sweep: the Optuna sweeper preset (conf/hparams_search/merge_optuna.yaml) optimising the merge on
the dev split through run.optimized_metric, per-branch merge parameters, the best trial in the comparison, and
the submitit launcher preset run with submitit's local executor."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from branchmerge.flows.compare import best_trial
from branchmerge.flows.config import CONF_DIR, compose
from branchmerge.flows.schema import ConfigError
from branchmerge.tasks import eval as eval_stage
from branchmerge.tasks.merge import mergekit_config
from branchmerge.tasks.registry import dry_run

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SEARCH = ["experiment=tiny", "hparams_search=merge_optuna"]


def hydra_config(overrides: list[str]):
    """The `hydra:` node a CLI run with these overrides would get (sweeper, launcher)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra


def test_search_preset_composes_a_dev_split_objective():
    cfg = compose(SEARCH)
    assert cfg.run.optimized_metric == "dev/pass@1" and cfg.merge.method == "ties" and not cfg.rl.enabled
    assert cfg.merge.branch_parameters == {d: {"weight": 1.0} for d in cfg.data.domains}
    # the final model is evaluated on the dev split too, and that evaluation is keyed apart from the held-out one
    assert eval_stage.items(cfg)[-2:] == ["merged", "dev/merged"]
    plans = dry_run(cfg)
    dev, held_out = plans["eval/dev/merged"][0], plans["eval/merged"][0]
    assert (dev.config["split"], held_out.config["split"]) == ("dev", "eval") and dev.key != held_out.key
    assert "eval/dev/merged" not in dry_run(compose(["experiment=tiny"]))  # no objective, no extra evaluation
    sweeper = hydra_config(SEARCH).sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    params = dict(sweeper.params)
    assert params["merge.method"].startswith("choice(") and params["merge.parameters.density"] == "interval(0.2, 1.0)"
    assert {f"merge.branch_parameters.{d}.weight" for d in cfg.data.domains} <= set(params)
    # every method the search may pick takes every parameter it sets (a trial never fails on its config)
    for method in params["merge.method"].removeprefix("choice(").removesuffix(")").split(", "):
        compose([*SEARCH, f"merge.method={method}", "merge.parameters.density=0.2"])


def test_branch_parameters_override_each_branch():
    cfg = compose(["experiment=tiny", "merge=ties", "+merge.branch_parameters.gcd.weight=0.25",
                      "+merge.branch_parameters.gcd.density=0.9"])
    config = mergekit_config(cfg.merge, "base", {"arithmetic": "a", "gcd": "g", "lcm": "l"})
    assert [m["parameters"] for m in config["models"]] == [
        {"weight": 1.0, "density": 0.5}, {"weight": 0.25, "density": 0.9}, {"weight": 1.0, "density": 0.5}]
    assert config["parameters"] == {"normalize": True, "lambda": 1.0}


@pytest.mark.parametrize("overrides, fragment", [
    (["run.optimized_metric=dev/loss"], "run.optimized_metric"),
    (["run.optimized_metric=heldout/pass@1"], "run.optimized_metric"),
    (["run.optimized_metric=dev/pass@1", "data.dev_size=0"], "run.optimized_metric='dev/pass@1' scores the dev "
                                                              "split: data.dev_size is 0"),
    (["merge=ties", "+merge.branch_parameters.code.weight=0.5"], "merge.branch_parameters.code: no such branch"),
    (["merge=ties", "+merge.branch_parameters.gcd.normalize=false"],
     "merge.branch_parameters.gcd.normalize: not a per-model parameter of ties"),
    (["merge=linear", "+merge.branch_parameters.gcd.density=0.5"],
     "merge.branch_parameters.gcd.density: not a per-model parameter of linear"),
    (["merge=recipe", "+merge.branch_parameters.gcd.weight=0.5"], "merge.branch_parameters="),
])
def test_bad_search_settings_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        compose(["experiment=tiny", *overrides])
    assert fragment in str(err.value)


def summary(value: float | None, job: str) -> dict:
    objective = None if value is None else {"name": "dev/pass@1", "model": "merged", "value": value,
                                            "ci": [0.0, 1.0], "prompts": 72}
    return {"job": job, "overrides": {"merge.method": job}, "folder": Path("/sweep") / job,
            "summary": {"objective": objective, "mlflow_run_id": f"run-{job}", "overall": {"merged": 0.1}}}


def test_best_trial_is_the_highest_dev_score_first_on_ties():
    found = [summary(0.25, "a"), summary(0.5, "b"), summary(None, "c"), summary(0.5, "d")]
    best = best_trial(found)
    assert (best["job"], best["value"], best["trials"]) == ("b", 0.5, 3)
    assert best["config"] == "/sweep/b/.hydra/config.yaml" and best["overrides"] == {"merge.method": "b"}
    assert best_trial([summary(None, "a")]) is None  # a plain sweep: no search, no best


def test_slurm_launcher_preset_composes():
    launcher = hydra_config(["experiment=tiny", "hydra/launcher=slurm"]).launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.cpus_per_task, launcher.gpus_per_node, launcher.array_parallelism) == (8, 1, 8)


# ----------------------------------------------------------------------------------------------- real runs

def run_cli(args: list[str], store: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, BRANCHMERGE_STORE=str(store))
    return subprocess.run([PY, "-m", "flows.run", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_optuna_search_maximises_the_dev_score_on_the_cache(tmp_path):
    sweep = tmp_path / "search"
    proc = run_cli([*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
                    f"hydra.sweep.dir={sweep}"], tmp_path / "store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if (p / "summary.json").exists()), key=lambda p: p.name)
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert len(summaries) == 3
    first_mix = Path(summaries[0]["stages"]["mix"]["path"])
    dev_ids = {it["id"] for it in read_jsonl(first_mix / "dev.jsonl")}
    held_out_ids = {it["id"] for it in read_jsonl(first_mix / "eval.jsonl")}
    for i, s in enumerate(summaries):
        # the objective is the dev evaluation of this trial's merge, recomputed here from its generations
        rows = read_jsonl(Path(s["stages"]["eval/dev/merged"]["path"]) / "generations.jsonl")
        assert {r["id"] for r in rows} == dev_ids and not dev_ids & held_out_ids
        per_domain = {}
        for r in rows:
            per_domain.setdefault(r["domain"], []).append(r["score"])
        expected = sum(sum(v) / len(v) for v in per_domain.values()) / len(per_domain)
        assert s["objective"]["value"] == pytest.approx(expected) and s["objective"]["prompts"] == len(dev_ids)
        # each trial merged what the sampler chose, per branch
        trial = yaml.safe_load((jobs[i] / ".hydra" / "overrides.yaml").read_text())
        chosen = dict(o.split("=", 1) for o in trial)
        record = json.loads((Path(s["stages"]["merge"]["path"]) / "merge_config.json").read_text())
        assert record["config"]["merge_method"] == chosen["merge.method"]
        weights = {m["model"].removeprefix("sft/"): m["parameters"]["weight"] for m in record["config"]["models"]}
        assert weights == {d: pytest.approx(float(chosen[f"merge.branch_parameters.{d}.weight"]))
                           for d in ("arithmetic", "gcd", "lcm")}
        if i:  # later trials reuse every upstream stage: a trial is a merge and its two evaluations
            computed = {k for k, v in s["stages"].items() if v["status"] == "computed"}
            assert computed <= {"merge", "eval/merged", "eval/dev/merged", "report"}, computed
    # Optuna's answer is the highest objective, and the comparison names that trial, printed and in MLflow
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == max(s["objective"]["value"] for s in summaries)
    comparison = json.loads((sweep / "comparison.json").read_text())
    best = comparison["best"]
    assert best["value"] == optuna["best_value"] and best["trials"] == 3
    assert {k: best["overrides"][k] for k in optuna["best_params"]} == {
        k: str(v) for k, v in optuna["best_params"].items()}
    assert f"best of 3 trials (run.optimized_metric=dev/pass@1, merged on {len(dev_ids)} dev prompts)" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    study = client.get_run(comparison["mlflow_run_id"])
    assert study.data.params["best.merge.method"] == best["overrides"]["merge.method"]
    assert study.data.metrics["best.dev/pass_at_1.merged"] == best["value"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(study.info.run_id)}
    for s in summaries:  # each trial's run logs its objective
        assert client.get_run(s["mlflow_run_id"]).data.metrics["dev/pass_at_1"] == s["objective"]["value"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep_in_processes(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=tiny", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                    "merge.method=linear,ties", f"hydra.sweep.dir={sweep}"], tmp_path / "store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # submitit ran each job in its own process, which logged there, and the comparison ran here after both
    logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2, list(sweep.rglob("*"))
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["config"]["merge"]["method"] for s in summaries] == ["linear", "ties"]
    assert all(s["stages"]["report"]["status"] in ("computed", "reused") for s in summaries)
    comparison = json.loads((sweep / "comparison.json").read_text())
    assert comparison["jobs"] == 2 and comparison["swept"] == ["merge.method"]
