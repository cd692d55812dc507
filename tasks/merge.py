"""Merge stage: the branch students merged onto the base with a mergekit method or a mergekit recipe file
(models/merging/)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchmerge.models.merging.config import MergeConfig
from branchmerge.tasks.common import Job, make_job
from branchmerge.tasks.store import ArtifactRef

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent


def recipe_path(recipe: str) -> Path:
    """A relative recipe path is read from the working directory, else from the repository root."""
    path = Path(recipe).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return ROOT / path


def recipe_docs(recipe: str) -> list[dict[str, Any]]:
    from branchmerge.models.merging.recipe import load_recipe

    path = recipe_path(recipe)
    if not path.is_file():
        raise ValueError(f"merge.recipe={recipe!r}: no such file (looked at {path})")
    return load_recipe(path)


def aliases(base: str, branches: dict[str, str]) -> dict[str, str]:
    """The names a recipe may use for the pipeline's models."""
    return {"base": base, **branches, **{f"sft/{name}": path for name, path in branches.items()}}


def needs(cfg: PipelineConfig, item: str) -> list[str]:
    return ["model/student", *(f"sft/{d}" for d in cfg.data.domains)]


def plan(cfg: PipelineConfig, item: str, refs: dict[str, ArtifactRef]) -> Job:
    upstream = {"base": refs["model/student"]} | {f"sft/{d}": refs[f"sft/{d}"] for d in cfg.data.domains}
    if cfg.merge.recipe is not None:  # the recipe's content is the setting (a moved file keeps its cache key)
        config = {"recipe": recipe_docs(cfg.merge.recipe)}
    else:
        config = {"merge": cfg.merge.model_dump()}
    return make_job("merge", config | {"seed": cfg.run.seed}, upstream, __name__, cfg.run.store,
                    "merge" in cfg.run.refresh, hint="merge.parameters (weights, lambda), merge.dtype, the branches")


def mergekit_config(merge: MergeConfig, base: str, branches: dict[str, str]) -> dict[str, Any]:
    """The merge as a mergekit YAML would say it, over the branches (domain -> model path). `merge.parameters`
    holds both kinds of mergekit parameter: per-model ones (weight, density, ...) go to every branch, the rest
    are global; `merge.branch_parameters[domain]` overrides per-model ones for one branch. The student is
    `base_model` for methods built on deltas; methods that ignore a base average the branches alone."""
    from branchmerge.models.merging.registry import get_method

    method = get_method(merge.method)
    per_model = {k: v for k, v in merge.parameters.items() if k in method.model_names()}
    return {"merge_method": merge.method,
            **({"base_model": base} if method.base != "ignored" else {}),
            "models": [{"model": path, "parameters": per_model | merge.branch_parameters.get(name, {})}
                       for name, path in branches.items()],
            "parameters": {k: v for k, v in merge.parameters.items() if k not in per_model},
            "dtype": merge.dtype, "out_dtype": merge.out_dtype}


def check(merge: MergeConfig, branches: list[str]) -> None:
    """Fail on a merge config that cannot run over these branches (no weights are read)."""
    from branchmerge.models.merging.config import MergeConfigError, validate_config
    from branchmerge.models.merging.recipe import plan_recipe

    if merge.recipe is not None:
        try:
            plan_recipe(recipe_docs(merge.recipe), aliases("<base>", {b: f"<{b}>" for b in branches}))
        except MergeConfigError as err:
            raise ValueError(f"invalid merge recipe (merge.recipe={merge.recipe!r}): {err}") from None
        return
    from branchmerge.models.merging.registry import get_method

    for name, params in merge.branch_parameters.items():
        if name not in branches:
            raise ValueError(f"merge.branch_parameters.{name}: no such branch; branches (data.domains): "
                             f"{', '.join(branches)}")
        allowed = get_method(merge.method).model_names()
        for key in params:
            if key not in allowed:
                raise ValueError(f"merge.branch_parameters.{name}.{key}: not a per-model parameter of "
                                 f"{merge.method}; per-model parameters: {', '.join(allowed) or 'none'}")
    try:
        validate_config(mergekit_config(merge, "<base>", {b: f"<{b}>" for b in branches}))
    except (MergeConfigError, ValueError) as err:
        raise ValueError(f"invalid merge config (merge.method={merge.method!r}, merge.parameters="
                         f"{merge.parameters} over {len(branches)} branches): {err}") from None


def build(job: Job, out: Path, logger=None) -> dict[str, Any]:
    from branchmerge.models.merging.recipe import run_recipe
    from branchmerge.models.merging.run import run_merge

    branches = {name: ref for name, ref in sorted(job.upstream.items()) if name.startswith("sft/")}
    # merge_config.json names the inputs by artifact and digest, not by path: the artifact is the same in any store.
    inputs = {"base": job.upstream["base"].digest} | {name: ref.digest for name, ref in branches.items()}
    if "recipe" in job.config:
        docs = job.config["recipe"]
        result = run_recipe(docs, out, seed=job.config["seed"], overwrite=True,
                            aliases=aliases(job.upstream["base"].path,
                                            {n.removeprefix("sft/"): r.path for n, r in branches.items()}),
                            record={"recipe": docs, "inputs": inputs, "seed": job.config["seed"]})
    else:
        merge = MergeConfig.model_validate(job.config["merge"])
        config = mergekit_config(merge, job.upstream["base"].path,
                                 {n.removeprefix("sft/"): ref.path for n, ref in branches.items()})
        record = {"config": mergekit_config(merge, "base", {n.removeprefix("sft/"): n for n in branches}),
                  "inputs": inputs,
                  "seed": job.config["seed"]}
        result = run_merge(config, out, seed=job.config["seed"], overwrite=True, record=record)
    return without_seconds(result)


def without_seconds(result: Any) -> Any:
    """The merge's result without its timings: an artifact's meta is content only (timings go to the summary)."""
    if isinstance(result, dict):
        return {k: without_seconds(v) for k, v in result.items() if k != "seconds"}
    if isinstance(result, list):
        return [without_seconds(v) for v in result]
    return result
