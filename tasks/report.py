"""Report stage: one table (Markdown + JSON) and one bar chart over every evaluated model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import eval as eval_stage
from tasks.common import Job, make_job, read_json, write_json
from tasks.store import ArtifactRef

if TYPE_CHECKING:
    from flows.schema import PipelineConfig


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return [f"eval/{name}" for name in eval_stage.models(cfg)]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    names = eval_stage.models(cfg)
    return make_job("report", {"models": names}, {f"eval/{k}": refs[f"eval/{k}"] for k in names}, __name__,
                    cfg.run.store, "report" in cfg.run.refresh)


def results_of(job: Job) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    results, tokens = {}, {}
    for name in job.config["models"]:
        metrics = read_json(Path(job.upstream[f"eval/{name}"].path) / "metrics.json")
        results[name] = {d: m["pass@1"] for d, m in metrics["domains"].items()}
        tokens[name] = {"mean tokens": sum(m["mean_tokens"] * m["n"] for m in metrics["domains"].values())
                        / max(metrics["n"], 1)}
    return results, tokens


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from models.eval import report

    results, extra = results_of(job)
    (out / "results.md").write_text(report.results_table_markdown(results, extra) + "\n")
    report.results_bar_chart(results, out / "results.png", title="greedy pass@1 on held-out prompts")
    write_json(out / "results.json", {"pass@1": results, "extra": extra})
    return {"results": results}
