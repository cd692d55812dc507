"""Reading input checkpoints lazily and writing the output in shards (safetensors only)."""

import json
import math
import os
from pathlib import Path

import torch
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
    tensor's data is read only by `get`, so everything can be checked before any weight is read.

    `get` reads with pread into a fresh tensor instead of memory-mapping the file: a mapped page stays
    in this process's RSS until the mapping goes away, so mmap'd reads (safe_open) grow the peak to the
    size of every input read so far; a read tensor is freed as soon as it is merged.
    """

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
        self._entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for file in files:
            for name, entry in sorted(_read_header(self.path / file).items()):  # safe_open's order
                self._entries[name] = (file, *entry)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        file, dtype, shape, start, nbytes = self._entries[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = os.open(self.path / file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:  # one read returns at most ~2 GiB on Linux
                n = os.preadv(fd, [view[done:]], start + done)
                if n <= 0:
                    raise OSError(f"{self.path / file}: file ends inside tensor {name} (truncated checkpoint?)")
                done += n
        finally:
            os.close(fd)
        return buffer.view(dtype).reshape(shape)


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """{tensor: (dtype, shape, absolute byte offset, byte length)} from a safetensors file's header
    (8-byte little-endian header length, then a JSON header; offsets are relative to the data after it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: unreadable safetensors header ({err})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}; readable: {', '.join(ST_DTYPES)}")
        dtype, shape = ST_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
            raise ValueError(f"{path}: tensor {name}'s data_offsets {[begin, end]} do not fit its shape "
                             f"{list(shape)} x {info['dtype']} or the file ({size} bytes): truncated or corrupt")
        entries[name] = (dtype, shape, 8 + length + begin, end - begin)
    return entries


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
