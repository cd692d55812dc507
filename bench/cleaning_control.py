"""Is the cleaning result the filters' doing, or just another training trajectory? (the control owed by issue 14)

    .venv/bin/python bench/cleaning_control.py <multirun folder> [--draws 4] [--drop-from arithmetic]

The multirun's jobs with data.mixture=uniform and the default teacher.clean give, per seed, the teacher's scored
samples. From them this rebuilds the teacher's SFT rows twice with tasks.teacher.select, the stage's own code:
with the filters (checked equal to the stage's sft.jsonl) and without (teacher.clean=[]). Removing even one row
changes every later batch (the draw over clusters and the length-grouped batches depend on the data), so a
cleaned-vs-uncleaned difference mixes what the filters removed with a different trajectory. The control: the
uncleaned rows less as many *random* rows per domain as the filters removed (drawn among the rows both keep), in
`--draws` draws per seed. Each data set trains the mixed-data baseline as the flow does (tasks.sft's job, with
the teacher artifact replaced by a folder holding those rows, so the key differs only there) and is evaluated as
the flow does (tasks.eval's job: greedy pass@1 on the held-out prompts), plus the dev measure of
bench/mixture_study.py (minus the per-token loss of each dev prompt's gold answer). Artifacts go to the jobs'
store and are reused on a rerun.

Reported, each pooled over seeds (a prompt's value averaged over the seeds, paired bootstrap within domains):
cleaned minus uncleaned, and each random draw minus uncleaned. If the filters' gain is no larger than what
dropping random rows gives, the filters earn no credit. `--drop-from <domain>` draws the random rows from that
domain instead (as many in all as the filters removed): whether dropping rows helps whichever domain loses them.
Prints Markdown.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from branchmerge.flows.schema import validate
from branchmerge.models.eval.metrics import paired
from branchmerge.tasks import eval as eval_task
from branchmerge.tasks import sft as sft_task
from branchmerge.tasks import teacher as teacher_task
from branchmerge.tasks.common import execute, read_json, read_jsonl
from branchmerge.tasks.store import ArtifactRef

from bench.mixture_study import model_dev_rows, pooled


def refs_of(summary: dict) -> dict[str, ArtifactRef]:
    """The run's artifacts under the names the stages' plan() reads (the summary names the student model/<name>)."""
    refs = {name: ArtifactRef(stage=name, key=s["key"], path=s["path"], digest=s["digest"])
            for name, s in summary["stages"].items()}
    return refs | {"model/student": refs[f"model/{summary['config']['student']['name']}"]}


def rebuilt(summary: dict, cfg) -> tuple[list[dict], list[dict], dict]:
    """(cleaned, uncleaned) SFT rows from the teacher's scored samples, by the stage's own selection, and each
    row's place in sample order."""
    from branchmerge.models.data import domains

    teacher, mix = Path(summary["stages"]["teacher"]["path"]), Path(summary["stages"]["mix"]["path"])
    items, shots = read_jsonl(mix / "train.jsonl"), read_json(mix / "shots.json")
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    by_id: dict[str, list[dict]] = defaultdict(list)
    for row in read_jsonl(teacher / "samples.jsonl"):
        by_id[row["id"]].append({"text": row["completion"], "num_tokens": row["num_tokens"],
                                 "finished": row["finished"]})
    samples = [by_id[it["id"]] for it in items]
    _, cleaned = teacher_task.select(items, conversations, samples, cfg.teacher)
    if cleaned != read_jsonl(teacher / "sft.jsonl"):
        raise SystemExit(f"rebuilding {teacher}/sft.jsonl from its samples gave other rows: the selection changed")
    scored, uncleaned = teacher_task.select(items, conversations, samples,
                                            cfg.teacher.model_copy(update={"clean": []}))
    order: dict[tuple[str, str], int] = {}
    for i, row in enumerate(scored):
        order.setdefault(row_key(row), i)
    return cleaned, uncleaned, order


def row_key(row: dict) -> tuple[str, str]:
    return row["id"], row["completion"]


def random_drop(cleaned: list[dict], uncleaned: list[dict], order: dict, rng: random.Random,
                drop_from: str | None = None) -> list[dict]:
    """The uncleaned rows less as many random rows per domain as the filters removed (among rows both keep; with
    `drop_from`, that many in all from that domain), plus the rows only cleaning keeps (a later response of a
    prompt, let in once an earlier one was dropped); in sample order, as the stage writes them."""
    kept = {row_key(r) for r in cleaned}
    plain = {row_key(r) for r in uncleaned}
    removed = {d: sum(row_key(r) not in kept for r in uncleaned if r["domain"] == d)
               for d in sorted({r["domain"] for r in uncleaned})}
    if drop_from is not None:
        removed = {drop_from: sum(removed.values())}
    drop: set[tuple[str, str]] = set()
    for domain, count in removed.items():
        common = [row_key(r) for r in uncleaned if r["domain"] == domain and row_key(r) in kept]
        drop |= set(rng.sample(common, count))
    rows = [r for r in uncleaned if row_key(r) not in drop] + [r for r in cleaned if row_key(r) not in plain]
    return sorted(rows, key=lambda r: order[row_key(r)])


def train_and_eval(cfg, refs: dict[str, ArtifactRef], rows: list[dict], folder: Path) -> tuple[str, list[dict]]:
    """The mixed-data baseline trained on `rows` and its held-out generations (tasks.sft / tasks.eval jobs)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    digest = hashlib.sha256(text.encode()).hexdigest()
    data = folder / digest[:20]
    if not (data / "sft.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        (data / "sft.jsonl").write_text(text)
    teacher = ArtifactRef(stage="teacher", key=f"control-{digest[:20]}", path=str(data), digest=digest)
    model = execute(sft_task.plan(cfg, sft_task.MIXTURE, refs | {"teacher": teacher}), sft_task.build)
    evaluated = execute(eval_task.plan(cfg, sft_task.MIXTURE, refs | {"sft/mixture": model}), eval_task.build)
    return model.path, read_jsonl(Path(evaluated.path) / "generations.jsonl")


def main(sweep: Path, draws: int, drop_from: str | None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    summaries = sorted((json.loads(p.read_text()) for p in sweep.glob("*/summary.json")),
                       key=lambda s: s["config"]["run"]["seed"])
    summaries = [s for s in summaries if s["config"]["data"]["mixture"] == "uniform" and s["config"]["teacher"]["clean"]]
    if not summaries:
        raise SystemExit(f"{sweep}: no job with data.mixture=uniform and teacher.clean filters")
    cache_file = sweep / "cleaning_control_dev.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    drawn = f"random from {drop_from}" if drop_from else "random"
    names = ["cleaned", "uncleaned", *(f"{drawn} {d + 1}" for d in range(draws))]
    held: dict[str, list[list[dict]]] = defaultdict(list)
    dev: dict[str, list[list[dict]]] = defaultdict(list)
    sizes = []
    try:
        for s in summaries:
            cfg, seed = validate(s["config"]), s["config"]["run"]["seed"]
            cleaned, uncleaned, order = rebuilt(s, cfg)
            rng = random.Random(seed)
            sets = {"cleaned": cleaned, "uncleaned": uncleaned,
                    **{f"{drawn} {d + 1}": random_drop(cleaned, uncleaned, order, rng, drop_from) for d in range(draws)}}
            sizes.append((seed, {k: len(v) for k, v in sets.items()}))
            folder = Path(cfg.run.store) / "control" / "teacher"
            for name in names:
                model_dir, generations = train_and_eval(cfg, refs_of(s), sets[name], folder)
                held[name].append(generations)
                dev[name].append(model_dev_rows(model_dir, Path(s["stages"]["mix"]["path"]),
                                               s["config"]["sft"]["max_length"], cache))
                print(f"seed {seed} {name}: {len(sets[name])} rows, held-out pass@1 "
                      f"{statistics.mean(g['score'] for g in generations):.3f}", file=sys.stderr)
    finally:
        cache_file.write_text(json.dumps(cache))
    seeds = [seed for seed, _ in sizes]
    print(f"Mixed-data baseline, seeds {seeds}; rows per data set: "
          + "; ".join(f"seed {seed}: " + ", ".join(f"{k} {v}" for k, v in n.items()) for seed, n in sizes) + "\n")
    print("| data | measure | mean over seeds | minus uncleaned, pooled | 95 % interval | p | per seed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for measure, runs in (("held-out pass@1", held), ("dev -loss/token", dev)):
        gain = {}  # minus uncleaned, pooled over seeds
        for name in names:
            mean = statistics.mean(statistics.mean(r["score"] for r in rows) for rows in runs[name])
            if name == "uncleaned":
                print(f"| {name} | {measure} | {mean:.3f} | | | | |")
                continue
            c = paired(pooled(runs[name]), pooled(runs["uncleaned"]))
            gain[name] = c["difference"]
            per_seed = [paired(a, b)["difference"] for a, b in zip(runs[name], runs["uncleaned"])]
            print(f"| {name} | {measure} | {mean:.3f} | {c['difference']:+.3f} | [{c['ci'][0]:+.3f}, "
                  f"{c['ci'][1]:+.3f}] | {c['p']:.3f} | " + ", ".join(f"{x:+.3f}" for x in per_seed) + " |")
        gains, filters = [gain[n] for n in names[2:]], gain["cleaned"]
        # the filters against dropping random rows: each prompt's value averaged over the draws, then paired
        random_mean = [pooled([runs[n][i] for n in names[2:]]) for i in range(len(sizes))]
        excess = paired(pooled(runs["cleaned"]), pooled(random_mean))
        print(f"\n{measure}: the filters' gain {filters:+.3f}; random drops' gains: mean {statistics.mean(gains):+.3f}, "
              f"range [{min(gains):+.3f}, {max(gains):+.3f}]; {sum(g >= filters for g in gains)} of {len(gains)} "
              f"draws at least as large. Cleaned minus the random drops (a prompt's value averaged over the draws): "
              f"{excess['difference']:+.3f} [{excess['ci'][0]:+.3f}, {excess['ci'][1]:+.3f}], p {excess['p']:.3f}.\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--drop-from", help="draw the random rows from this domain only")
    args = parser.parse_args()
    main(args.sweep, args.draws, args.drop_from)
