"""Teacher stage: sample n responses per training prompt, verify each with the task's own score_answer, clean the
verified ones with rule filters (models/data/cleaning.py) and keep the rest (rejection sampling) as the branches' SFT
data; report pass rates and what each filter dropped per domain.

The artifact: samples.jsonl (every sample, scored: {"id", "domain", "completion", "answer", "score", "finished",
"num_tokens", "accepted" (teacher.keep accepts it), "dropped_by" (the teacher.clean filter that dropped it, else
null)}), sft.jsonl (the kept responses with their prompts), pass_rates.json (pass_rates()) and sft.card.json (the
dataset card: card())."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.lm.config import TeacherConfig
from branchmerge.tasks.common import Job, make_job, read_json, read_jsonl, write_json, write_jsonl
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return ["mix", *(["model/teacher"] if cfg.teacher.uses_local_model() else [])]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    # A server's own model (teacher.openai.model) replaces the model/teacher artifact in the key; the server's URL
    # and timeouts are not in it (TeacherConfig.key)
    upstream = {"mix": refs["mix"]} | ({"model": refs["model/teacher"]} if cfg.teacher.uses_local_model() else {})
    return make_job("teacher", {"teacher": cfg.teacher.model_dump(), "seed": cfg.run.seed}, upstream, __name__,
                    cfg.run.store, "teacher" in cfg.run.refresh,
                    key_config={"teacher": cfg.teacher.key(), "seed": cfg.run.seed})


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import domains
    from branchmerge.models.lm.backends import open_backend
    from branchmerge.tasks.store import Store

    cfg, mix = TeacherConfig.model_validate(job.config["teacher"]), job.upstream["mix"].path
    items = read_jsonl(Path(mix) / "train.jsonl")
    shots = read_json(Path(mix) / "shots.json")
    conversations = [domains.build_messages(it, shots[it["domain"]]) for it in items]
    model_dir = job.upstream["model"].path if "model" in job.upstream else None
    backend = open_backend(cfg, section="teacher", model_dir=model_dir, served_model=cfg.openai.model or model_dir,
                           dtype=cfg.model.dtype, batch_size=cfg.batch_size,
                           scratch=Store(job.store).scratch(job.stage, job.key))
    samples = backend.generate(conversations, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, seed=job.config["seed"], desc="teacher")

    scored, kept = select(items, conversations, samples, cfg)
    stats = pass_rates(items, scored, kept, cfg.n, cfg.clean)
    write_jsonl(out / "samples.jsonl", scored)
    write_jsonl(out / "sft.jsonl", kept)
    write_json(out / "pass_rates.json", stats)
    write_json(out / "sft.card.json", card(stats, cfg, job.config["seed"]))
    return stats


def select(items: list[dict], conversations: list[list[dict]], samples: list[list[dict]],
           cfg: TeacherConfig) -> tuple[list[dict], list[dict]]:
    """(scored, kept): every sample scored by the task's verifier and marked `accepted` by cfg.keep; the accepted
    ones run through the cfg.clean filters (`dropped_by`: the first that drops it); of the rest, up to
    cfg.keep_per_prompt distinct responses per prompt, in sample order, become SFT rows with the prompt's messages.
    samples: per item, its n completions {"text", "num_tokens", "finished"} (the backends' generate())."""
    from branchmerge.models.data import cleaning, domains

    scored = []
    for item, completions in zip(items, samples, strict=True):
        for c in completions:
            answer = domains.extract_answer(c["text"])
            row = {"id": item["id"], "domain": item["domain"], "completion": c["text"], "answer": answer,
                   "score": domains.score(item, answer), "finished": c["finished"], "num_tokens": c["num_tokens"]}
            row["accepted"] = {"verified": row["score"] == 1.0, "well_formed": c["finished"] and answer is not None,
                               "all": True}[cfg.keep]
            scored.append(row)

    # the filters see each accepted row with its question (near_duplicate_prompt compares prompts)
    questions = {it["id"]: it["question"] for it in items}
    accepted = [row for row in scored if row["accepted"]]
    reasons = cleaning.drop_reasons([row | {"question": questions[row["id"]]} for row in accepted], cfg.clean)
    for row in scored:
        row["dropped_by"] = None
    for row, why in zip(accepted, reasons):
        row["dropped_by"] = why

    messages = {it["id"]: m for it, m in zip(items, conversations, strict=True)}
    seen: dict[str, set[str]] = defaultdict(set)  # id -> texts kept
    kept = []
    for row in accepted:
        texts = seen[row["id"]]
        if row["dropped_by"] is None and row["completion"] not in texts and len(texts) < cfg.keep_per_prompt:
            texts.add(row["completion"])
            kept.append({"id": row["id"], "domain": row["domain"], "messages": messages[row["id"]],
                         "completion": row["completion"], "score": row["score"]})
    return scored, kept


def counts(scored: list[dict], kept: list[dict], clean: list[str]) -> dict[str, Any]:
    """What became of the samples: {"samples", "accepted" (by teacher.keep), "dropped": {filter: accepted responses
    it dropped, first filter wins} in teacher.clean's order, "capped" (passed every filter but past keep_per_prompt
    distinct ones for its prompt), "kept" (rows of sft.jsonl)}; accepted = sum(dropped) + capped + kept."""
    accepted = [row for row in scored if row["accepted"]]
    dropped = {name: sum(row["dropped_by"] == name for row in accepted) for name in clean}
    return {"samples": len(scored), "accepted": len(accepted), "dropped": dropped,
            "capped": len(accepted) - sum(dropped.values()) - len(kept), "kept": len(kept)}


def pass_rates(items: list[dict], scored: list[dict], kept: list[dict], n: int, clean: list[str]) -> dict[str, Any]:
    """Per domain: pass@n (a prompt with at least one verified sample), the mean sample accuracy, the share of
    samples with an extracted answer, and counts() (accepted, dropped per filter, kept); overall: counts() and the
    filter list `clean`. Content only: the stage's wall time is in the run summary and MLflow, never in the artifact
    (its digest must not depend on the machine)."""
    by_item: dict[str, list[float]] = defaultdict(list)
    for row in scored:
        by_item[row["id"]].append(row["score"])
    per_domain: dict[str, dict[str, Any]] = {}
    for domain in sorted({it["domain"] for it in items}):
        ids = [it["id"] for it in items if it["domain"] == domain]
        rows = [r for r in scored if r["domain"] == domain]
        per_domain[domain] = {
            f"pass@{n}": sum(max(by_item[i]) == 1.0 for i in ids) / len(ids),
            "sample_accuracy": sum(sum(by_item[i]) for i in ids) / (len(ids) * n),
            "tagged": sum(r["answer"] is not None for r in rows) / (len(ids) * n),
        } | counts(rows, [k for k in kept if k["domain"] == domain], clean)
    return {"domains": per_domain, "clean": clean} | counts(scored, kept, clean)


def card(stats: dict[str, Any], cfg: TeacherConfig, seed: int) -> dict[str, Any]:
    """sft.jsonl's dataset card (sft.card.json beside it): the counts overall and per domain (pass_rates()), the
    filters in the order they ran with their rules and thresholds, and the settings that made the data
    (TeacherConfig.key(): no server URL or key) with the seed."""
    from branchmerge.models.data import cleaning

    return {"data": "sft.jsonl",
            "counts": {k: stats[k] for k in ("samples", "accepted", "dropped", "capped", "kept")},
            "domains": stats["domains"],
            "clean": cfg.clean,
            "filters": {name: cleaning.rule(name) for name in cfg.clean},
            "thresholds": cleaning.THRESHOLDS,
            "settings": cfg.key() | {"seed": seed}}
