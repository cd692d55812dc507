"""Sequence packing for SFT: several prompt+response examples share one row, each one seeing only itself.

A packed row is examples laid end to end (at most max_length tokens, each example whole). Three things keep the
examples apart, so that every example's logits, loss and gradients are those it would get alone:

- position ids restart at 0 for every example (RoPE sees each example at the positions it has alone);
- the label of every example's first token is -100: masked_lm_loss lets logits[t] predict labels[t + 1], so no
  example's last token is trained to predict the next example's first token. Alone, an example's first label is
  never a target either, so the packed loss (a mean over the same target tokens) equals the unpacked one;
- attention stays inside each example (packed_model_inputs):
    * flash_attention_2/3: no mask; position_ids plus cu_seq_lens_q/k and max_length_q/k over the flattened
      batch, which transformers 5 hands to flash_attn_varlen_func (as its DataCollatorWithFlattening does).
      position_ids alone are not enough when a batch has several rows: transformers reads them as packed only
      for batch size 1 (`_is_packed_sequence` in modeling_flash_attention_utils.py);
    * sdpa: a 4D block-diagonal causal bool mask [B, 1, T, T] (True = may attend), the format transformers'
      own sdpa_mask builds; create_causal_mask returns any 4D mask untouched;
    * eager: the same mask as additive float in the model dtype (0 / dtype min), because eager attention adds
      the mask to the scores (a bool mask would be added as 0/1: silently wrong);
    * any other implementation (flex_attention, ...): position_ids only, no mask: transformers 5 then builds
      the per-example causal mask itself from where the position ids restart (find_packed_sequence_indices).
  The padding at a row's end is its own segment (position ids 0, 1, ...; labels -100), so no attention row is
  fully masked (which would give NaN in SDPA).

Public API:
    pack_examples(rows, max_length, seed) -> packed rows {"input_ids", "labels", "position_ids", "seq_lens"}
    packed_collate(rows, pad_token_id) -> batch {"input_ids", "labels", "position_ids", "seq_lens", "cu_seq_lens",
                                                 "max_seq_len", "num_tokens"}
    block_causal_mask(position_ids) -> bool [B, 1, T, T]
    packed_model_inputs(batch, attn_implementation, dtype) -> keyword arguments for model(...)
"""

from __future__ import annotations

import bisect
import random

import torch

IGNORE_INDEX = -100  # labels that are not targets (torch cross_entropy's default ignore_index)


def pack_examples(rows: list[dict], max_length: int, seed: int) -> list[dict]:
    """Best-fit-decreasing bin packing of tokenized examples ({"input_ids", "labels"}) into rows of <= max_length.

    Longest example first, each into the row with the least room that still fits it whole, else a new row.
    The seed only breaks ties between examples of equal length. Each packed row holds "input_ids", "labels"
    (first label of every example set to -100), "position_ids" (restarting at 0 for every example) and
    "seq_lens" (the examples' lengths, in row order).
    """
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if not 0 < n <= max_length or len(r["labels"]) != n:
            raise ValueError(f"pack_examples: row {i} has {n} input_ids and {len(r['labels'])} labels; need "
                             f"1..max_length={max_length} tokens and one label per token (tokenize with "
                             "the same sft.max_length)")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    order.sort(key=lambda i: -len(rows[i]["input_ids"]))  # stable: equal lengths keep the seeded order
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin index), ascending
    for i in order:
        n = len(rows[i]["input_ids"])
        k = bisect.bisect_left(room, (n, -1))  # the fullest row that still has n tokens free
        if k == len(room):
            bins.append([i])
            left, b = max_length - n, len(bins) - 1
        else:
            left, b = room.pop(k)
            bins[b].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, b))
    return [_join([rows[i] for i in b]) for b in bins]


def _join(examples: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for e in examples:
        n = len(e["input_ids"])
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])
        row["position_ids"] += range(n)
        row["seq_lens"].append(n)
    return row


def packed_collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad packed rows to the longest in the batch; the padding is one more segment of its own.

    cu_seq_lens (int32) are the segment boundaries over the flattened [B * T] batch, padding segments
    included, and max_seq_len the longest segment: what flash_attn_varlen_func needs. num_tokens counts
    non-pad tokens.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments: list[int] = []
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        positions[i, :n] = torch.tensor(r["position_ids"])
        positions[i, n:] = torch.arange(width - n)
        segments += r["seq_lens"] + ([width - n] if n < width else [])
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments).cumsum(0)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "seq_lens": [list(r["seq_lens"]) for r in rows], "cu_seq_lens": cu, "max_seq_len": max(segments),
            "num_tokens": sum(len(r["input_ids"]) for r in rows)}


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query t may attend key s iff s <= t and both lie in the same segment.

    A segment starts wherever the position id is 0 (every example, and a row's padding, starts at 0).
    """
    segment = (position_ids == 0).cumsum(-1)
    width = position_ids.size(-1)
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def packed_model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """Keyword arguments for a transformers causal LM's forward on a packed batch (see the module docstring).

    attn_implementation is the model's `config._attn_implementation`; dtype its parameters' dtype (the dtype
    transformers' own eager masks use).
    """
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "flash" in attn_implementation:  # flash_attention_2/3 and hub kernels such as kernels-community/flash-attn
        cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
        return inputs | {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if attn_implementation == "sdpa":
        return inputs | {"attention_mask": block_causal_mask(batch["position_ids"])}
    if attn_implementation == "eager":
        allowed = block_causal_mask(batch["position_ids"])
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return inputs | {"attention_mask": additive.masked_fill(~allowed, torch.finfo(dtype).min)}
    return inputs
