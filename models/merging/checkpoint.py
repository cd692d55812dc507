"""Reading input checkpoints lazily and writing the output in shards (safetensors only)."""

import json
import math
import os
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors header dtype -> torch dtype
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {dtype: name for name, dtype in ST_DTYPES.items()}


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
            pickles = sorted(p.name for p in self.path.glob("pytorch_model*.bin")) if self.path.is_dir() else []
            found = f"only {', '.join(pickles)} found" if pickles else f"neither {WEIGHTS} nor {INDEX} found"
            # .bin checkpoints are pickles: loading one can run code, so they are never read here
            raise FileNotFoundError(f"{self.path}: {found}; only safetensors is read (re-save the model with "
                                    "save_pretrained(..., safe_serialization=True))")
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
    """Streams output tensors into safetensors shards as they come, nothing buffered.

    Every output tensor's name, dtype and shape is known from the plan, so each shard's header, and each
    tensor's byte offset in it, are written before any data: a merged tensor goes straight to its place in
    the file (pwrite) and is freed. A shard starts whenever the next tensor would push it past max_shard_size
    (mergekit's rule). Shards get temporary names until `finish`, then the HF names (model.safetensors, or
    model-0000i-of-0000n + index).
    """

    def __init__(self, out_dir: Path, max_shard_size: int, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.out_dir = Path(out_dir)
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
        size = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if not self.shards or (self.shards[-1] and size + nbytes > max_shard_size):
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, shape))
            size += nbytes
        self.total_size = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in layout)
        self.place: dict[str, tuple[int, int, int]] = {}  # name -> (shard, byte offset, byte length)
        self.headers: list[bytes] = []
        for i, shard in enumerate(self.shards):
            header, offset = {}, 0
            for name, dtype, shape in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.place[name] = (i, offset, nbytes)
                offset += nbytes
            blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
            self.headers.append(len(blob).to_bytes(8, "little") + blob)
        self.fds: dict[int, int] = {}

    def _path(self, shard: int) -> Path:
        return self.out_dir / f"shard-{shard + 1:05d}.tmp"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, nbytes = self.place[name]
        self._open(shard)
        data = memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        if len(data) != nbytes:
            raise RuntimeError(f"tensor {name}: {len(data)} bytes to write, the plan has {nbytes}")
        start, done = len(self.headers[shard]) + offset, 0
        while done < nbytes:
            done += os.pwrite(self.fds[shard], data[done:], start + done)

    def _open(self, shard: int) -> None:
        """Create the shard's file with its header, once."""
        if shard not in self.fds:
            fd = os.open(self._path(shard), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, self.headers[shard])
            self.fds[shard] = fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def finish(self) -> list[str]:
        """Close the shards, name them, write the index when sharded; returns the file names."""
        for i in range(len(self.shards)):
            self._open(i)  # a shard of empty tensors only was never written to
        self.close()
        n = len(self.shards)
        if n <= 1:
            if n == 0:  # no tensors: an empty but valid file
                (self.out_dir / WEIGHTS).write_bytes(_empty_safetensors())
            else:
                self._path(0).rename(self.out_dir / WEIGHTS)
            return [WEIGHTS]
        weight_map, files = {}, []
        for i, shard in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._path(i).rename(self.out_dir / file)
            files.append(file)
            weight_map.update(dict.fromkeys((name for name, _, _ in shard), file))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def _empty_safetensors() -> bytes:
    blob = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob
