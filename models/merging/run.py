"""run_merge: a mergekit-shaped config -> a merged HF folder, streamed tensor by tensor.

    {merge_method: ties, base_model: /m/base,
     models: [{model: /m/math, parameters: {weight: 1.0, density: 0.5}}, ...],
     parameters: {normalize: true}, dtype: float32, out_dtype: bfloat16, tokenizer_source: base}

Three phases, so a bad config costs nothing:
1. validate_config: the config alone (keys, method, parameter names and values, model counts);
2. plan: safetensors headers only (tensor names, shapes, tied embeddings, per-tensor parameters);
3. merge: read each tensor from every model, merge in `dtype`, cast, write it into its place in the
   shards (their headers come from the plan) in a temp folder that is renamed into place at the end.
   `workers` tensors are merged at once; peak memory is about one tensor per input model per worker.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tqdm import tqdm

from .checkpoint import Checkpoint, ShardWriter
from .global_trim import kept_counts
from .registry import (
    MergeConfigError, MergeMethod, Params, describe, get_method, parameter_names, required_names, validate_value,
)
from .values import check_setting, layer_index, layer_t, resolve, tensor_generator

log = logging.getLogger(__name__)

CONFIG_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
# mergekit keys we know and refuse, with what to do instead (a silent ignore would merge something else).
MERGEKIT_UNSUPPORTED = {
    "slices": "list whole models under `models`; layer slicing is not implemented",
    "modules": "per-module merges are not implemented; use one config per model",
    "tokenizer": "tokenizer surgery is not implemented; use tokenizer_source: base or a model folder",
    "chat_template": "the tokenizer source's chat template is copied as it is",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# Output tensor -> the input tensor that stands in for it in checkpoints that tie it (no lm_head stored).
TIED = {"lm_head.weight": "model.embed_tokens.weight"}
MAX_SHARD_SIZE = 5_000_000_000  # mergekit's out_shard_size


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
    dtype: torch.dtype
    out_dtype: torch.dtype | None
    tokenizer_source: str

    def has_model_params(self, i: int) -> bool:
        return i != self.base


@dataclass(frozen=True)
class TensorJob:
    name: str
    sources: list[str]  # tensor to read from each input (a tied lm_head reads embed_tokens)
    params: Params | None  # None: not a float tensor, copied from the reference model
    models: list[Params]
    out_dtype: torch.dtype


def _plain(x: Any) -> Any:
    """Plain dicts / lists / str (accepts OmegaConf containers and paths without importing them)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _dtype(config: dict, key: str) -> torch.dtype | None:
    name = config.get(key)
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise MergeConfigError(f"{key}: {config[key]!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_names(settings: Any, where: str, method: MergeMethod, allow_global: bool) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise MergeConfigError(f"{where}: expected a mapping of parameter names to values; got {settings!r}")
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
    config = _plain(config)
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

    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: expected a non-empty list of {model: <path>, parameters: {...}}")
    inputs, where, settings = [], [], []
    for i, entry in enumerate(models):
        at = f"models[{i}]"
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
        base=base, reference=reference, dtype=_dtype(config, "dtype") or torch.float32,
        out_dtype=_dtype(config, "out_dtype") or _dtype(config, "dtype"), tokenizer_source=tokenizer_source,
    )


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


def plan(spec: MergeSpec, ckpts: list[Checkpoint]) -> list[TensorJob]:
    """Every output tensor with its sources and parameters, from the headers alone."""
    ref = ckpts[spec.reference]
    names = list(dict.fromkeys(n for ck in [ref, *ckpts] for n in ck.names()))
    layers = [i for n in names if (i := layer_index(n)) is not None]
    n_layers = ref.config.get("num_hidden_layers") or ref.config.get("text_config", {}).get("num_hidden_layers") \
        or (max(layers) + 1 if layers else 1)
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


def _model_scope_trim(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob]) -> list[TensorJob]:
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


def _output_config(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob]) -> dict:
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


def run_merge(
    config: Mapping, out_dir: str | os.PathLike, *, seed: int, max_shard_size: int = MAX_SHARD_SIZE,
    overwrite: bool = False, record: dict | None = None, workers: int = 2,
) -> dict:
    """Merge the models of a mergekit-style config into the HF folder `out_dir` (written atomically).

    `seed` drives DARE / DELLA masks: each tensor draws from a generator derived from (seed, tensor
    name). `record` replaces what merge_config.json records (default: the config and seed). `workers`
    tensors are merged at once (the output is the same for any number): torch's sort, which the trimming
    methods spend their time in, runs on one core per tensor, so two in flight use two cores; peak memory
    grows by one tensor per input model per extra worker.
    Returns {method, n_tensors, n_shards, seconds}.
    """
    start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers: expected >= 1; got {workers}")
    spec = validate_config(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    ckpts = [Checkpoint(p) for p in spec.inputs]
    if not Path(spec.tokenizer_source).is_dir():
        raise MergeConfigError(f"tokenizer_source: {spec.tokenizer_source!r} is not a folder")
    jobs = _model_scope_trim(spec, ckpts, plan(spec, ckpts))
    log.info("merge %s: %d tensors from %d models", spec.method.name, len(jobs), len(ckpts))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    layout = [(job.name, job.out_dtype, ckpts[spec.reference].shape(job.sources[spec.reference])) for job in jobs]
    writer = None
    try:
        writer = ShardWriter(tmp, max_shard_size, layout)  # headers from the plan; tensors stream into place
        merged = _merged_in_order(spec, ckpts, jobs, seed, workers)
        for job, tensor in tqdm(zip(jobs, merged), total=len(jobs), desc=f"merge {spec.method.name}", unit="tensor"):
            writer.add(job.name, tensor)
        files = writer.finish()
        (tmp / "config.json").write_text(json.dumps(_output_config(spec, ckpts, jobs), indent=2) + "\n")
        ref = Path(spec.inputs[spec.reference])
        for src, names in ((ref, ("generation_config.json",)), (Path(spec.tokenizer_source), TOKENIZER_FILES)):
            for file in names:
                if (src / file).exists():
                    shutil.copy(src / file, tmp / file)
        record = record if record is not None else {"config": _plain(config), "seed": seed}
        (tmp / "merge_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"method": spec.method.name, "n_tensors": len(jobs), "n_shards": len(files),
            "seconds": round(time.perf_counter() - start, 3)}


def _merged_in_order(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob], seed: int,
                     workers: int) -> Iterator[torch.Tensor]:
    """Each job's output tensor, in job order, with up to `workers` tensors being merged at a time.

    Jobs are submitted ahead while the inputs of the not-yet-written ones fit in `workers` times the largest
    job's inputs, so one slow tensor (a sort over the embeddings) does not idle the other workers, and memory
    stays what `workers` jobs of the largest tensor would take.
    """
    def job_bytes(job: TensorJob) -> int:
        return sum(math.prod(ck.shape(src)) for ck, src in zip(ckpts, job.sources)) * spec.dtype.itemsize

    sizes = [job_bytes(job) for job in jobs]
    budget = workers * max(sizes, default=0)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[Future, int]] = deque()
        queued = 0
        for job, size in zip(jobs, sizes):
            while pending and queued + size > budget:
                future, done = pending.popleft()
                queued -= done
                yield future.result()
            pending.append((pool.submit(_merge_tensor, spec, ckpts, job, seed), size))
            queued += size
        while pending:
            yield pending.popleft()[0].result()


def _merge_tensor(spec: MergeSpec, ckpts: list[Checkpoint], job: TensorJob, seed: int) -> torch.Tensor:
    if job.params is None:
        return ckpts[spec.reference].get(job.sources[spec.reference])
    xs = [ck.get(src).to(spec.dtype) for ck, src in zip(ckpts, job.sources)]
    base = xs.pop(spec.base) if spec.base is not None else None
    out = spec.method.fn(base, xs, job.models, job.params, tensor_generator(seed, job.name))
    expected = ckpts[spec.reference].shape(job.sources[spec.reference])
    if tuple(out.shape) != expected:
        raise RuntimeError(
            f"{spec.method.name} returned shape {list(out.shape)} for {job.name}; expected {list(expected)}"
        )
    return out.to(job.out_dtype)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an existing folder is swapped out, then deleted."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
