"""The merged model's vocabulary and chat template, as mergekit 0.1.5 builds them (its tokenizer/build.py,
tokenizer/embed.py and merge.py's _set_chat_template).

`tokenizer_source` absent: the reference model's tokenizer files are copied and the embedding rows merged as
they are. Set, the output vocabulary is built first and every input's vocabulary-indexed tensors
(embed_tokens, lm_head) are re-indexed to it before the merge method sees them:

- `base`: the base model's tokenizer (else the first model's), without the tokens whose ids are at or past its
  config's vocab_size (padding rows are dropped: a Qwen2.5 embedding of 151936 rows becomes 151665);
- `union`: the base tokenizer plus every other token any input's tokenizer knows, ids after the base's;
- a model folder: that tokenizer as it is.

An input's row for a token it lacks is, in order: the row of the only input that has it; zeros when none has
it; the base model's row; else the mean of the inputs that have it. The output's vocab_size is the tokenizer's
length. `chat_template`: `auto` takes the template most inputs share; a built-in name (chatml, llama3, ...)
mergekit's file of that name; anything else is the Jinja template itself.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import MergeConfigError, MergeSpec

log = logging.getLogger(__name__)

CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"
# Tensors indexed by token id along axis 0 (mergekit's `vocabulary_axis: 0` in its architecture files).
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "embed_out.weight", "wte.weight", "word_embeddings.weight")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))


def check_chat_template(template: object) -> None:
    """`chat_template`: `auto`, a built-in name or a Jinja template (mergekit's rule for telling them apart)."""
    if not isinstance(template, str):
        raise MergeConfigError(f"chat_template: expected 'auto', a built-in name or a Jinja template; got {template!r}")
    if template == "auto" or _builtin(template) is not None:
        return
    if len(template) < 20 or "{" not in template:
        raise MergeConfigError(f"chat_template: {template!r} is neither 'auto', a built-in template "
                               f"({', '.join(builtin_templates())}) nor a Jinja template")


def _builtin(name: str) -> str | None:
    if len(name) < 256 and "\n" not in name and "{" not in name and (CHAT_TEMPLATES / f"{name}.jinja").is_file():
        return (CHAT_TEMPLATES / f"{name}.jinja").read_text()
    return None


def _load(path: str, key: str | None = None):
    """A folder's tokenizer; with `key`, a folder without one fails naming that config key."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as err:
        if key is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeConfigError(f"{key}: no loadable tokenizer in {path} ({first})") from None


def resolve_chat_template(spec: MergeSpec) -> str | None:
    """The template the output gets, or None to keep the tokenizer's own (`auto` with no input template)."""
    template = spec.chat_template
    if template != "auto":
        return _builtin(template) or template
    found = []
    for path in spec.inputs:  # mergekit asks every referenced model; ties go to the first in config order
        try:
            own = _load(path).chat_template
        except (OSError, ValueError) as err:
            log.warning("chat_template: auto: no tokenizer in %s (%s)", path, err)
            continue
        if isinstance(own, dict):
            own = own.get("default")
        if own:
            found.append(own.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _vocab_size(ck: Checkpoint) -> int | None:
    config = ck.config
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def _stripped(path: str, vocab_size: int | None):
    """The tokenizer without the tokens whose ids are >= the model's vocab_size (mergekit's
    get_stripped_tokenizer: they have no embedding row)."""
    import tokenizers

    tok = _load(path, "tokenizer_source")
    vocab = tok.get_vocab()
    vocab_size = vocab_size or len(vocab)
    unused = [t for t, i in vocab.items() if i >= vocab_size]
    if not unused:
        return tok
    if not tok.is_fast:
        raise MergeConfigError(f"tokenizer_source: {path} has tokens past its vocab_size and no fast tokenizer")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise MergeConfigError(f"tokenizer_source: {path} has a {data['model']['type']} tokenizer with tokens past "
                               "its vocab_size; only BPE ones can be stripped (as in mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    unused_set = set(unused)
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        return not any(t in unused_set for t in pair)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok, toks: list[tuple[object, int]]):
    """The base tokenizer plus every token of the others (mergekit's build_union_tokenizer)."""
    import tempfile

    from transformers import AutoTokenizer

    vocab_out: dict[str, int] = {}
    added_out: dict[str, object] = {}
    for tok, vocab_size in toks:
        added = tok.added_tokens_decoder
        added_contents = {info.content for info in added.values()}
        for t, i in tok.get_vocab().items():
            if i >= vocab_size or t in added_contents:
                continue
            vocab_out.setdefault(t, len(vocab_out))
        for i, info in added.items():
            if i < vocab_size and info.content not in added_out:
                added_out[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base tokenizer object stays as it is
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in vocab_out:
        if t not in added_out and t not in base_vocab:
            out.add_tokens(t)
    for info in added_out.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and, per input, the input row of each output token id (-1: the input lacks it)."""

    tokenizer: object
    rows: int  # output vocabulary length: rows of every vocabulary tensor, the config's vocab_size
    index: dict[int, torch.Tensor]  # input (MergeSpec.inputs index) -> long tensor [rows]
    base: int | None  # input whose row wins for tokens some inputs lack (mergekit: the base model)

    def align(self, tensors: list[torch.Tensor], inputs: list[int]) -> list[torch.Tensor]:
        """The inputs' vocabulary tensors re-indexed to the output vocabulary (mergekit's PermutedVocabulary)."""
        idx = torch.stack([self.index[i] for i in inputs])  # [models, rows]
        present = idx >= 0
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        shape = (self.rows, *tensors[0].shape[1:])
        defaults = torch.zeros(shape, dtype=dtype)
        missing = (~present).any(0)
        if missing.any():
            count = present.sum(0)
            decided = torch.zeros(self.rows, dtype=torch.bool)
            one = missing & (count == 1)  # the only input that has it donates its row
            for k, t in enumerate(tensors):
                rows = one & present[k]
                defaults[rows] = t[idx[k, rows]].to(dtype)
            decided |= one | (count == 0)  # none has it: zeros
            if self.base is not None and self.base in inputs:
                b = inputs.index(self.base)
                rows = missing & ~decided & present[b]
                defaults[rows] = tensors[b][idx[b, rows]].to(dtype)
                decided |= rows
            rows = missing & ~decided  # the mean of those that have it, summed in input order (as mergekit)
            if rows.any():
                acc = torch.zeros((int(rows.sum()), *shape[1:]), dtype=dtype)
                for k, t in enumerate(tensors):
                    has = present[k, rows]
                    part = torch.zeros_like(acc)
                    part[has] = t[idx[k, rows][has]].to(dtype)
                    acc = acc + part
                defaults[rows] = acc / count[rows].to(dtype).unsqueeze(-1).reshape(-1, *[1] * (acc.dim() - 1))
        out = []
        for k, t in enumerate(tensors):
            new = defaults.clone()
            new[present[k]] = t[idx[k, present[k]]].to(dtype)
            out.append(new)
        return out


def build_vocabulary(spec: MergeSpec, ckpts: list[Checkpoint]) -> Vocabulary:
    """The output tokenizer for `tokenizer_source` and each input's row index (mergekit's build_tokenizer)."""
    ref = spec.base_input if spec.base_input is not None else spec.reference
    sizes = [_vocab_size(ck) for ck in ckpts]
    base_tok = _stripped(spec.inputs[ref], sizes[ref])
    toks = {ref: base_tok}  # the base first: its added tokens come first in a union (mergekit)
    for i, path in enumerate(spec.inputs):
        if i == ref:
            continue
        try:
            toks[i] = _load(path)
        except (OSError, ValueError) as err:  # mergekit: assume the base's
            log.warning("tokenizer_source: no tokenizer in %s (%s); taking it to be the base's", path, err)
    source = spec.tokenizer_source
    if source == "base":
        out = base_tok
    elif source == "union":
        out = _union(base_tok, [(toks[i], sizes[i] or toks[i].vocab_size) for i in toks])
    else:
        if not Path(source).is_dir():
            raise MergeConfigError(f"tokenizer_source: {source!r} is neither 'base', 'union' nor a folder")
        out = _load(source, "tokenizer_source")
    vocab = out.get_vocab()
    index = {}
    for i in range(len(spec.inputs)):
        own = (toks.get(i) or base_tok).get_vocab()
        size = sizes[i] or len(own)
        row = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, new in vocab.items():
            old = own.get(t)
            if old is not None and old < size:
                row[new] = old
        index[i] = row
    return Vocabulary(out, len(vocab), index, spec.base_input)
