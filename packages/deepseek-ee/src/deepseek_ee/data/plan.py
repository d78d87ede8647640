"""Work planning: source files -> tasks of bounded size, in stream order, each with a fingerprint.

Small files are packed together into one task (up to `chunk_bytes` of input); a larger file is split
into byte ranges (txt, jsonl) or row-group ranges (parquet) of about `chunk_bytes`, one task each, plus
a "hash" task that computes its sha256 on a worker. A task writes its own shards, so the shards of
task 0, 1, 2, ... concatenated give the token stream in source-file order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .sources import SourceFile, filesystem

FORMAT_VERSION = 1  # bump when tokenization semantics change: every task is then redone
TARGET_TASKS = 64  # a corpus smaller than TARGET_TASKS * chunk_bytes still gets this many tasks...
MIN_TASK_BYTES = 1 << 20  # ...unless they would be smaller than this


def task_bytes(total_bytes: int, chunk_bytes: int) -> int:
    """Input bytes per task: at most `chunk_bytes`, smaller for small corpora so every worker gets work.

    Depends only on the corpus size (never on the number of workers), so a rerun plans the same tasks.
    """
    return max(1, min(chunk_bytes, max(MIN_TASK_BYTES, total_bytes // TARGET_TASKS)))


@dataclass(frozen=True)
class Piece:
    """A part of one source file: bytes [start, end) for txt/jsonl, row groups [start, end) for parquet."""

    source: int
    start: int
    end: int
    whole: bool  # the entire file: its sha256 is computed while reading it
    last: bool  # reaches the end of the file (a txt document's EOS follows it)


@dataclass(frozen=True)
class Task:
    """A unit of work for one worker: tokenize pieces into shards, or hash one large file."""

    task_id: int
    kind: str  # "tokenize" | "hash"
    pieces: tuple[Piece, ...]
    nbytes: int  # input bytes covered: progress and balancing

    @property
    def name(self) -> str:
        """Stable name used for the done-marker and shard files."""
        return f"{self.task_id:06d}"


def plan_tasks(
    sources: Sequence[SourceFile],
    chunk_bytes: int,
    storage_options: dict[str, Any] | None = None,
    max_files_per_task: int = 1000,
) -> list[Task]:
    """Tasks covering every source in order (see module docstring)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    tasks: list[Task] = []
    group: list[Piece] = []
    group_bytes = 0

    def add(kind: str, pieces: list[Piece], nbytes: int) -> None:
        tasks.append(Task(len(tasks), kind, tuple(pieces), nbytes))

    def flush_group() -> None:
        nonlocal group, group_bytes
        if group:
            add("tokenize", group, group_bytes)
        group, group_bytes = [], 0

    for src in sources:
        splittable = src.compression is None and src.size > chunk_bytes
        if not splittable:
            if group and (group_bytes + src.size > chunk_bytes or len(group) >= max_files_per_task):
                flush_group()
            group.append(Piece(src.index, 0, src.size, whole=True, last=True))
            group_bytes += src.size
            continue
        flush_group()
        ranges = _parquet_ranges(src, chunk_bytes, storage_options) if src.format == "parquet" else None
        if ranges is None:
            ranges = [
                (lo, min(lo + chunk_bytes, src.size), min(lo + chunk_bytes, src.size) - lo)
                for lo in range(0, src.size, chunk_bytes)
            ]
        for lo, hi, nbytes in ranges:
            add("tokenize", [Piece(src.index, lo, hi, whole=False, last=(lo, hi) == ranges[-1][:2])], nbytes)
        add("hash", [Piece(src.index, 0, src.size, whole=True, last=True)], 0)
    flush_group()
    return tasks


def _parquet_ranges(
    src: SourceFile, chunk_bytes: int, storage_options: dict[str, Any] | None
) -> list[tuple[int, int, int]]:
    """Row-group ranges of about chunk_bytes (by row-group byte size); reads only the footer."""
    import pyarrow.parquet as pq

    fs, path = filesystem(src.url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            meta = pq.ParquetFile(handle).metadata
    except Exception as exc:
        raise DataError(src.url, f"cannot read parquet metadata ({exc})") from None
    sizes = [max(1, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    ranges: list[tuple[int, int, int]] = []
    lo, acc = 0, 0
    for i, size in enumerate(sizes):
        if acc and acc + size > chunk_bytes:
            ranges.append((lo, i, acc))
            lo, acc = i, 0
        acc += size
    ranges.append((lo, len(sizes), acc))
    # report input bytes proportionally to the file size, so progress totals match the corpus size
    total = sum(r[2] for r in ranges) or 1
    return [(a, b, n * src.size // total) for a, b, n in ranges]


def task_fingerprint(task: Task, sources: Sequence[SourceFile], settings: dict[str, Any]) -> str:
    """sha256 over what determines a task's output: its pieces, their files' versions and the settings."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": task.kind,
        "pieces": [
            {**sources[p.source].to_dict(), "start": p.start, "end": p.end, "whole": p.whole, "last": p.last}
            for p in task.pieces
        ],
        "settings": settings if task.kind == "tokenize" else {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
