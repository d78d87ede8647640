"""Where a training run writes: a local directory, or an object-store URL (s3://, gs://) behind a local stage.

With a URL the Trainer works in a local staging directory keyed by the URL
(``$DEEPSEEK_CACHE/runs/<scheme>/<bucket>/<path>``, by default under ``~/.cache/deepseek``): each complete
checkpoint is written there atomically as for a local run, then published to ``<url>/checkpoint-NNNNNN/``
(files first, sha256 manifest last, so a half-uploaded checkpoint is never taken for a complete one), and the
loss curve and log are copied to ``<url>/`` at the end. A resume takes the newest complete checkpoint under
the URL, fetches and verifies it into the object cache, and continues exactly as from a local one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_core import storage
from deepseek_core.fileio import atomic_write_bytes
from deepseek_core.training.checkpoints import (
    fetch_remote_checkpoint,
    latest_remote_checkpoint,
    prune_remote_checkpoints,
    publish_checkpoint,
)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def staging_root() -> Path:
    """Parent of the local staging directories of URL outputs: ``$DEEPSEEK_CACHE/runs``."""
    return storage.cache_root().parent / "runs"


@dataclass
class OutputLocation:
    """The local directory a run writes to and, for an object-store output, the URL it publishes to."""

    local_dir: Path
    url: str | None = None
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def is_remote(self) -> bool:
        """Whether checkpoints and outputs are published to object storage."""
        return self.url is not None

    def publish(self, checkpoint_dir: Path, keep_last: int = 0) -> str | None:
        """Upload a complete local checkpoint to the URL (manifest last), then prune old remote ones to
        `keep_last` (0 keeps all); returns its URL, or None for a local run."""
        if self.url is None:
            return None
        url = publish_checkpoint(checkpoint_dir, self.url, self.storage_options)
        if keep_last > 0:
            prune_remote_checkpoints(self.url, keep_last, self.storage_options)
        return url

    def publish_file(self, path: Path) -> str | None:
        """Copy one finished output file (loss curve, log) to ``<url>/<name>``; None for a local run."""
        if self.url is None:
            return None
        target = storage.url_join(self.url, path.name)
        data = path.read_bytes()
        # Written in one piece: the object appears only when the handle closes.
        with storage.open_url(target, "wb", self.storage_options) as handle:
            handle.write(data)
        return target

    def fetch_file(self, name: str, dest: Path) -> bool:
        """Download ``<url>/<name>`` to `dest` when it exists there and `dest` does not; True if copied."""
        if self.url is None or dest.exists():
            return False
        source = storage.url_join(self.url, name)
        if not storage.remote_exists(source, self.storage_options):
            return False
        with storage.open_url(source, "rb", self.storage_options) as handle:
            atomic_write_bytes(dest, handle.read())
        return True

    def latest_checkpoint(self) -> tuple[Path, str] | None:
        """(local copy, URL) of the newest complete remote checkpoint, fetched and verified; None when the
        URL holds none (or for a local run)."""
        if self.url is None:
            return None
        url = latest_remote_checkpoint(self.url, self.storage_options)
        if url is None:
            return None
        return fetch_remote_checkpoint(url, storage_options=self.storage_options), url

    def fetch(self, url: str) -> Path:
        """A published checkpoint at `url`, downloaded and verified into the local cache."""
        return fetch_remote_checkpoint(url, storage_options=self.storage_options)


def resolve_output_dir(
    output_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> OutputLocation:
    """A local path as is; an object-store URL gets a local staging directory keyed by the URL."""
    text = os.fspath(output_dir)
    if not text:
        raise ValueError("output_dir: must be a directory path or an s3:// / gs:// URL")
    if storage.is_remote(text):
        url = text.rstrip("/")
        try:
            local = storage.cache_path(url, staging_root())
        except ValueError as exc:
            raise ValueError(f"output_dir: {exc}") from None
        return OutputLocation(local_dir=local, url=url, storage_options=storage_options)
    if _URL.match(text) and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"output_dir={text!r}: unsupported URL scheme {scheme!r} (use s3://, gs:// or a local path)"
        )
    path = Path(text.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir: {path} exists and is not a directory")
    return OutputLocation(local_dir=path)
