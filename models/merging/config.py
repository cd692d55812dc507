"""Merge settings: the pipeline's merge stage (MergeConfig, at the end) and a mergekit-shaped merge config,
validated from the config alone (no file opened) into a MergeSpec:

    {merge_method: ties, base_model: /m/base,
     models: [{model: /m/math, parameters: {weight: 1.0, density: 0.5}}, ...],
     parameters: {normalize: true}, dtype: float32, out_dtype: bfloat16, tokenizer_source: base}

The first of the merge's three phases (mergekit's config.py): validate_config (this file) -> plan (plan.py, from
the safetensors headers) -> run_merge (run.py, the tensors). Importable without torch (the registry, which
imports it, is loaded inside validate_config).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from branchmerge.models.settings import Settings

if TYPE_CHECKING:
    import torch

    from .methods.base import MergeMethod

log = logging.getLogger(__name__)


class MergeConfigError(ValueError):
    """A merge config is wrong: the message names the key path and what would be accepted."""


CONFIG_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
               "tokenizer_source")
# mergekit keys we know and refuse, with what to do instead (a silent ignore would merge something else).
MERGEKIT_UNSUPPORTED = {
    "modules": "per-module merges are not implemented; use one config per model",
    "tokenizer": "tokenizer surgery is not implemented; use tokenizer_source: base or a model folder",
    "chat_template": "the tokenizer source's chat template is copied as it is",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")  # compute / output dtypes, by torch's names

@dataclass(frozen=True)
class MergeSpec:
    """A validated config. Inputs are the models in config order, plus the base appended when it is
    not listed (as mergekit does); `base` indexes it for methods that take a base."""

    method: MergeMethod
    inputs: list[str]
    where: list[str]  # config key path of each input, for messages
    settings: list[dict]  # per-input parameter settings
    global_settings: dict
    base: int | None
    reference: int  # input whose config.json / generation_config.json the output gets
    dtype: torch.dtype | None  # compute dtype; None: each tensor as stored (mergekit without `dtype`)
    out_dtype: torch.dtype | None
    tokenizer_source: str
    # `slices`: each input's layer_range (None: the base_model added beside them); checked against the checkpoints
    # once they are open (plan.check_layer_ranges): only full ranges, which merge as `models` would.
    layer_ranges: list[tuple[int, int] | None] | None = None

    def has_model_params(self, i: int) -> bool:
        return i != self.base


def plain_data(x: Any) -> Any:
    """Plain dicts / lists / str (accepts OmegaConf containers and paths without importing them)."""
    if isinstance(x, Mapping):
        return {str(k): plain_data(v) for k, v in x.items()}
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [plain_data(v) for v in x]
    return x


def _dtype(config: dict, key: str) -> torch.dtype | None:
    name = config.get(key)
    if name is None:
        return None
    import torch

    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise MergeConfigError(f"{key}: {config[key]!r} is not supported; allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def _check_names(settings: Any, where: str, method: MergeMethod, allow_global: bool) -> dict:
    from .methods.base import validate_value
    from .values import check_setting

    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise MergeConfigError(f"{where}: expected a mapping of parameter names to values; got {settings!r}")
    ignored = [k for k in settings if k in method.ignored_model_params and not allow_global]
    if ignored:
        log.warning("%s: %s has no effect on %s (mergekit ignores it too)", where, ", ".join(ignored), method.name)
        settings = {k: v for k, v in settings.items() if k not in ignored}
    allowed = method.model_names() + (method.global_names() if allow_global else [])
    misplaced = [k for k in settings if k in method.global_names() and not allow_global]
    if misplaced:
        raise MergeConfigError(
            f"{where}: {', '.join(misplaced)} is a global parameter of {method.name}; set it under `parameters`"
        )
    unknown = [k for k in settings if k not in allowed]
    if unknown:
        raise MergeConfigError(
            f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))} for {method.name}; allowed: "
            f"{', '.join(allowed) or 'none'}"
        )
    for name, setting in settings.items():
        schema = method.params if name in method.global_names() else method.model_params
        check_setting(setting, f"{where}.{name}", lambda v, at, s=schema, n=name: validate_value(s, n, v, at))
    return settings


def validate_config(config: Mapping) -> MergeSpec:
    """Everything that can be checked from the config alone (no file is opened)."""
    # The registry imports torch: loaded here, so the pipeline's MergeConfig below validates without it.
    from .methods.base import describe, required_names
    from .registry import get_method

    config = plain_data(config)
    if not isinstance(config, dict):
        raise MergeConfigError(f"a merge config is a mapping with keys {', '.join(CONFIG_KEYS)}; got {config!r}")
    unsupported = [k for k in config if k in MERGEKIT_UNSUPPORTED]
    if unsupported:
        raise MergeConfigError("; ".join(f"{k}: mergekit's {k!r} is not supported ({MERGEKIT_UNSUPPORTED[k]})"
                                         for k in unsupported))
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise MergeConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(CONFIG_KEYS)}")
    if "merge_method" not in config:
        raise MergeConfigError("merge_method: missing")
    method = get_method(str(config["merge_method"]))

    layer_ranges, labels = None, None
    if "slices" in config:
        if "models" in config:
            raise MergeConfigError("slices, models: give the models one way, a list of `models` or `slices`")
        config["models"], layer_ranges = _slice_sources(config.pop("slices"))
        labels = [f"slices[0].sources[{i}]" for i in range(len(config["models"]))]
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: expected a non-empty list of {model: <path>, parameters: {...}}")
    inputs, where, settings = [], [], []
    for i, entry in enumerate(models):
        at = labels[i] if labels else f"models[{i}]"
        if isinstance(entry, str):  # mergekit accepts a bare model reference
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"{at}: expected {{model: <path>, parameters: {{...}}}}; got {entry!r}")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise MergeConfigError(f"{at}: unknown key(s) {', '.join(map(repr, extra))}; allowed: model, parameters")
        path = str(entry["model"])
        if os.path.abspath(path) in map(os.path.abspath, inputs):
            raise MergeConfigError(f"{at}.model: {path!r} is listed twice")
        inputs.append(path)
        where.append(at)
        settings.append(_check_names(entry.get("parameters"), f"{at}.parameters", method, allow_global=False))

    base_model = config.get("base_model")
    base = None
    if base_model is not None:
        base_model = str(base_model)
        listed = [os.path.abspath(p) for p in inputs]
        if os.path.abspath(base_model) in listed:
            base = listed.index(os.path.abspath(base_model))
        elif layer_ranges is not None:  # mergekit reads a slice's tensors from its sources only
            raise MergeConfigError(f"base_model: {base_model!r} is not one of slices[0].sources; list it there "
                                   "with the same layer_range")
        else:  # mergekit adds the base as an input when it is not listed under models
            inputs.append(base_model)
            where.append("base_model")
            settings.append({})
            base = len(inputs) - 1
    if method.base == "required" and base is None:
        raise MergeConfigError(f"base_model: merge_method {method.name} needs a base model; none given")
    reference = base if base is not None else 0
    if method.base == "ignored":
        base = None
    elif base is not None and settings[base]:  # per-model parameters describe deltas from the base: the base has none
        log.warning("%s.parameters %s: ignored, %s does not weight its base model", where[base],
                    sorted(settings[base]), method.name)

    n = len(inputs)
    if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
        bounds = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                  else f"at least {method.min_inputs}" if method.max_inputs is None
                  else f"{method.min_inputs} to {method.max_inputs}")
        counted = " counting base_model" if base_model is not None else ""
        raise MergeConfigError(f"models: {method.name} takes {bounds} input model(s){counted}; got {n}")
    if method.models_besides_base is not None and n - (base is not None) != method.models_besides_base:
        raise MergeConfigError(f"models: {method.name} merges exactly {method.models_besides_base} models besides "
                               f"the base; got {n - (base is not None)}")

    global_settings = _check_names(config.get("parameters"), "parameters", method, allow_global=True)
    for name in required_names(method.params):
        if name not in global_settings:
            raise MergeConfigError(
                f"parameters.{name}: required by {method.name}; parameters: {describe(method.params)}"
            )
    for i in range(n):
        for name in required_names(method.model_params):
            if i == base or name in settings[i] or name in global_settings:
                continue
            if where[i] == "base_model":
                raise MergeConfigError(
                    f"base_model ({inputs[i]}) is not listed under models, so it is added as an input of "
                    f"{method.name} (as in mergekit) and needs {name!r}: list it under models with "
                    f"parameters.{name}, or set parameters.{name}"
                )
            raise MergeConfigError(
                f"{where[i]}.parameters.{name}: missing for {inputs[i]}; {method.name} needs it there or under "
                f"parameters.{name}; per-model parameters: {describe(method.model_params)}"
            )

    source = config.get("tokenizer_source") or "base"
    if source == "union":
        raise MergeConfigError("tokenizer_source: 'union' is not supported; allowed: 'base' or a model path")
    if not isinstance(source, str):
        raise MergeConfigError(f"tokenizer_source: expected 'base' or a model path; got {source!r}")
    tokenizer_source = inputs[reference] if source == "base" else source

    return MergeSpec(
        method=method, inputs=inputs, where=where, settings=settings, global_settings=global_settings,
        base=base, reference=reference, dtype=_dtype(config, "dtype"),
        out_dtype=_dtype(config, "out_dtype") or _dtype(config, "dtype"), tokenizer_source=tokenizer_source,
        layer_ranges=layer_ranges,
    )


def _slice_sources(slices: Any) -> tuple[list[dict], list[tuple[int, int]]]:
    """mergekit's `slices` as `models` entries and each source's layer range. One slice whose sources each span
    all their layers is the same merge as listing the models (mergekit gives identical tensors); stitched layer
    ranges (frankenmerges) are not implemented and fail here, naming the key."""
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"slices: expected a list of {{sources: [{{model, layer_range}}, ...]}}; got {slices!r}")
    if len(slices) > 1:
        raise MergeConfigError(f"slices: {len(slices)} slices stitch layer ranges together, which is not implemented; "
                               "one slice whose sources span every layer is (or list the models under `models`)")
    entry = slices[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise MergeConfigError(f"slices[0]: expected {{sources: [{{model, layer_range}}, ...]}}; got {entry!r}")
    extra = [k for k in entry if k != "sources"]
    if extra:
        raise MergeConfigError(f"slices[0]: key(s) {', '.join(map(repr, extra))} not supported; allowed: sources")
    models, ranges = [], []
    for i, source in enumerate(entry["sources"]):
        at = f"slices[0].sources[{i}]"
        if not isinstance(source, dict) or "model" not in source:
            raise MergeConfigError(f"{at}: expected {{model: <path>, layer_range: [start, end]}}; got {source!r}")
        extra = [k for k in source if k not in ("model", "layer_range", "parameters")]
        if extra:
            raise MergeConfigError(f"{at}: unknown key(s) {', '.join(map(repr, extra))}; allowed: model, "
                                   "layer_range, parameters")
        rng = source.get("layer_range")
        valid = isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
        if not (valid and 0 <= rng[0] < rng[1]):
            raise MergeConfigError(f"{at}.layer_range: expected [start, end] with 0 <= start < end; got {rng!r}")
        models.append({k: v for k, v in source.items() if k != "layer_range"})
        ranges.append((rng[0], rng[1]))
    return models, ranges


# ------------------------------------------------------------------------------------ the pipeline's merge stage

# The registry's names (registry.py imports torch); a test checks they agree.
MERGE_METHODS = ("arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                 "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough",
                 "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties")


def _method_names() -> list[str]:
    from .registry import method_names

    return method_names()


class MergeConfig(Settings):
    """The merge stage (`merge:` in conf/merge/): either one `method` over every branch, with mergekit's
    `parameters` (per-model ones such as weight/density go to every branch, the rest are global), compute `dtype`
    and `out_dtype`; or a mergekit `recipe` file (one mergekit YAML or a mergekit-multi file; its documents
    carry their own dtypes). The student is the base model."""

    # a select in the Prefect form: the registry's names, read when the schema is generated (the registry
    # imports torch; validation against it gives the message naming the allowed methods)
    method: str | None = Field(json_schema_extra=lambda schema: schema.update(enum=[*_method_names(), None]))
    """mergekit merge method over every branch (linear, ties, dare_ties, ...); null when recipe is set."""
    parameters: dict[str, Any]
    """mergekit parameters: per-model ones (weight, density, ...) go to every branch, the rest are global."""
    dtype: Literal["float32", "bfloat16", "float16"]
    """Compute dtype of a method merge (a recipe's documents carry their own)."""
    out_dtype: Literal["float32", "bfloat16", "float16"]
    """Dtype of the merged weights of a method merge (a recipe's documents carry their own)."""
    recipe: str | None
    """mergekit or mergekit-multi YAML file (relative: working dir, else repo root); null: use method."""

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str | None) -> str | None:
        if method is not None and method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {method!r}; allowed: {', '.join(MERGE_METHODS)}")
        return method

    @model_validator(mode="after")
    def _one_of_method_or_recipe(self) -> "MergeConfig":
        if (self.method is None) == (self.recipe is None):
            raise ValueError(f"set exactly one of merge.method (got {self.method!r}) and merge.recipe "
                             f"(got {self.recipe!r}): a recipe file replaces method and parameters")
        return self
