"""Does CLIMB's searched mixture beat uniform weights, and does cleaning change the branches (issue 14, point 6)?

    .venv/bin/python bench/mixture_study.py multirun/<date>/<time> [multirun/<date>/<time> ...]

Each job is one (seed, setting); the setting is the job's `data.mixture` and `teacher.clean` overrides (as
recorded in .hydra/overrides.yaml). The study compares settings two at a time on the same seeds:
- climb vs uniform (data.mixture=climb / uniform, cleaning on): the weights act on the mixed-data baseline's
  data (over every cluster) and on each branch's sub-domain clusters, so both are compared, and the merge of the
  branches beside them;
- cleaning on vs off (uniform, teacher.clean=[]): the same models.
Two measures, each pooled over seeds (a prompt's value averaged over the seeds first, then a paired bootstrap
over prompts within domains, models/eval/metrics.paired, the estimator of every run's report):
- **dev**: minus the loss of each dev prompt's gold worked answer (per token), the quantity CLIMB's proxy runs
  optimise, measured here on the full models. The dev split is disjoint from training and held-out eval.
- **held-out**: greedy pass@1 on the held-out eval (the run's own generations).
A branch is compared on its own domain's prompts; the baseline and the merge on all domains (the merge on
held-out only). Dev losses are computed once per model artifact and kept in <first sweep>/dev_losses.json.
Prints Markdown.
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

from bench.seed_study import generations, own_domain  # noqa: E402
from branchmerge.models.eval.metrics import paired  # noqa: E402

SETTING_KEYS = ("data.mixture", "teacher.clean")


def setting(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return " ".join(sorted(o for o in overrides if o.split("=")[0] in SETTING_KEYS)) or "default"


def model_path(summary: dict, model: str) -> str:
    stage = "merge" if model == "merged" else "sft/" + model.removeprefix("branch/")
    return summary["stages"][stage]["path"]


def item_losses(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 12) -> list[float]:
    """Each example's mean next-token loss over its target tokens (what toolkit.group_losses measures per group,
    here per example). Batches hold one domain's examples, whose system prompt and few-shot turns are read once
    (toolkit.decoder_hidden, as SFT does); only target positions reach the LM head."""
    import torch

    from branchmerge.kernels.linear_ce import chunked_linear_logprobs
    from branchmerge.models.training.toolkit import IGNORE_INDEX, decoder_hidden, pad_collate, tokenize_example

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenize_example(tokenizer, e["messages"], e["completion"], max_length) for e in examples]
    order = sorted(range(len(rows)), key=lambda i: (examples[i]["domain"], len(rows[i]["input_ids"])))
    batches = [[]]
    for i in order:  # one domain per batch: its rows share the few-shot prefix
        current = batches[-1]
        if len(current) == batch_size or (current and examples[current[0]]["domain"] != examples[i]["domain"]):
            batches.append([])
        batches[-1].append(i)
    out = [0.0] * len(rows)
    model.eval()
    with torch.inference_mode():
        for idx in batches:
            batch = pad_collate([rows[i] for i in idx], pad_id)
            hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"], shared_prefix=True)
            labels = batch["labels"][:, 1:]
            logps = chunked_linear_logprobs(hidden[:, :-1], model.get_output_embeddings().weight, labels)
            per_row = -logps.sum(-1) / (labels != IGNORE_INDEX).sum(-1)
            for i, v in zip(idx, per_row.tolist()):
                out[i] = v
    return out


def dev_rows(summary: dict, model: str, cache: dict) -> list[dict]:
    """One row per dev prompt: score = minus the per-token loss of its gold worked answer under `model`."""
    return model_dev_rows(model_path(summary, model), Path(summary["stages"]["mix"]["path"]),
                          summary["config"]["sft"]["max_length"], cache)


def model_dev_rows(path: str, mix: Path, max_length: int, cache: dict) -> list[dict]:
    """dev_rows for the model folder `path`, on the dev split of the mix artifact `mix`; cached by path."""
    if path not in cache:
        from transformers.utils import logging as hf_logging

        from branchmerge.models.data import domains
        from branchmerge.models.lm.hf import load_model, load_tokenizer
        from branchmerge.tasks.common import read_json, read_jsonl

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model would bury the tables
        dev = domains.dev_examples(read_jsonl(mix / "dev.jsonl"), read_json(mix / "shots.json"))
        examples = [e for group in dev.values() for e in group]
        losses = item_losses(load_model(path, "float32"), load_tokenizer(path), examples, max_length)
        cache[path] = [{"id": e["id"], "domain": e["domain"], "score": -loss, "answer": "", "num_tokens": 0}
                       for e, loss in zip(examples, losses)]
    return cache[path]


def pooled(per_seed: list[list[dict]]) -> list[dict]:
    out: dict[str, dict] = {}
    for rows in per_seed:
        for r in rows:
            out.setdefault(r["id"], dict(r, score=0.0))["score"] += r["score"] / len(per_seed)
    return list(out.values())


def compare(a: list[dict], b: list[dict], model: str, measure: str, cache: dict) -> tuple[dict, list[dict], list]:
    """a - b for `model` under `measure` (dev / held-out), pooled over the seeds both settings ran."""
    rows_a, rows_b = [], []
    for sa, sb in zip(a, b):
        if measure == "dev":
            ra, rb = dev_rows(sa, model, cache), dev_rows(sb, model, cache)
        else:
            ra, rb = generations(sa, model), generations(sb, model)
        if model.startswith("branch/"):
            ra, rb = own_domain(ra, model.removeprefix("branch/")), own_domain(rb, model.removeprefix("branch/"))
        rows_a.append(ra)
        rows_b.append(rb)
    per_seed = [paired(ra, rb) for ra, rb in zip(rows_a, rows_b)]
    means = [(statistics.mean(r["score"] for r in ra), statistics.mean(r["score"] for r in rb))
             for ra, rb in zip(rows_a, rows_b)]
    return paired(pooled(rows_a), pooled(rows_b)), per_seed, means


def table(name_a: str, name_b: str, a: list[dict], b: list[dict], cache: dict) -> None:
    domains = list(a[0]["results"]["base"])
    models = ["mixture", "merged", *(f"branch/{d}" for d in domains)]
    print(f"\n**{name_a}** minus **{name_b}**, seeds {[s['config']['run']['seed'] for s in a]}; dev: minus the "
          "gold answer's loss per token (higher is better); held-out: greedy pass@1.\n")
    print(f"| model | on | measure | {name_a} (mean over seeds) | {name_b} | pooled difference | 95 % interval | p "
          "| per seed: difference (p) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for model in models:
        scope = model.removeprefix("branch/") + " only" if model.startswith("branch/") else "all domains"
        for measure in ("held-out",) if model == "merged" else ("dev", "held-out"):  # the question: the
            # data's models; the merge only by its held-out score (its dev loss would cost ~1 min per model)
            c, per_seed, means = compare(a, b, model, measure, cache)
            ma, mb = statistics.mean(m[0] for m in means), statistics.mean(m[1] for m in means)
            print(f"| {model} | {scope} | {measure} | {ma:.3f} | {mb:.3f} | {c['difference']:+.3f} | "
                  f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p']:.3f} | "
                  + ", ".join(f"{x['difference']:+.3f} ({x['p']:.2f})" for x in per_seed) + " |")


def climb_report(summaries: list[dict]) -> None:
    print("\nCLIMB's searches (weights over the clusters; prior = the clusters' shares of the training prompts):\n")
    print("| seed | proxy runs | best observed score | chosen from | chosen: predicted score | predictor fit "
          "| chosen weights | prior |")
    print("| ---: | ---: | ---: | --- | ---: | --- | --- | --- |")
    for s in summaries:
        out = Path(s["stages"]["climb"]["path"])
        search = json.loads((out / "search.json").read_text())
        runs = [r for rnd in search["rounds"] for r in rnd["runs"]]
        fit = {k: v for k, v in (search["predictor"] or {}).items()
               if k.startswith(("r2", "spearman")) and isinstance(v, (int, float))}
        fit_text = ", ".join(f"{k} {v:.2f}" for k, v in fit.items()) or "-"
        fit_text += f" ({search['predictor']['n_trees']} trees)"
        print(f"| {s['config']['run']['seed']} | {len(runs)} | {search['best_observed']['score']:.4f} | "
              f"{search['chosen'].get('from', 'predictor')} | {search['chosen']['predicted_score']:.4f} | {fit_text} | "
              + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(search["chosen"]["mixture"].items(),
                                                            key=lambda kv: int(kv[0]))) + " | "
              + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(search["prior"].items(), key=lambda kv: int(kv[0])))
              + " |")


def cleaning_report(summaries: list[dict], unclean: list[dict]) -> None:
    print("\nWhat cleaning removed (teacher responses that passed verification, per filter; first filter wins):\n")
    print("| seed | domain | accepted | " + " | ".join(summaries[0]["config"]["teacher"]["clean"])
          + " | capped | kept | kept without cleaning |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in summaries[0]["config"]["teacher"]["clean"])
          + " | ---: | ---: | ---: |")
    for s, u in zip(summaries, unclean):
        rates = json.loads((Path(s["stages"]["teacher"]["path"]) / "pass_rates.json").read_text())
        plain = json.loads((Path(u["stages"]["teacher"]["path"]) / "pass_rates.json").read_text())
        for domain, row in [*rates["domains"].items(), ("all", rates)]:
            other = plain if domain == "all" else plain["domains"][domain]
            print(f"| {s['config']['run']['seed']} | {domain} | {row['accepted']} | "
                  + " | ".join(str(row["dropped"][f]) for f in rates["clean"])
                  + f" | {row['capped']} | {row['kept']} | {other['kept']} |")


def main(sweeps: list[Path]) -> None:
    by_setting: dict[str, dict[int, dict]] = defaultdict(dict)
    for sweep in sweeps:
        for path in sweep.glob("*/summary.json"):
            s = json.loads(path.read_text())
            by_setting[setting(path.parent)][s["config"]["run"]["seed"]] = s
    print("settings:", ", ".join(f"{k} (seeds {sorted(v)})" for k, v in sorted(by_setting.items())))
    cache_file = sweeps[0] / "dev_losses.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def runs(name: str) -> list[dict]:
        return [by_setting[name][k] for k in sorted(by_setting[name])]

    climb, uniform = "data.mixture=climb", "data.mixture=uniform"
    unclean = " ".join(sorted([uniform, "teacher.clean=[]"]))
    try:  # the dev losses computed so far are kept whatever happens (they take ~10 s per model)
        if climb in by_setting and uniform in by_setting:
            seeds = sorted(set(by_setting[climb]) & set(by_setting[uniform]))
            table("climb", "uniform", [by_setting[climb][k] for k in seeds], [by_setting[uniform][k] for k in seeds],
                  cache)
            climb_report(runs(climb))
        if unclean in by_setting and uniform in by_setting:
            seeds = sorted(set(by_setting[unclean]) & set(by_setting[uniform]))
            table("cleaned", "not cleaned", [by_setting[uniform][k] for k in seeds],
                  [by_setting[unclean][k] for k in seeds], cache)
            cleaning_report([by_setting[uniform][k] for k in seeds], [by_setting[unclean][k] for k in seeds])
    finally:
        cache_file.write_text(json.dumps(cache))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
