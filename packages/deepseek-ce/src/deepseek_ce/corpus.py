"""The quickstart's embedded corpus: the running Python's own standard-library sources (no download)."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from deepseek_core.fileio import atomic_write_text


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(
    max_bytes: int = 4_000_000, root: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """(relative path, source) of the standard library's top-level *.py files, in name order, until
    `max_bytes` of text; files that are not UTF-8 are skipped."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
    base = Path(root) if root is not None else stdlib_dir()
    files = sorted(base.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"{base}: no *.py files (is the standard library installed as source?)")
    out: list[tuple[str, str]] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_bytes and out:
            break
        out.append((path.name, text))
        total += len(text)
    return out


def write_stdlib_corpus(path: str | os.PathLike[str], max_bytes: int = 4_000_000) -> tuple[Path, int, int]:
    """Write the standard-library corpus as .jsonl ({"text", "path"} per file); returns (path, files, chars)."""
    sources = stdlib_sources(max_bytes)
    lines = [json.dumps({"text": text, "path": name}, ensure_ascii=False) for name, text in sources]
    target = Path(path)
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target, len(sources), sum(len(t) for _, t in sources)
