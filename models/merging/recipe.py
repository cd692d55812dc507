"""Merge recipes: a mergekit YAML file, or a mergekit-multi file of several steps, run as chained merges.

A recipe is what `mergekit-yaml` or `mergekit-multi` reads, unchanged:

    name: mid                      # a named step: its output can be a model in later steps
    merge_method: arcee_fusion
    base_model: science
    models: [{model: math}, {model: science}]
    ---
    merge_method: arcee_fusion     # the unnamed step is the final model (else the last step is)
    base_model: code
    models: [{model: mid}, {model: code}]

A model reference (`models[].model`, `base_model`, `tokenizer_source`) resolves, in this order, to an earlier
step's output, an alias the caller gives (the pipeline: `base` = the student, each branch name = its SFT
model, so a branch can be the base), or a local model folder. Hub ids are refused: nothing is downloaded at run
time. Every step is validated, and every folder checked, before the first tensor is read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import MergeConfigError, plain_data, validate_config
from .run import run_merge


@dataclass(frozen=True)
class Step:
    name: str | None  # None: the unnamed (final) document
    config: dict[str, Any]  # the document without `name`, references as written
    needs: tuple[str, ...]  # earlier steps whose outputs it reads

    @property
    def label(self) -> str:
        return self.name or "final"


def load_recipe(source: str | os.PathLike | Mapping | list) -> list[dict[str, Any]]:
    """The recipe's documents: from a YAML file path, YAML text (has a newline), or parsed document(s)."""
    if isinstance(source, (Mapping, list)):
        docs = [source] if isinstance(source, Mapping) else list(source)
    else:
        is_text = isinstance(source, str) and "\n" in source
        if not is_text and not Path(source).is_file():
            raise MergeConfigError(f"recipe {str(source)!r}: no such file")
        text = str(source) if is_text else Path(source).read_text()
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as err:
            raise MergeConfigError(f"recipe {source}: not valid YAML: {err}") from None
    docs = [plain_data(d) for d in docs]
    if not docs:
        raise MergeConfigError("recipe: no merge document found")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise MergeConfigError(f"recipe document {i}: expected a mergekit config mapping; got {doc!r}")
    return docs


def _model_lists(config: dict[str, Any]) -> list[tuple[str, list]]:
    """(key path, list of model entries): `models`, and each slice's `sources`."""
    lists = [("models", config["models"])] if isinstance(config.get("models"), list) else []
    for j, piece in enumerate(config.get("slices") or [] if isinstance(config.get("slices"), list) else []):
        if isinstance(piece, dict) and isinstance(piece.get("sources"), list):
            lists.append((f"slices[{j}].sources", piece["sources"]))
    return lists


def _references(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(key path, model reference) for every place a mergekit config names a model."""
    refs = []
    for where, entries in _model_lists(config):
        for i, entry in enumerate(entries):
            model = entry.get("model") if isinstance(entry, dict) else entry
            if isinstance(model, str):
                refs.append((f"{where}[{i}].model", model))
    if isinstance(config.get("base_model"), str):
        refs.append(("base_model", config["base_model"]))
    source = config.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union"):
        refs.append(("tokenizer_source", source))
    return refs


def _substitute(config: dict[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `config` with every model reference found in `paths` replaced by its path."""
    def substituted(entries: list) -> list:
        out = []
        for entry in entries:
            if isinstance(entry, str):
                entry = {"model": entry}
            if isinstance(entry, dict) and isinstance(entry.get("model"), str):
                entry = {**entry, "model": paths.get(entry["model"], entry["model"])}
            out.append(entry)
        return out

    out = dict(config)
    if isinstance(out.get("models"), list):
        out["models"] = substituted(out["models"])
    if isinstance(out.get("slices"), list):
        out["slices"] = [{**s, "sources": substituted(s["sources"])} if isinstance(s, dict)
                         and isinstance(s.get("sources"), list) else s for s in out["slices"]]
    for key in ("base_model", "tokenizer_source"):
        if isinstance(out.get(key), str):
            out[key] = paths.get(out[key], out[key])
    return out


def plan_recipe(docs: list[dict[str, Any]], aliases: Mapping[str, str] | None = None,
                check_folders: bool = True) -> list[Step]:
    """The steps in run order, each validated; raises MergeConfigError naming the document and key."""
    aliases = dict(aliases or {})
    steps: list[Step] = []
    names: set[str] = set()
    for i, doc in enumerate(docs):
        where = f"recipe document {i}"
        name = doc.get("name")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise MergeConfigError(f"{where}.name: expected a non-empty string; got {name!r}")
            where = f"recipe step {name!r}"
            if name in names:
                raise MergeConfigError(f"{where}: the name is used twice")
            if name in aliases:
                raise MergeConfigError(f"{where}: the name is already a model ({name} = {aliases[name]}); rename the step")
        elif any(s.name is None for s in steps):
            raise MergeConfigError(f"{where}: only one unnamed (final) document is allowed; name the others")
        config = {k: v for k, v in doc.items() if k != "name"}
        needs, placeholders = [], {}
        for at, ref in _references(config):
            if ref in names:
                needs.append(ref)
                placeholders[ref] = f"<step {ref}>"
            elif ref in aliases:
                placeholders[ref] = aliases[ref]
            elif any(ref == d.get("name") for d in docs[i + 1:]):
                raise MergeConfigError(f"{where}.{at}: step {ref!r} is defined later in the recipe; order the "
                                       f"documents so a step comes after the steps it uses")
            elif check_folders and not (Path(ref) / "config.json").is_file():
                known = sorted(names | set(aliases))
                raise MergeConfigError(
                    f"{where}.{at}: {ref!r} is not an earlier step, a known model ({', '.join(known) or 'none'}) "
                    f"or a local model folder with config.json (hub ids are not downloaded at run time)")
        try:
            validate_config(_substitute(config, placeholders))
        except MergeConfigError as err:
            raise MergeConfigError(f"{where}: {err}") from None
        steps.append(Step(name, config, tuple(dict.fromkeys(needs))))
        if name is not None:
            names.add(name)
    final = next((s for s in steps if s.name is None), steps[-1])
    used = _closure(final, {s.name: s for s in steps})
    unused = [s.label for s in steps if s.label not in used]
    if unused:
        raise MergeConfigError(f"recipe: step(s) {', '.join(map(repr, unused))} are not used by the final merge "
                               f"{final.label!r}; remove them or use their output")
    return [s for s in steps if s is not final] + [final]


def _closure(step: Step, by_name: dict[str | None, Step]) -> set[str]:
    seen = {step.label}
    for need in step.needs:
        seen |= _closure(by_name[need], by_name)
    return seen


def step_seed(seed: int, step: Step) -> int:
    """The final step uses `seed` itself (a one-document recipe equals run_merge(config, seed)); named steps
    get their own stream, so DARE masks of two steps that share tensor names are independent."""
    if step.name is None:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{step.name}".encode()).digest()[:8], "little") >> 1


def run_recipe(docs: list[dict[str, Any]], out_dir: str | os.PathLike, *, seed: int,
               aliases: Mapping[str, str] | None = None, workdir: str | os.PathLike | None = None,
               overwrite: bool = False, workers: int = 2, record: dict | None = None) -> dict[str, Any]:
    """Run every step; intermediate models go to `workdir` (kept) or a temporary folder (deleted after).
    `workers`: tensors merged at once (run_merge). `record`: what the final model's merge_config.json holds
    (default: the recipe, the aliases and the seed)."""
    steps = plan_recipe(docs, aliases)
    out_dir = Path(out_dir)
    scratch = Path(workdir) if workdir is not None else Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.steps-", dir=out_dir.parent if out_dir.parent.exists() else None))
    paths = dict(aliases or {})
    results = []
    try:
        for step in steps:
            final = step is steps[-1]
            target = out_dir if final else scratch / step.name
            config = _substitute(step.config, paths)
            if final and record is None:
                record = {"recipe": docs, "aliases": dict(aliases or {}), "seed": seed}
            # A step folder in the caller's workdir may be the caller's own: replaced only with `overwrite`.
            result = run_merge(config, target, seed=step_seed(seed, step),
                               overwrite=overwrite or (not final and workdir is None),
                               record=record if final else None, workers=workers)
            results.append({"step": step.label, **result})
            if not final:
                paths[step.name] = str(target)
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"method": " -> ".join(r["method"] for r in results), "steps": results,
            "seconds": round(sum(r["seconds"] for r in results), 3)}
