"""Reading documents out of a piece of a source file, with the line (or row) of every error.

What is encoded (the tokenization contract, also what a single-process reference loop does):
  .txt      every line, with its line ending, is encoded on its own; the file is one document.
  .jsonl    every non-blank line is a JSON object whose `text_field` string is one document.
  .parquet  every row's `text_field` value is one document.
Each unit is yielded as (text, end_of_document); the tokenizer appends EOS after a document's end when
asked. Bad records (invalid UTF-8, bad JSON, missing or non-string field, null) go to `report`, which
either raises or records them; reading then continues with the next record.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
from collections.abc import Callable, Iterator
from typing import IO, Any

from .errors import DataError
from .plan import Piece
from .sources import SourceFile, filesystem

Unit = tuple[str, bool]
Report = Callable[[DataError], None]
BLOCK = 1 << 20
_BOM = "\ufeff"


class HashingReader(io.RawIOBase):
    """A read-only stream that feeds everything read through sha256 and counts the bytes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.nbytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and hash) whatever is left."""
        while self.read(BLOCK):
            pass


def iter_lines(stream: Any, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line including its b"\\n") for each line of a binary stream positioned at `offset`."""
    pending = bytearray()
    pos = offset
    while True:
        block = stream.read(BLOCK)
        if not block:
            if pending:
                yield pos, bytes(pending)
            return
        begin = 0
        while True:
            nl = block.find(b"\n", begin)
            if nl < 0:
                pending += block[begin:]
                break
            if pending:
                pending += block[begin : nl + 1]
                line = bytes(pending)
                pending.clear()
            else:
                line = block[begin : nl + 1]
            yield pos, line
            pos += len(line)
            begin = nl + 1


def count_newlines(src: SourceFile, end: int, storage_options: dict[str, Any] | None) -> int:
    """Newlines in bytes [0, end) of a source: the line number base of a piece that starts at `end`."""
    fs, path = filesystem(src.url, storage_options)
    count, pos = 0, 0
    with fs.open(path, "rb") as handle:
        while pos < end:
            block = handle.read(min(BLOCK, end - pos))
            if not block:
                break
            count += block.count(b"\n")
            pos += len(block)
    return count


def _decompressor(stream: Any, compression: str | None) -> Any:
    if compression is None:
        return stream
    if compression == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(stream, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(stream, mode="rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise RuntimeError("reading .zst files needs the 'zstandard' package") from None
        return zstandard.ZstdDecompressor().stream_reader(stream)
    raise ValueError(f"unknown compression {compression!r}")


class PieceReader:
    """Yields the units of one piece; after a whole-file piece, `sha256` and `nbytes` describe the file."""

    def __init__(
        self, src: SourceFile, piece: Piece, text_field: str, report: Report, storage_options: dict[str, Any]
    ) -> None:
        self.src, self.piece, self.text_field, self.report = src, piece, text_field, report
        self.storage_options = storage_options
        self.sha256: str | None = None
        self.nbytes: int | None = None

    def __iter__(self) -> Iterator[Unit]:
        try:
            if self.src.format == "parquet":
                yield from self._parquet()
            else:
                yield from self._lines()
        except DataError:
            raise
        except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:  # unreadable or corrupt file
            self.report(DataError(self.src.url, f"cannot read file ({type(exc).__name__}: {exc})"))

    # ------------------------------------------------------------------ txt / jsonl
    def _lines(self) -> Iterator[Unit]:
        src, piece = self.src, self.piece
        fs, path = filesystem(src.url, self.storage_options)
        with fs.open(path, "rb") as raw:
            hashing = HashingReader(raw) if piece.whole else None
            stream = _decompressor(hashing or raw, src.compression)
            if piece.start > 0:
                raw.seek(piece.start - 1)
                lines = iter_lines(stream, piece.start - 1)
                next(lines, None)  # the rest of the line holding byte start-1 belongs to the previous piece
            else:
                lines = iter_lines(stream, 0)
            line_base: int | None = 0 if piece.start == 0 else None
            first_offset: int | None = None
            parse = self._txt_unit if src.format == "txt" else self._jsonl_unit
            for rel, (offset, line) in enumerate(lines):
                if not piece.whole and offset >= piece.end:
                    break
                if first_offset is None:
                    first_offset = offset
                if offset == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                try:
                    unit = parse(line)
                except _BadRecord as bad:
                    if line_base is None:  # counted only when an error needs an absolute line number
                        line_base = count_newlines(src, first_offset, self.storage_options)
                    self.report(DataError(src.url, str(bad), line=line_base + rel + 1))
                    continue
                if unit is not None:
                    yield unit
            if hashing is not None:
                hashing.drain()
                self.sha256, self.nbytes = hashing.sha256.hexdigest(), hashing.nbytes
                if src.compression is None and hashing.nbytes != src.size:
                    raise DataError(
                        src.url, f"file changed while reading ({src.size} -> {hashing.nbytes} bytes)"
                    )
        if src.format == "txt" and piece.last:
            yield "", True

    @staticmethod
    def _decode(data: bytes, what: str = "line") -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadRecord(f"invalid UTF-8 at byte {exc.start} of the {what}") from None

    def _txt_unit(self, line: bytes) -> Unit | None:
        return self._decode(line), False

    def _jsonl_unit(self, line: bytes) -> Unit | None:
        text = self._decode(line)
        if not text.strip():
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
        if self.text_field not in record:
            raise _BadRecord(f"no field {self.text_field!r}")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise _BadRecord(f"field {self.text_field!r} is {type(value).__name__}, expected a string")
        return value, True

    # ------------------------------------------------------------------ parquet
    def _parquet(self) -> Iterator[Unit]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        src, piece = self.src, self.piece
        fs, path = filesystem(src.url, self.storage_options)
        with fs.open(path, "rb") as raw:
            if piece.whole:  # small file: read it once, hashing it, and parse from memory
                hashing = HashingReader(raw)
                data = hashing.read()
                self.sha256, self.nbytes = hashing.sha256.hexdigest(), hashing.nbytes
                handle: Any = pa.BufferReader(data)
            else:
                handle = raw
            try:
                parquet = pq.ParquetFile(handle)
            except Exception as exc:
                raise OSError(f"not a parquet file: {exc}") from None
            schema = parquet.schema_arrow
            if self.text_field not in schema.names:
                self.report(DataError(src.url, f"no column {self.text_field!r} (columns: {schema.names})"))
                return
            column_type = schema.field(self.text_field).type
            is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
            is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            if not (is_binary or is_text or pa.types.is_null(column_type)):  # null: all rows null (or none)
                self.report(
                    DataError(src.url, f"column {self.text_field!r} is {column_type}, expected string")
                )
                return
            meta = parquet.metadata
            groups = (
                list(range(piece.start, piece.end)) if not piece.whole else list(range(meta.num_row_groups))
            )
            row = sum(meta.row_group(i).num_rows for i in range(groups[0] if groups else 0)) + 1
            if not groups:
                return
            for batch in parquet.iter_batches(batch_size=4096, row_groups=groups, columns=[self.text_field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        self.report(DataError(src.url, f"null {self.text_field!r}", row=row))
                    elif is_binary:
                        try:
                            text = self._decode(value, "value")
                        except _BadRecord as bad:
                            self.report(DataError(src.url, str(bad), row=row))
                        else:
                            yield text, True
                    else:
                        yield value, True
                    row += 1


class _BadRecord(Exception):
    """A record-level problem; the caller adds the path and line."""


def hash_file(src: SourceFile, storage_options: dict[str, Any] | None) -> tuple[str, int]:
    """(sha256 hex, size) of a source file's raw bytes, streamed."""
    fs, path = filesystem(src.url, storage_options)
    with fs.open(path, "rb") as raw:
        hashing = HashingReader(raw)
        hashing.drain()
    return hashing.sha256.hexdigest(), hashing.nbytes
