"""The science over seeds (issue 10, point 6): a `run.seed=0,1,2` multirun of the default, read back.

    .venv/bin/python bench/seed_study.py multirun/<date>/<time>

For every job (seed): each model's greedy pass@1 per domain and overall. Across seeds: mean and std per model, and
paired comparisons pooled over seeds: for each held-out prompt, the score difference averaged over the seeds,
then a bootstrap over prompts within domains (models/eval/metrics.paired: the same estimator as each run's report).
Pooling keeps prompt-to-prompt noise (the larger part) and averages the seed-to-seed part; the per-seed p-values
are printed beside it. Prints Markdown.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from branchmerge.models.eval.metrics import paired  # noqa: E402

QUESTIONS = [("merged", "base"), ("merged", "branch/arithmetic"), ("merged", "branch/gcd"), ("merged", "branch/lcm"),
             ("merged", "mixture"), ("rl", "merged"),
             ("branch/arithmetic", "base"), ("branch/gcd", "base"), ("branch/lcm", "base")]


def generations(summary: dict, model: str) -> list[dict]:
    path = Path(summary["stages"][f"eval/{model}"]["path"]) / "generations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def own_domain(rows: list[dict], domain: str) -> list[dict]:
    return [r for r in rows if r["domain"] == domain]


def main(sweep: Path) -> None:
    jobs = sorted((p for p in sweep.glob("*/summary.json")), key=lambda p: int(p.parent.name))
    summaries = [json.loads(p.read_text()) for p in jobs]
    seeds = [s["config"]["run"]["seed"] for s in summaries]
    models = list(summaries[0]["results"])
    domains = list(summaries[0]["results"]["base"])
    print(f"{len(summaries)} seeds ({', '.join(map(str, seeds))}); held-out prompts per domain: "
          f"{len(generations(summaries[0], 'base')) // len(domains)}\n")

    print("| model | " + " | ".join(domains) + " | overall | overall per seed |")
    print("| --- | " + " | ".join("---:" for _ in domains) + " | ---: | --- |")
    for m in models:
        cells = []
        for d in [*domains, "overall"]:
            vals = [s["overall"][m] if d == "overall" else s["results"][m][d] for s in summaries]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
        per_seed = ", ".join(f"{s['overall'][m]:.3f}" for s in summaries)
        print(f"| {m} | " + " | ".join(cells) + f" | {per_seed} |")

    print("\nPaired comparisons (difference of pass@1, 95 % bootstrap interval, p); 'pooled' averages each prompt's "
          "score over the seeds first:\n")
    print("| comparison | on | pooled difference | pooled 95 % interval | pooled p | per seed: difference (p) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for a, b in QUESTIONS:
        scopes = [("all domains", None)]
        if a.startswith("branch/") and b == "base":
            scopes = [(f"{a.removeprefix('branch/')} only", a.removeprefix("branch/"))]
        for label, domain in scopes:
            per_seed, pooled_a, pooled_b = [], {}, {}
            for s in summaries:
                ra, rb = generations(s, a), generations(s, b)
                if domain:
                    ra, rb = own_domain(ra, domain), own_domain(rb, domain)
                per_seed.append(paired(ra, rb))
                for r in ra:
                    pooled_a.setdefault(r["id"], dict(r, score=0.0))["score"] += r["score"] / len(summaries)
                for r in rb:
                    pooled_b.setdefault(r["id"], dict(r, score=0.0))["score"] += r["score"] / len(summaries)
            c = paired(list(pooled_a.values()), list(pooled_b.values()))
            seeds_text = ", ".join(f"{x['difference']:+.3f} ({x['p']:.2f})" for x in per_seed)
            print(f"| {a} - {b} | {label} | {c['difference']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                  f"{c['p']:.3f} | {seeds_text} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
