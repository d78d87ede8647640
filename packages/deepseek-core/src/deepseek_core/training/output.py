"""Where a training run writes: a local directory, or an object-store URL (s3://, gs://) behind a local stage.

Shared by CE's Trainer and EE's DistributedTrainer. With a URL the trainer works in a local staging directory
keyed by the URL (``$DEEPSEEK_CACHE/runs/<scheme>/<bucket>/<path>``, by default under ``~/.cache/deepseek``):
each complete checkpoint is written there atomically as for a local run, then published under the URL as a
prefix whose sha256 manifest is written last (deepseek_core.storage), so a half-uploaded checkpoint is never
taken for a complete one; finished files (loss curve, log, config) are copied to ``<url>/<name>``. A resume
takes the newest complete checkpoint under the URL, fetches and verifies it into the object cache, and
continues exactly as from a local one.

CE publishes its own checkpoint directories (``<url>/checkpoint-NNNNNN/``, see ``publish``); EE publishes
Lightning checkpoints and its final export with ``publish_directory``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import CheckpointError
from ..fileio import atomic_write_bytes
from .checkpoints import (
    fetch_remote_checkpoint,
    latest_remote_checkpoint,
    prune_remote_checkpoints,
    publish_checkpoint,
)

__all__ = ["OutputLocation", "list_published", "resolve_output_dir", "staging_root"]

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def staging_root() -> Path:
    """Parent of the local staging directories of URL outputs: ``$DEEPSEEK_CACHE/runs``."""
    return storage.cache_root().parent / "runs"


def list_published(prefix_url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """(number, url) of every complete published directory (one with a manifest) right under `prefix_url`,
    oldest first: ordered by the last integer in the name (``step-000200``), then the manifest's time."""
    found: list[tuple[int, float, str]] = []
    for child in storage.list_prefixes(prefix_url, storage_options):
        try:
            manifest = storage.read_manifest(child, storage_options)
        except (CheckpointError, ValueError):
            continue  # unreadable manifest: treated as incomplete, as every reader does
        if manifest is None:
            continue
        numbers = re.findall(r"\d+", child.rstrip("/").rsplit("/", 1)[-1])
        found.append((int(numbers[-1]) if numbers else -1, float(manifest.get("created", 0.0)), child))
    return [(number, url) for number, _, url in sorted(found)]


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

    def check_access(self, name: str = "output_dir") -> None:
        """Fail early, naming parameter `name`, when the URL cannot be used: its filesystem package is missing
        (gs:// without gcsfs) or its bucket does not exist or is not reachable with these credentials."""
        if self.url is None:
            return
        try:
            fs, path = storage._filesystem(self.url, self.storage_options)
        except ImportError as exc:
            raise ImportError(f"{name}={self.url!r}: {exc}") from None
        bucket = path.lstrip("/").split("/", 1)[0]
        try:
            fs.invalidate_cache()
            exists = bool(fs.exists(bucket))
        except Exception as exc:  # credentials, endpoint, network: all mean the URL is unusable
            raise ValueError(
                f"{name}={self.url!r}: cannot reach bucket {bucket!r} ({type(exc).__name__}: {exc})"
            ) from None
        if not exists:
            raise ValueError(
                f"{name}={self.url!r}: bucket {bucket!r} does not exist or is not accessible with the "
                "configured credentials and endpoint"
            )

    def publish(self, checkpoint_dir: Path, keep_last: int = 0) -> str | None:
        """Upload a complete local training checkpoint (deepseek_core.training.checkpoints layout) to the URL
        (manifest last), then prune old remote ones to `keep_last` (0 keeps all); its URL, or None if local."""
        if self.url is None:
            return None
        url = publish_checkpoint(checkpoint_dir, self.url, self.storage_options)
        if keep_last > 0:
            prune_remote_checkpoints(self.url, keep_last, self.storage_options)
        return url

    def publish_directory(self, local_dir: Path, name: str) -> str | None:
        """Upload any local directory to ``<url>/<name>`` (files first, manifest last, replacing what was
        there); returns that URL, or None for a local run."""
        if self.url is None:
            return None
        return storage.upload_directory(local_dir, storage.url_join(self.url, name), self.storage_options)

    def prune_published(self, prefix: str, keep_last: int) -> list[str]:
        """Delete all but the newest `keep_last` complete directories under ``<url>/<prefix>`` (0 keeps all).

        Each one's manifest goes first, so an interrupted deletion leaves an incomplete prefix that every
        reader skips, never a damaged one that looks complete. Returns the URLs removed.
        """
        if self.url is None or keep_last < 1:
            return []
        found = list_published(storage.url_join(self.url, prefix), self.storage_options)
        removed = []
        for _, url in found[: max(0, len(found) - keep_last)]:
            fs, path = storage._filesystem(url, self.storage_options)
            fs.rm_file(f"{path}/{storage.MANIFEST_NAME}")
            fs.rm(path, recursive=True)
            fs.invalidate_cache(path)
            removed.append(url)
        return removed

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
        """(local copy, URL) of the newest complete remote training checkpoint (``checkpoint-NNNNNN``),
        fetched and verified; None when the URL holds none (or for a local run)."""
        if self.url is None:
            return None
        url = latest_remote_checkpoint(self.url, self.storage_options)
        if url is None:
            return None
        return fetch_remote_checkpoint(url, storage_options=self.storage_options), url

    def fetch(self, url: str) -> Path:
        """A published training checkpoint at `url`, downloaded and verified into the local cache."""
        return fetch_remote_checkpoint(url, storage_options=self.storage_options)

    def fetch_directory(self, url: str) -> Path:
        """Any published directory at `url` (manifest-complete), downloaded and sha256-verified into the cache."""
        return storage.fetch_checkpoint(url, storage_options=self.storage_options)


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
