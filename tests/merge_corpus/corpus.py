"""What the merge corpus compares, shared by bench/merge_corpus_expected.py (mergekit's venv, imported by path)
and tests/test_merge_corpus.py: the configs, their `${models}` substitution, and the summary of a merged folder.
Needs only torch, safetensors, transformers (no pytest, no branchmerge), like models.py beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected"
# Masks drawn at random (DARE's Bernoulli drops, DELLA's magnitude-ranked drops): no two RNGs agree, so only the
# structure of these outputs is stored and compared.
STOCHASTIC_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
# config.json fields compared. `dtype` is transformers 5's name for 4.x's `torch_dtype`: both are recorded, and
# the test compares whichever is present (an engine may write either).
CONFIG_FIELDS = ("num_hidden_layers", "vocab_size", "tie_word_embeddings", "torch_dtype", "dtype")
# Recorded for reading only, not compared: mergekit copies them from the reference model unchanged, even
# layer_types when the layer count changes (which transformers 5 then refuses to save or load).
INFO_FIELDS = ("architectures", "layer_types", "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id")


def config_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yml"))


def config_text(name: str, models_root: Path) -> str:
    """The YAML of `name` with `${models}` replaced by the folder build_models wrote."""
    return (HERE / f"{name}.yml").read_text().replace("${models}", str(Path(models_root).resolve()))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors shard in `folder`."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(str(shard))
        clash = set(part) & set(out)
        assert not clash, f"{shard.name}: tensors also in another shard: {sorted(clash)[:5]}"
        out.update(part)
    return out


def tensor_key(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes (not of the file: a safetensors release may lay out headers
    differently without changing a value)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{tensor_key(t)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vocab_sha256(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def summarize(folder: Path) -> dict:
    """The comparable facts of a merged HF folder: tensor names / shapes / dtypes, config.json fields, tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    tensors = read_tensors(folder)
    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: mergekit's "auto" reads the default one
        template = template.get("default")
    return {
        # one short string per tensor ("bfloat16[300, 16]"): the JSON stays small and diffs read well
        "tensors": {k: tensor_key(v) for k, v in sorted(tensors.items())},
        "config_json": {k: cfg.get(k) for k in CONFIG_FIELDS},
        "config_json_info": {k: cfg.get(k) for k in INFO_FIELDS if k in cfg},
        "tokenizer": {
            "vocab_size": len(vocab),
            "len": len(tok),
            "vocab_sha256": vocab_sha256(vocab),
            "chat_template": template,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        },
        "files": sorted(p.name for p in folder.iterdir()),
    }
