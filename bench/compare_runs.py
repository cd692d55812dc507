"""Two runs of the pipeline, model by model: each model of run A against the same-named model of run B, paired
over the held-out prompts both evaluated (models/eval/metrics.paired: bootstrap over prompts within domains).

    .venv/bin/python bench/compare_runs.py <run A>/summary.json <run B>/summary.json

For variants that change what every model is built from (e.g. teacher=qwen_coder vs the default teacher) at the
same seed and data: both runs must share data.seed, so the held-out prompts are the same. Prints Markdown.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed_study import generations  # noqa: E402
from branchmerge.models.eval.metrics import paired  # noqa: E402


def main(a_path: str, b_path: str) -> None:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    if a["config"]["data"]["seed"] != b["config"]["data"]["seed"]:
        raise SystemExit("the runs' data.seed differ: their held-out prompts are not the same")
    print("| model | A | B | A - B [95 %] | p |\n| --- | ---: | ---: | ---: | ---: |")
    for model in [m for m in a["results"] if m in b["results"] and m != "base"]:
        c = paired(generations(a, model), generations(b, model))
        print(f"| {model} | {a['overall'][model]:.3f} | {b['overall'][model]:.3f} | {c['difference']:+.3f} "
              f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
