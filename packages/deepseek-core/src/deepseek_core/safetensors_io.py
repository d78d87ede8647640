"""Memory-mapped reading of .safetensors files with errors that name the file and the tensor.

Tensors come back as views of a private (copy-on-write) memory map: loading a checkpoint in its stored dtype
on the CPU costs no second copy in RAM, and the pages are only read when a tensor is used.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies inside a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked, its data memory-mapped on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._buffer: torch.Tensor | None = None
        self._parse_header()

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {why}")

    def _parse_header(self) -> None:
        if not self.path.is_file():
            raise self._fail("safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise self._fail(f"truncated or corrupt safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise self._fail(
                    f"corrupt safetensors header (declares {header_len} header bytes, file has {size})"
                )
            raw = handle.read(header_len)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._fail(f"corrupt safetensors header: not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header: not a JSON object")
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                self.metadata = dict(info or {})
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"tensor '{name}': malformed header entry {info!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise self._fail(
                    f"tensor '{name}': header says {end - begin} bytes, shape {shape} needs {nbytes}"
                )
            if base + end > size:
                raise self._fail(
                    f"tensor '{name}': truncated file (tensor ends at byte {base + end}, file has {size} bytes)"
                )
            self.entries[name] = TensorEntry(name, dtype, shape, base + begin, base + end)

    def _map(self) -> torch.Tensor:
        if self._buffer is None:
            with open(self.path, "rb") as handle:
                # ACCESS_COPY: private pages, writable in memory, never written back to the file.
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._buffer = torch.frombuffer(mapped, dtype=torch.uint8)
        return self._buffer

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view of the memory map (a copy only when its offset is misaligned)."""
        entry = self.entries[name]
        if entry.end == entry.start:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = self._map()[entry.start : entry.end]
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        if entry.start % itemsize:
            raw = raw.clone()
        return raw.view(entry.dtype).view(entry.shape)

    def keys(self) -> list[str]:
        """Tensor names stored in this file."""
        return list(self.entries)


def read_weight_index(directory: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the opened shard that holds it (single file or sharded with an index)."""
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index_path}: field 'weight_map' missing or malformed") from None
        opened: dict[str, SafetensorsFile] = {}
        files = {}
        for name, shard in weight_map.items():
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: tensor '{name}' points at missing shard {shard_path}")
            if shard not in opened:
                opened[shard] = SafetensorsFile(shard_path)
            if name not in opened[shard].entries:
                raise CheckpointError(f"{index_path}: tensor '{name}' is not in shard {shard_path}")
            files[name] = opened[shard]
        return files
    if single.is_file():
        opened_single = SafetensorsFile(single)
        return dict.fromkeys(opened_single.keys(), opened_single)
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")
