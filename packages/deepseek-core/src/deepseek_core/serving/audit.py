"""Audit log: one JSON line per API request, without prompt or completion text unless asked for.

Each line holds the time, the request id, the key id (a hash prefix of the API key, never the key), the
endpoint, the model, token counts, the HTTP status, the outcome and the latency. Lines are appended under a
lock and flushed at once, so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO


@dataclass
class AuditRecord:
    """What one request contributes to its audit line; filled in by the handler as it learns things."""

    request_id: str | None = None
    key_id: str | None = None
    endpoint: str = ""
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    n: int | None = None
    stream: bool | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    client_disconnected: bool = False
    prompt_text: Any = None
    completion_text: list[str] | None = None
    tenant: str | None = None  # set by multi-tenant gateways (deepseek-cne); written only when set


class AuditLog:
    """Appends audit lines to a file (created with its parent directories)."""

    def __init__(self, path: str | os.PathLike[str], include_text: bool = False) -> None:
        self.path = Path(path)
        self.include_text = include_text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the app's life

    def write(self, record: AuditRecord, status: int, latency_s: float, started: float | None = None) -> None:
        """Append one line for a finished request."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(started or time.time(), tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "request_id": record.request_id,
            "key_id": record.key_id,
            "endpoint": record.endpoint,
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
            "status": status,
            "outcome": _outcome(record, status),
            "latency_s": round(latency_s, 6),
        }
        if record.n is not None:
            line["n"] = record.n
        if record.stream is not None:
            line["stream"] = record.stream
        if record.finish_reasons:
            line["finish_reasons"] = record.finish_reasons
        if record.error:
            line["error"] = record.error
        if record.tenant is not None:
            line["tenant"] = record.tenant
        if self.include_text:
            line["prompt"] = record.prompt_text
            line["completion"] = record.completion_text
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(text)
            self._file.flush()

    def close(self) -> None:
        """Close the file; later writes are dropped."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _outcome(record: AuditRecord, status: int) -> str:
    if record.client_disconnected:
        return "client_disconnected"
    if status >= 400 or record.error:
        return "error"
    return "ok"
