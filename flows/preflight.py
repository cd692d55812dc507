"""What a run needs from its surroundings, checked in seconds before any stage computes.

The schema (flows/schema.py) judges the config alone; this judges what the config points at: the store must take
a write, MLflow and the Prefect API must answer, an OpenAI-compatible server a stage will ask must be up, a local
checkpoint must be a readable Hugging Face folder, a Ray head given by address must listen, and fsdp needs
CUDA. Each failure raises `Unavailable` naming the setting and its value, so a dead endpoint or a truncated
checkpoint is one line at start, not a traceback after minutes of work (MLflow's client alone retries a refused
connection for four minutes) and never a sealed artifact. Called by the flow (CLI, deployments, schedules
alike); the CLI calls it before Prefect starts, plus `check_prefect_api`.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from branchmerge.models.training.distributed import device_problem
from branchmerge.tasks.store import Store, Unavailable

if TYPE_CHECKING:
    from branchmerge.flows.schema import PipelineConfig

TIMEOUT_S = 5  # a live server on this network answers /health in milliseconds


def preflight(cfg: PipelineConfig) -> None:
    Store(cfg.run.store).check_writable()
    if cfg.tracking.enabled:
        check_tracking(cfg.tracking.tracking_uri)
    for section, backend in (("teacher", cfg.teacher), ("eval", cfg.eval)):
        if backend.backend == "openai":
            check_server(f"{section}.openai.base_url", backend.openai.base_url.rstrip("/") + "/models")
    for key, model in (("student", cfg.student), ("teacher.model", cfg.teacher.model)):
        if model.source["kind"] == "hf" and (key == "student" or cfg.teacher.uses_local_model()):
            check_checkpoint(f"{key}.source.path", Path(model.source["path"]).expanduser())
    address = cfg.runner.ray.address if cfg.runner.kind == "ray" and cfg.runner.ray else None
    if address and address != "auto":
        check_port("runner.ray.address", address)
    if (problem := device_problem(cfg.sft)) is not None:
        raise Unavailable(problem)


def probe(url: str, *, any_status: bool = False) -> str | None:
    """None when `url` answers 200 (a /health endpoint: MLflow's, Prefect's), or any HTTP status with `any_status`
    (an OpenAI-compatible server's /models: whatever it says, it is up); else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 or any_status else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return None if any_status else f"HTTP {err.code} from {url}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_server(key: str, url: str) -> None:
    if (reason := probe(url, any_status=True)) is not None:
        raise Unavailable(f"{key}={url.rsplit('/', 1)[0]!r}: no server answers ({reason}); start it or point "
                          f"{key} at one")


def check_port(key: str, address: str) -> None:
    """A TCP connect to host:port (a Ray head's GCS, or its Ray Client server for ray://)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise Unavailable(f"{key}={address!r}: nothing answers there ({err}); start the head (ray start --head) "
                          "or point it at one") from None


def check_tracking(tracking_uri: str | None) -> None:
    """A server must answer /health; a SQLite file's folder must exist and be writable."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith(("http://", "https://")):
        if (reason := probe(uri.rstrip("/") + "/health")) is not None:
            raise Unavailable(f"tracking.tracking_uri={uri!r}: no MLflow server answers ({reason}); start it "
                              "(mlflow server ...) or run with tracking=none")
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        folder = path.parent
        problem = (f"folder {str(folder)!r} does not exist" if not folder.is_dir()
                   else f"{str(path)!r} is read-only" if path.exists() and not os.access(path, os.W_OK)
                   else f"folder {str(folder)!r} is read-only" if not os.access(folder, os.W_OK) else None)
        if problem:
            raise Unavailable(f"tracking.tracking_uri={uri!r}: MLflow cannot write its database ({problem}); point "
                              "it at a writable place or run with tracking=none")


def check_prefect_api() -> None:
    """With PREFECT_API_URL set the run reports to that server, which must answer now (Prefect's client would
    retry, then fail with a traceback). Unset, the run starts its own temporary server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url and (reason := probe(url.rstrip("/") + "/health")) is not None:
        raise Unavailable(f"PREFECT_API_URL={url!r}: no Prefect server answers ({reason}); start it (prefect server "
                          "start) or unset PREFECT_API_URL to run on a temporary one")


def check_checkpoint(key: str, folder: Path) -> None:
    """A Hugging Face folder: config.json that parses, and safetensors files whose headers parse and whose sizes
    hold every tensor the header lists (a copy cut short fails here, not in from_pretrained after the upstream
    stages). Reads headers only."""
    def bad(why: str) -> Unavailable:
        return Unavailable(f"{key}={str(folder)!r}: {why}")

    if not folder.is_dir():
        raise bad("no such folder")
    try:
        json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise bad("not a Hugging Face model folder (no config.json)") from None
    except (OSError, ValueError) as err:
        raise bad(f"config.json does not parse ({err})") from None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise bad("no *.safetensors weights (pytorch_model.bin is not read: pickles can run code)")
    for shard in shards:
        size = shard.stat().st_size
        with open(shard, "rb") as handle:
            head = handle.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise bad(f"{shard.name} is not a safetensors file (header length {n}, file {size} bytes)")
            try:
                header = json.loads(handle.read(n))
            except ValueError as err:
                raise bad(f"{shard.name}: its header does not parse ({err})") from None
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise bad(f"{shard.name} is cut short: its header needs {8 + n + end} bytes, the file has {size}")
