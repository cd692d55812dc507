"""Does RL help (issue 13, point 8)? Multiruns of the default over seeds and RL settings, read back.

    .venv/bin/python bench/rl_study.py multirun/<date>/<time> [multirun/<date>/<time> ...]

Each job is one (seed, RL setting). The RL setting is every `rl.*` override of the job (Hydra's
`hydra.overrides.task`, as recorded in the job's .hydra/overrides.yaml); jobs with none run the default. Within a
seed every setting starts from the same merged model (the merge's key does not read `rl:`, so it is one cached
artifact), so "rl - merged" is a paired comparison on the same held-out prompts. Per setting: the RL model's
pass@1 (mean ± std over seeds) and rl - merged pooled over seeds as bench/seed_study.py does it (each prompt's
score difference averaged over the seeds first, then the bootstrap over prompts within domains of
models/eval/metrics.paired), with the per-seed differences beside it. Prints Markdown.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed_study import generations  # noqa: E402
from branchmerge.models.eval.metrics import paired  # noqa: E402


def setting(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    rl = sorted(o for o in overrides if o.startswith("rl."))
    return " ".join(rl) or "default (rl.stages=[grpo])"


def pooled(summaries: list[dict], model: str) -> list[dict]:
    """Each prompt's score averaged over the seeds."""
    out: dict[str, dict] = {}
    for s in summaries:
        for r in generations(s, model):
            out.setdefault(r["id"], dict(r, score=0.0))["score"] += r["score"] / len(summaries)
    return list(out.values())


def main(sweeps: list[Path]) -> None:
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for sweep in sweeps:
        for path in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
            by_setting[setting(path.parent)].append(json.loads(path.read_text()))
    merged_by_seed: dict[int, dict] = {}
    for summaries in by_setting.values():
        for s in summaries:
            merged_by_seed.setdefault(s["config"]["run"]["seed"], s)
    seeds = sorted(merged_by_seed)
    merged = [merged_by_seed[k] for k in seeds]
    domains = list(merged[0]["results"]["merged"])
    n = len(generations(merged[0], "merged")) // len(domains)
    print(f"seeds {', '.join(map(str, seeds))}; held-out prompts per domain: {n} ({len(domains)} domains)\n")
    overall = [s["overall"]["merged"] for s in merged]
    print("| model | RL setting | seeds | overall pass@1 (mean ± std) | per seed | rl - merged, pooled | 95 % interval "
          "| p | per seed: difference (p) |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    print(f"| merged | - | {len(merged)} | {statistics.mean(overall):.3f} ± {statistics.stdev(overall):.3f} | "
          + ", ".join(f"{x:.3f}" for x in overall) + " | | | | |")
    for name, summaries in sorted(by_setting.items()):
        summaries = sorted(summaries, key=lambda s: s["config"]["run"]["seed"])
        got = [s["config"]["run"]["seed"] for s in summaries]
        if got != seeds:
            print(f"| rl | {name} | seeds {got} (not {seeds}): skipped | | | | | | |")
            continue
        # the merged model each job compares against must be its seed's one and the same artifact in every job
        for s in summaries:
            assert s["stages"]["merge"]["digest"] == merged_by_seed[s["config"]["run"]["seed"]]["stages"]["merge"]["digest"]
        vals = [s["overall"]["rl"] for s in summaries]
        per_seed = [paired(generations(s, "rl"), generations(s, "merged")) for s in summaries]
        c = paired(pooled(summaries, "rl"), pooled(summaries, "merged"))
        print(f"| rl | {name} | {len(vals)} | {statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} | "
              + ", ".join(f"{x:.3f}" for x in vals)
              + f" | {c['difference']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p']:.3f} | "
              + ", ".join(f"{x['difference']:+.3f} ({x['p']:.2f})" for x in per_seed) + " |")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
