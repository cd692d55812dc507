"""Plan a merge from the safetensors headers alone: every output tensor with its sources and resolved parameters.

The second phase (mergekit's plan.py): after validate_config (config.py), before run_merge (run.py) reads a tensor.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from .checkpoint import Checkpoint
from .config import MergeConfigError, MergeSpec
from .global_trim import kept_counts
from .methods.base import Params, parameter_names, validate_value
from .values import layer_index, layer_t, resolve

# Output tensor -> the input tensor that stands in for it in checkpoints that tie it (no lm_head stored).
TIED = {"lm_head.weight": "model.embed_tokens.weight"}

@dataclass(frozen=True)
class TensorJob:
    name: str
    sources: list[str]  # tensor to read from each input (a tied lm_head reads embed_tokens)
    params: Params | None  # None: not a float tensor, copied from the reference model
    models: list[Params]
    out_dtype: torch.dtype


def _resolve_params(schema: type[Params], scopes: list[tuple[dict, str]], tensor: str, t: float, context: str):
    """Highest-precedence value of each parameter (model scope first, then global), validated."""
    values = {}
    for name in parameter_names(schema):
        for settings, where in scopes:
            if name in settings:
                at = f"{where}.{name}"
                v = resolve(settings[name], tensor, t, lambda x, at=at, n=name: validate_value(schema, n, x, at))
                if v is not None:
                    values[name] = v
                    break
    try:
        return schema(**values)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        raise MergeConfigError(f"tensor {tensor} ({context}): {msg}") from None


def num_layers(ck: Checkpoint) -> int:
    """The checkpoint's decoder layers: its config's num_hidden_layers, else the highest layer index + 1."""
    layers = [i for n in ck.names() if (i := layer_index(n)) is not None]
    return ck.config.get("num_hidden_layers") or ck.config.get("text_config", {}).get("num_hidden_layers") \
        or (max(layers) + 1 if layers else 1)


def check_layer_ranges(spec: MergeSpec, ckpts: list[Checkpoint]) -> None:
    """`slices`: every source's layer_range spans its model's layers (the only slicing implemented)."""
    for i, rng in enumerate(spec.layer_ranges or []):
        if rng is not None and rng != (0, n := num_layers(ckpts[i])):
            raise MergeConfigError(
                f"{spec.where[i]}.layer_range: {list(rng)} of {spec.inputs[i]} ({n} layers): only full-range slices "
                f"([0, {n}]) are implemented, the same merge as listing the model under `models`")


def plan(spec: MergeSpec, ckpts: list[Checkpoint]) -> list[TensorJob]:
    """Every output tensor with its sources and parameters, from the headers alone."""
    check_layer_ranges(spec, ckpts)
    ref = ckpts[spec.reference]
    names = list(dict.fromkeys(n for ck in [ref, *ckpts] for n in ck.names()))
    n_layers = num_layers(ref)
    jobs = []
    for name in names:
        sources, missing = [], []
        for i, ck in enumerate(ckpts):
            if name in ck:
                sources.append(name)
            elif name in TIED and TIED[name] in ck:  # tied checkpoint: its embeddings are its lm_head
                sources.append(TIED[name])
            else:
                missing.append(spec.inputs[i])
        if missing:
            have = [spec.inputs[i] for i, ck in enumerate(ckpts) if name in ck]
            raise ValueError(f"tensor {name} is in {have} but missing from {missing}")
        shapes = [ck.shape(src) for ck, src in zip(ckpts, sources)]
        if len(set(shapes)) > 1:
            listing = ", ".join(f"{p}: {list(s)}" for p, s in zip(spec.inputs, shapes))
            hint = ("; the vocabularies differ: merge models that share one tokenizer (mergekit's "
                    "tokenizer_source: union, which resizes embeddings, is not supported)"
                    if name.endswith(("embed_tokens.weight", "lm_head.weight")) else "")
            raise ValueError(f"tensor {name} has different shapes across models: {listing}{hint}")
        ref_dtype = ref.dtype(sources[spec.reference])
        out_dtype = spec.out_dtype or ref_dtype
        if not ref_dtype.is_floating_point:  # e.g. integer buffers: nothing to average
            jobs.append(TensorJob(name, sources, None, [], ref_dtype))
            continue
        t = layer_t(name, n_layers)
        params = _resolve_params(spec.method.params, [(spec.global_settings, "parameters")], name, t, "parameters")
        models = [
            _resolve_params(
                spec.method.model_params, [(spec.settings[i], f"{spec.where[i]}.parameters"),
                                           (spec.global_settings, "parameters")],
                name, t, f"{spec.where[i]}: {spec.inputs[i]}",
            )
            for i in range(len(ckpts)) if spec.has_model_params(i)
        ]
        if spec.method.check is not None:
            try:
                spec.method.check(params, models)
            except ValueError as e:
                raise MergeConfigError(f"tensor {name}: {e}") from None
        jobs.append(TensorJob(name, sources, params, models, out_dtype))
    return jobs


def model_scope_trim(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob]) -> list[TensorJob]:
    """`trim_scope: model` (the TIES paper): each model's density over the whole model becomes a per-tensor
    density that keeps exactly the entries that rank in the model's top fraction (global_trim.py)."""
    scoped = [j for j in jobs if j.params is not None and getattr(j.params, "trim_scope", "tensor") == "model"]
    if not scoped:
        return jobs
    if len(scoped) != sum(j.params is not None for j in jobs):
        raise MergeConfigError("parameters.trim_scope: 'model' must hold for every tensor (no filters or gradients)")
    inputs = [i for i in range(len(ckpts)) if spec.has_model_params(i)]
    names = {job.name for job in scoped}
    densities: dict[tuple[str, int], float] = {}
    for j, i in enumerate(inputs):
        given = sorted({job.models[j].density for job in scoped})
        if len(given) > 1:
            raise MergeConfigError(f"{spec.where[i]}.parameters.density: trim_scope: model ranks the whole model "
                                   f"with one density; got {given} across tensors")
        if given[0] >= 1:
            continue
        sources = [(job.name, job.sources[i], job.sources[spec.base]) for job in scoped]
        for job, (name, count) in zip(scoped, kept_counts(ckpts[i], ckpts[spec.base], sources, given[0]).items()):
            numel = math.prod(ckpts[i].shape(job.sources[i]))
            # +0.5: the per-tensor trim keeps int(density * numel) entries, which must come out as `count`
            densities[(name, j)] = (count + 0.5) / numel if count else 0.0
    return [dataclasses.replace(job, models=[m.model_copy(update={"density": densities[(job.name, j)]})
                                              if (job.name, j) in densities else m for j, m in enumerate(job.models)])
            if job.name in names else job for job in jobs]


def output_config(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob]) -> dict:
    config = dict(ckpts[spec.reference].config)
    if spec.out_dtype is not None:
        name = str(spec.out_dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = name
    # A model with its own lm_head made the merged head differ from the merged embeddings: untie,
    # or from_pretrained would replace the merged head by the embeddings.
    own_head = any("lm_head.weight" in ck and ck.config.get("tie_word_embeddings") is not True for ck in ckpts)
    if own_head and any(j.name == "lm_head.weight" for j in jobs) and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    return config
