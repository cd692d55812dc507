"""sft.strategy=ddp (issue 15, point 2): two processes with gloo on this CPU train what one process trains with
the same global batch.

Two torchrun ranks with batch_size 2 against one process with batch_size 4, float32, 13 examples (the last global
batch holds one row, so rank 1's share is empty and it trains on a stand-in without targets), 4 AdamW steps at
lr 1e-3. Tolerance 1e-5 on the per-step loss and on every weight (max |difference|): the runs add the same terms
in another order (each rank pads its rows to their own longest; gloo sums the ranks' gradients), and AdamW divides
each weight's gradient by its own running scale, so a rounding difference in a near-zero gradient becomes up to
~lr x (its relative size) in the update. Measured (2026-11-30): loss 9.5e-7, weights 1.5e-6, while training moved
the weights by 4.0e-3. The same run with DDP's default normalisation (each rank's mean loss, averaged over the
ranks) differs by 4.2e-3 in loss and 4.9e-3 in weights: the tolerance tells the two apart by a factor of ~500.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from branchmerge.models.training.config import SFTConfig
from branchmerge.models.training.sft import train_sft
from tests.test_sft import SETTINGS

pytestmark = pytest.mark.slow  # torchrun starts two Python processes (~15 s)

TOLERANCE = 1e-5


def examples() -> list[dict]:
    """13 examples of different lengths (target token counts 3-40): ranks' token counts differ in every batch."""
    out = []
    for i in range(13):
        question = f"What is {i} plus {i * 7}?" + " Think." * (i % 4)
        answer = f"{i} + {i * 7} = {i * 8}. " + "Check: ok. " * (i % 5) + f"<answer>{i * 8}</answer>"
        out.append({"messages": [{"role": "user", "content": question}], "completion": answer})
    return out


def config(**changes) -> SFTConfig:
    return SFTConfig(**(SETTINGS | {"lr": 1e-3, "epochs": 1, "weight_decay": 0.01} | changes))


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ddp_on_two_processes_trains_what_one_process_trains(tiny_model_dir, tmp_path):
    one = train_sft(config(batch_size=4), tiny_model_dir, examples(), tmp_path / "one", seed=0, progress=False)
    two = train_sft(config(batch_size=2, strategy="ddp", devices=2), tiny_model_dir, examples(), tmp_path / "two",
                    seed=0, progress=False)
    assert one["steps"] == two["steps"] == 4  # ceil(13 / 4) global batches
    assert (one["tokens"], one["target_tokens"]) == (two["tokens"], two["target_tokens"])  # every row, once
    assert two["loss_history"] == pytest.approx(one["loss_history"], abs=TOLERANCE)
    w1, w2, w0 = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_model_dir)
    assert max_difference(w1, w0) > 1e-3  # it trained
    assert max_difference(w1, w2) <= TOLERANCE


def test_bad_parallel_settings_name_the_key():
    with pytest.raises(ValueError, match=r"sft.devices=2.*sft.strategy=auto"):
        config(devices=2)
    with pytest.raises(ValueError, match=r"sft.mixing=aioli.*sft.strategy=ddp"):
        config(strategy="ddp", devices=2, mixing="aioli")


def test_fsdp_without_cuda_is_refused_before_training(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    with pytest.raises(ValueError, match="sft.strategy=.fsdp.*sft.strategy=ddp"):
        train_sft(config(strategy="fsdp", devices=2), tiny_model_dir, examples(), tmp_path / "x", seed=0,
                  progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP shards over CUDA devices")
def test_fsdp_on_cuda_trains_what_one_process_trains(tiny_model_dir, tmp_path):
    """sft.strategy=fsdp on every CUDA device here (batch_size per device) against one process on one device with
    the same global batch; same tolerance as ddp's (float32, TF32 off: PyTorch's default for matmuls)."""
    devices = torch.cuda.device_count()
    one = train_sft(config(batch_size=4), tiny_model_dir, examples(), tmp_path / "one", seed=0, progress=False)
    sharded = train_sft(config(batch_size=4 // devices if 4 % devices == 0 else 4, strategy="fsdp", devices=devices),
                        tiny_model_dir, examples(), tmp_path / "fsdp", seed=0, progress=False)
    w1, w2, w0 = weights(tmp_path / "one"), weights(tmp_path / "fsdp"), weights(tiny_model_dir)
    loss_gap = max(abs(a - b) for a, b in zip(one["loss_history"], sharded["loss_history"]))
    print(f"fsdp on {devices} device(s): loss {loss_gap:.2e}, weights {max_difference(w1, w2):.2e} (training moved "
          f"them {max_difference(w1, w0):.2e})")
    assert max_difference(w1, w0) > 1e-3
    assert sharded["loss_history"] == pytest.approx(one["loss_history"], abs=TOLERANCE)
    assert max_difference(w1, w2) <= TOLERANCE


def test_the_sft_stage_trains_with_ddp_and_logs_to_its_mlflow_run(tmp_path):
    """The pipeline's SFT stages through torchrun: sealed HF folders, and rank 0's metrics in each stage's run."""
    import mlflow

    from branchmerge.flows.pipeline import branchmerge

    result = branchmerge(overrides=["experiment=tiny", f"run.store={tmp_path}", "rl.enabled=false",
                                    "tracking.registered_model=null", "sft.strategy=ddp", "sft.devices=2"])
    summary = json.loads(Path(result["summary"]).read_text())
    sft = {k: v for k, v in summary["stages"].items() if k.startswith("sft/")}
    assert len(sft) == 4 and {v["status"] for v in sft.values()} == {"computed"}
    assert all((Path(v["path"]) / "model.safetensors").exists() for v in sft.values())
    runs = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'",
                              output_format="list", search_all_experiments=True)
    trained = [r for r in runs if r.info.run_name.startswith("sft/")]
    assert len(trained) == 4 and all("train/loss" in r.data.metrics for r in trained)
