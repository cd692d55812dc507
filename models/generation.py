"""Batched chat generation with the transformers backend (CPU-friendly).

generate() returns, for each conversation, n completions {"text", "num_tokens", "finished"}.

Why it is shaped this way:
- Rows (conversation x sample) are sorted by prompt length and cut into batches, so left padding
  wastes little compute; outputs are put back in input order.
- temperature == 0 means greedy: the n completions would be identical, so each prompt is decoded
  once and the completion is repeated n times (n is still honoured so callers can treat greedy and
  sampling alike, e.g. pass@k of a greedy run == pass@1).
- Each batch draws from its own RNG state seeded from (seed, batch index) inside fork_rng, so the
  same seed + inputs + batch_size give the same outputs on CPU and the caller's RNG is untouched.
- Generation stops at EOS or the chat turn terminator (<|im_end|>), and a batch stops as soon as
  all its rows have finished (transformers' stopping criteria).
"""

import logging

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from models.hf import stop_token_ids

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the chat template + the assistant header."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    # the template already holds the special tokens; adding BOS again would shift the model
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def length_sorted_batches(rows: list[tuple[int, int]], lengths: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Rows (prompt index, sample index) grouped into batches of similar prompt length."""
    order = sorted(rows, key=lambda r: (lengths[r[0]], r[0], r[1]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def completion(tokenizer, new_ids: list[int], stops: set[int]) -> dict:
    """Cut a generated row at its first stop token (kept in num_tokens: the model produced it)."""
    cut = next((i for i, t in enumerate(new_ids) if t in stops), None)
    body = new_ids if cut is None else new_ids[:cut]
    return {"text": tokenizer.decode(body, skip_special_tokens=True),
            "num_tokens": len(new_ids) if cut is None else cut + 1,
            "finished": cut is not None}


def generation_config(tokenizer, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
    """An explicit config, so a model folder's own sampling defaults (top_k=50, repetition
    penalties, ...) never leak into our runs."""
    stops = stop_token_ids(tokenizer)
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, use_cache=True)
    if temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)


def generate(model, tokenizer, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
             max_new_tokens: int, batch_size: int, seed: int, desc: str) -> list[list[dict]]:
    """For each conversation, n completions {"text", "num_tokens", "finished"} (see module doc)."""
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1 (got {n}, {batch_size}, {max_new_tokens})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    prompts = prompt_ids(tokenizer, conversations)
    samples = 1 if temperature == 0 else n
    rows = [(p, s) for p in range(len(prompts)) for s in range(samples)]
    batches = length_sorted_batches(rows, [len(p) for p in prompts], batch_size)
    gc = generation_config(tokenizer, temperature, top_p, max_new_tokens)
    stops = set(stop_token_ids(tokenizer))
    out: list[list[dict | None]] = [[None] * samples for _ in prompts]
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
        for b, batch in enumerate(tqdm(batches, desc=desc, unit="batch")):
            torch.manual_seed(seed * 100_003 + b)
            ids, mask = left_padded([prompts[p] for p, _ in batch], tokenizer.pad_token_id)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
            for (p, s), row in zip(batch, gen[:, ids.shape[1]:].tolist()):
                out[p][s] = completion(tokenizer, row, stops)
    if samples == 1 and n > 1:
        out = [[dict(o[0]) for _ in range(n)] for o in out]
    return out
