"""flows/compare.py on a multirun folder: groups by the swept values (seed aside), mean +- std over seeds."""
import json
import statistics

import pytest
import yaml

from branchmerge.flows.compare import compare, main


def fake_job(folder, overrides, results):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    overall = {m: sum(d.values()) / len(d) for m, d in results.items()}
    (folder / "summary.json").write_text(json.dumps({"results": results, "overall": overall, "mlflow_run_id": None,
                                                     "config": {"tracking": {"enabled": False}}}))


def test_groups_by_swept_values_and_averages_seeds(tmp_path):
    scores = {("linear", 0): 0.2, ("linear", 1): 0.4, ("ties", 0): 0.5, ("ties", 1): 0.9}
    for i, ((method, seed), s) in enumerate(scores.items()):
        fake_job(tmp_path / str(i), ["experiment=tiny", f"merge.method={method}", f"run.seed={seed}"],
                 {"base": {"a": 0.1, "b": 0.1}, "merged": {"a": s, "b": s / 2}})
    (tmp_path / "9").mkdir()  # a failed job: no summary, left out
    out = compare(tmp_path, log_to_mlflow=False)
    assert out["swept"] == ["merge.method", "run.seed"] and out["grouped_by"] == ["merge.method"] and out["jobs"] == 4
    rows = {(r["group"], r["model"]): r for r in out["table"]}
    for method in ("linear", "ties"):
        merged = rows[(f"merge.method={method}", "merged")]
        values = [scores[(method, seed)] * 0.75 for seed in (0, 1)]  # overall = mean of a and b = 0.75 s
        assert merged["jobs"] == 2
        assert merged["overall"]["mean"] == pytest.approx(statistics.fmean(values))
        assert merged["overall"]["std"] == pytest.approx(statistics.stdev(values))
        assert merged["a"]["mean"] == pytest.approx(statistics.fmean(scores[(method, s)] for s in (0, 1)))
    assert rows[("merge.method=ties", "base")]["overall"]["std"] == 0.0
    text = (tmp_path / "comparison.md").read_text()
    assert "| merge.method=ties | merged | 2 | 0.700 +- 0.283 |" in text
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_on_a_folder_without_jobs(tmp_path, capsys):
    assert main([str(tmp_path), "--no-mlflow"]) == 2
    assert "no finished job" in capsys.readouterr().err


def test_metric_names_are_ones_mlflow_accepts():
    """A swept list (rl.stages=[dpo,grpo]) used to end the multirun with MLflow refusing the study's metrics."""
    from mlflow.utils.validation import _validate_metric_name

    from branchmerge.flows.compare import metric_name

    name = metric_name("mean", "rl.stages=[dpo,grpo], merge.method=ties", "rl")
    assert name == "mean.rl.stages-_dpo_grpo_/merge.method-ties.rl"
    _validate_metric_name(name)  # raises on a name MLflow refuses
