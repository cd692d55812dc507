"""Sequence packing: bin packing, collation, and a packed batch giving exactly the unpacked logits, loss and
gradients on a tiny random Llama; train_sft with packing against train_sft without it."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from branchmerge.models.data.packing import IGNORE_INDEX, block_causal_mask, pack_examples, packed_collate, packed_model_inputs
from branchmerge.models.training.sft import masked_lm_loss, pad_collate, train_sft
from tests.test_sft import sft_config, varied_examples

PAD = 0


def make_rows(lengths, prompt_lengths, vocab=97, seed=0):
    """Random examples; the first prompt_lengths[i] labels are -100 (the prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, p in zip(lengths, prompt_lengths):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return rows


def split_row(row):
    """The examples of a packed row, as (input_ids, labels, position_ids) slices."""
    out, start = [], 0
    for n in row["seq_lens"]:
        out.append(tuple(row[k][start : start + n] for k in ("input_ids", "labels", "position_ids")))
        start += n
    assert start == len(row["input_ids"])
    return out


# ----------------------------------------------------------------------------------------------- packing


def test_pack_examples_keeps_examples_whole_within_max_length():
    lengths = [17, 3, 9, 25, 4, 11, 30, 2, 8, 14, 9, 30, 1]
    rows = make_rows(lengths, [min(2, n - 1) for n in lengths])
    packed = pack_examples(rows, max_length=32, seed=0)
    assert all(len(r["input_ids"]) <= 32 for r in packed)
    assert len(packed) == 6  # 163 tokens: at least ceil(163 / 32) = 6 rows, and best-fit reaches it
    pieces = [piece for r in packed for piece in split_row(r)]
    assert sorted(p[0] for p in pieces) == sorted(r["input_ids"] for r in rows)  # every example once, whole
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    for ids, labels, positions in pieces:
        assert positions == list(range(len(ids)))  # position ids restart at every example
        assert labels[0] == IGNORE_INDEX and labels[1:] == by_ids[tuple(ids)]["labels"][1:]
    assert pack_examples(rows, 32, seed=0) == packed  # deterministic


def test_pack_examples_best_fit_decreasing_and_errors():
    rows = make_rows([6, 5, 4, 3, 2], [0] * 5)
    # 6 -> row A (4 left), 5 -> row B (5 left), 4 -> A (fits exactly), 3 -> B, 2 -> B
    assert [r["seq_lens"] for r in pack_examples(rows, 10, seed=0)] == [[6, 4], [5, 3, 2]]
    with pytest.raises(ValueError, match="max_length=5"):
        pack_examples(rows, 5, seed=0)
    # The seed only orders equal lengths.
    same = make_rows([4] * 6, [1] * 6)
    orders = {tuple(tuple(r["input_ids"]) for r in pack_examples(same, 8, seed=s)) for s in range(5)}
    assert len(orders) > 1


def test_packed_collate_pads_as_its_own_segment():
    rows = pack_examples(make_rows([3, 2, 4], [1, 0, 2]), max_length=5, seed=0)
    assert [r["seq_lens"] for r in rows] == [[4], [3, 2]]
    batch = packed_collate(rows, PAD)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, 4] == PAD and batch["labels"][0, 4] == IGNORE_INDEX
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 5, 8, 10] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_seq_len"] == 4 and batch["num_tokens"] == 9
    expected = torch.zeros(2, 5, 5, dtype=torch.bool)
    for b, segments in enumerate([[(0, 4), (4, 5)], [(0, 3), (3, 5)]]):
        for lo, hi in segments:
            for q in range(lo, hi):
                expected[b, q, lo : q + 1] = True
    assert torch.equal(block_causal_mask(batch["position_ids"]), expected[:, None])


def test_flash_inputs_are_varlen_kwargs_without_a_mask():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = packed_collate(pack_examples(make_rows([3, 2, 4, 6], [1, 0, 2, 3]), 7, seed=0), PAD)
    inputs = packed_model_inputs(batch, "flash_attention_2", torch.bfloat16)
    assert "attention_mask" not in inputs and inputs["position_ids"] is batch["position_ids"]
    # The same boundaries transformers derives from position ids for a batch flattened into one row.
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(inputs["cu_seq_lens_q"], cu_q) and torch.equal(inputs["cu_seq_lens_k"], cu_k)
    assert inputs["max_length_q"] == inputs["max_length_k"] == int(max_q) == int(max_k)


# ----------------------------------------------------------------------------------------------- model


def tiny_llama(attn_implementation):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=PAD)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    assert model.config._attn_implementation == attn_implementation
    return model.train()  # no dropout in Llama's default config: train mode is deterministic


LENGTHS, PROMPTS = [7, 12, 3, 9, 15, 5, 10], [3, 5, 1, 4, 6, 2, 9]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(attn):
    model = tiny_llama(attn)
    rows = make_rows(LENGTHS, PROMPTS)
    packed = pack_examples(rows, max_length=24, seed=0)
    assert len(packed) < len(rows) and any(len(r["seq_lens"]) > 1 for r in packed)
    batch = packed_collate(packed, PAD)
    inputs = packed_model_inputs(batch, attn, model.dtype)
    assert inputs["attention_mask"].shape == (len(packed), 1, 24, 24)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        for b, row in enumerate(packed):
            start = 0
            for ids, _, _ in split_row(row):
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[b, start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
                start += len(ids)
        if attn == "sdpa":  # the fallback (no mask): transformers 5 derives the same mask from position ids
            bare = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            torch.testing.assert_close(bare, logits, atol=1e-5, rtol=1e-5)


def test_packed_loss_and_gradients_equal_unpacked():
    model = tiny_llama("sdpa")
    rows = make_rows(LENGTHS, PROMPTS)

    def loss_and_grads(batch, inputs):
        model.zero_grad()
        loss = masked_lm_loss(model(**inputs, use_cache=False).logits, batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = pad_collate(rows, PAD)
    loss, grads = loss_and_grads(padded, {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})
    packed = packed_collate(pack_examples(rows, 24, seed=0), PAD)
    packed_loss, packed_grads = loss_and_grads(packed, packed_model_inputs(packed, "sdpa", model.dtype))
    # Same target tokens: each example's first label is never a target, packed or not.
    n_targets = sum(sum(x != IGNORE_INDEX for x in r["labels"][1:]) for r in rows)
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_targets
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash-attn varlen needs CUDA and the flash_attn package")
def test_flash_varlen_packed_logits_equal_each_example_alone():
    model = tiny_llama("flash_attention_2").to("cuda", torch.bfloat16)
    rows = make_rows(LENGTHS, PROMPTS)
    packed = pack_examples(rows, max_length=24, seed=0)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed_collate(packed, PAD).items()}
    with torch.no_grad():
        logits = model(**packed_model_inputs(batch, "flash_attention_2", model.dtype), use_cache=False).logits
        for b, row in enumerate(packed):
            start = 0
            for ids, _, _ in split_row(row):
                alone = model(input_ids=torch.tensor([ids], device="cuda"), use_cache=False).logits[0]
                torch.testing.assert_close(logits[b, start : start + len(ids)], alone, atol=2e-2, rtol=2e-2)
                start += len(ids)


# ----------------------------------------------------------------------------------------------- training



def test_train_sft_packed_equals_unpacked_when_steps_see_the_same_examples(tiny_model_dir, tmp_path):
    # Batches big enough for all 7 examples (unpacked: 7 rows; packed: fewer rows): every step sees every example,
    # so the two runs take the same optimizer steps and only the batch layout differs.
    plain, packed = (train_sft(sft_config(epochs=3, batch_size=7, packing=packing), tiny_model_dir, varied_examples(),
                               tmp_path / name, seed=0, progress=False)
                     for name, packing in (("plain", False), ("packed", True)))
    assert plain["rows"] == 7 and packed["rows"] < 7 and packed["steps"] == plain["steps"] == 3
    assert packed["tokens"] == plain["tokens"] and packed["target_tokens"] == plain["target_tokens"]
    assert packed["loss_history"] == pytest.approx(plain["loss_history"], rel=1e-5)
    assert packed["loss_history"][-1] < packed["loss_history"][0]
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "packed" / "model.safetensors")
    # Adam divides by sqrt(v): on a near-zero gradient, float summation-order noise moves a weight by a
    # fraction of one lr step (3e-3), so weights match to 1e-4, not to the losses' 1e-5.
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
