"""Report stage: one table (Markdown + JSON) and one bar chart over every evaluated model, each value with its
95 % interval, and paired comparisons of the merged model (and RL on top of it) with the alternatives."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.tasks import eval as eval_stage
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl, write_json
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return [f"eval/{name}" for name in eval_stage.models(cfg)]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    names = eval_stage.models(cfg)
    return make_job("report", {"models": names}, {f"eval/{k}": refs[f"eval/{k}"] for k in names}, __name__,
                    cfg.run.store, "report" in cfg.run.refresh)


def comparisons(models: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs the report tests a - b for: the merged model against the base, every branch and the mixture
    baseline; RL against the model it started from."""
    others = [m for m in models if m == "base" or m.startswith("branch/") or m == "mixture"]
    pairs = [("merged", m) for m in others]
    return pairs + ([("rl", "merged")] if "rl" in models else [])


def table(metrics: dict[str, dict], metric: str) -> tuple[dict, dict]:
    """(model -> domain -> value, model -> column -> interval) for one metric, overall included."""
    values, intervals = {}, {}
    for name, m in metrics.items():
        values[name] = {d: s[metric]["value"] for d, s in m["domains"].items()}
        intervals[name] = ({d: s[metric]["ci"] for d, s in m["domains"].items()}
                           | {"overall": m["overall"][metric]["ci"]})
    return values, intervals


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.eval import report
    from branchmerge.models.eval.metrics import paired

    names = job.config["models"]
    folders = {name: Path(job.upstream[f"eval/{name}"].path) for name in names}
    metrics = {name: read_json(folder / "metrics.json") for name, folder in folders.items()}
    rows = {name: read_jsonl(folder / "generations.jsonl") for name, folder in folders.items()}
    k = next(iter(metrics.values()))["k"]
    results, intervals = table(metrics, "pass@1")
    tokens = {name: {"mean tokens": m["overall"]["mean_tokens"]["value"]} for name, m in metrics.items()}
    n = {d: s["n"] for d, s in next(iter(metrics.values()))["domains"].items()}
    sections = [f"Greedy pass@1 on held-out prompts ({', '.join(f'{d}: {c}' for d, c in n.items())} prompts), "
                "95 % intervals (Wilson per domain, bootstrap overall):\n",
                report.results_table_markdown(results, tokens, intervals)]
    extra_tables = {}
    for metric in (["pass@k", "maj@k"] if k else []):
        values, cis = table(metrics, metric)
        label = metric.replace("@k", f"@{k}")
        extra_tables[label] = {"results": values, "intervals": cis}
        sections += [f"\n{label} from {k} samples per prompt:\n", report.results_table_markdown(values, None, cis)]
    compared = [{"a": a, "b": b, **paired(rows[a], rows[b])} for a, b in comparisons(names)
                if a in rows and b in rows]
    if compared:
        sections.append("\nPaired comparisons (greedy pass@1, mean over domains, same prompts; bootstrap):\n")
        sections.append("| comparison | difference | 95 % interval | p |\n| --- | ---: | ---: | ---: |\n")
        sections += [f"| {c['a']} - {c['b']} | {c['difference']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                     f"{c['p']:.3f} |\n" for c in compared]
    (out / "results.md").write_text("".join(sections))
    report.results_bar_chart(results, out / "results.png", intervals=intervals,
                             title="greedy pass@1 on held-out prompts (95 % intervals)")
    write_json(out / "results.json", {"pass@1": results, "intervals": intervals, "extra": tokens,
                                      "tables": extra_tables, "comparisons": compared, "prompts": n})
    return {"results": results, "intervals": intervals, "comparisons": compared, "prompts": n}
