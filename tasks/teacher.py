"""Teacher stage: sample n responses per training prompt, verify each with the task's own score_answer, keep
the verified ones (rejection sampling) as the branches' SFT data, and report pass rates per domain."""
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

    scored, kept = [], []
    for item, messages, completions in zip(items, conversations, samples):
        seen: set[str] = set()
        for c in completions:
            answer = domains.extract_answer(c["text"])
            row = {"id": item["id"], "domain": item["domain"], "completion": c["text"], "answer": answer,
                   "score": domains.score(item, answer), "finished": c["finished"], "num_tokens": c["num_tokens"]}
            scored.append(row)
            accepted = {"verified": row["score"] == 1.0, "well_formed": c["finished"] and answer is not None,
                        "all": True}[cfg.keep]
            if accepted and c["text"] not in seen and len(seen) < cfg.keep_per_prompt:
                seen.add(c["text"])
                kept.append({"id": item["id"], "domain": item["domain"], "messages": messages,
                             "completion": c["text"], "score": row["score"]})

    stats = pass_rates(items, scored, kept, cfg.n)
    write_jsonl(out / "samples.jsonl", scored)
    write_jsonl(out / "sft.jsonl", kept)
    write_json(out / "pass_rates.json", stats)
    return stats


def pass_rates(items: list[dict], scored: list[dict], kept: list[dict], n: int) -> dict[str, Any]:
    """Per domain: pass@n (a prompt with at least one verified sample), the mean sample accuracy, the share of
    samples with an extracted answer, and how many responses were kept. Content only: the stage's wall time is
    in the run summary and MLflow, never in the artifact (its digest must not depend on the machine)."""
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
    return {"domains": per_domain, "kept": len(kept)}
