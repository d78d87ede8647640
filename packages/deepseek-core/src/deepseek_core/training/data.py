"""Single-file datasets: read a .txt / .jsonl / .parquet file, tokenize it once (cached), pack it.

Everything that can be wrong with the file is found here, before any training step: a missing or empty
file, a binary file, a .jsonl line that is not JSON or lacks the text field (with its line number), a file
too short for one training sequence, an extension we do not read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..fileio import atomic_write_bytes
from .errors import DataError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# Bumped when the tokenized layout changes, so old cache entries are never misread.
_CACHE_FORMAT = 1
# .txt files are tokenized in pieces of about this many characters (split at line ends) so the tokenizers
# library can work on them in parallel.
_TXT_PIECE_CHARS = 64 * 1024


# ---------------------------------------------------------------------------------------------- reading
def _check_text_bytes(path: Path, head: bytes) -> None:
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of `head` is fine; anything earlier is not UTF-8.
        if exc.start < len(head) - 4:
            raise DataError(
                f"{path}: looks like a binary file (not UTF-8 at byte offset {exc.start}); expected UTF-8 text"
            ) from None


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    _check_text_bytes(path, data[: 1 << 16])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte offset {exc.start})") from None


def check_data_file(path: str | os.PathLike[str]) -> Path:
    """Return `path` as a Path if it names a non-empty file with a supported extension, else raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file does not exist")
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory; a single-file dataset needs one {', '.join(SUPPORTED_EXTENSIONS)} file"
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported extension {suffix or '(none)'!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


def iter_documents(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a data file: a .txt file in line-aligned pieces, one per .jsonl line, one per
    .parquet row. Raises DataError naming the file (and line or row) at the first bad record."""
    path = check_data_file(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt_pieces(path)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


def read_documents(path: str | os.PathLike[str], text_field: str = "text") -> list[str]:
    """All documents of a data file (see iter_documents); raises DataError if there is no text at all."""
    docs = list(iter_documents(path, text_field))
    if not any(doc.strip() for doc in docs):
        raise DataError(f"{path}: file is empty (no text)")
    return docs


def _txt_pieces(path: Path) -> Iterator[str]:
    text = _read_text(path)
    start = 0
    while start < len(text):
        end = text.find("\n", start + _TXT_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: line {lineno} is a JSON {type(record).__name__}, expected an object"
            )
        if text_field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(
                f"{path}:{lineno}: line {lineno} has no text field {text_field!r} (its keys: {keys}); "
                "set text_field to the field that holds the text"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: line {lineno} field {text_field!r} is {type(value).__name__}, expected a string"
            )
        yield value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); set text_field to the text column"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: row {row} column {text_field!r} is {type(value).__name__}, expected a string"
                )
            row += 1
            yield value


# ---------------------------------------------------------------------------------------------- tokenizing
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how `tokenizer` turns text into ids."""
    backend = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise TypeError(
            f"tokenizer: cannot fingerprint a {type(tokenizer).__name__}; pass a deepseek_core.Tokenizer "
            "(or a transformers fast tokenizer)"
        )
    special = [
        getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "add_bos_token", "add_eos_token")
    ]
    payload = backend.to_str() + json.dumps([str(s) for s in special])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def file_fingerprint(path: Path) -> str:
    """sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$DEEPSEEK_CACHE_DIR, else $XDG_CACHE_HOME/deepseek, else ~/.cache/deepseek."""
    env = os.environ.get("DEEPSEEK_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepseek"


def _special_id(tokenizer: Any, which: str) -> int | None:
    value = getattr(tokenizer, f"{which}_token_id", None)
    return int(value) if value is not None else None


def tokenize_documents(docs: list[str], tokenizer: Any, separate_documents: bool = True) -> np.ndarray:
    """One token stream: each document as [bos] + ids + [eos] (those the tokenizer has), concatenated.

    With `separate_documents=False` (pieces of one .txt file) the pieces are joined without markers and
    one bos/eos pair wraps the whole stream.
    """
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    encoded = tokenizer.encode_batch(docs, add_special_tokens=False)
    parts: list[list[int]] = []
    if not separate_documents and bos is not None:
        parts.append([bos])
    for ids in encoded:
        if separate_documents and bos is not None:
            parts.append([bos])
        parts.append(list(ids))
        if separate_documents and eos is not None:
            parts.append([eos])
    if not separate_documents and eos is not None:
        parts.append([eos])
    total = sum(len(p) for p in parts)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    dtype = np.uint16 if 0 < vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for p in parts:
        stream[pos : pos + len(p)] = p
        pos += len(p)
    return stream


def tokenize_file(
    path: str | os.PathLike[str],
    tokenizer: Any,
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """The file's token stream, tokenized at most once per (file content, tokenizer) and cached as .npy."""
    path = check_data_file(path)
    key_src = json.dumps(
        [
            _CACHE_FORMAT,
            file_fingerprint(path),
            tokenizer_fingerprint(tokenizer),
            path.suffix.lower(),
            text_field,
        ]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenized"
    entry = cache / f"{path.stem[:40]}-{key}.npy"
    if entry.is_file():
        try:
            return np.load(entry, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    docs = read_documents(path, text_field)
    stream = tokenize_documents(docs, tokenizer, separate_documents=path.suffix.lower() != ".txt")
    buffer = io.BytesIO()
    np.save(buffer, stream, allow_pickle=False)
    atomic_write_bytes(entry, buffer.getvalue())
    return stream


# ---------------------------------------------------------------------------------------------- packing
class PackedTokens(Dataset):
    """Fixed-length training windows over a token stream, in the layout of packed shards.

    Window i covers stream tokens [i*seq_len, i*seq_len + seq_len + 1): input_ids are its first seq_len
    tokens, labels its last seq_len (consecutive windows share one token, so every token is a label once).
    Items are {"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}, as PackedShardDataset's.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, source: str = "") -> None:
        if stream.dim() != 1:
            raise ValueError(f"stream: expected a 1-D token tensor, got shape {list(stream.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        self.stream = stream
        self.seq_len = seq_len
        self.source = source
        self.num_windows = max(0, (len(stream) - 1) // seq_len)
        # [num_windows, seq_len + 1] view (no copy) with overlapping rows.
        self._windows = stream[: self.num_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_windows <= index < self.num_windows:
            raise IndexError(f"index {index} out of range for {self.num_windows} windows")
        window = self._windows[index].long()
        return {"input_ids": window[:-1], "labels": window[1:]}

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each LongTensor [len(indices), seq_len], in one gather."""
        windows = self._windows.index_select(0, indices).long()
        return windows[:, :-1], windows[:, 1:]

    @property
    def num_tokens(self) -> int:
        """Tokens in the stream."""
        return int(self.stream.numel())

    def max_token_id(self) -> int:
        """The largest id in the stream (to check it against a model's vocabulary)."""
        return int(self.stream.max()) if self.stream.numel() else -1


@dataclass
class SplitDataset:
    """A file's packed windows split into a train part and an eval part (held out from the end)."""

    train: PackedTokens
    eval: PackedTokens | None
    num_tokens: int


def load_text_dataset(
    path: str | os.PathLike[str],
    tokenizer: Any,
    seq_len: int,
    eval_fraction: float = 0.05,
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> SplitDataset:
    """Tokenize `path` (or load it from the cache), pack it into seq_len windows and hold out the last
    `eval_fraction` of them for evaluation.

    Raises DataError when the file cannot give one training window (and one eval window when
    eval_fraction > 0).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len: must be >= 2, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: must be in [0, 1), got {eval_fraction}")
    stream_np = tokenize_file(path, tokenizer, text_field=text_field, cache_dir=cache_dir)
    windows = max(0, (len(stream_np) - 1) // seq_len)
    needed = 2 if eval_fraction > 0 else 1
    if windows < needed:
        what = "one sequence" if needed == 1 else "two sequences (one to train on, one to evaluate)"
        raise DataError(
            f"{path}: too short: {len(stream_np)} tokens, fewer than {what} of seq_len={seq_len} tokens "
            f"(+1 label token); use more text or a smaller seq_len"
        )
    stream = torch.from_numpy(stream_np.astype(np.int32))
    n_eval = min(math.ceil(windows * eval_fraction), windows - 1) if eval_fraction > 0 else 0
    n_train = windows - n_eval
    train = PackedTokens(stream[: n_train * seq_len + 1], seq_len, str(path))
    evals = PackedTokens(stream[n_train * seq_len :], seq_len, str(path)) if n_eval else None
    return SplitDataset(train=train, eval=evals, num_tokens=len(stream_np))
