"""Merge stage: the branch students merged onto the base with a mergekit method (models/merge.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job
from tasks.store import ArtifactRef

CODE = ("tasks/merge.py", "models/merge.py", "models/merging/registry.py", "models/merging/run.py",
        "models/merging/values.py", "models/merging/linear.py", "models/merging/task_arithmetic.py",
        "models/merging/sparsify.py", "models/merging/geometric.py", "models/merging/sce.py")


def plan(merge: dict[str, Any], seed: int, base: ArtifactRef, branches: dict[str, ArtifactRef], store: str,
         refresh: bool) -> Job:
    upstream = {"base": base} | {f"sft/{name}": ref for name, ref in branches.items()}
    return make_job("merge", merge | {"seed": seed}, upstream, CODE, store, refresh)


def mergekit_config(merge: dict[str, Any], base: str, branches: list[str]) -> dict[str, Any]:
    """The merge as a mergekit YAML would say it. `merge.parameters` holds both kinds of mergekit parameter:
    per-model ones (weight, density, ...) go to every branch, the rest are global. The student is
    `base_model` for methods built on deltas; methods that ignore a base average the branches alone."""
    from models.merge import get_method

    method = get_method(merge["method"])
    per_model = {k: v for k, v in merge["parameters"].items() if k in method.model_names()}
    return {"merge_method": merge["method"],
            **({"base_model": base} if method.base == "required" else {}),
            "models": [{"model": path, "parameters": dict(per_model)} for path in branches],
            "parameters": {k: v for k, v in merge["parameters"].items() if k not in per_model},
            "dtype": merge["dtype"], "out_dtype": merge["out_dtype"], "tokenizer_source": base}


def check(merge: dict[str, Any], branches: list[str]) -> None:
    """Fail on a bad merge config before anything upstream is computed (no weights are read)."""
    from models.merge import MergeConfigError, validate_config

    try:
        validate_config(mergekit_config(merge, "<base>", [f"<{b}>" for b in branches]))
    except (MergeConfigError, ValueError) as err:
        raise ValueError(f"invalid merge config (merge.method={merge['method']!r}, merge.parameters="
                         f"{merge['parameters']} over {len(branches)} branches): {err}") from None


def build(job: Job, out: Path) -> dict[str, Any]:
    from models.merge import run_merge

    branches = [ref.path for name, ref in sorted(job.upstream.items()) if name.startswith("sft/")]
    config = mergekit_config(job.config, job.upstream["base"].path, branches)
    return run_merge(config, out, seed=job.config["seed"], overwrite=True)
