"""SFT: loss and tokenization against hand computations; train_sft against a plain PyTorch loop."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.models.lm.chat import end_of_turn_text
from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.sft import IGNORE_INDEX, length_batches, masked_lm_loss, tokenize_example, train_sft

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 6 times 7?"}]
COMPLETION = "6 * 7 = 42, so the answer is <answer>42</answer>."

# Every SFTConfig field, set for tests (small, fast, float32, no checkpoints); tests change what they test.
SETTINGS = dict(lr=3e-3, epochs=1, max_steps=-1, batch_size=2, grad_accum=1, max_length=128, warmup_ratio=0.0,
                weight_decay=0.0, betas=(0.9, 0.999), scheduler="constant_with_warmup", precision="32-true",
                save_dtype="float32", packing=False, loss_impl="plain", finetune="full",
                lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                gradient_checkpointing=False, shared_prefix=False, checkpoint_every=0, strategy="auto", devices=1,
                num_nodes=1, loss="nll",
                poft_reference="base",
                poft_length_normalize=True, recipe="single", dmt_k=0.25, hard_fraction=0.3, mixture=False,
                mixing="static", aioli={"eta": 0.2, "lp_rounds": 1, "lp_steps": 2, "one_hot_factor": 0.625, "rounds": 3,
                                        "ema": None})


def sft_config(**changes) -> SFTConfig:
    return SFTConfig(**(SETTINGS | changes))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


# ----------------------------------------------------------------------------------------------- loss


def test_masked_lm_loss_matches_loop_over_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):  # position t predicts token t + 1
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            row = [float(v) for v in logits[b, t]]
            m = max(row)
            log_z = m + math.log(sum(math.exp(v - m) for v in row))
            total += -(row[y] - log_z)
            count += 1
    assert count == 3 + 3  # row 0: targets 3..5; row 1: targets 1..3 (label 0 is never a target)
    assert masked_lm_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-6)
    assert masked_lm_loss(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


# ----------------------------------------------------------------------------------------------- data


def test_tokenize_example_masks_exactly_the_prompt(tok):
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ex = tokenize_example(tok, MESSAGES, COMPLETION, max_length=512)
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    target = ex["labels"][n:]
    assert IGNORE_INDEX not in target and target == ex["input_ids"][n:]
    assert tok.decode(target) == COMPLETION + "<|im_end|>"  # ChatML end of turn, derived from the template


def test_tokenize_example_truncates_from_completion_end(tok):
    full = tokenize_example(tok, MESSAGES, COMPLETION, max_length=512)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = tokenize_example(tok, MESSAGES, COMPLETION, max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"] == full["labels"][: n_prompt + 3]
    assert sum(x != IGNORE_INDEX for x in cut["labels"]) == 3


def test_end_of_turn_text_follows_the_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert end_of_turn_text(tok) == "<|im_end|>"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>\n\n{% endfor %}"
    assert end_of_turn_text(tok) == "<|endoftext|>"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # writes nothing after a reply
    assert end_of_turn_text(tok) == tok.eos_token


def test_length_batches_partition_and_group_by_length():
    lengths = [17, 3, 9, 25, 4, 11, 30, 2, 8, 14]  # distinct; 10 items < one mega-batch (50 batches)
    batches = length_batches(lengths, batch_size=3, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(10))
    by_length = sorted(range(10), key=lambda i: -lengths[i])
    expected = [by_length[i : i + 3] for i in range(0, 10, 3)]  # minimal-padding batches
    assert sorted(batches) == sorted(expected)
    orders = {tuple(map(tuple, length_batches(lengths, 3, s))) for s in range(6)}
    assert len(orders) > 1  # the batch order depends on the seed


# ----------------------------------------------------------------------------------------------- training


def reference_sft(model_dir, ids, labels, *, steps, lr, betas, weight_decay, warmup, total):
    """Plain PyTorch: AdamW (decay on matrices), HF cosine-with-warmup written out, the same batch every step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=betas)
    losses = []
    for step in range(steps):
        if step < warmup:
            factor = step / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def test_train_sft_equals_plain_loop_and_reloads(tiny_model_dir, tok, tmp_path):
    # One repeated example: every batch is the same, so the batch order cannot matter.
    examples = [{"messages": MESSAGES, "completion": COMPLETION}] * 4
    settings = dict(lr=5e-3, epochs=3, max_steps=5, warmup_ratio=0.3, weight_decay=0.1,
                    betas=(0.9, 0.95), scheduler="cosine")
    out = train_sft(sft_config(**settings), tiny_model_dir, examples, tmp_path / "sft", seed=0, progress=False)
    assert out["steps"] == 5 and len(out["loss_history"]) == 5  # max_steps (5) < 3 epochs x 2 batches

    ex = tokenize_example(tok, MESSAGES, COMPLETION, 128)
    ids, labels = torch.tensor([ex["input_ids"]] * 2), torch.tensor([ex["labels"]] * 2)
    ref_model, ref_losses = reference_sft(tiny_model_dir, ids, labels, steps=5, lr=5e-3, betas=(0.9, 0.95),
                                          weight_decay=0.1, warmup=2, total=5)  # warmup = ceil(0.3 * 5)
    assert out["loss_history"] == pytest.approx(ref_losses, rel=1e-5)
    assert out["loss_history"][-1] < out["loss_history"][0] - 0.5  # it learns the example
    assert out["tokens"] == 5 * 2 * len(ex["input_ids"])

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert reloaded.dtype == torch.float32
    ref_state = ref_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = weights(tiny_model_dir)
    assert not torch.equal(weights(tmp_path / "sft")["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").chat_template == tok.chat_template
    assert (tmp_path / "sft" / "generation_config.json").exists()


def varied_examples():
    return [{"messages": [{"role": "user", "content": f"Count to {n}."}],
             "completion": " ".join(str(i) for i in range(1, n + 1))} for n in (2, 9, 4, 15, 6, 1, 11)]


def test_train_sft_same_seed_same_weights(tiny_model_dir, tmp_path):
    runs = {name: train_sft(sft_config(), tiny_model_dir, varied_examples(), tmp_path / name, seed=seed,
                            progress=False)
            for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert runs["a"]["loss_history"] == runs["b"]["loss_history"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed: another batch order


def test_train_sft_bf16_accumulation_logs_and_saves_bf16(tiny_model_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "logs", name="sft")
    cfg = sft_config(batch_size=2, grad_accum=3, epochs=2, precision="bf16-mixed", save_dtype="bfloat16")
    out = train_sft(cfg, tiny_model_dir, varied_examples(), tmp_path / "sft", seed=0, logger=logger, progress=False)
    assert out["steps"] == 2 * math.ceil(math.ceil(7 / 2) / 3)  # 4 batches per epoch -> 2 optimizer steps
    assert all(math.isfinite(x) for x in out["loss_history"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft").dtype == torch.bfloat16
    header = open(f"{logger.log_dir}/metrics.csv").readline().strip().split(",")
    assert {"train/loss", "train/lr", "train/tokens"} <= set(header)


def test_sft_config_rejects_unknown_scheduler():
    with pytest.raises(ValueError, match="cosine"):
        sft_config(scheduler="linear")


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_trains_like_the_plain_loss(tiny_model_dir, tmp_path, packing):
    # Same model, data and seed: the chunked linear cross-entropy (kernels/linear_ce.py) gives the plain loss's
    # loss history and weights up to float rounding, without ever building [tokens, vocab] logits.
    runs = {impl: train_sft(sft_config(packing=packing, loss_impl=impl, max_steps=3, epochs=2), tiny_model_dir,
                            varied_examples(), tmp_path / impl, seed=0, progress=False)
            for impl in ("plain", "chunked")}
    assert runs["chunked"]["loss_history"] == pytest.approx(runs["plain"]["loss_history"], rel=1e-5)
    plain, chunked = weights(tmp_path / "plain"), weights(tmp_path / "chunked")
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-4, rtol=0, msg=name)


def test_chunked_loss_runs_under_bf16_autocast(tiny_model_dir, tmp_path):
    plain, chunked = (train_sft(sft_config(precision="bf16-mixed", loss_impl=impl, max_steps=2), tiny_model_dir,
                                varied_examples(), tmp_path / impl, seed=0, progress=False)
                      for impl in ("plain", "chunked"))
    assert chunked["loss_history"] == pytest.approx(plain["loss_history"], rel=2e-2)
