"""Scores of an evaluation: per domain and overall, from the scored generations."""
from __future__ import annotations

from collections import defaultdict
from typing import Any


def accuracy_by_domain(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """rows: {"domain", "score", "answer", "num_tokens"} per prompt -> greedy pass@1, answered fraction and mean
    completion tokens per domain, and pass@1 over all rows."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["domain"]].append(row)
    per_domain = {d: {"pass@1": sum(r["score"] for r in g) / len(g),
                      "answered": sum(r["answer"] is not None for r in g) / len(g),
                      "mean_tokens": sum(r["num_tokens"] for r in g) / len(g), "n": len(g)}
                  for d, g in sorted(groups.items())}
    return {"domains": per_domain, "pass@1": sum(r["score"] for r in rows) / len(rows), "n": len(rows)}
