"""SASR: the SFT-or-GRPO rule on a scripted gradient-norm sequence; a tiny hybrid run."""

import random

import pytest
import torch
from safetensors.torch import load_file

from branchmerge.models.training.config import RLConfig
from branchmerge.models.training.sasr import SASRSchedule, grad_norm, train_sasr
from tests.test_grpo import GRPO, ITEMS, ToyReward, build_messages


def test_schedule_follows_p_equals_g_last_over_g_last_plus_gamma_g_warmup():
    """Scripted: warm-up norm 2.0; then each SFT step reports the next norm of the script. The choice at each
    step is u < p with u the seeded uniform stream and p = G_last / (G_last + gamma * G_warmup)."""
    gamma, seed = 0.5, 7
    script = iter([3.0, 1.0, 0.25, 0.1, 4.0, 0.05, 2.0, 0.5, 0.3, 0.2, 0.1, 0.1])
    schedule = SASRSchedule(gamma, seed)
    schedule.warmup(2.0)
    u = random.Random(seed)
    g_last, got, want = 2.0, [], []
    for _ in range(30):
        p = g_last / (g_last + gamma * 2.0)
        assert schedule.p_sft() == pytest.approx(p)
        expected = "sft" if u.random() < p else "grpo"
        choice = schedule.choose()
        got.append(choice)
        want.append(expected)
        if choice == "sft":
            g_last = next(script, 0.1)
            schedule.record_sft(g_last)
    assert got == want
    assert "sft" in got and "grpo" in got
    # starting p is 1 / (1 + gamma): SFT twice as likely as GRPO at gamma 0.5
    fresh = SASRSchedule(gamma, 0)
    fresh.warmup(5.0)
    assert fresh.p_sft() == pytest.approx(1 / 1.5)


def test_schedule_refuses_to_choose_before_the_warm_up():
    with pytest.raises(RuntimeError, match="warm-up"):
        SASRSchedule(1.0, 0).choose()


def test_grad_norm_is_the_l2_norm_over_all_gradients():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert grad_norm([a, b]) == pytest.approx(5.0)


def test_train_sasr_warms_up_then_mixes(tiny_model_dir, tmp_path):
    cfg = RLConfig(**(GRPO | {"beta": 0.0, "sasr": GRPO["sasr"] | {"warmup_steps": 1, "steps": 4, "gamma": 1.0}}))
    examples = [{"messages": build_messages(it), "completion": f"The answer is {it['answer']}."} for it in ITEMS]
    out = train_sasr(cfg, tiny_model_dir, ITEMS, ToyReward(), build_messages, examples, tmp_path / "sasr", seed=0,
                     progress=False)
    assert len(out["choices"]) == 5 and out["choices"][0] == "sft"
    assert out["history"][0]["p_sft"] is None and out["history"][0]["grad_norm"] > 0
    assert out["history"][1]["p_sft"] == pytest.approx(0.5)  # G_last = G_warmup, gamma 1
    for h, kind in zip(out["history"], out["choices"]):
        assert h["kind"] == kind
        assert ("reward" in h) == (kind == "grpo")
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{tmp_path}/sasr/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
