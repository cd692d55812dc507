"""Batched chat generation with the transformers backend (CPU-friendly).

generate() returns, for each conversation, n completions {"text", "num_tokens", "finished"}.

Why it is shaped this way (a small decode loop of our own instead of model.generate):
- Prompts dominate the cost here (few-shot prompts of ~170 tokens, answers of ~20-60), so the
  prefix a batch's prompts share (system prompt + instruction + shot turns) is read once, each
  prompt is read once and its KV cache repeated for its n samples (generate() would read every
  sample's whole prompt), and prefill computes only the last position's logits.
- Prompts are sorted lexicographically by token ids (same task/shots side by side, then similar
  questions) and cut into batches; batch_size counts decoded rows (prompts per batch =
  batch_size // n, at least 1); outputs come back in input order.
- Rows that hit a stop token (EOS or the chat terminator <|im_end|>) are dropped from the batch at
  once, and the batch ends when none is left.
- temperature == 0 means greedy: the n completions would be identical, so each prompt is decoded
  once and the completion repeated n times (callers treat greedy and sampling alike: pass@k of a
  greedy run == pass@1).
- Sampling is plain temperature + nucleus (top_p) sampling, no top-k. Each batch draws from its
  own torch.Generator seeded from (seed, batch index): the same seed, inputs and batch_size give
  the same outputs on CPU, and the global RNG is untouched.
"""

import inspect
import logging

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from models.lm.chat import stop_token_ids

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the chat template + the assistant header."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    # the template already holds the special tokens; adding BOS again would shift the model
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def completion(tokenizer, new_ids: list[int], stops: set[int]) -> dict:
    """A generated row cut at its first stop token (counted in num_tokens: the model produced it)."""
    cut = next((i for i, t in enumerate(new_ids) if t in stops), None)
    body = new_ids if cut is None else new_ids[:cut]
    return {"text": tokenizer.decode(body, skip_special_tokens=True),
            "num_tokens": len(new_ids) if cut is None else cut + 1,
            "finished": cut is not None}


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Greedy when temperature == 0, else nucleus sampling from softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


def cache_kwarg(model) -> str:
    """The name forward() takes the KV cache under: `cache` since transformers 5.24 (`past_key_values` still works
    there, with a deprecation warning per call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, prompts: list[list[int]], pad_id: int, kw: str):
    """(last logits, cache, attention mask, positions) after reading the prompts.

    The prefix every prompt shares (system prompt, instruction, few-shot turns: most of the prompt)
    is read once and its cache repeated; the rest is left-padded after it: [prefix][pad..][suffix].
    Positions count only real tokens, so each row sees exactly what it would see alone."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    shared = shared_prefix_len(prompts) if len(prompts) > 1 else 0
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        model(input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], use_cache=True,
              logits_to_keep=1, **{kw: cache})
        cache.batch_repeat_interleave(len(prompts))
    ids, mask = (t.to(device) for t in left_padded([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # padding takes no position
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    return out.logits[:, -1], cache, mask, pos  # the cache is filled in place


def decode_batch(model, prompts: list[list[int]], samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, stops: list[int], pad_id: int, gen: torch.Generator) -> list[list[int]]:
    """New token ids for each (prompt, sample) row, prompt-major; rows end at their stop token."""
    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    logits, cache, mask, pos = prefill(model, prompts, pad_id, kw)
    if samples > 1:  # one prefill per prompt, shared by its samples
        cache.batch_repeat_interleave(samples)
        logits, mask, pos = (t.repeat_interleave(samples, dim=0) for t in (logits, mask, pos))
    next_pos = pos[:, -1:] + 1
    alive = torch.arange(logits.shape[0], device=device)  # batch row -> output row
    tokens: list[list[int]] = [[] for _ in range(logits.shape[0])]
    stop_ids = torch.tensor(stops, device=device)
    for step in range(max_new_tokens):
        nxt = next_tokens(logits, temperature, top_p, gen)
        for r, t in zip(alive.tolist(), nxt.tolist()):
            tokens[r].append(t)
        keep = ~torch.isin(nxt, stop_ids)
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():  # finished rows leave the batch
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, mask, next_pos, nxt = alive[idx], mask[idx], next_pos[idx], nxt[idx]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{kw: cache})
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return tokens


def generate(model, tokenizer, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
             max_new_tokens: int, batch_size: int, seed: int, desc: str) -> list[list[dict]]:
    """For each conversation, n completions {"text", "num_tokens", "finished"} (see module doc)."""
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1 (got {n}, {batch_size}, {max_new_tokens})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    prompts = prompt_ids(tokenizer, conversations)
    samples = 1 if temperature == 0 else n
    # lexicographic order puts prompts with the same few-shot prefix (same task) side by side, so a
    # batch shares a long prefix and its questions, of similar length, need little padding
    order = sorted(range(len(prompts)), key=lambda p: (prompts[p], p))
    per_batch = max(1, batch_size // samples)
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    stops = stop_token_ids(tokenizer, model.generation_config)
    device = next(model.parameters()).device
    out: list[list[dict]] = [[] for _ in prompts]
    with torch.inference_mode():
        for b, batch in enumerate(tqdm(batches, desc=desc, unit="batch")):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
            rows = decode_batch(model, [prompts[p] for p in batch], samples, temperature, top_p, max_new_tokens,
                                stops, tokenizer.pad_token_id, gen)
            for i, p in enumerate(batch):
                out[p] = [completion(tokenizer, r, set(stops)) for r in rows[i * samples:(i + 1) * samples]]
    if samples == 1 and n > 1:
        out = [[dict(o[0]) for _ in range(n)] for o in out]
    return out
