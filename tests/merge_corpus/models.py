"""Tiny, deterministic HF model folders for the merge corpus (tests/test_merge_corpus.py).

    build_models(root) -> {"llama-base": root/"llama-base", ...}

Imported by path from two virtual environments (ours and mergekit's, bench/merge_corpus_expected.py), so it
needs only torch, safetensors, transformers and tokenizers. The expected outputs in expected/ were made from
these folders on one machine and are checked on others, so nothing here may depend on the machine or on a
library's random init: every tensor is drawn with an explicitly seeded torch.Generator in a fixed order and
written with safetensors; config.json and generation_config.json are written as plain JSON.

Families (hidden 16, intermediate 32, 8 layers, 4 heads, 2 kv heads):
- llama-base, llama-a, llama-b, llama-c: LlamaForCausalLM, tied embeddings (no lm_head stored), fp32.
  a = base + dense deltas; b = base + sparse (30 %) larger deltas; c = base - 0.6 * (a - base) + noise, so
  its deltas disagree in sign with a's (TIES sign election, breadcrumbs and model_stock have work to do).
- llama-base-bf16, llama-a-bf16, llama-b-bf16: the same weights stored in bfloat16 (config dtype bfloat16),
  like real checkpoints.
- llama-think: base + deltas, and a tokenizer with two extra added tokens (<think>, </think>) whose embedding
  rows are extra rows (vocab 302), and its own chat template (tokenizer_source: union / <model>).
- qwen-base, qwen-a, qwen-b: Qwen2ForCausalLM with q/k/v biases, untied lm_head, and vocab_size 320 padded
  above the tokenizer's 300 tokens (as Qwen2.5 pads).
The llama family's chat template differs from qwen's and llama-think's, so `chat_template: auto` has a
plurality to find, and none of them equals mergekit's built-in templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 16, 32, 8, 4, 2
HEAD_DIM = HIDDEN // HEADS
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
QWEN_VOCAB = 320  # padded above len(tokenizer) == 300

# A few dozen BPE merges over GPT-2's byte alphabet ("Ġ" is the space byte); each new token is the
# concatenation of the pair, and both sides must already exist when the merge is added.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"), ("Ġ", "a"),
    ("Ġt", "he"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("o", "r"), ("i", "s"), ("Ġ", "w"), ("Ġ", "o"),
    ("e", "s"), ("in", "g"), ("Ġ", "c"), ("Ġ", "b"), ("a", "l"), ("i", "t"), ("Ġ", "m"), ("Ġ", "f"),
    ("Ġa", "n"), ("Ġan", "d"), ("e", "d"), ("o", "u"), ("Ġ", "p"), ("Ġo", "f"), ("Ġ", "i"), ("a", "r"),
    ("Ġ", "d"), ("l", "e"), ("Ġt", "o"), ("Ġ", "h"), ("Ġ", "in"), ("i", "on"), ("Ġw", "h"), ("s", "t"),
    ("Ġ", "is"),
]  # 256 bytes + 41 merges + 3 specials = 300 tokens

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] | trim + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
THINK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] | trim + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (so byte b is token id b)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _tokenizer(extra: list[str], template: str, bos: str | None):
    """A byte-level BPE built from a fixed vocab and merge list (no training), as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    for left, right in MERGES:
        assert left in vocab and right in vocab and left + right not in vocab, (left, right)
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if extra:  # like Qwen3's <think>: added, not special
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    fast.chat_template = template
    return fast


def _shapes(family: str, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in a fixed order (the draw order of the generators)."""
    out = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        ]
        if family == "qwen":
            out += [
                (p + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,)),
                (p + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,)),
                (p + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    out.append(("model.norm.weight", (HIDDEN,)))
    if family == "qwen":
        out.append(("lm_head.weight", (vocab, HIDDEN)))
    return out


def _base(family: str, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _shapes(family, vocab):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        # norms near 1 (as trained ones are), everything else at an init-like scale
        out[name] = 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.2 * x
    return out


def _delta(base: dict[str, torch.Tensor], seed: int, scale: float, density: float = 1.0):
    """base + scale * noise, the noise kept on a `density` fraction of elements (mask drawn from the same
    generator right after each tensor's noise)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        d = scale * torch.randn(w.shape, generator=g, dtype=torch.float32)
        if density < 1.0:
            d = d * (torch.rand(w.shape, generator=g) < density)
        out[name] = w + d
    return out


def _llama_config(vocab: int, dtype: str, tok) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).to_diff_dict()  # what save_pretrained writes: no default-valued noise
    cfg.update(architectures=["LlamaForCausalLM"], dtype=dtype)
    return cfg


def _qwen_config(tok) -> dict:
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=QWEN_VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).to_diff_dict()  # what save_pretrained writes: no default-valued noise
    cfg.update(architectures=["Qwen2ForCausalLM"], dtype="float32")
    return cfg


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict, tok, dtype: torch.dtype) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(str(folder))
    return folder


def build_models(root: Path) -> dict[str, Path]:
    """Write every model folder under `root` (created if needed); returns {name: folder}."""
    root = Path(root)
    llama_tok = _tokenizer([], LLAMA_TEMPLATE, bos="<|endoftext|>")
    think_tok = _tokenizer(THINK_TOKENS, THINK_TEMPLATE, bos="<|endoftext|>")
    qwen_tok = _tokenizer([], QWEN_TEMPLATE, bos=None)
    vocab = len(llama_tok)
    assert vocab == 256 + len(MERGES) + len(SPECIAL_TOKENS) == 300, vocab
    assert len(think_tok) == vocab + len(THINK_TOKENS)

    base = _base("llama", vocab, seed=0)
    a = _delta(base, seed=1, scale=0.03)
    b = _delta(base, seed=2, scale=0.08, density=0.3)
    noise = _delta({k: torch.zeros_like(v) for k, v in base.items()}, seed=3, scale=0.01)
    c = {k: base[k] - 0.6 * (a[k] - base[k]) + noise[k] for k in base}
    think = _delta(base, seed=4, scale=0.02)
    g = torch.Generator().manual_seed(5)  # the two new tokens' rows
    think["model.embed_tokens.weight"] = torch.cat(
        [think["model.embed_tokens.weight"], 0.2 * torch.randn((len(THINK_TOKENS), HIDDEN), generator=g)]
    )

    out = {}
    fp32 = _llama_config(vocab, "float32", llama_tok)
    bf16 = _llama_config(vocab, "bfloat16", llama_tok)
    for name, weights in (("llama-base", base), ("llama-a", a), ("llama-b", b), ("llama-c", c)):
        out[name] = _write(root / name, weights, fp32, llama_tok, torch.float32)
    for name, weights in (("llama-base-bf16", base), ("llama-a-bf16", a), ("llama-b-bf16", b)):
        out[name] = _write(root / name, weights, bf16, llama_tok, torch.bfloat16)
    out["llama-think"] = _write(root / "llama-think", think, _llama_config(len(think_tok), "float32", think_tok),
                                think_tok, torch.float32)

    assert len(qwen_tok) == vocab < QWEN_VOCAB
    q_base = _base("qwen", QWEN_VOCAB, seed=10)
    q_a = _delta(q_base, seed=11, scale=0.03)
    q_b = _delta(q_base, seed=12, scale=0.06, density=0.5)
    q_cfg = _qwen_config(qwen_tok)
    for name, weights in (("qwen-base", q_base), ("qwen-a", q_a), ("qwen-b", q_b)):
        out[name] = _write(root / name, weights, q_cfg, qwen_tok, torch.float32)
    return out


if __name__ == "__main__":  # python tests/merge_corpus/models.py OUT_DIR: write the folders to look at them
    import sys

    for name, path in build_models(Path(sys.argv[1])).items():
        print(name, path)
