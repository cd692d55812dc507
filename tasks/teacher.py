"""Teacher stage: sample n responses per training prompt, verify each with the task's own score_answer, keep
the verified ones (rejection sampling) as the branches' SFT data, and report pass rates per domain."""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks.common import Job, make_job, read_json, read_jsonl, write_json, write_jsonl
from tasks.store import ArtifactRef

CODE = ("tasks/teacher.py", "models/generation.py", "models/domains.py")


def plan(teacher: dict[str, Any], seed: int, mix: ArtifactRef, model: ArtifactRef, store: str, refresh: bool) -> Job:
    config = {k: v for k, v in teacher.items() if k != "model"} | {"dtype": teacher["model"]["dtype"], "seed": seed}
    return make_job("teacher", config, {"mix": mix, "model": model}, CODE, store, refresh)


def build(job: Job, out: Path) -> dict[str, Any]:
    from models import domains, generation
    from models.hf import load_model, load_tokenizer

    cfg, mix = job.config, job.upstream["mix"].path
    items = read_jsonl(Path(mix) / "train.jsonl")
    shots = read_json(Path(mix) / "shots.json")
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    model_dir = job.upstream["model"].path
    model, tokenizer = load_model(model_dir, cfg["dtype"]), load_tokenizer(model_dir)
    t0 = time.perf_counter()
    samples = generation.generate(model, tokenizer, conversations, n=cfg["n"], temperature=cfg["temperature"],
                                  top_p=cfg["top_p"], max_new_tokens=cfg["max_new_tokens"],
                                  batch_size=cfg["batch_size"], seed=cfg["seed"], desc="teacher")
    minutes = (time.perf_counter() - t0) / 60

    scored, kept = [], []
    for item, messages, completions in zip(items, conversations, samples):
        seen: set[str] = set()
        for c in completions:
            answer = domains.extract_answer(c["text"])
            row = {"id": item["id"], "domain": item["domain"], "completion": c["text"], "answer": answer,
                   "score": domains.score(item, answer), "finished": c["finished"], "num_tokens": c["num_tokens"]}
            scored.append(row)
            accepted = {"verified": row["score"] == 1.0, "well_formed": c["finished"] and answer is not None,
                        "all": True}[cfg["keep"]]
            if accepted and c["text"] not in seen and len(seen) < cfg["keep_per_prompt"]:
                seen.add(c["text"])
                kept.append({"id": item["id"], "domain": item["domain"], "messages": messages,
                             "completion": c["text"], "score": row["score"]})

    stats = pass_rates(items, scored, kept, cfg["n"], minutes)
    write_jsonl(out / "samples.jsonl", scored)
    write_jsonl(out / "sft.jsonl", kept)
    write_json(out / "pass_rates.json", stats)
    return stats


def pass_rates(items: list[dict], scored: list[dict], kept: list[dict], n: int, minutes: float) -> dict[str, Any]:
    by_item: dict[str, list[float]] = defaultdict(list)
    for row in scored:
        by_item[row["id"]].append(row["score"])
    per_domain: dict[str, dict[str, float]] = {}
    for domain in sorted({it["domain"] for it in items}):
        ids = [it["id"] for it in items if it["domain"] == domain]
        per_domain[domain] = {
            f"pass@{n}": sum(max(by_item[i]) == 1.0 for i in ids) / len(ids),
            "sample_accuracy": sum(sum(by_item[i]) for i in ids) / (len(ids) * n),
            "tagged": sum(r["answer"] is not None for r in scored if r["domain"] == domain) / (len(ids) * n),
            "kept": sum(k["domain"] == domain for k in kept),
        }
    return {"domains": per_domain, "kept": len(kept), "generation_minutes": minutes,
            "kept_per_minute": len(kept) / max(minutes, 1e-9)}
