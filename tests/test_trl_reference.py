"""Our GRPO and DPO losses against TRL 1.16's own code on the same fixed inputs.

tests/trl_reference/losses.pt holds what TRL's GRPOTrainer._compute_loss and DPOTrainer._compute_loss returned
(loss, its gradient with respect to the per-token log-probs, the metrics they logged) for every loss type,
importance-sampling level, clip, KL and entropy-mask setting; bench/trl_loss_reference.py made it in TRL's own
venv and says how TRL's methods were called. Here ours runs on the stored inputs and must agree.
"""
from pathlib import Path

import pytest
import torch

from branchmerge.models.training.dpo import dpo_loss
from branchmerge.models.training.grpo import grpo_loss, high_entropy_mask

REF = torch.load(Path(__file__).parent / "trl_reference" / "losses.pt", weights_only=True)
TOL = {"rtol": 1e-5, "atol": 1e-7}


def test_reference_was_made_by_trl_1_16():
    assert REF["trl"].startswith("1.16")


@pytest.mark.parametrize("ref", REF["grpo"], ids=lambda r: "-".join(f"{k}={v}" for k, v in r["case"].items()))
def test_grpo_loss_gradient_and_metrics_equal_trl(ref):
    c = {**REF["grpo_defaults"], **ref["case"]}
    x = REF["grpo_inputs"]
    logps = x["logps"].clone().requires_grad_(True)
    mask = x["completion_mask"]
    entropy_mask = (high_entropy_mask(x["entropies"], mask, c["top_entropy_quantile"])
                    if c["top_entropy_quantile"] < 1.0 else None)
    loss, metrics = grpo_loss(
        logps, x["old_logps"], x["ref_logps"], x["advantages"], mask, epsilon=c["epsilon"],
        epsilon_high=c["epsilon_high"], beta=c["beta"], loss_type=c["loss_type"], max_completion_length=mask.shape[1],
        delta=c["delta"], importance_sampling_level=c["importance_sampling_level"], kl_estimator="k3",
        sapo_temperature_pos=c["sapo_temperature_pos"], sapo_temperature_neg=c["sapo_temperature_neg"],
        num_items_in_batch=mask.sum(), entropy_mask=entropy_mask)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref["loss"], **TOL)
    torch.testing.assert_close(logps.grad, ref["grad"], **TOL)
    assert ref["grad"].abs().sum() > 0  # the case moves the policy
    # every metric we log under TRL's name has TRL's value (TRL also logs entropy and per-sequence extremes)
    shared = set(metrics) & set(ref["metrics"])
    assert shared == set(metrics)
    for name in shared:
        assert metrics[name] == pytest.approx(ref["metrics"][name], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("ref", REF["dpo"], ids=lambda r: f"{r['case']['loss_type']}-beta={r['case']['beta']}")
def test_dpo_loss_gradient_and_rewards_equal_trl(ref):
    x = REF["dpo_inputs"]
    raw = x["raw_logps"].clone().requires_grad_(True)
    shift = x["completion_mask"][..., 1:]
    per_sequence = (raw * shift).sum(1)  # summed log-probs of each completion's tokens
    n = per_sequence.shape[0] // 2
    lengths = shift.sum(1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        per_sequence[:n], per_sequence[n:], x["ref_chosen_logps"], x["ref_rejected_logps"],
        beta=ref["case"]["beta"], loss_type=ref["case"]["loss_type"], chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:])
    loss = losses.mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref["loss"], **TOL)
    torch.testing.assert_close(raw.grad, ref["grad"], **TOL)
    m = ref["metrics"]
    assert float(chosen_rewards.mean()) == pytest.approx(m["rewards/chosen"], rel=1e-5)
    assert float(rejected_rewards.mean()) == pytest.approx(m["rewards/rejected"], rel=1e-5)
    assert float((chosen_rewards > rejected_rewards).float().mean()) == pytest.approx(m["rewards/accuracies"])
    assert 0 < m["rewards/accuracies"] < 1  # the inputs hold pairs on both sides
