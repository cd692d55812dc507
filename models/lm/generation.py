"""Batched chat generation with the transformers backend: our own decode loop around the HF model's forward.

generate() returns, for each conversation, n completions {"text", "num_tokens", "finished"}; generate_ids() the
token ids (GRPO's rollouts use it). Against `model.generate` on the same prompts, dtype, max tokens and batch size
(bench/generation.py, 2-core CPU, SmolLM2 bf16, the stages' batches): 3.8x its tokens/s sampling n=4, 2.8x
greedy. Why it is shaped this way (measured with the torch profiler on that workload):
- Prompts dominate the cost (few-shot prompts of ~170 tokens, answers of ~20-60): the prefix prompts share
  (system prompt + instruction + shot turns) is read once and its KV cache repeated, and kept (PrefixCache) for the
  next prompts that start with it; prompts joining at once are prefilled in groups that share a long prefix
  (prefill_groups: one task's prompts differ only in their last ~15 tokens); each prompt is read once for its n
  samples (generate() reads every sample's whole prompt); prefill computes only the last position's logits.
- Continuous batching: up to batch_size rows decode at once; a row that emits a stop token (EOS or the chat
  terminator) or reaches max_new_tokens leaves at once, and when a quarter of the rows are free the next prompts
  are prefilled and join (left-padded on the shared time axis), so the batch stays full (generate() keeps finished
  rows until its slowest one ends). Prompts go in lexicographic token order: the same task's prompts, sharing the
  longest prefix, run together.
- Decoding attention (one query row) runs as two batched matmuls instead of torch's CPU flash kernel (40 % of a
  bf16 step); nucleus sampling searches the 256 most likely tokens first instead of sorting the vocabulary (27 %).
  Neither changes the math: greedy float32 outputs equal model.generate's token for token (tests/test_hf.py).
- temperature == 0 means greedy: the n completions would be identical, so each prompt is decoded once and
  repeated n times (callers treat greedy and sampling alike: pass@k of a greedy run == pass@1).
- Sampling is temperature + nucleus (top_p) sampling, no top-k, from one torch.Generator seeded by `seed`: the same
  seed, inputs and batch_size give the same outputs on CPU, and the global RNG is untouched.
"""

import contextlib
import inspect
import logging

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from branchmerge.models.lm.chat import stop_token_ids

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


# Nucleus sampling looks at the most likely tokens first: sorting and sampling over all 49k vocabulary entries
# took 27 % of a teacher run (torch profiler, SmolLM2 bf16, 16 rows); the nucleus almost always lies in these.
NUCLEUS_CANDIDATES = 256


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their probabilities), both [rows, m], in vocabulary order: the smallest set of most likely
    tokens whose mass reaches top_p (zero probability for candidates outside it).

    The set is found among the NUCLEUS_CANDIDATES most likely tokens when their mass exceeds top_p (then no token
    outside them can be in it: exact), else over the whole sorted vocabulary."""
    sorted_p, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    if not bool((sorted_p.sum(-1) > top_p).all()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
    kept = sorted_p.masked_fill(outside, 0.0)
    # Vocabulary order, not probability order: two nearly equal probabilities that swap places under float noise
    # must not change which token a given draw picks.
    ids, by_id = order.sort(dim=-1)
    return ids, kept.gather(-1, by_id)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Greedy when temperature == 0, else nucleus sampling from softmax(logits / temperature)."""
    if temperature == 0:
        return logits.float().argmax(-1)  # bf16 argmax is 4x slower on CPU; the float copy is exact
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    ids, kept = nucleus(probs, top_p)
    return ids.gather(-1, torch.multinomial(kept, 1, generator=gen)).squeeze(-1)


# A forward call costs about as much as reading this many more tokens (30 layers of small ops, matmuls at few rows).
CALL_COST = 32


def prefill_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Split prompts (in sorted order) into runs that are prefilled together, as indices.

    prefill() reads a group's shared prefix once and every prompt's rest left-padded to the longest rest, so one
    prompt of another task (another few-shot example) in the group shrinks the shared prefix to the system prompt
    and makes every row read ~130 tokens again. A prompt joins the current group unless that costs more padded
    tokens than reading its own rest in a call of its own: on the default experiment this cut the prefilled
    tokens of 120 eval prompts from 7662 to 2534."""
    groups: list[list[int]] = []
    shared = width = 0  # the current group's shared prefix and its longest prompt
    for i, p in enumerate(prompts):
        if groups:
            with_first = common_len(prompts[groups[-1][0]], p[:-1])  # every prompt keeps a token of its own
            common = min(shared, with_first)
            joined = (len(groups[-1]) + 1) * (max(width, len(p)) - common)
            apart = len(groups[-1]) * (width - shared) + len(p) - with_first + CALL_COST
            if joined <= apart:
                groups[-1].append(i)
                shared, width = common, max(width, len(p))
                continue
        groups.append([i])
        shared, width = len(p) - 1, len(p)
    return groups


def common_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    first = prompts[0]
    return max(min(min(common_len(first, p), len(p) - 1) for p in prompts), 0)


DECODE_ATTENTION = "branchmerge_decode"


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, with decoding (one new token per row) done as two batched matmuls over the
    key/value heads: torch's CPU flash kernel for one query row took 40 % of a bf16 SmolLM2 decode step (87 ms of
    a step vs 54 ms this way, 16 rows). Prefill, and anything this does not cover, goes to SDPA unchanged."""
    if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scores = torch.matmul(query.view(rows, kv_heads, heads // kv_heads, dim), key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [rows, 1, 1, keys]: bool (True = attend) or additive
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def fast_decoding(model):
    """Decode with decode_attention while inside, on CPU models that use SDPA (CUDA's SDPA kernels are fast)."""
    before = model.config._attn_implementation
    if before != "sdpa" or next(model.parameters()).device.type != "cpu":
        yield
        return
    model.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def cache_kwarg(model) -> str:
    """The name forward() takes the KV cache under: `cache` since transformers 5.24 (`past_key_values` still works
    there, with a deprecation warning per call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixCache:
    """The KV cache of the last shared prefix read (one row), reused by later prompts that start with it: with
    continuous batching prompts join a few at a time, and without this each group would read the few-shot
    prefix again (prefill took 19 s of a 120-prompt teacher run instead of 11 s)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reusable(self, prefix: list[int]) -> int:
        """How many leading tokens of `prefix` are cached."""
        return common_len(self.tokens, prefix)

    def remember(self, tokens: list[int], cache: DynamicCache) -> None:
        self.tokens = list(tokens)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]


def prefill(model, prompts: list[list[int]], pad_id: int, kw: str, prefixes: PrefixCache | None = None):
    """(last logits, cache, attention mask, positions) after reading the prompts.

    The prefix every prompt shares (system prompt, instruction, few-shot turns: most of the prompt)
    is read once and its cache repeated; the rest is left-padded after it: [prefix][pad..][suffix].
    Positions count only real tokens, so each row sees exactly what it would see alone. With `prefixes`, the part
    of the prefix read by an earlier call is taken from there (for one prompt, all of it but the last token)."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    shared = shared_prefix_len(prompts) if len(prompts) > 1 else (len(prompts[0]) - 1 if prefixes else 0)
    if shared:
        reused = prefixes.reusable(prompts[0][:shared]) if prefixes else 0
        for i, (keys, values) in enumerate(prefixes.layers if reused else []):
            cache.update(keys[:, :, :reused], values[:, :, :reused], i)
        if reused < shared:
            prefix = torch.tensor([prompts[0][reused:shared]], device=device)
            model(input_ids=prefix, position_ids=torch.arange(reused, shared, device=device)[None], use_cache=True,
                  logits_to_keep=1, **{kw: cache})
        if prefixes is not None:
            prefixes.remember(prompts[0][:shared], cache)
        cache.batch_repeat_interleave(len(prompts))
    ids, mask = (t.to(device) for t in left_padded([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # padding takes no position
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    return out.logits[:, -1], cache, mask, pos  # the cache is filled in place


class Rows:
    """The rows being decoded: their KV cache, attention mask and next position over one shared time axis (rows
    that joined later are left-padded and masked), the last logits, and which (prompt, sample) each row is."""

    def __init__(self, model, kw: str):
        self.model, self.kw = model, kw
        self.cache, self.mask, self.pos, self.logits = None, None, None, None
        self.owner: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.owner)

    def join(self, logits, cache, mask, pos, owner: list[tuple[int, int]]) -> None:
        """Add freshly prefilled rows: both caches are left-padded to the longer time axis, then stacked."""
        if self.cache is None:
            self.cache, self.mask, self.pos, self.logits, self.owner = cache, mask, pos, logits, owner
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys, old.values = (torch.cat([_left_pad(a, width, dim=2), _left_pad(b, width, dim=2)])
                                    for a, b in ((old.keys, new.keys), (old.values, new.values)))
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.pos, self.logits = torch.cat([self.pos, pos]), torch.cat([self.logits, logits])
        self.owner = self.owner + owner

    def keep(self, idx: torch.Tensor) -> None:
        """Only these rows go on; time steps no remaining row attends to are cut off the front."""
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        self.owner = [self.owner[i] for i in idx.tolist()]
        start = int(self.mask.any(0).int().argmax())
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def step(self, tokens: torch.Tensor) -> None:
        """Read one new token per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         **{self.kw: self.cache})
        self.logits, self.pos = out.logits[:, -1], self.pos + 1


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def decode_stream(model, prompts: list[list[int]], order: list[int], samples: int, rows: int, temperature: float,
                  top_p: float, max_new_tokens: int, stops: list[int], pad_id: int, gen: torch.Generator):
    """Yield (prompt, [token ids per sample]) as prompts finish, decoding up to `rows` rows at once.

    Continuous batching: when a quarter of the rows (at least one prompt's samples) have finished, the next
    prompts in `order` are prefilled (sharing their common prefix, each prompt once for its samples) and join the
    rows being decoded, so the batch stays full instead of shrinking to its slowest row."""
    kw = cache_kwarg(model)
    device = next(model.parameters()).device
    stop_ids = torch.tensor(stops, device=device)
    queue = list(reversed(order))
    active, prefixes = Rows(model, kw), PrefixCache()
    tokens: dict[tuple[int, int], list[int]] = {}
    done: dict[int, int] = {}
    refill = max(samples, rows // 4)
    while queue or len(active):
        free = rows - len(active)
        if queue and (not len(active) or free >= refill):
            joining = [queue.pop() for _ in range(min(len(queue), max(1, free // samples)))]
            for group in prefill_groups([prompts[p] for p in joining]):
                batch = [joining[i] for i in group]
                logits, cache, mask, pos = prefill(model, [prompts[p] for p in batch], pad_id, kw, prefixes)
                if samples > 1:  # one prefill per prompt, shared by its samples
                    cache.batch_repeat_interleave(samples)
                    logits, mask, pos = (t.repeat_interleave(samples, dim=0) for t in (logits, mask, pos))
                active.join(logits, cache, mask, pos[:, -1:] + 1, [(p, s) for p in batch for s in range(samples)])
                tokens.update({(p, s): [] for p in batch for s in range(samples)})
        nxt = next_tokens(active.logits, temperature, top_p, gen)
        finished = torch.isin(nxt, stop_ids)
        for r, (owner, t) in enumerate(zip(active.owner, nxt.tolist())):
            tokens[owner].append(t)
            if len(tokens[owner]) == max_new_tokens:
                finished[r] = True
        for r in finished.nonzero().squeeze(1).tolist():
            prompt = active.owner[r][0]
            done[prompt] = done.get(prompt, 0) + 1
            if done[prompt] == samples:
                yield prompt, [tokens.pop((prompt, s)) for s in range(samples)]
        if finished.all():
            active = Rows(model, kw)
            continue
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            active.keep(keep)
            nxt = nxt[keep]
        active.step(nxt)


def generate_ids(model, tokenizer, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int, seed: int, desc: str = "", progress: bool = True
                 ) -> list[list[list[int]]]:
    """For each prompt (token ids), n completions as token ids, each ending at its stop token (kept) or after
    max_new_tokens. Greedy (temperature 0) decodes each prompt once and repeats it n times."""
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1 (got {n}, {batch_size}, {max_new_tokens})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    samples = 1 if temperature == 0 else n
    # lexicographic order puts prompts with the same few-shot prefix (same task) side by side, so prompts
    # prefilled together share a long prefix and their questions, of similar length, need little padding
    order = sorted(range(len(prompts)), key=lambda p: (prompts[p], p))
    rows = max(1, batch_size // samples) * samples
    stops = stop_token_ids(tokenizer, model.generation_config)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out: list[list[list[int]]] = [[] for _ in prompts]
    with torch.inference_mode(), fast_decoding(model), tqdm(total=len(prompts), desc=desc, unit="prompt",
                                                            disable=not progress) as bar:
        for p, decoded in decode_stream(model, prompts, order, samples, rows, temperature, top_p, max_new_tokens,
                                        stops, tokenizer.pad_token_id, gen):
            out[p] = decoded * (n // samples)
            bar.update()
    return out


def generate(model, tokenizer, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
             max_new_tokens: int, batch_size: int, seed: int, desc: str) -> list[list[dict]]:
    """For each conversation, n completions {"text", "num_tokens", "finished"} (see module doc)."""
    stops = set(stop_token_ids(tokenizer, model.generation_config))
    ids = generate_ids(model, tokenizer, prompt_ids(tokenizer, conversations), n=n, temperature=temperature,
                       top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, desc=desc)
    return [[completion(tokenizer, c, stops) for c in per_prompt] for per_prompt in ids]
