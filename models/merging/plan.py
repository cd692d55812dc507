"""Plan a merge from the safetensors headers alone: every output tensor with its sources and resolved parameters.

The second phase (mergekit's plan.py): after validate_config (config.py), before run_merge (run.py) reads a tensor.
"""

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from .checkpoint import Checkpoint
from .config import MergeConfigError, MergeSpec, SliceSpec
from .global_trim import kept_counts
from .methods.base import Params, parameter_names, validate_value
from .values import layer_index, layer_t, resolve
from .vocab import is_vocab_tensor

# Output tensor -> the input tensor that stands in for it in checkpoints that tie it (no lm_head stored).
TIED = {"lm_head.weight": "model.embed_tokens.weight"}

@dataclass(frozen=True)
class TensorJob:
    name: str
    inputs: tuple[int, ...]  # the MergeSpec.inputs it reads, in the method's order
    sources: list[str]  # tensor to read from each of them (a tied lm_head reads embed_tokens)
    params: Params | None  # None: not a float tensor, copied from inputs[reference]
    models: list[Params]  # per input but the base
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    base: int | None = None  # position in `inputs` of the base model
    reference: int = 0  # position in `inputs` whose tensor is copied when params is None
    vocab: bool = False  # rows re-indexed to the output vocabulary before merging (vocab.py)


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


def plan(spec: MergeSpec, ckpts: list[Checkpoint], vocab_rows: int | None = None) -> list[TensorJob]:
    """Every output tensor with its sources and parameters, from the headers alone. `vocab_rows`: the output
    vocabulary's length when tokenizer_source re-indexes the vocabulary tensors (vocab.py)."""
    if spec.slices is not None:
        return plan_slices(spec, ckpts, vocab_rows)
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
        inputs = tuple(range(len(ckpts)))
        shape = _shape(name, [ckpts[i] for i in inputs], sources, [spec.inputs[i] for i in inputs],
                       spec.reference, vocab_rows)
        ref_dtype = ref.dtype(sources[spec.reference])
        if not ref_dtype.is_floating_point:  # e.g. integer buffers: nothing to average
            jobs.append(TensorJob(name, inputs, sources, None, [], ref_dtype, shape, reference=spec.reference))
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
        _check(spec, name, params, models)
        out_dtype = spec.out_dtype or spec.method.result_dtype(ref_dtype)
        jobs.append(TensorJob(name, inputs, sources, params, models, out_dtype, shape, base=spec.base, reference=spec.reference,
                              vocab=vocab_rows is not None and is_vocab_tensor(name)))
    return jobs


def _check(spec: MergeSpec, name: str, params: Params, models: list[Params]) -> None:
    if spec.method.check is not None:
        try:
            spec.method.check(params, models)
        except ValueError as e:
            raise MergeConfigError(f"tensor {name}: {e}") from None


def _shape(name: str, ckpts: list[Checkpoint], sources: list[str], labels: list[str], reference: int,
           vocab_rows: int | None) -> tuple[int, ...]:
    """The output shape: the inputs' common shape; vocabulary tensors re-indexed to the output vocabulary
    (tokenizer_source) may differ in rows and get vocab_rows."""
    shapes = [ck.shape(src) for ck, src in zip(ckpts, sources)]
    vocab = vocab_rows is not None and is_vocab_tensor(name)
    if len({s[1:] if vocab else s for s in shapes}) > 1:
        listing = ", ".join(f"{p}: {list(s)}" for p, s in zip(labels, shapes))
        hint = ("; the vocabularies differ: set tokenizer_source (base, union or a model folder) to re-index "
                "the embeddings to one vocabulary, as mergekit does" if is_vocab_tensor(name) else "")
        raise ValueError(f"tensor {name} has different shapes across models: {listing}{hint}")
    return (vocab_rows, *shapes[reference][1:]) if vocab else shapes[reference]


_LAYER_AT = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")


def _layer_names(ck: Checkpoint, layer: int) -> dict[str, str]:
    """{name with the layer index as '{}': tensor name} for one layer of a checkpoint."""
    return {_LAYER_AT.sub(r"\g<1>{}\g<3>", n.replace("{", "{{").replace("}", "}}"), count=1): n
            for n in ck.names() if layer_index(n) == layer}


def plan_slices(spec: MergeSpec, ckpts: list[Checkpoint], vocab_rows: int | None) -> list[TensorJob]:
    """mergekit's `slices` (its plan.py): the tensors outside the layer stack that hold embeddings are merged
    from the first slice's sources, the others (final norm, lm_head) from the last slice's, each with t = 0; then
    every slice's layers in order, output layer k from each source's layer start + offset, with t = offset /
    (n - 1) within the slice. Per-model parameters are matched against the source's tensor name, global ones
    against the output's (mergekit's parameter_resolver)."""
    first, last = spec.slices[0], spec.slices[-1]
    for sl in spec.slices:
        for src in sl.sources:
            n = num_layers(ckpts[src.input])
            if src.layer_range[1] > n:
                raise MergeConfigError(f"{src.where}.layer_range: {list(src.layer_range)} of "
                                       f"{spec.inputs[src.input]}, which has {n} layers")

    def job(sl: SliceSpec, out: str, names: list[str], t: float) -> TensorJob:
        inputs = tuple(s.input for s in sl.sources)
        cks = [ckpts[i] for i in inputs]
        sources = []
        for ck, name in zip(cks, names):
            if name not in ck and name in TIED and TIED[name] in ck:  # tied checkpoint: embeddings are its lm_head
                name = TIED[name]
            if name not in ck:
                raise ValueError(f"tensor {name} is missing from {ck.path} ({sl.where})")
            sources.append(name)
        reference = sl.base if sl.base is not None else 0
        labels = [f"{s.where}: {spec.inputs[s.input]}" for s in sl.sources]
        shape = _shape(out, cks, sources, labels, reference, vocab_rows)
        ref_dtype = cks[reference].dtype(sources[reference])
        if not ref_dtype.is_floating_point:
            return TensorJob(out, inputs, sources, None, [], ref_dtype, shape, reference=reference)
        scope = [(sl.settings, f"{sl.where}.parameters"), (spec.global_settings, "parameters")]
        params = _resolve_params(spec.method.params, scope, out, t, "parameters")
        models = [_resolve_params(spec.method.model_params, [(s.settings, f"{s.where}.parameters"), *scope],
                                  src, t, labels[k])
                  for k, (s, src) in enumerate(zip(sl.sources, sources)) if k != sl.base]
        _check(spec, out, params, models)
        out_dtype = spec.out_dtype or spec.method.result_dtype(ref_dtype)
        return TensorJob(out, inputs, sources, params, models, out_dtype, shape, base=sl.base, reference=reference, vocab=vocab_rows is not None and is_vocab_tensor(out))

    head = [n for n in ckpts[first.sources[0].input].names() if layer_index(n) is None and "embed" in n]
    tail_ck = ckpts[last.sources[0].input]
    tail = [n for n in tail_ck.names() if layer_index(n) is None and "embed" not in n]
    if "lm_head.weight" not in tail and any("lm_head.weight" in ckpts[s.input] for s in last.sources):
        tail.append("lm_head.weight")
    jobs = [job(first, n, [n] * len(first.sources), 0.0) for n in head]
    k = 0
    for sl in spec.slices:
        n = sl.n_layers
        for offset in range(n):
            layers = [_layer_names(ckpts[s.input], s.layer_range[0] + offset) for s in sl.sources]
            for s, names in zip(sl.sources[1:], layers[1:]):
                if set(names) != set(layers[0]):
                    raise ValueError(f"{s.where}: layer {s.layer_range[0] + offset} of {spec.inputs[s.input]} has "
                                     f"other tensors than {sl.sources[0].where}'s layer "
                                     f"{sl.sources[0].layer_range[0] + offset}")
            t = offset / (n - 1) if n > 1 else 1.0
            for template in layers[0]:
                jobs.append(job(sl, template.format(k), [names[template] for names in layers], t))
            k += 1
    jobs += [job(last, n, [n] * len(last.sources), 0.0) for n in tail]
    return jobs


def output_layers(spec: MergeSpec, ckpts: list[Checkpoint]) -> list[tuple[int, int]] | None:
    """(input, layer) behind each output layer with `slices`; None with `models` (the reference's layers)."""
    if spec.slices is None:
        return None
    return [(sl.sources[0].input, sl.sources[0].layer_range[0] + offset)
            for sl in spec.slices for offset in range(sl.n_layers)]


def model_scope_trim(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob]) -> list[TensorJob]:
    """`trim_scope: model` (the TIES paper): each model's density over the whole model becomes a per-tensor
    density that keeps exactly the entries that rank in the model's top fraction (global_trim.py)."""
    scoped = [j for j in jobs if j.params is not None and getattr(j.params, "trim_scope", "tensor") == "model"]
    if not scoped:
        return jobs
    if spec.slices is not None:
        raise MergeConfigError("parameters.trim_scope: 'model' ranks each model's own tensors; list the models "
                               "under `models`, not `slices`")
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


def output_config(spec: MergeSpec, ckpts: list[Checkpoint], jobs: list[TensorJob],
                  vocab_rows: int | None = None) -> dict:
    """The reference's config.json with the output dtype, the layer count of `slices`, the vocabulary length of
    `tokenizer_source` (mergekit sets all three), and tie_word_embeddings off when a merged lm_head exists."""
    config = dict(ckpts[spec.reference].config)
    if spec.out_dtype is not None:
        name = str(spec.out_dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = name
    layers = output_layers(spec, ckpts)
    if layers is not None:
        config["num_hidden_layers"] = len(layers)
        # transformers refuses a config whose per-layer list is not num_hidden_layers long (mergekit 0.1.5 leaves
        # it as it was): each output layer keeps the type of the layer it was made from
        for key in ("layer_types",):
            if isinstance(config.get(key), list):
                config[key] = [_per_layer(ckpts[i].config, key, layer) for i, layer in layers]
    if vocab_rows is not None:
        config["vocab_size"] = vocab_rows
    # A model with its own lm_head made the merged head differ from the merged embeddings: untie,
    # or from_pretrained would replace the merged head by the embeddings.
    own_head = any("lm_head.weight" in ck and ck.config.get("tie_word_embeddings") is not True for ck in ckpts)
    if own_head and any(j.name == "lm_head.weight" for j in jobs) and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    return config


def _per_layer(config: dict, key: str, layer: int):
    values = config.get(key)
    if not isinstance(values, list) or layer >= len(values):
        raise MergeConfigError(f"{key}: the config of a slice's source has no entry for layer {layer}")
    return values[layer]
