"""DPO: the loss and its gradient against the DPO / IPO papers' formulas, sequence log-probs against a direct
forward, preference pairs from scored samples, and tiny training runs."""

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.models.data.pairs import pair_counts, pairs_from_samples, policy_pairs, teacher_pairs
from branchmerge.models.lm.chat import end_of_turn_text
from branchmerge.models.lm.generation import prompt_ids
from branchmerge.models.training.config import DPOConfig
from branchmerge.models.training.dpo import collate_pairs, dpo_loss, sequence_logps, tokenize_pair, train_dpo

# ----------------------------------------------------------------------------------------------- loss

# Four pairs of sequence log-probs: policy chosen / rejected, reference chosen / rejected, completion lengths.
PC = [-12.0, -30.5, -7.25, -50.0]
PR = [-15.0, -28.0, -7.0, -40.0]
RC = [-13.0, -29.0, -8.0, -52.0]
RR = [-14.0, -29.5, -6.5, -41.0]
NC = [4, 10, 3, 20]
NR = [6, 9, 3, 12]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def leaf_tensors():
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (PC, PR, RC, RR)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_loss_and_gradient_follow_the_dpo_paper(beta):
    # DPO paper, eq. 7: L = -log sigma(beta log pi(yw)/ref(yw) - beta log pi(yl)/ref(yl)). With
    # h = (pc - rc) - (pr - rr): dL/dpc = -beta sigma(-beta h) = -dL/dpr = -dL/drc = dL/drr.
    pc, pr, rc, rr = leaf_tensors()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    grads = torch.autograd.grad(losses.sum(), (pc, pr, rc, rr))
    for i in range(4):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert losses[i].item() == pytest.approx(-math.log(sigmoid(beta * h)), rel=1e-12)
        g = beta * sigmoid(-beta * h)
        assert [grads[k][i].item() for k in range(4)] == pytest.approx([-g, g, g, -g], rel=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_and_gradient_follow_the_ipo_paper_with_trl_length_averaging(beta):
    # IPO paper, eq. 17 (tau = beta): L = (h - 1 / (2 tau))^2, with TRL's per-token h =
    # (pc - rc) / nc - (pr - rr) / nr. dL/dpc = 2 (h - 1/(2 tau)) / nc = -dL/drc; dL/dpr = -2 (...) / nr = -dL/drr.
    pc, pr, rc, rr = leaf_tensors()
    nc, nr = torch.tensor(NC), torch.tensor(NR)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo",
                                                        chosen_lengths=nc, rejected_lengths=nr)
    grads = torch.autograd.grad(losses.sum(), (pc, pr, rc, rr))
    for i in range(4):
        h = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        d = h - 1 / (2 * beta)
        assert losses[i].item() == pytest.approx(d * d, rel=1e-12)
        want = [2 * d / NC[i], -2 * d / NR[i], -2 * d / NC[i], 2 * d / NR[i]]
        assert [grads[k][i].item() for k in range(4)] == pytest.approx(want, rel=1e-12)
        # TRL's rewards stay on the summed log-ratios for ipo too
        assert chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)
    # Without lengths the log-probs are taken as already averaged: the same losses from per-token means.
    averaged = [torch.tensor(v, dtype=torch.float64) / torch.tensor(n, dtype=torch.float64)
                for v, n in ((PC, NC), (PR, NR), (RC, NC), (RR, NR))]
    again, _, _ = dpo_loss(*averaged, beta=beta, loss_type="ipo")
    torch.testing.assert_close(again, losses.detach())


def test_dpo_loss_refuses_unknown_loss_types_and_half_given_lengths():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="both"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", chosen_lengths=torch.ones(2))


# ----------------------------------------------------------------------------------------------- log-probs

PAIRS = [
    {"id": "q1", "domain": "arith", "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": "2 + 2 = 4.\n<answer>4</answer>", "rejected": "<answer>5</answer>"},
    {"id": "q2", "domain": "words", "prompt": [{"role": "user", "content": "Reverse the words: red green blue"}],
     "chosen": "Reading from the end.\n<answer>blue green red</answer>", "rejected": "<answer>red blue</answer>"},
    {"id": "q3", "domain": "arith", "prompt": [{"role": "user", "content": "What is 10 - 3? Think it over."}],
     "chosen": "<answer>7</answer>", "rejected": "10 - 3 is 6.\n<answer>6</answer>"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with 6x its (tied) embedding: log-probs far from uniform, so a wrong position shows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    return model


def test_pairs_are_tokenized_as_sft_and_generation_see_them(tok):
    row = tokenize_pair(tok, PAIRS[0])
    assert row["prompt_ids"] == prompt_ids(tok, [PAIRS[0]["prompt"]])[0]
    for key in ("chosen", "rejected"):
        want = tok(PAIRS[0][key] + end_of_turn_text(tok), add_special_tokens=False)["input_ids"]
        assert row[f"{key}_ids"] == want


def test_sequence_logps_equal_a_direct_forward_on_the_completion_tokens(sharp_model, tok):
    rows = [tokenize_pair(tok, p) for p in PAIRS]
    batch = collate_pairs(rows, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["completion_mask"].sum().item() == sum(
        len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    with torch.no_grad():
        got, lengths = sequence_logps(sharp_model, batch)
    sequences = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"])
                                                                      for r in rows]
    for i, (prompt, completion) in enumerate(sequences):  # chosen rows first, then rejected (TRL's order)
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(sharp_model(input_ids=ids).logits[0].double(), -1)
        positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)  # position t predicts token t + 1
        want = sum(logp[t, ids[0, t + 1]].item() for t in positions)
        assert lengths[i].item() == len(completion)
        assert got[i].item() == pytest.approx(want, rel=1e-5), i
    assert got.std() > 1.0  # the rows differ: a mix-up of rows would show


# ----------------------------------------------------------------------------------------------- pairs


def sample(pid, correct, response, domain="arith"):
    return {"id": pid, "domain": domain, "prompt": [{"role": "user", "content": f"question {pid}"}],
            "response": response, "correct": correct}


SAMPLES = [
    sample("a", False, "a-wrong-1"), sample("a", True, "a-right-1"), sample("a", False, "a-wrong-2"),
    sample("b", True, "b-right-1"), sample("b", True, "b-right-2"),  # all correct: no pair
    sample("c", False, "c-wrong-1", "words"), sample("c", False, "c-wrong-2", "words"),  # all wrong: no pair
    sample("d", True, "d-right-1", "words"), sample("e", False, "e-wrong-1"),  # e is interleaved with d
    sample("d", False, "d-wrong-1", "words"), sample("d", True, "d-right-2", "words"),
    sample("e", True, "e-right-1"),
]


def test_pairs_from_samples_pick_the_first_right_and_wrong_response_per_prompt():
    pairs = pairs_from_samples(SAMPLES, None)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "a-right-1", "a-wrong-1"), ("d", "d-right-1", "d-wrong-1"), ("e", "e-right-1", "e-wrong-1")]
    assert pairs[1]["domain"] == "words" and pairs[1]["prompt"] == [{"role": "user", "content": "question d"}]
    assert set(pairs[0]) == {"id", "domain", "prompt", "chosen", "rejected"}
    assert pair_counts(pairs, n_prompts=5) == {"prompts": 5, "pairs": 3, "domains": {"arith": 2, "words": 1},
                                               "without_pair": 2}
    capped = pairs_from_samples(SAMPLES, max_pairs=2)
    assert [p["id"] for p in capped] == ["a", "d"]  # the first prompts' pairs
    assert pair_counts(capped, n_prompts=5)["without_pair"] == 3
    assert pairs_from_samples([s for s in SAMPLES if s["id"] in "bc"], None) == []
    assert pairs_from_samples([], None) == []


def test_teacher_pairs_read_the_teacher_artifacts_rows():
    # tasks/teacher.py's samples.jsonl rows: no prompt, correct = score == 1.0 (the teacher's "verified")
    rows = [{"id": "q1", "domain": "arith", "completion": "<answer>5</answer>", "answer": "5", "score": 0.0,
             "finished": True, "num_tokens": 6},
            {"id": "q1", "domain": "arith", "completion": "<answer>4</answer>", "answer": "4", "score": 1.0,
             "finished": True, "num_tokens": 6},
            {"id": "q2", "domain": "arith", "completion": "<answer>3.9</answer>", "answer": "3.9", "score": 0.5,
             "finished": True, "num_tokens": 7},
            {"id": "q2", "domain": "arith", "completion": "<answer>4</answer>", "answer": "4", "score": 1.0,
             "finished": True, "num_tokens": 6}]
    prompts = {"q1": [{"role": "user", "content": "2 + 2?"}], "q2": [{"role": "user", "content": "8 / 2?"}]}
    pairs = teacher_pairs(rows, prompts, None)
    assert pairs == [
        {"id": "q1", "domain": "arith", "prompt": prompts["q1"], "chosen": "<answer>4</answer>",
         "rejected": "<answer>5</answer>"},
        {"id": "q2", "domain": "arith", "prompt": prompts["q2"], "chosen": "<answer>4</answer>",
         "rejected": "<answer>3.9</answer>"}]  # partial credit is not verified
    with pytest.raises(ValueError, match="prompts="):
        teacher_pairs(rows, None, None)
    with_messages = [r | {"messages": prompts[r["id"]]} for r in rows]  # sft.jsonl-style rows carry their prompt
    assert teacher_pairs(with_messages, None, max_pairs=1) == pairs[:1]


# ----------------------------------------------------------------------------------------------- training

# Every DPOConfig field, set for tests; tests change what they test.
DPO = {"steps": 2, "batch_size": 2, "lr": 1e-4, "beta": 0.1, "loss_type": "sigmoid", "pairs_from": "teacher",
       "num_samples": 4, "max_pairs": 8, "max_new_tokens": 6, "temperature": 1.0, "precision": "32-true",
       "save_dtype": "float32"}


def test_policy_pairs_sample_score_and_pair(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()  # as a trainer holds it
    items = [{"id": f"q{i}", "domain": "arith", "question": f"What is {i} + {i}?"} for i in range(3)]
    calls = []

    def reward(prompts, completions, completion_ids, **columns):  # "correct": the first token id is even
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        return [float(ids[0] % 2 == 0) for ids in completion_ids]

    def build(item):
        return [{"role": "user", "content": item["question"]}]

    cfg = DPOConfig(**(DPO | {"pairs_from": "policy"}))
    pairs = policy_pairs(model, tok, items, build, reward, cfg, seed=0)
    assert model.training  # left as it was
    (call,) = calls
    assert len(call["completions"]) == 12 and call["id"] == [f"q{i // 4}" for i in range(12)]
    assert call["prompts"][5] == build(items[1])
    verdict = {}
    for i, (text, ids) in enumerate(zip(call["completions"], call["completion_ids"])):
        verdict.setdefault(call["id"][i], []).append((text, ids[0] % 2 == 0))
    by_id = {it["id"]: it for it in items}
    for p in pairs:
        right = [t for t, ok in verdict[p["id"]] if ok]
        wrong = [t for t, ok in verdict[p["id"]] if not ok]
        assert (p["chosen"], p["rejected"]) == (right[0], wrong[0])
        assert p["prompt"] == build(by_id[p["id"]]) and p["domain"] == "arith"
    mixed = [pid for pid, v in verdict.items() if len({ok for _, ok in v}) == 2]
    assert [p["id"] for p in pairs] == mixed and mixed  # every mixed prompt gives a pair, in item order
    again = policy_pairs(model, tok, items, build, reward, cfg, seed=0)
    assert again == pairs  # seeded


def dpo(model_dir, out, pairs=PAIRS, **changes):
    return train_dpo(DPOConfig(**(DPO | changes)), model_dir, pairs, out, seed=0, progress=False)


def test_train_dpo_two_steps_writes_loadable_folder_and_starts_at_ln2(tiny_model_dir, tmp_path):
    out = dpo(tiny_model_dir, tmp_path / "dpo")
    assert out["steps"] == 2 and out["pairs"] == 3 and len(out["history"]) == 2
    first = out["history"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: every log-ratio is 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    for step in out["history"]:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(step)
        assert all(math.isfinite(v) for v in step.values())
    assert out["history"][1]["rewards/margins"] > 0  # step 1 moved towards the chosen responses

    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo"), AutoTokenizer.from_pretrained(tmp_path / "dpo")
    ids = tok("What is 1 + 1?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{tmp_path}/dpo/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_train_dpo_grows_the_margin(tiny_model_dir, tmp_path, loss_type):
    # Every step sees all three pairs; a high learning rate makes the chosen-minus-rejected margin grow.
    out = dpo(tiny_model_dir, tmp_path / loss_type, steps=5, batch_size=3, lr=3e-3, loss_type=loss_type)
    margins = [h["rewards/margins"] for h in out["history"]]
    losses = [h["loss"] for h in out["history"]]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a for a, b in itertools.pairwise(margins)), margins
    assert losses[-1] < losses[0], losses
    assert out["history"][-1]["rewards/accuracies"] == 1.0
    if loss_type == "ipo":
        assert losses[0] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)  # (0 - 1 / (2 beta))^2


def test_train_dpo_without_pairs_names_the_setting(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"rl\.dpo"):
        dpo(tiny_model_dir, tmp_path / "dpo", pairs=[])
    assert not (tmp_path / "dpo").exists()


def test_train_dpo_runs_under_bf16_autocast(tiny_model_dir, tmp_path):
    # The conf's precision: policy and reference both read under autocast, so step 1 is still exactly ln 2.
    out = dpo(tiny_model_dir, tmp_path / "dpo", steps=1, precision="bf16-mixed", save_dtype="bfloat16")
    assert out["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(w.dtype == torch.bfloat16 for w in load_file(f"{tmp_path}/dpo/model.safetensors").values())


def test_a_diverging_dpo_run_raises_before_saving(tiny_model_dir, tmp_path):
    from branchmerge.models.training import DivergedError

    with pytest.raises(DivergedError, match=r"at optimizer step \d"):
        dpo(tiny_model_dir, tmp_path / "dpo", lr=1e9, steps=4, batch_size=3)
    assert not (tmp_path / "dpo").exists()
