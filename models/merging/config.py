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
               "tokenizer_source", "chat_template")
# mergekit keys we know and refuse, with what to do instead (a silent ignore would merge something else).
MERGEKIT_UNSUPPORTED = {
    "modules": "per-module merges are not implemented; use one config per model",
    "tokenizer": "per-token embedding sources are not implemented; use tokenizer_source: base | union | <model>",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")  # compute / output dtypes, by torch's names


@dataclass(frozen=True)
class SliceSource:
    """One `slices[j].sources[i]` entry: the input it reads, its layers and its own parameters."""

    input: int  # index into MergeSpec.inputs
    layer_range: tuple[int, int]
    settings: dict
    where: str  # "slices[1].sources[0]", for messages


@dataclass(frozen=True)
class SliceSpec:
    """One output slice: its sources' layers, merged layer by layer, one after the other (mergekit's slices)."""

    sources: list[SliceSource]
    settings: dict  # the slice's `parameters`: between a source's own and the global ones
    base: int | None  # position in `sources` of the base model; None when there is none or the method ignores it
    where: str

    @property
    def n_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass(frozen=True)
class MergeSpec:
    """A validated config. Inputs are the models in config order, plus the base appended when it is
    not listed (as mergekit does); `base` indexes it for methods that take a base."""

    method: MergeMethod
    inputs: list[str]
    where: list[str]  # config key path of each input, for messages
    settings: list[dict]  # per-input parameter settings (`models` form; empty with `slices`)
    global_settings: dict
    base: int | None
    reference: int  # input whose config.json / generation_config.json the output gets
    dtype: torch.dtype | None  # compute dtype; None: each tensor as stored (mergekit without `dtype`)
    out_dtype: torch.dtype | None
    # None: the reference's tokenizer files are copied and the embeddings kept as merged (mergekit without the
    # key); "base" | "union" | a folder: the output vocabulary is built and every input's embedding rows are
    # aligned to it before merging (vocab.py, mergekit's tokenizer/build.py + embed.py)
    tokenizer_source: str | None
    chat_template: str | None  # "auto", a built-in name or a Jinja template (vocab.chat_template)
    slices: list[SliceSpec] | None = None  # `slices` form: planned layer by layer (plan.plan_slices)
    base_input: int | None = None  # the input `base_model` names, whether or not the method merges over it

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
    allowed = method.model_names() + (method.global_names() if allow_global else [])
    # mergekit 0.1.5 ignores a parameter its method does not read (published configs carry `normalize` on sce,
    # a per-model `lambda` on della, `weight` on karcher): so do we, loudly. A name no method knows is a typo
    # and fails below.
    ignored = [k for k in settings if k not in allowed and k in _known_names()]
    if ignored:
        misplaced = [k for k in ignored if k in method.global_names()]
        log.warning("%s: %s has no effect on %s%s (mergekit ignores it too)", where, ", ".join(ignored), method.name,
                    f" here; {', '.join(misplaced)} is read only under `parameters`" if misplaced else "")
        settings = {k: v for k, v in settings.items() if k not in ignored}
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


def _known_names() -> set[str]:
    """Every parameter name any registered method reads."""
    from .registry import METHODS

    return {n for m in METHODS.values() for n in (*m.global_names(), *m.model_names())}


def _model_entry(entry: Any, at: str, keys: tuple[str, ...]) -> dict:
    if isinstance(entry, str):  # mergekit accepts a bare model reference
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise MergeConfigError(f"{at}: expected {{{', '.join(keys)}}}; got {entry!r}")
    extra = [k for k in entry if k not in keys]
    if extra:
        raise MergeConfigError(f"{at}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(keys)}")
    return entry


def _check_group(method: MergeMethod, group: str, n: int, base: int | None, counted_base: bool,
                 scopes: list[list[dict]], where: list[str], inputs: list[str]) -> None:
    """One group of inputs merged together (`models`, or one slice's sources): how many, and every required
    per-model parameter set in one of each input's scopes (own, [slice,] global)."""
    from .methods.base import describe, required_names

    if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
        bounds = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                  else f"at least {method.min_inputs}" if method.max_inputs is None
                  else f"{method.min_inputs} to {method.max_inputs}")
        counted = " counting base_model" if counted_base else ""
        raise MergeConfigError(f"{group}: {method.name} takes {bounds} input model(s){counted}; got {n}")
    if method.models_besides_base is not None and n - (base is not None) != method.models_besides_base:
        raise MergeConfigError(f"{group}: {method.name} merges exactly {method.models_besides_base} models besides "
                               f"the base; got {n - (base is not None)}")
    for i in range(n):
        for name in required_names(method.model_params):
            if i == base or any(name in s for s in scopes[i]):
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
    if "slices" in config and "models" in config:
        raise MergeConfigError("slices, models: give the models one way, a list of `models` or `slices`")

    global_settings = _check_names(config.get("parameters"), "parameters", method, allow_global=True)
    for name in required_names(method.params):
        if name not in global_settings and "slices" not in config:  # with slices: checked per slice
            raise MergeConfigError(
                f"parameters.{name}: required by {method.name}; parameters: {describe(method.params)}"
            )
    base_model = None if config.get("base_model") is None else str(config["base_model"])
    if "slices" in config:
        inputs, where, settings, base, slices = _slices(config["slices"], base_model, method, global_settings)
        reference = base if base is not None else slices[0].sources[0].input
    else:
        inputs, where, settings, base = _models(config.get("models"), base_model, method, global_settings)
        reference, slices = (base if base is not None else 0), None
    base_input = base
    if method.base == "ignored":
        base = None

    source = config.get("tokenizer_source")
    if source is not None and not isinstance(source, str):
        raise MergeConfigError(f"tokenizer_source: expected 'base', 'union' or a model path; got {source!r}")
    template = config.get("chat_template")
    if template is not None:
        from .vocab import check_chat_template

        check_chat_template(template)
    return MergeSpec(
        method=method, inputs=inputs, where=where, settings=settings, global_settings=global_settings,
        base=base, reference=reference, dtype=_dtype(config, "dtype"),
        out_dtype=_dtype(config, "out_dtype") or _dtype(config, "dtype"), tokenizer_source=source,
        chat_template=template, slices=slices, base_input=base_input,
    )


def _models(models: Any, base_model: str | None, method: MergeMethod, global_settings: dict):
    """The `models` form: every input merged over all its layers; the base appended when not listed."""
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: expected a non-empty list of {model: <path>, parameters: {...}}")
    inputs, where, settings = [], [], []
    for i, entry in enumerate(models):
        at = f"models[{i}]"
        entry = _model_entry(entry, at, ("model", "parameters"))
        path = str(entry["model"])
        if os.path.abspath(path) in map(os.path.abspath, inputs):
            raise MergeConfigError(f"{at}.model: {path!r} is listed twice")
        inputs.append(path)
        where.append(at)
        settings.append(_check_names(entry.get("parameters"), f"{at}.parameters", method, allow_global=False))
    base = None
    if base_model is not None:
        listed = [os.path.abspath(p) for p in inputs]
        if os.path.abspath(base_model) in listed:
            base = listed.index(os.path.abspath(base_model))
        else:  # mergekit adds the base as an input when it is not listed under models
            inputs.append(base_model)
            where.append("base_model")
            settings.append({})
            base = len(inputs) - 1
    if method.base == "required" and base is None:
        raise MergeConfigError(f"base_model: merge_method {method.name} needs a base model; none given")
    if method.base != "ignored" and base is not None and settings[base]:
        # per-model parameters describe deltas from the base: the base has none
        log.warning("%s.parameters %s: ignored, %s does not weight its base model", where[base],
                    sorted(settings[base]), method.name)
    _check_group(method, "models", len(inputs), base if method.base != "ignored" else None,
                 base_model is not None, [[s, global_settings] for s in settings], where, inputs)
    return inputs, where, settings, base


def _range(rng: Any, at: str) -> tuple[int, int]:
    valid = isinstance(rng, list | tuple) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
    if not (valid and 0 <= rng[0] < rng[1]):
        raise MergeConfigError(f"{at}.layer_range: expected [start, end] with 0 <= start < end; got {rng!r}")
    return rng[0], rng[1]


def _slices(slices: Any, base_model: str | None, method: MergeMethod, global_settings: dict):
    """mergekit's `slices`: output layers made slice after slice, each from its sources' layer ranges (all the
    same length), merged layer by layer. Embeddings come from the first slice's sources, the final norm and
    lm_head from the last slice's (mergekit's plan.py). A slice's base is its own `base_model` or the config's,
    and must be one of its sources (mergekit reads a slice's tensors from its sources only)."""
    from .methods.base import describe, required_names

    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"slices: expected a list of {{sources: [{{model, layer_range}}, ...]}}; got {slices!r}")
    inputs: list[str] = []
    where: list[str] = []
    out = []

    def input_index(path: str, at: str) -> int:
        key = os.path.abspath(path)
        for i, p in enumerate(inputs):
            if os.path.abspath(p) == key:
                return i
        inputs.append(path)
        where.append(at)
        return len(inputs) - 1

    for j, piece in enumerate(slices):
        at = f"slices[{j}]"
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) or not piece["sources"]:
            raise MergeConfigError(f"{at}: expected {{sources: [{{model, layer_range}}, ...]}}; got {piece!r}")
        extra = [k for k in piece if k not in ("sources", "base_model", "parameters", "residual_weight")]
        if extra:
            raise MergeConfigError(f"{at}: unknown key(s) {', '.join(map(repr, extra))}; allowed: sources, "
                                   "base_model, parameters")
        if "residual_weight" in piece:
            log.warning("%s.residual_weight: has no effect (mergekit 0.1.5 ignores it too)", at)
        slice_settings = _check_names(piece.get("parameters"), f"{at}.parameters", method, allow_global=True)
        sources = []
        for i, entry in enumerate(piece["sources"]):
            src_at = f"{at}.sources[{i}]"
            entry = _model_entry(entry, src_at, ("model", "layer_range", "parameters"))
            if "layer_range" not in entry:
                raise MergeConfigError(f"{src_at}.layer_range: missing; expected [start, end]")
            path = str(entry["model"])
            idx = input_index(path, src_at)
            if any(s.input == idx for s in sources):
                raise MergeConfigError(f"{src_at}.model: {path!r} is listed twice in {at}")
            sources.append(SliceSource(idx, _range(entry["layer_range"], src_at),
                                       _check_names(entry.get("parameters"), f"{src_at}.parameters", method,
                                                    allow_global=False), src_at))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise MergeConfigError(f"{at}.sources: layer ranges of different lengths "
                                   f"{[list(s.layer_range) for s in sources]}; a slice merges layer by layer")
        slice_base = piece.get("base_model", base_model)
        base = None
        if slice_base is not None and method.base != "ignored":
            found = [k for k, s in enumerate(sources)
                     if os.path.abspath(inputs[s.input]) == os.path.abspath(str(slice_base))]
            if not found:
                key = f"{at}.base_model" if "base_model" in piece else "base_model"
                raise MergeConfigError(f"{key}: {slice_base!r} is not one of {at}.sources; list it there "
                                       "with a layer_range of the same length")
            base = found[0]
        if method.base == "required" and base is None:
            raise MergeConfigError(f"base_model: merge_method {method.name} needs a base model; none given for {at}")
        for name in required_names(method.params):
            if name not in slice_settings and name not in global_settings:
                raise MergeConfigError(f"parameters.{name}: required by {method.name} (or {at}.parameters."
                                       f"{name}); parameters: {describe(method.params)}")
        _check_group(method, f"{at}.sources", len(sources), base, False,
                     [[s.settings, slice_settings, global_settings] for s in sources], [s.where for s in sources],
                     [inputs[s.input] for s in sources])
        out.append(SliceSpec(sources, slice_settings, base, at))
    base = None
    if base_model is not None:  # the output's config.json comes from the base (mergekit), listed or not
        base = input_index(base_model, "base_model")
    return inputs, where, [{} for _ in inputs], base, out


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
    branch_parameters: dict[str, dict[str, Any]]
    """Per-model mergekit parameters of one branch, by domain (e.g. {gcd: {weight: 0.5}}), over `parameters` for
    that branch: what a merge search tunes branch by branch (conf/hparams_search/merge_optuna.yaml); {}: none."""
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
        if self.recipe is not None and self.branch_parameters:
            raise ValueError(f"merge.branch_parameters={self.branch_parameters} with merge.recipe={self.recipe!r}: "
                             "a recipe file gives each model its parameters; set them there")
        return self
