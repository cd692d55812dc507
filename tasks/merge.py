"""Merge stage: the branch students merged onto the base with a mergekit method or a mergekit recipe file
(models/merge.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Job, make_job
from tasks.store import ArtifactRef

CODE = ("tasks/merge.py", "models/merge.py", "models/merging/registry.py", "models/merging/run.py",
        "models/merging/values.py", "models/merging/linear.py", "models/merging/task_arithmetic.py",
        "models/merging/sparsify.py", "models/merging/geometric.py", "models/merging/sce.py",
        "models/merging/spherical.py", "models/merging/arcee_fusion.py", "models/merging/recipe.py",
        "models/merging/global_trim.py")
ROOT = Path(__file__).resolve().parent.parent


def recipe_path(recipe: str) -> Path:
    """A relative recipe path is read from the working directory, else from the repository root."""
    path = Path(recipe).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return ROOT / path


def recipe_docs(merge: dict[str, Any]) -> list[dict[str, Any]]:
    from models.merge import load_recipe

    path = recipe_path(merge["recipe"])
    if not path.is_file():
        raise ValueError(f"merge.recipe={merge['recipe']!r}: no such file (looked at {path})")
    return load_recipe(path)


def aliases(base: str, branches: dict[str, str]) -> dict[str, str]:
    """The names a recipe may use for the pipeline's models."""
    return {"base": base, **branches, **{f"sft/{name}": path for name, path in branches.items()}}


def plan(merge: dict[str, Any], seed: int, base: ArtifactRef, branches: dict[str, ArtifactRef], store: str,
         refresh: bool) -> Job:
    upstream = {"base": base} | {f"sft/{name}": ref for name, ref in branches.items()}
    if merge["recipe"] is not None:  # the recipe's content is the setting (a moved file keeps its cache key)
        merge = {"recipe": recipe_docs(merge)}
    else:
        merge = {k: v for k, v in merge.items() if k != "recipe"}
    return make_job("merge", merge | {"seed": seed}, upstream, CODE, store, refresh)


def mergekit_config(merge: dict[str, Any], base: str, branches: list[str]) -> dict[str, Any]:
    """The merge as a mergekit YAML would say it. `merge.parameters` holds both kinds of mergekit parameter:
    per-model ones (weight, density, ...) go to every branch, the rest are global. The student is
    `base_model` for methods built on deltas; methods that ignore a base average the branches alone."""
    from models.merge import get_method

    method = get_method(merge["method"])
    per_model = {k: v for k, v in merge["parameters"].items() if k in method.model_names()}
    return {"merge_method": merge["method"],
            **({"base_model": base} if method.base != "ignored" else {}),
            "models": [{"model": path, "parameters": dict(per_model)} for path in branches],
            "parameters": {k: v for k, v in merge["parameters"].items() if k not in per_model},
            "dtype": merge["dtype"], "out_dtype": merge["out_dtype"], "tokenizer_source": base}


def check(merge: dict[str, Any], branches: list[str]) -> None:
    """Fail on a bad merge config before anything upstream is computed (no weights are read)."""
    from models.merge import MergeConfigError, plan_recipe, validate_config

    if merge["recipe"] is not None:
        try:
            plan_recipe(recipe_docs(merge), aliases("<base>", {b: f"<{b}>" for b in branches}))
        except MergeConfigError as err:
            raise ValueError(f"invalid merge recipe (merge.recipe={merge['recipe']!r}): {err}") from None
        return
    try:
        validate_config(mergekit_config(merge, "<base>", [f"<{b}>" for b in branches]))
    except (MergeConfigError, ValueError) as err:
        raise ValueError(f"invalid merge config (merge.method={merge['method']!r}, merge.parameters="
                         f"{merge['parameters']} over {len(branches)} branches): {err}") from None


def build(job: Job, out: Path) -> dict[str, Any]:
    from models.merge import run_merge, run_recipe

    if "recipe" in job.config:
        branch_paths = {name.removeprefix("sft/"): ref.path for name, ref in job.upstream.items()
                        if name.startswith("sft/")}
        return run_recipe(job.config["recipe"], out, seed=job.config["seed"], overwrite=True,
                          aliases=aliases(job.upstream["base"].path, branch_paths))
    branches = [ref.path for name, ref in sorted(job.upstream.items()) if name.startswith("sft/")]
    config = mergekit_config(job.config, job.upstream["base"].path, branches)
    return run_merge(config, out, seed=job.config["seed"], overwrite=True)
