"""Eval stage: greedy pass@1 per domain on the held-out split; every generation is kept for inspection."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks.common import Job, make_job, read_json, read_jsonl, write_json, write_jsonl
from tasks.store import ArtifactRef

CODE = ("tasks/eval.py", "models/generation.py", "models/domains.py")


def plan(eval: dict[str, Any], name: str, model: ArtifactRef, mix: ArtifactRef, store: str, refresh: bool) -> Job:
    # The model's name is not in the key: the same weights evaluated under two names are evaluated once.
    return make_job(f"eval/{name}", eval, {"model": model, "mix": mix}, CODE, store, refresh)


def build(job: Job, out: Path) -> dict[str, Any]:
    from models import domains, generation
    from models.hf import load_model, load_tokenizer

    cfg, mix = job.config, Path(job.upstream["mix"].path)
    items = read_jsonl(mix / "eval.jsonl")
    shots = read_json(mix / "shots.json")
    model_dir = job.upstream["model"].path
    model, tokenizer = load_model(model_dir, cfg["dtype"]), load_tokenizer(model_dir)
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    outputs = generation.generate(model, tokenizer, conversations, n=1, temperature=0.0, top_p=1.0,
                                  max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"], seed=0,
                                  desc=f"eval {job.stage.split('/', 1)[1]}")
    rows = []
    for item, (c,) in zip(items, outputs):
        answer = domains.extract_answer(c["text"])
        rows.append({"id": item["id"], "domain": item["domain"], "question": item["question"],
                     "reference": item["answer"], "completion": c["text"], "answer": answer,
                     "score": domains.score(item, answer), "num_tokens": c["num_tokens"]})
    metrics = accuracy_by_domain(rows)
    write_jsonl(out / "generations.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    return metrics


def accuracy_by_domain(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["domain"]].append(row)
    per_domain = {d: {"pass@1": sum(r["score"] for r in g) / len(g),
                      "answered": sum(r["answer"] is not None for r in g) / len(g),
                      "mean_tokens": sum(r["num_tokens"] for r in g) / len(g), "n": len(g)}
                  for d, g in sorted(groups.items())}
    return {"domains": per_domain, "pass@1": sum(r["score"] for r in rows) / len(rows), "n": len(rows)}
