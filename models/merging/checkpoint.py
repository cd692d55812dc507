"""Reading input checkpoints lazily and writing the output in shards (safetensors only)."""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors header dtype -> torch dtype
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """One HF folder's weights. Names, shapes and dtypes come from the safetensors headers; a
    tensor's data is read only by `get`, so everything can be checked before any weight is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if (self.path / INDEX).exists():
            files = sorted(set(json.loads((self.path / INDEX).read_text())["weight_map"].values()))
        elif (self.path / WEIGHTS).exists():
            files = [WEIGHTS]
        else:
            raise FileNotFoundError(f"{self.path}: neither {WEIGHTS} nor {INDEX} found (only safetensors is read)")
        config = self.path / "config.json"
        self.config: dict = json.loads(config.read_text()) if config.exists() else {}
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._file = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return ST_DTYPES[self._handles[self._file[name]].get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file[name]].get_tensor(name)


class ShardWriter:
    """Buffers output tensors; writes a shard whenever the next tensor would push it past max_shard_size.

    Peak memory is one shard plus the tensors being merged. Shards get temporary names until the
    total is known, then the HF names (model.safetensors, or model-0000i-of-0000n + index).
    """

    def __init__(self, out_dir: Path, max_shard_size: int):
        self.out_dir = Path(out_dir)
        self.max_shard_size = max_shard_size
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_size:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, name the shards, write the index when sharded; returns the file names."""
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.out_dir / WEIGHTS)
            return [WEIGHTS]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.shards, start=1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / file)
            files.append(file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
