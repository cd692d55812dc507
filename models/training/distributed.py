"""sft.strategy=ddp | fsdp: train_sft in `sft.devices` processes, launched by torchrun, trained by Lightning.

Lightning's own DDP launcher re-runs the program's command line once per device, which for a pipeline means the
whole flow; its spawn launcher pickles the module and the data loader. So the stage, already running, launches
`torchrun --nproc-per-node=<devices> -m branchmerge.models.training.distributed <spec>`: each process reads the
spec (settings, data, paths), calls train_sft, and Lightning finds torchrun's environment and joins the process
group instead of launching (its DDP / FSDP strategy, gloo on CPU). Rank 0 saves the model and the metrics.

What makes N processes train as one: each optimizer step draws one global batch of batch_size x N rows (the
sampler a single process with batch_size x N would use), and rank r takes rows r, r+N, ...; each rank's loss is
its token sum over the global batch's token count, times N (DDP averages gradients over the ranks), which is
the single process's token mean exactly (models/training/sft.py, SFTModule). A rank whose share of a last,
short batch is empty takes a row with no target tokens: zero loss, the same collectives.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a launched group."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """True in a process torchrun (or Slurm through Lightning) started as a rank, one of several or the only one:
    LOCAL_RANK is set by the launcher even for a single rank (sft.devices=1, fsdp on one GPU), which must train
    here rather than launch torchrun again."""
    return "LOCAL_RANK" in os.environ or world()[1] > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_problem(cfg) -> str | None:
    """Why this node cannot run `cfg` (the sft section) as set, else None. The flow's preflight asks this before
    any stage computes; launch asks it again for callers of the library."""
    import torch

    if cfg.strategy == "fsdp" and not torch.cuda.is_available():
        return ("sft.strategy='fsdp' shards parameters over CUDA devices and this machine has none: use "
                "sft.strategy=ddp (gloo on CPUs) or run on GPUs")
    if torch.cuda.is_available() and cfg.devices > torch.cuda.device_count():
        return f"sft.devices={cfg.devices} but this node has {torch.cuda.device_count()} CUDA devices"
    return None


def launch(cfg, model_dir, examples: list[dict], out_dir, *, seed: int, reference_dir, checkpoint_dir, logger,
           progress: bool) -> dict:
    """Run train_sft in cfg.devices processes on this node; returns rank 0's metrics."""
    import torch

    if cfg.num_nodes > 1:
        raise ValueError(f"sft.num_nodes={cfg.num_nodes}: the stage launches processes on this node only; start it "
                         "on every node under a multi-node launcher (torchrun --nnodes, srun), which sets "
                         "WORLD_SIZE / RANK for Lightning")
    if (problem := device_problem(cfg)) is not None:
        raise ValueError(problem)
    with tempfile.TemporaryDirectory(prefix="branchmerge-ddp-") as tmp:
        spec = {
            "cfg": cfg.model_dump(mode="json"), "model_dir": str(model_dir), "out_dir": str(out_dir), "seed": seed,
            "reference_dir": None if reference_dir is None else str(reference_dir),
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir), "progress": progress,
            "examples": f"{tmp}/examples.jsonl", "metrics": f"{tmp}/metrics.json",
            # rank 0 logs into the stage's MLflow run, as the single process does
            "mlflow": None if logger is None else {"tracking_uri": logger._tracking_uri, "run_id": logger.run_id},
        }
        Path(spec["examples"]).write_text("".join(json.dumps(e) + "\n" for e in examples))
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.devices}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", __name__, f"{tmp}/spec.json"]
        log.info("sft: %s on %d processes (torchrun)", cfg.strategy, cfg.devices)
        # the ranks' bars and log lines go to this terminal; OMP threads split between them (torchrun would set 1)
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cfg.devices))}
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"sft with sft.strategy={cfg.strategy}, sft.devices={cfg.devices} failed (torchrun "
                               f"exit code {done.returncode}); the ranks' errors are above")
        return json.loads(Path(spec["metrics"]).read_text())


def main(spec_path: str) -> None:
    from branchmerge.models.training.config import SFTConfig
    from branchmerge.models.training.sft import train_sft

    spec = json.loads(Path(spec_path).read_text())
    rank, _ = world()
    logger = None
    if spec["mlflow"] is not None and rank == 0:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=spec["mlflow"]["tracking_uri"], run_id=spec["mlflow"]["run_id"])
    examples = [json.loads(line) for line in Path(spec["examples"]).read_text().splitlines()]
    metrics = train_sft(SFTConfig.model_validate(spec["cfg"]), spec["model_dir"], examples, spec["out_dir"],
                        seed=spec["seed"], reference_dir=spec["reference_dir"], checkpoint_dir=spec["checkpoint_dir"],
                        logger=logger, progress=spec["progress"] and rank == 0)
    if rank == 0:
        Path(spec["metrics"]).write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
