"""CLIMB through the pipeline (data.mixture=climb on the tiny experiment): the search's artifact, its dev split,
a killed search resuming without re-training finished proxy runs, and the SFT stages reading the weights."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a tiny pipeline with 7 proxy runs

OVERRIDES = ["experiment=tiny", "data.mixture=climb", "data.dev_size=8", "data.climb.budget=7",
             "data.climb.candidates=2000", "rl.enabled=false", "tracking.registered_model=null"]


def run(store, *overrides):
    from branchmerge.flows.pipeline import branchmerge

    result = branchmerge(overrides=[*OVERRIDES, f"run.store={store}", *overrides])
    return json.loads(Path(result["summary"]).read_text())


def test_a_killed_search_resumes_and_its_weights_feed_sft(tmp_path, monkeypatch):
    import branchmerge.models.training.recipes  # noqa: F401  (binds the real train_sft for the SFT stages)
    import branchmerge.models.training.sft as sft

    real, calls, kill = sft.train_sft, [], [True]

    def proxy_run(*args, **kwargs):  # tasks/climb.py's proxy runs (recipes.py holds its own train_sft)
        calls.append(kwargs.get("seed"))
        if kill[0] and len(calls) == 4:
            raise RuntimeError("killed during the 4th proxy run")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "train_sft", proxy_run)
    with pytest.raises(Exception, match="killed during the 4th proxy run"):
        run(tmp_path)
    scratch = list(Path(tmp_path).glob("climb/*/proxies")) or list(Path(tmp_path).rglob("proxies"))
    assert scratch and len(list(scratch[0].glob("*.json"))) == 3  # the three finished runs, kept

    calls.clear()
    kill[0] = False
    summary = run(tmp_path)
    assert len(calls) == 7 - 3  # only the runs the kill left undone
    st = summary["stages"]
    assert st["climb"]["status"] == "computed"
    climb_dir = Path(st["climb"]["path"])
    search = json.loads((climb_dir / "search.json").read_text())
    assert [len(r["runs"]) for r in search["rounds"]] == [4, 2, 1]  # 4:2:1
    weights = json.loads((climb_dir / "weights.json").read_text())
    assert set(weights) <= {"0", "1", "2"} and sum(weights.values()) == pytest.approx(1.0)
    assert weights == search["chosen"]["mixture"]
    assert (climb_dir / "search.png").stat().st_size > 0
    assert not list(Path(tmp_path).rglob("proxies"))  # scratch deleted once sealed

    # the dev split the proxies were scored on shares no prompt with the training pool nor the held-out eval
    mix = Path(st["mix"]["path"])
    pools = {name: {json.loads(line)["question"] for line in (mix / f"{name}.jsonl").read_text().splitlines()}
             for name in ("train", "dev", "eval")}
    assert len(pools["dev"]) == 8 * 3
    assert not pools["dev"] & pools["train"] and not pools["dev"] & pools["eval"]

    # every SFT stage read the search (its digest is in their keys): a rerun reuses all, a different budget
    # recomputes the search and the SFT stages but neither the mix nor the teacher
    again = run(tmp_path)
    assert {rec["status"] for rec in again["stages"].values()} == {"reused"}
    changed = run(tmp_path, "data.climb.budget=8")["stages"]
    assert changed["mix"]["status"] == changed["teacher"]["status"] == "reused"
    assert changed["climb"]["status"] == "computed" and changed["sft/mixture"]["status"] == "computed"
