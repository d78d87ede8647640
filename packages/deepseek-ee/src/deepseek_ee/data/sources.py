"""Input discovery: globs, directories and fsspec URLs (s3://, gs://, file paths) -> ordered source files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import DataError

FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    """One input file: its URL (a plain path when local), format, compression, size and version stamp."""

    index: int
    url: str
    format: str  # txt | jsonl | parquet
    compression: str | None
    size: int
    version: str  # mtime or ETag: changes when the file changes, so resumed work is redone

    def to_dict(self) -> dict[str, Any]:
        """JSON form (also part of each task's fingerprint)."""
        return {
            "path": self.url,
            "format": self.format,
            "compression": self.compression,
            "size": self.size,
            "version": self.version,
        }


def detect_format(path: str) -> tuple[str, str | None]:
    """(format, compression) from a file name such as data.jsonl.gz; DataError if unsupported."""
    name = path.rsplit("/", 1)[-1].lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression is not None:
        stem, ext = os.path.splitext(stem)
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise DataError(path, f"unsupported file type (expected one of {', '.join(sorted(FORMATS))})")
    if fmt == "parquet" and compression is not None:
        raise DataError(path, "compressed parquet files are not supported (parquet compresses internally)")
    return fmt, compression


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "LastModified", "mtime", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def discover(inputs: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[SourceFile]:
    """Expand `inputs` (paths, globs, directories, URLs) into source files.

    Order: inputs in the order given; matches of one input sorted by path. Duplicates are kept once.
    Explicit files and glob matches must have a supported type; directories contribute their
    supported, non-hidden files.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("inputs: give at least one path, glob or URL")
    sources: list[SourceFile] = []
    seen: set[str] = set()
    for spec in inputs:
        fs, path = fsspec.core.url_to_fs(str(spec), **(storage_options or {}))
        local = isinstance(fs, LocalFileSystem)
        matches: dict[str, dict[str, Any]]
        strict = True
        if any(c in path for c in _GLOB_CHARS):
            matches = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            matches = fs.find(path, detail=True)
            strict = False
        elif fs.exists(path):
            matches = {path: fs.info(path)}
        else:
            raise DataError(str(spec), "no such file or directory")
        chosen = []
        for p in sorted(matches):
            base = p.rsplit("/", 1)[-1]
            if not strict and (base.startswith(".") or _try_format(p) is None):
                continue
            chosen.append(p)
        if not chosen:
            raise DataError(str(spec), "matches no input files")
        for p in chosen:
            url = os.path.abspath(p) if local else fs.unstrip_protocol(p)
            if url in seen:
                continue
            seen.add(url)
            fmt, compression = detect_format(url)
            info = matches[p]
            version = str(os.stat(url).st_mtime_ns) if local else _version(info)
            sources.append(
                SourceFile(len(sources), url, fmt, compression, int(info.get("size") or 0), version)
            )
    return sources


def _try_format(path: str) -> tuple[str, str | None] | None:
    try:
        return detect_format(path)
    except DataError:
        return None


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a source URL."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))
