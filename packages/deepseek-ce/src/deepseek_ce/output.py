"""Where a training run writes: a local directory today; the hook for object-store URLs later.

Object storage (s3://, gs://) is the Cloud-Native path: deepseek_core.storage uploads a finished local
checkpoint directory (manifest last) and finds the newest complete one for a resume. The CE Trainer will
train into a local scratch directory and publish each checkpoint through `OutputLocation.publish`; until
that is wired, a URL is refused here, before any training starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class OutputLocation:
    """The local directory a run writes to, and (later) the remote URL its checkpoints are published to."""

    local_dir: Path
    url: str | None = None

    def publish(self, checkpoint_dir: Path) -> None:
        """Copy a complete local checkpoint to the remote URL (no-op for a local run)."""
        if self.url is None:
            return
        raise NotImplementedError(f"output_dir={self.url}: publishing checkpoints to object storage")


def resolve_output_dir(output_dir: str | os.PathLike[str]) -> OutputLocation:
    """A local path as is; an object-store URL raises a clear error (not supported by CE's Trainer yet)."""
    text = os.fspath(output_dir)
    if not text:
        raise ValueError("output_dir: must be a directory path")
    if _URL.match(text):
        raise NotImplementedError(
            f"output_dir={text!r}: the CE Trainer writes checkpoints to a local directory; object-store "
            "URLs (s3://, gs://) are not supported yet. Train into a local directory, then upload a checkpoint "
            "with deepseek_core.storage.upload_directory(local_checkpoint, url)."
        )
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir: {path} exists and is not a directory")
    return OutputLocation(local_dir=path)
