"""One comparison over a Hydra multirun: every job's results, grouped by the swept values, mean +- std over seeds.

    python -m flows.run -m experiment=tiny run.seed=0,1,2 merge.method=linear,ties   # ends with the comparison
    python -m flows.compare multirun/2026-11-30/10-00-00                             # the same, later

Each job of `python -m flows.run -m` leaves its run summary in its Hydra job folder (flows/run.py); a Hydra
callback (conf/config.yaml: hydra.callbacks.compare) runs `compare` on the sweep folder when the multirun ends.
Jobs are grouped by every swept key but run.seed; each group shows, per model, the mean and standard deviation
over its jobs of greedy pass@1 per domain and overall. Written beside the jobs: comparison.md, comparison.json,
comparison.png; logged as one MLflow run for the study (tag `study`), which names its jobs' runs.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

SEED = "run.seed"
SUMMARY = "summary.json"


def jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each finished job: its overrides (from Hydra's record) and its run summary, in job order."""
    found = []
    for folder in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        summary, overrides = folder / SUMMARY, folder / ".hydra" / "overrides.yaml"
        if summary.is_file():
            pairs = yaml.safe_load(overrides.read_text()) if overrides.is_file() else []
            found.append({"job": folder.name, "overrides": dict(o.lstrip("+~").split("=", 1) for o in pairs),
                          "summary": json.loads(summary.read_text()), "folder": folder})
    return found


def compare(sweep_dir: str | Path, log_to_mlflow: bool = True) -> dict[str, Any]:
    """Write the comparison of a multirun folder's jobs; returns it (groups, table text, file paths)."""
    sweep_dir = Path(sweep_dir)
    found = jobs(sweep_dir)
    if not found:
        raise ValueError(f"{sweep_dir}: no finished job (no */{SUMMARY}); is it a `python -m flows.run -m` folder?")
    keys = sorted({k for j in found for k in j["overrides"]})
    swept = [k for k in keys if len({j["overrides"].get(k) for j in found}) > 1]
    grouping = [k for k in swept if k != SEED]
    groups: dict[str, list[dict]] = {}
    for j in found:
        label = ", ".join(f"{k}={short(j['overrides'].get(k))}" for k in grouping) or "all jobs"
        groups.setdefault(label, []).append(j)
    table = []
    for label, members in groups.items():
        models = list(members[0]["summary"]["results"])
        domains = list(next(iter(members[0]["summary"]["results"].values())))
        for model in models:
            row: dict[str, Any] = {"group": label, "model": model, "jobs": len(members)}
            summaries = [m["summary"] for m in members if model in m["summary"]["results"]]
            for column in [*domains, "overall"]:
                values = [s["overall"][model] if column == "overall" else s["results"][model][column]
                          for s in summaries]
                row[column] = {"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            table.append(row)
    best = best_trial(found)
    # a search: its trials ranked by the objective, then the best; the per-model table follows in the file
    text = (f"{trials_markdown(found, grouping)}\n{describe_best(best)}\n\n" if best else "") + markdown(table)
    out = {"sweep_dir": str(sweep_dir), "swept": swept, "grouped_by": grouping, "jobs": len(found), "table": table,
           "best": best, "markdown": text,
           "files": {name: str(sweep_dir / f"comparison.{name}") for name in ("md", "json", "png")}}
    (sweep_dir / "comparison.md").write_text(f"Greedy pass@1 on the held-out split, mean +- std over {len(found)} "
                                             f"jobs (swept: {', '.join(swept) or 'nothing'}):\n\n{text}")
    chart(table, sweep_dir / "comparison.png")
    out["mlflow_run_id"] = log_study(found, out, sweep_dir) if log_to_mlflow else None
    (sweep_dir / "comparison.json").write_text(json.dumps({k: v for k, v in out.items() if k != "markdown"}, indent=2))
    return out


def best_trial(found: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The job with the highest run.optimized_metric (what an Optuna sweep maximised; the earliest on a tie): its
    overrides, value with interval, and composed config file. None when no job returned one."""
    scored = [j for j in found if j["summary"].get("objective")]
    if not scored:
        return None
    job = max(scored, key=lambda j: j["summary"]["objective"]["value"])
    objective = job["summary"]["objective"]
    return {"job": job["job"], "overrides": job["overrides"], "metric": objective["name"], "model": objective["model"],
            "value": objective["value"], "ci": objective["ci"], "prompts": objective["prompts"],
            "trials": len(scored), "config": str(job["folder"] / ".hydra" / "config.yaml"),
            "mlflow_run_id": job["summary"].get("mlflow_run_id")}


def short(value: str | None) -> str | None:
    """A swept float as 4 significant digits (an Optuna trial's 0.7167152904533249 reads 0.7167)."""
    try:
        return f"{float(value):.4g}" if value is not None and "." in value else value
    except ValueError:
        return value


def trials_markdown(found: list[dict[str, Any]], swept: list[str]) -> str:
    """One row per job with an objective, best first: its swept values, the objective, the final model's
    held-out pass@1 (shown, never searched on)."""
    scored = sorted((j for j in found if j["summary"].get("objective")),
                    key=lambda j: -j["summary"]["objective"]["value"])
    name, model = scored[0]["summary"]["objective"]["name"], scored[0]["summary"]["objective"]["model"]
    lines = [f"| job | {' | '.join(swept)} | {name} ({model}) | held-out pass@1 ({model}) |",
             "| ---: | " + " | ".join("---" for _ in swept) + " | ---: | ---: |"]
    for j in scored:
        objective = j["summary"]["objective"]
        lines.append(f"| {j['job']} | " + " | ".join(str(short(j["overrides"].get(k))) for k in swept)
                     + f" | {objective['value']:.3f} | {j['summary']['overall'][objective['model']]:.3f} |")
    return "\n".join(lines) + "\n"


def describe_best(best: dict[str, Any]) -> str:
    overrides = " ".join(f"{k}={v}" for k, v in best["overrides"].items())
    return (f"best of {best['trials']} trials (run.optimized_metric={best['metric']}, {best['model']} on "
            f"{best['prompts']} dev prompts): job {best['job']}, {best['value']:.3f} [{best['ci'][0]:.3f}, "
            f"{best['ci'][1]:.3f}]\n  overrides: {overrides}\n  config:    {best['config']}")


def markdown(table: list[dict[str, Any]]) -> str:
    columns = [c for c in table[0] if c not in ("group", "model", "jobs")]
    lines = ["| group | model | jobs | " + " | ".join(columns) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in table:
        cells = [f"{row[c]['mean']:.3f} +- {row[c]['std']:.3f}" for c in columns]
        lines.append(f"| {row['group']} | {row['model']} | {row['jobs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(table: list[dict[str, Any]], path: Path) -> None:
    """Overall pass@1 per model, one bar group per swept value, error bars one standard deviation."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(r["group"] for r in table))
    models = list(dict.fromkeys(r["model"] for r in table))
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.0, 1.5 * len(groups) * max(1, len(models) / 3)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        rows = {r["group"]: r["overall"] for r in table if r["model"] == model}
        means = [rows[g]["mean"] if g in rows else np.nan for g in groups]
        stds = [rows[g]["std"] if g in rows else 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=model)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("greedy pass@1, overall (mean +- std)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small", ncols=min(len(models), 4), loc="upper left", bbox_to_anchor=(0, -0.12))
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")


def metric_name(stat: str, group: str, model: str) -> str:
    """An MLflow metric name for a group's statistic: "mean.rl.steps-16/merge.method-ties.merged". MLflow allows
    only letters, digits, _ - . space : /, so anything else a swept value holds (the brackets and commas of a list,
    `rl.stages=[dpo,grpo]`) becomes "_"."""
    name = f"{stat}.{group}.{model}".replace(", ", "/").replace("=", "-")
    return re.sub(r"[^\w\-. :/]", "_", name)


def log_study(found: list[dict[str, Any]], out: dict[str, Any], sweep_dir: Path) -> str | None:
    """One MLflow run for the study in the jobs' experiment, naming the jobs' runs; None if the jobs were not
    tracked."""
    tracking = found[0]["summary"]["config"]["tracking"]
    if not tracking["enabled"]:
        return None
    from branchmerge.flows.tracking import Tracker

    tracker = Tracker(True, tracking["tracking_uri"], tracking["experiment"])
    tags = {"study": sweep_dir.name, "swept": ",".join(out["swept"]),
            "jobs": ",".join(j["summary"].get("mlflow_run_id") or "" for j in found)}
    params = {"swept": out["swept"], "grouped_by": out["grouped_by"]}
    metrics = {metric_name(stat, row["group"], row["model"]): row["overall"][stat]
               for row in out["table"] for stat in ("mean", "std")}
    artifacts = [out["files"][k] for k in ("md", "png")]
    if best := out["best"]:  # the search's answer: its settings as params, its score, its whole config
        params["best"] = {"job": best["job"], **best["overrides"]}
        tags["best.mlflow_run_id"] = best["mlflow_run_id"] or ""
        metrics[metric_name("best", best["metric"].replace("@", "_at_"), best["model"])] = best["value"]
        artifacts.append(best["config"])
    tracker.start(f"study {sweep_dir.name}", params, tags)
    tracker.finish(metrics, artifacts)
    return tracker.parent_id


class CompareCallback(Callback):
    """Hydra callback: when a multirun ends, compare its jobs (conf/config.yaml registers it)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            out = compare(config.hydra.sweep.dir)
        except ValueError as err:
            print(f"comparison: {err}", file=sys.stderr)
            return
        text = out["markdown"].split("\n\n| group |")[0] if out["best"] else out["markdown"]  # a search: its trials
        print(f"\n{text}\ncomparison: {out['files']['md']} (+ .json, .png)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a `python -m flows.run -m` sweep folder (hydra.sweep.dir)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the study to MLflow")
    args = parser.parse_args(argv)
    try:
        out = compare(args.sweep_dir, log_to_mlflow=not args.no_mlflow)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out["markdown"] + f"\ncomparison: {out['files']['md']} (+ .json, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
