"""Mix stage: reasoning-gym domains -> train / dev / held-out prompt pools, few-shot examples, clusters.

CLIMB-style: embed every training prompt (all-MiniLM-L6-v2), k-means, optionally merge close clusters, and
report how clusters align with domains and each cluster's size. The mixture over the clusters (data.mixture) is
not this stage's business: its settings stay out of this key, so choosing or searching a mixture never redraws the
prompts nor re-runs the teacher (models/data/mixing.cluster_weights, tasks/climb.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.data.config import DataConfig
from branchmerge.tasks.common import Job, make_job, write_json, write_jsonl
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

# data settings that only say how SFT data is drawn over the clusters: not read here
MIXTURE_KEYS = {"mixture", "temperature", "custom_weights", "climb"}


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return []


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    return make_job("mix", {"data": cfg.data.model_dump()}, {}, __name__, cfg.run.store, "mix" in cfg.run.refresh,
                    key_config={"data": cfg.data.model_dump(exclude=MIXTURE_KEYS)})


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.data import domains, mixing

    data = DataConfig.model_validate(job.config["data"])
    train, dev, held_out, shots = [], [], [], {}
    for name, domain in data.domains.items():
        tasks = [t.model_dump() for t in domain.tasks]
        items = domains.build_items(name, tasks, size=data.train_size + data.dev_size + data.eval_size,
                                    seed=data.seed)
        wanted = data.train_size + data.dev_size + data.eval_size
        if len(items) < wanted:  # else the held-out split would eat the training pool (silently, before)
            raise ValueError(f"data.domains.{name}: reasoning-gym gave {len(items)} distinct questions, fewer than "
                             f"data.train_size + dev_size + eval_size = {wanted}; widen the tasks' configs (e.g. "
                             "max_value) or lower the sizes")
        rest, ev = domains.split_items(items, data.eval_size, seed=data.seed)
        tr, dv = domains.split_items(rest, data.dev_size, seed=data.seed + 1)
        train += tr
        dev += dv
        held_out += ev
        shots[name] = domains.make_shots(tasks, k=data.shots, seed=data.seed + 10_000)

    embed = data.embed
    vectors = mixing.embed_texts([it["question"] for it in train], batch_size=embed.batch_size)
    labels, centroids = mixing.kmeans(vectors, k=min(embed.clusters, len(train)), seed=data.seed)
    if embed.merge_threshold > 0:
        labels = mixing.merge_close_clusters(labels, centroids, threshold=embed.merge_threshold)
    for item, label in zip(train, labels):
        item["cluster"] = int(label)
    alignment = mixing.cluster_alignment(labels, [it["domain"] for it in train])
    sizes: dict[str, int] = {}  # question characters per cluster: CLIMB's token share, in characters
    for it in sorted(train, key=lambda it: it["cluster"]):
        sizes[str(it["cluster"])] = sizes.get(str(it["cluster"]), 0) + len(it["question"])

    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "dev.jsonl", dev)
    write_jsonl(out / "eval.jsonl", held_out)
    write_json(out / "shots.json", shots)
    summary = {"train": len(train), "dev": len(dev), "eval": len(held_out), "cluster_sizes": sizes,
               "alignment": {k: alignment[k] for k in ("ari", "nmi", "purity")},
               "contingency": alignment.get("contingency")}
    write_json(out / "mix.json", summary)
    return {k: summary[k] for k in ("train", "dev", "eval", "cluster_sizes", "alignment")}

