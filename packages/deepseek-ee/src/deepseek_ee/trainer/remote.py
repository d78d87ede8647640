"""Lightning checkpoints on object storage: each one saved locally (atomically), then published to the URL.

Layout under an s3:// / gs:// output_dir ``U`` (local staging: deepseek_core.training.output)::

    U/checkpoints/step-000004/checkpoint.ckpt + checksums.sha256.json   one per saved step, manifest last
    U/final/...                                                          the Hugging Face-format export
    U/loss_curve.png, U/training_config.json, U/train.log

A checkpoint prefix is complete once its manifest exists (deepseek_core.storage writes it last), so a reader
never resumes from a half-uploaded one. Global rank 0 publishes (Lightning calls CheckpointIO.save_checkpoint on
rank 0 only); every process fetches the checkpoint it resumes from into its own object cache, verified by
sha256, so nodes need no shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_core import storage
from deepseek_core.errors import CheckpointError
from deepseek_core.training.output import OutputLocation
from lightning.fabric.plugins import TorchCheckpointIO

REMOTE_CHECKPOINTS = "checkpoints"
REMOTE_CHECKPOINT_FILE = "checkpoint.ckpt"
_STAGE_PREFIX = ".publish-"


def remote_checkpoint_name(step: int) -> str:
    """Name of the published prefix of the Lightning checkpoint taken at global step `step`."""
    return f"step-{step:06d}"


class PublishingCheckpointIO(TorchCheckpointIO):
    """Writes each Lightning checkpoint to a temporary file renamed into place (a reader never sees half of it)
    and, for an object-store output, publishes it to ``<url>/checkpoints/step-NNNNNN/`` (manifest last), then
    prunes the remote ones to the newest `keep_last` (0 keeps all).

    Lightning calls save_checkpoint on global rank 0 only; `on_publish(step, url)` is told each publication.
    """

    def __init__(
        self, output: OutputLocation, keep_last: int = 0, on_publish: Callable[[int, str], None] | None = None
    ) -> None:
        super().__init__()
        self.output = output
        self.keep_last = keep_last
        self.on_publish = on_publish

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Save `checkpoint` to `path` atomically, then publish it when the output is a URL."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if self.output.is_remote:
            step = int(checkpoint.get("global_step", 0))
            url = self.publish(target, step)
            if self.on_publish is not None:
                self.on_publish(step, url)

    def publish(self, local_file: Path, step: int) -> str:
        """Upload one local Lightning checkpoint file as ``<url>/checkpoints/step-NNNNNN/checkpoint.ckpt``."""
        name = remote_checkpoint_name(step)
        stage = local_file.parent / f"{_STAGE_PREFIX}{name}-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            try:  # a hard link: no second copy of a checkpoint that may be gigabytes
                os.link(local_file, stage / REMOTE_CHECKPOINT_FILE)
            except OSError:
                shutil.copyfile(local_file, stage / REMOTE_CHECKPOINT_FILE)
            url = self.output.publish_directory(stage, f"{REMOTE_CHECKPOINTS}/{name}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        assert url is not None  # only called for a remote output
        if self.keep_last > 0:
            self.output.prune_published(REMOTE_CHECKPOINTS, self.keep_last)
        return url


def latest_published_checkpoint(output: OutputLocation) -> str | None:
    """URL of the newest complete Lightning checkpoint under ``<url>/checkpoints``, or None."""
    if output.url is None:
        return None
    return storage.latest_complete_checkpoint(
        storage.url_join(output.url, REMOTE_CHECKPOINTS), output.storage_options
    )


def fetch_lightning_checkpoint(output: OutputLocation, url: str) -> Path:
    """Download a published Lightning checkpoint (its prefix, or the .ckpt URL inside it) into the object
    cache, every file checked against the manifest; returns the local .ckpt file."""
    prefix = url.rstrip("/")
    if prefix.endswith(".ckpt"):
        prefix = prefix.rsplit("/", 1)[0]
    directory = output.fetch_directory(prefix)
    found = sorted(directory.glob("*.ckpt"))
    if len(found) != 1:
        raise CheckpointError(
            f"{prefix}: not a published Lightning checkpoint (expected one .ckpt file, found {len(found)})"
        )
    return found[0]


def remove_stale_stages(checkpoint_dir: Path) -> None:
    """Remove publish stages and temp files left by a process killed mid-save or mid-upload."""
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if entry.name.startswith(_STAGE_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
