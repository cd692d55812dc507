"""SFT options of conf/sft: resume after a kill, LoRA, gradient checkpointing, the PoFT loss, DMT / curriculum."""

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.recipes import curriculum_stages, dmt_stages, recipe_stages, train_recipe
from branchmerge.models.training.sft import SFTModule, pad_collate, reference_logps, tokenize_example, train_sft
from branchmerge.models.training.toolkit import CHECKPOINT, decoder_hidden, shared_prefix_len
from tests.test_sft import SETTINGS, sft_config, varied_examples

ROOT = Path(__file__).resolve().parent.parent


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------- resume

KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from branchmerge.models.training import sft
    from branchmerge.models.training.config import SFTConfig

    model_dir, out, checkpoints, kill_at, settings = sys.argv[1:6]
    kill_at, settings = int(kill_at), json.loads(settings)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # after the checkpoint callback's hook: a SIGKILL, no cleanup of any kind
        if self.trainer.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sft.SFTModule.on_train_batch_end = on_train_batch_end
    examples = [{"messages": [{"role": "user", "content": f"Count to {n}."}],
                 "completion": " ".join(str(i) for i in range(1, n + 1))} for n in (2, 9, 4, 15, 6, 1, 11)]
    sft.train_sft(SFTConfig(**settings), model_dir, examples, out, seed=0, checkpoint_dir=checkpoints, progress=False)
""")


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum,every,kill_at", [
    (1, 3, 5),  # checkpoint mid-epoch (epoch = 4 steps), killed in the next epoch
    (1, 4, 6),  # checkpoint at an epoch's last batch
    (2, 3, 4),  # gradient accumulation: 2 steps per epoch, checkpoint mid-epoch
])
def test_killed_run_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path, grad_accum, every, kill_at):
    settings = dict(SETTINGS, epochs=3, grad_accum=grad_accum, checkpoint_every=every, betas=[0.9, 0.999])
    total = 3 * math.ceil(4 / grad_accum)
    checkpoints = tmp_path / "ckpt"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tiny_model_dir), str(tmp_path / "resumed"),
                             str(checkpoints), str(kill_at), json.dumps(settings)],
                            cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (checkpoints / CHECKPOINT).exists() and not (tmp_path / "resumed").exists()
    assert not list(checkpoints.glob(".*.tmp"))

    resumed = train_sft(SFTConfig(**settings), tiny_model_dir, varied_examples(), tmp_path / "resumed", seed=0,
                        checkpoint_dir=checkpoints, progress=False)
    whole = train_sft(SFTConfig(**(settings | {"checkpoint_every": 0})), tiny_model_dir, varied_examples(),
                      tmp_path / "whole", seed=0, progress=False)
    saved_at = (kill_at // every) * every
    assert resumed["resumed_from_step"] == saved_at and whole["resumed_from_step"] == 0
    assert resumed["steps"] == whole["steps"] == total
    assert resumed["loss_history"] == whole["loss_history"] and len(whole["loss_history"]) == total
    assert resumed["tokens"] == whole["tokens"]
    assert_same_weights(tmp_path / "resumed", tmp_path / "whole")


def test_a_checkpoint_of_other_settings_is_refused(tiny_model_dir, tmp_path):
    settings = dict(checkpoint_every=2, max_steps=3)
    train_sft(sft_config(**settings), tiny_model_dir, varied_examples(), tmp_path / "a", seed=0,
              checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert (tmp_path / "ckpt" / CHECKPOINT).exists()
    with pytest.raises(ValueError, match="written by another SFT run"):
        train_sft(sft_config(**settings, lr=1e-3), tiny_model_dir, varied_examples(), tmp_path / "b", seed=0,
                  checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("damage", ["zero_filled", "truncated"])
def test_an_unreadable_checkpoint_is_discarded_and_training_restarts(tiny_model_dir, tmp_path, caplog, damage):
    cfg = sft_config(checkpoint_every=2, max_steps=3)
    whole = train_sft(cfg, tiny_model_dir, varied_examples(), tmp_path / "whole", seed=0,
                      checkpoint_dir=tmp_path / "ckpt", progress=False)
    ckpt = tmp_path / "ckpt" / CHECKPOINT
    size = ckpt.stat().st_size
    ckpt.write_bytes(bytes(size) if damage == "zero_filled" else ckpt.read_bytes()[: size // 2])
    with caplog.at_level("WARNING"):
        again = train_sft(cfg, tiny_model_dir, varied_examples(), tmp_path / "again", seed=0,
                          checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert "discarding unreadable checkpoint" in caplog.text
    assert again["resumed_from_step"] == 0 and again["loss_history"] == whole["loss_history"]
    assert_same_weights(tmp_path / "again", tmp_path / "whole")


# ----------------------------------------------------------------------------------------------- lora, checkpointing

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_lora_trains_low_rank_updates_of_the_targets_only(tiny_model_dir, tmp_path):
    out = train_sft(sft_config(finetune="lora", lora=LORA, lr=2e-2, epochs=2), tiny_model_dir, varied_examples(),
                    tmp_path / "lora", seed=0, progress=False)
    assert out["loss_history"][-1] < out["loss_history"][0]
    base, tuned = weights(tiny_model_dir), weights(tmp_path / "lora")
    assert set(tuned) == set(base)  # adapters merged: a plain HF folder, no lora_A / lora_B tensors
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    for name in changed:  # W' = W + (alpha / r) B A: a rank <= r update
        assert torch.linalg.matrix_rank(tuned[name] - base[name]).item() <= LORA["r"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match=r"lora.dropout\n  Field required"):
        sft_config(finetune="lora", lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    with pytest.raises(ValueError, match="finetune\n  Input should be 'full' or 'lora'"):
        sft_config(finetune="qlora")


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, tmp_path, finetune):
    runs = {gc: train_sft(sft_config(finetune=finetune, lora=LORA, gradient_checkpointing=gc, max_steps=3),
                          tiny_model_dir, varied_examples(), tmp_path / str(gc), seed=0, progress=False)
            for gc in (False, True)}
    assert runs[True]["loss_history"] == pytest.approx(runs[False]["loss_history"], rel=1e-6)
    a, b = weights(tmp_path / "False"), weights(tmp_path / "True")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def few_shot_examples():
    """Examples that share a long prompt prefix (a system prompt and a worked example), as one task's do."""
    shot = [{"role": "system", "content": "Count as asked, numbers separated by spaces. " * 3},
            {"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}]
    return [{"messages": shot + [{"role": "user", "content": f"Count to {n}."}],
             "completion": " ".join(str(i) for i in range(1, n + 1))} for n in (2, 9, 4, 15, 6, 1, 11, 5)]


def test_shared_prefix_len():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 9, 9], [5, 6, 7, 8, 1]])
    mask = torch.ones_like(ids)
    assert shared_prefix_len(ids, mask) == 3
    assert shared_prefix_len(ids[[0, 0]], mask[:2]) == 4  # identical rows keep one position of their own
    mask[2, 1] = 0
    assert shared_prefix_len(ids, mask) == 1  # the mask must agree too


@pytest.mark.parametrize("pad", ["right", "left"])
def test_decoder_hidden_with_shared_prefix_equals_the_whole_batch(tiny_model_dir, pad):
    """States and gradients are those of the ordinary forward: right-padded SFT rows, and left-padded GRPO rows
    (prompt + completion, positions from the mask) whose padding is shared too."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    prefix = torch.randint(5, 200, (40,)).tolist()
    rests = [torch.randint(5, 200, (n,)).tolist() for n in (3, 9, 6)]
    width = max(map(len, rests))
    if pad == "right":  # SFT rows: [prompt prefix | own tokens][pads]
        rows = [(prefix + r + [0] * (width - len(r)), [1] * (40 + len(r)) + [0] * (width - len(r))) for r in rests]
        positions = None
    else:  # GRPO rows: [pads | shared prompt][pads | own tokens], positions from the mask
        rows = [([0] * 4 + prefix + [0] * (width - len(r)) + r,
                 [0] * 4 + [1] * 40 + [0] * (width - len(r)) + [1] * len(r)) for r in rests]
    ids, mask = (torch.tensor([row[k] for row in rows]) for k in (0, 1))
    if pad == "left":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert shared_prefix_len(ids, mask) >= 40
    results = []
    for shared in (False, True):
        model.zero_grad()
        hidden = decoder_hidden(model, ids, mask, positions, shared_prefix=shared)
        real = hidden[mask.bool()]
        (real.square().mean()).backward()
        results.append((real.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_changes_compute_not_results(tiny_model_dir, tmp_path):
    runs = {shared: train_sft(sft_config(loss_impl="chunked", shared_prefix=shared, batch_size=4, max_steps=3),
                              tiny_model_dir, few_shot_examples(), tmp_path / str(shared), seed=0, progress=False)
            for shared in (False, True)}
    assert runs[True]["loss_history"] == pytest.approx(runs[False]["loss_history"], rel=1e-5)
    assert runs[True]["tokens"] == runs[False]["tokens"]  # the tokens trained on, not the tokens computed
    a, b = weights(tmp_path / "False"), weights(tmp_path / "True")
    for name in a:  # Adam turns a float-rounding difference in a near-zero gradient into up to ~1e-5 (lr 3e-3)
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_group_losses_equal_a_full_logits_cross_entropy(tiny_model_dir, lora):
    """group_losses (shared prefix read once, chunked LM head, what CLIMB's proxies and Aioli read) against the
    plain definition: one example at a time, full logits, token-weighted mean over each group's target tokens."""
    from branchmerge.models.training.config import LoraConfig
    from branchmerge.models.training.toolkit import group_losses, load_for_training

    torch.manual_seed(0)
    model = load_for_training(tiny_model_dir, lora=LoraConfig(**LORA) if lora else None, gradient_checkpointing=False)
    if lora:  # peft starts B at zero: move it, so the adapters change the losses
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = few_shot_examples()
    groups = {"a": examples[:5], "b": examples[5:]}
    got = group_losses(model, tokenizer, groups, max_length=256, batch_size=3)
    assert model.training  # put back as it was
    model.eval()
    for name, group in groups.items():
        total, count = 0.0, 0
        for e in group:
            row = tokenize_example(tokenizer, e["messages"], e["completion"], 256)
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
        assert got[name] == pytest.approx(total / count, rel=1e-5), name


def test_shared_prefix_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="sft.shared_prefix=true .* set sft.gradient_checkpointing=false"):
        sft_config(shared_prefix=True, gradient_checkpointing=True)


# ----------------------------------------------------------------------------------------------- poft


def hand_logps(model, ids, labels, length_normalize):
    """Sum (or mean) over target tokens of log softmax, position by position."""
    logits = model(input_ids=ids, use_cache=False).logits.float()
    out = []
    for row_logits, row_labels in zip(logits, labels):
        total, n = 0.0, 0
        for t in range(len(row_labels) - 1):
            if row_labels[t + 1] != -100:
                total = total + torch.log_softmax(row_logits[t], -1)[row_labels[t + 1]]
                n += 1
        out.append(total / n if length_normalize else total)
    return torch.stack(out)


@pytest.mark.parametrize("loss_impl", ["plain", "chunked"])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_poft_loss_equals_its_formula(tiny_model_dir, tmp_path, loss_impl, length_normalize):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # another model for the policy: the tiny one, nudged
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    examples = varied_examples()[:3]
    ref = reference_logps(tmp_path / "ref", examples, max_length=128, length_normalize=length_normalize,
                          batch_size=2)
    rows = [tokenize_example(tok, e["messages"], e["completion"], 128) | {"ref_logp": r}
            for e, r in zip(examples, ref)]
    batch = pad_collate(rows, tok.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    module = SFTModule(policy, sft_config(loss_impl=loss_impl, loss="poft", poft_length_normalize=length_normalize),
                       total_steps=1)
    loss = module.loss(batch)

    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        r_ref = torch.stack([hand_logps(reference, ids[i:i + 1, :int(batch["attention_mask"][i].sum())],
                                        labels[i:i + 1, :int(batch["attention_mask"][i].sum())], length_normalize)[0]
                             for i in range(len(rows))])
    torch.testing.assert_close(torch.tensor(ref), r_ref, rtol=1e-5, atol=1e-5)
    r_model = hand_logps(policy, ids, labels, length_normalize)  # right padding: pads come after every target
    expected = -F.logsigmoid(r_model - r_ref).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    loss.backward()  # gradient = sigmoid(r_ref - r_model)-weighted cross-entropy gradient
    got = policy.model.layers[0].mlp.up_proj.weight.grad.clone()
    policy.zero_grad()
    expected.backward()
    torch.testing.assert_close(got, policy.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-7)


def test_poft_against_itself_starts_at_log_2(tiny_model_dir, tmp_path):
    out = train_sft(sft_config(loss="poft", max_steps=3), tiny_model_dir, varied_examples(), tmp_path / "poft",
                    seed=0, reference_dir=tiny_model_dir, progress=False)
    assert out["loss_history"][0] == pytest.approx(math.log(2), abs=1e-6)  # r_model == r_ref before any step
    assert out["loss_history"][-1] < math.log(2)  # the model moves above the reference
    with pytest.raises(ValueError, match="sft.packing=false"):
        sft_config(loss="poft", packing=True)


# ----------------------------------------------------------------------------------------------- recipes


def tagged(prefix, n):
    return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"{prefix} {i}"}], "completion": str(i)}
            for i in range(n)]


def test_dmt_stages():
    spec, general = tagged("s", 40), tagged("g", 10)
    stage1, stage2 = dmt_stages(spec, general, 0.25, seed=3)
    assert stage1 == spec
    replay = stage2[len(general):]
    assert stage2[:len(general)] == general and len(replay) == 10 and len({r["id"] for r in replay}) == 10
    assert all(r in spec for r in replay)
    assert dmt_stages(spec, general, 0.25, seed=3) == [stage1, stage2]
    assert dmt_stages(spec, general, 0.25, seed=4)[1] != stage2
    assert len(dmt_stages(spec, general, 0.0, seed=3)[1]) == len(general)
    with pytest.raises(ValueError, match="needs general data"):
        dmt_stages(spec, [], 0.25, seed=0)


def test_curriculum_stage_two_is_the_hardest_fraction():
    examples = tagged("x", 10)
    rates = [0.9, 0.1, 0.5, 0.0, 1.0, 0.1, 0.75, 0.3, 0.2, 0.6]
    stage1, stage2 = curriculum_stages(examples, rates, 0.3)
    assert stage1 == examples
    assert [e["id"] for e in stage2] == ["x1", "x3", "x5"]  # rates 0.1, 0.0, 0.1: the three lowest, data order
    assert [e["id"] for e in curriculum_stages(examples, rates, 0.05)[1]] == ["x3"]  # ceil: at least one
    with pytest.raises(ValueError, match="recipe\n  Input should be 'single', 'dmt' or 'curriculum'"):
        sft_config(recipe="mix")
    assert recipe_stages(sft_config(recipe="curriculum", hard_fraction=0.3), examples, general=[], pass_rates=rates,
                         seed=0) == [stage1, stage2]


def test_train_recipe_chains_stages_and_skips_finished_ones(tiny_model_dir, tmp_path):
    examples = varied_examples()
    stages = [examples, examples[:3]]
    cfg = sft_config(max_steps=2)
    out = train_recipe(cfg, tiny_model_dir, stages, tmp_path / "out", seed=0, checkpoint_dir=tmp_path / "ckpt",
                       progress=False)
    assert [m["steps"] for m in out["stages"]] == [2, 2] and out["steps_total"] == 4
    by_hand = tmp_path / "stage1"
    train_sft(cfg, tiny_model_dir, stages[0], by_hand, seed=0, progress=False)
    train_sft(cfg, by_hand, stages[1], tmp_path / "stage2", seed=0, progress=False)
    assert_same_weights(tmp_path / "out", tmp_path / "stage2")

    # a rerun (after a crash in stage 2) reuses the finished stage 1 instead of training it again
    calls = []
    import branchmerge.models.training.recipes as recipes

    real = recipes.train_sft
    recipes.train_sft = lambda cfg, model_dir, ex, out_dir, **kw: calls.append(str(model_dir)) or real(
        cfg, model_dir, ex, out_dir, **kw)
    try:
        again = train_recipe(cfg, tiny_model_dir, stages, tmp_path / "out2", seed=0, checkpoint_dir=tmp_path / "ckpt",
                             progress=False)
    finally:
        recipes.train_sft = real
    assert calls == [str(tmp_path / "ckpt" / "stage-1" / "model")]
    assert again["stages"][0]["loss_history"] == out["stages"][0]["loss_history"]
    assert_same_weights(tmp_path / "out2", tmp_path / "out")


def test_sft_task_reads_general_data_and_pass_rates(tmp_path):
    from branchmerge.tasks.common import write_jsonl
    from branchmerge.tasks.sft import general_examples, pass_rates

    write_jsonl(tmp_path / "sft.jsonl", [{"id": "a1", "domain": "a"}, {"id": "b1", "domain": "b"},
                                         {"id": "c1", "domain": "c"}])
    write_jsonl(tmp_path / "samples.jsonl", [{"id": "a1", "score": 1.0}, {"id": "a1", "score": 0.0},
                                             {"id": "a1", "score": 0.0}, {"id": "a1", "score": 1.0},
                                             {"id": "b1", "score": 0.0}, {"id": "b1", "score": 0.0}])
    assert [r["id"] for r in general_examples(str(tmp_path), "a")] == ["b1", "c1"]
    assert pass_rates(str(tmp_path), [{"id": "a1"}, {"id": "b1"}]) == [0.5, 0.0]


def test_execute_deletes_the_scratch_folder_once_sealed(tmp_path):
    from branchmerge.tasks.common import Job, execute
    from branchmerge.tasks.store import Store

    job = Job(stage="s", key="k1", store=str(tmp_path), refresh=False, config={}, upstream={})
    scratch = Store(tmp_path).scratch("s", "k1")

    def crash(job, out):
        scratch.mkdir(parents=True)
        (scratch / "last.ckpt").write_text("progress")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        execute(job, crash)
    assert (scratch / "last.ckpt").read_text() == "progress"  # kept for the rerun

    def finish(job, out):
        assert (scratch / "last.ckpt").exists()  # the rerun sees it
        (out / "result.txt").write_text("done")
        return {}

    ref = execute(job, finish)
    assert Path(ref.path, "result.txt").read_text() == "done" and not scratch.exists()
