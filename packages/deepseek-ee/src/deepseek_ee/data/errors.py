"""Errors of the data pipeline: each names the source file and the line (or parquet row) at fault."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad input data: a file that cannot be read, invalid UTF-8, a bad jsonl line or parquet row."""

    def __init__(self, path: str, message: str, line: int | None = None, row: int | None = None) -> None:
        self.path, self.message, self.line, self.row = path, message, line, row
        super().__init__(self.location + ": " + message)

    @property
    def location(self) -> str:
        """`path:line`, `path: row N` or just `path`."""
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path}: row {self.row}"
        return self.path

    def to_dict(self) -> dict[str, Any]:
        """The form listed under "skipped" in index.json."""
        item: dict[str, Any] = {"path": self.path}
        if self.line is not None:
            item["line"] = self.line
        if self.row is not None:
            item["row"] = self.row
        item["error"] = self.message
        return item

    @classmethod
    def from_dict(cls, item: dict[str, Any]) -> DataError:
        """Inverse of to_dict."""
        return cls(item["path"], item["error"], item.get("line"), item.get("row"))

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Dask) intact
        return (DataError, (self.path, self.message, self.line, self.row))
