"""Make tests/trl_reference/losses.pt: TRL 1.16's own loss code run on fixed inputs, for every GRPO loss type,
importance-sampling level, clip, KL and entropy-mask setting we offer and for DPO's sigmoid / ipo.

Run in TRL's own venv (bench/grpo_vs_trl.py builds it), from the repository root:

    ~/.cache/branchmerge/trl-grpo-venv/bin/python bench/trl_loss_reference.py

How TRL's code is reached without a model or a dataset: GRPOTrainer._compute_loss and DPOTrainer._compute_loss
are called unbound on a stand-in `self` that carries only the attributes those methods read (the config values,
a one-process accelerator whose gather / reduce / pad are the identity, a metrics dict). GRPO's
_get_per_token_logps_and_entropies is replaced by one that returns fixed per-token log-probs (a leaf tensor, so
the gradient of TRL's loss with respect to them is taken) and entropies; get_high_entropy_mask is TRL's own,
bound to the stand-in. DPO's model and reference are replaced by callables returning TRL's fused-head outputs
(log_probs zero outside the completion, as TRL's labels=-100 make them) with the reference log-probs
precomputed (TRL's precompute_ref_logps path). Everything from the log-probs on (ratios, clipping, KL, entropy
mask, aggregation, metrics) is TRL's code as installed.

Stored per case: the inputs, TRL's loss, its gradient with respect to the log-probs, and the metrics TRL logged.
tests/test_trl_reference.py computes ours on the same inputs and compares.
"""

from __future__ import annotations

import collections
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "trl_reference" / "losses.pt"
B, K, G = 6, 7, 3  # completions, completion length, num_generations (two groups)


class OneProcess:
    """accelerate.Accelerator as one CPU process sees it."""
    num_processes = 1
    device = torch.device("cpu")
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def grpo_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 3, 7, 1, 6])  # 7 = truncated at K
    mask = (torch.arange(K)[None, :] < lengths[:, None]).long()
    logps = -3 * torch.rand(B, K, generator=g)
    return {
        "logps": logps,
        "old_logps": logps + 0.3 * torch.randn(B, K, generator=g),  # ratios up to ~2: both clips act
        "ref_logps": logps + 0.2 * torch.randn(B, K, generator=g),
        "entropies": 2 * torch.rand(B, K, generator=g),
        "advantages": torch.tensor([1.2, -0.4, -0.8, 0.0, 0.9, -0.9]),
        "completion_mask": mask,
    }


GRPO_CASES = [
    *({"loss_type": lt, "importance_sampling_level": lvl}
      for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo") for lvl in ("token", "sequence")),
    {"loss_type": "dapo", "epsilon_high": 0.28},
    {"loss_type": "cispo", "epsilon_high": 1.3},
    {"loss_type": "grpo", "delta": 1.4},
    {"loss_type": "dapo", "delta": 1.4, "importance_sampling_level": "sequence"},
    {"loss_type": "grpo", "beta": 0.04},
    {"loss_type": "dapo", "beta": 0.1, "importance_sampling_level": "sequence"},
    {"loss_type": "dapo", "top_entropy_quantile": 0.5},
    {"loss_type": "grpo", "top_entropy_quantile": 0.2, "beta": 0.04},
    {"loss_type": "sapo", "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.3},
]
GRPO_DEFAULTS = {"loss_type": "dapo", "importance_sampling_level": "token", "beta": 0.0, "epsilon": 0.2,
                 "epsilon_high": 0.2, "delta": None, "top_entropy_quantile": 1.0, "sapo_temperature_pos": 1.0,
                 "sapo_temperature_neg": 1.05}


def trl_grpo(case: dict, x: dict) -> dict:
    from trl import GRPOTrainer

    c = {**GRPO_DEFAULTS, **case}
    logps = x["logps"].clone().requires_grad_(True)
    me = types.SimpleNamespace(
        loss_type=c["loss_type"], importance_sampling_level=c["importance_sampling_level"], beta=c["beta"],
        epsilon_low=c["epsilon"], epsilon_high=c["epsilon_high"], top_entropy_quantile=c["top_entropy_quantile"],
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=K,
        current_gradient_accumulation_steps=1, accelerator=OneProcess(), model=torch.nn.Linear(1, 1),
        _metrics={"train": collections.defaultdict(list)},
        args=types.SimpleNamespace(delta=c["delta"], sapo_temperature_pos=c["sapo_temperature_pos"],
                                   sapo_temperature_neg=c["sapo_temperature_neg"], use_bias_correction_kl=False,
                                   steps_per_generation=1),
    )
    me.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, me)
    me._get_per_token_logps_and_entropies = lambda *a, **k: (logps, x["entropies"], None)
    mask = x["completion_mask"]
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, K, dtype=torch.long), "completion_mask": mask,
              "advantages": x["advantages"], "old_per_token_logps": x["old_logps"],
              "ref_per_token_logps": x["ref_logps"], "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss.backward()
    return {"loss": loss.detach(), "grad": logps.grad, "metrics": {k: v[-1] for k, v in me._metrics["train"].items()}}


def dpo_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, T = 3, 9  # pairs, sequence length (prompt + completion)
    starts = torch.tensor([2, 4, 3, 2, 5, 3])  # first completion position, chosen rows then rejected rows
    ends = torch.tensor([9, 8, 9, 6, 9, 7])
    pos = torch.arange(T)[None, :]
    completion_mask = ((pos >= starts[:, None]) & (pos < ends[:, None])).long()
    return {
        "raw_logps": -2 * torch.rand(2 * n, T - 1, generator=g),  # per-token log-probs of tokens 1..T-1
        "completion_mask": completion_mask,
        # summed over each completion; against these the policy prefers the chosen of pair 0 and 2 (margin > 0)
        "ref_chosen_logps": torch.tensor([-8.0, -4.0, -9.5]),
        "ref_rejected_logps": torch.tensor([-3.0, -6.0, -4.0]),
    }


DPO_CASES = [{"loss_type": "sigmoid", "beta": 0.1}, {"loss_type": "sigmoid", "beta": 2.0},
             {"loss_type": "ipo", "beta": 0.1}, {"loss_type": "ipo", "beta": 0.5}]


def trl_dpo(case: dict, x: dict) -> dict:
    from trl import DPOTrainer

    raw = x["raw_logps"].clone().requires_grad_(True)
    completion_mask = x["completion_mask"]
    shift = completion_mask[..., 1:]

    def model(**kwargs):  # TRL's fused head: log-probs of the labels, 0 where labels = -100
        return types.SimpleNamespace(log_probs=raw * shift, entropy=torch.zeros_like(raw),
                                     mean_logits=torch.zeros_like(raw), is_top1=torch.zeros_like(raw, dtype=torch.bool))

    model.training = True
    me = types.SimpleNamespace(
        model=model, accelerator=OneProcess(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[case["loss_type"]], loss_weights=[1.0], beta=case["beta"],
        use_weighting=False, _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": x["ref_chosen_logps"],
              "ref_rejected_logps": x["ref_rejected_logps"]}
    loss = DPOTrainer._compute_loss(me, model, inputs, return_outputs=False)
    loss.backward()
    return {"loss": loss.detach(), "grad": raw.grad, "metrics": {k: v[-1] for k, v in me._metrics["train"].items()}}


def main() -> None:
    import trl

    grpo_x, dpo_x = grpo_inputs(0), dpo_inputs(1)
    result = {"trl": trl.__version__, "torch": str(torch.__version__), "grpo_inputs": grpo_x, "dpo_inputs": dpo_x,
              "grpo_defaults": GRPO_DEFAULTS,
              "grpo": [{"case": c, **trl_grpo(c, grpo_x)} for c in GRPO_CASES],
              "dpo": [{"case": c, **trl_dpo(c, dpo_x)} for c in DPO_CASES]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, OUT)
    for r in result["grpo"] + result["dpo"]:
        print(r["case"], f"loss {float(r['loss']):.6f}", {k: round(v, 4) for k, v in r["metrics"].items()})
    print(f"wrote {OUT.relative_to(ROOT)} (trl {trl.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
