"""Training checkpoints: model weights (Hugging Face format) plus the state an exact resume needs.

A checkpoint is `output_dir/checkpoint-000100/`: config.json, model.safetensors, tokenizer files (so
transformers loads it as is), trainer_state.pt (optimizer, scheduler, RNG, data position, step, history),
training_config.json, and last of all the completion marker CHECKPOINT_COMPLETE. The directory is built as
`.tmp-checkpoint-000100-<pid>` and renamed into place, so a run killed mid-save leaves only a temp dir,
which `latest_checkpoint` never picks (it needs the marker too, in case a copy tool drops atomicity).

Object storage (s3://, gs://): a trainer whose output is a URL saves each checkpoint locally as above, then
`publish_checkpoint` uploads it to `<url>/checkpoint-000100/` with the sha256 manifest written last, so a
half-uploaded checkpoint is never taken for a complete one. `latest_remote_checkpoint(url)` finds the newest
complete one and `fetch_remote_checkpoint` downloads and verifies it into the local cache, from where
`load_trainer_state` and `load_weights_into` resume exactly as from a local directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_model, save_model
from ..errors import CheckpointError

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
TRAINER_STATE_FILE = "trainer_state.pt"
TRAINING_CONFIG_FILE = "training_config.json"
_TEMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every COMPLETE checkpoint in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None; half-written ones are never returned."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    tokenizer: Any = None,
    training_config: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint-<step> atomically (temp dir, marker, rename); then keep only the newest `keep_last`."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TEMP_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_model(model, tmp, tokenizer=tokenizer)  # type: ignore[arg-type]  # itself atomic: tmp appears complete or not at all
        state_path = tmp / TRAINER_STATE_FILE
        with open(state_path, "wb") as handle:
            torch.save({**trainer_state, "step": step}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if training_config is not None:
            _write_synced(tmp / TRAINING_CONFIG_FILE, (json.dumps(training_config, indent=2) + "\n").encode())
        marker = {"step": step, "time": time.time()}
        _write_synced(tmp / COMPLETE_MARKER, (json.dumps(marker) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. the final save after a resume at that step): swap, then drop the old one.
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(output_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was removed."""
    found = list_checkpoints(output_dir)
    removed = []
    for _, path in found[: max(0, len(found) - keep_last)]:
        # Drop the marker first: if deletion is interrupted the remains are never taken for a checkpoint.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_temp_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temp checkpoint dirs left by runs killed mid-save (never complete checkpoints)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        if entry.is_dir() and (
            entry.name.startswith(_TEMP_PREFIX) or entry.name.startswith(".old-checkpoint-")
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def load_trainer_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The trainer_state dict of a complete checkpoint (CheckpointError if incomplete or unreadable)."""
    directory = Path(checkpoint_dir)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    path = directory / TRAINER_STATE_FILE
    try:
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing trainer state") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read trainer state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: trainer state has no 'step'")
    return state


def load_weights_into(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Copy a checkpoint's weights into an existing model in place (its optimizer keeps pointing at them)."""
    first = next(model.parameters())
    loaded = load_model(checkpoint_dir, dtype=first.dtype, device=first.device)
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states, in a form torch.load(weights_only=True) reads."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            *map(_plain, np_state[2:]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo capture_rng_state."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- object storage
def publish_checkpoint(
    checkpoint_dir: str | os.PathLike[str], output_url: str, storage_options: dict[str, Any] | None = None
) -> str:
    """Upload a complete local checkpoint to `output_url/<its name>` (manifest last); returns its URL."""
    from .. import storage

    directory = Path(checkpoint_dir)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{directory}: not a complete checkpoint (no {COMPLETE_MARKER}); nothing published"
        )
    return storage.upload_directory(directory, storage.url_join(output_url, directory.name), storage_options)


def list_remote_checkpoints(
    output_url: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint under `output_url`, oldest first.

    Complete means: the upload finished (its manifest exists) and the checkpoint it uploaded was complete
    (the manifest lists the CHECKPOINT_COMPLETE marker).
    """
    from .. import storage

    found = []
    for child in storage.list_prefixes(output_url, storage_options):
        match = _NAME.match(child.rstrip("/").rsplit("/", 1)[-1])
        if not match:
            continue
        try:
            manifest = storage.read_manifest(child, storage_options)
        except (CheckpointError, ValueError):
            continue  # unreadable manifest: treated as incomplete
        if manifest is not None and COMPLETE_MARKER in manifest.get("files", {}):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_remote_checkpoint(output_url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """URL of the complete checkpoint with the highest step under `output_url`, or None."""
    found = list_remote_checkpoints(output_url, storage_options)
    return found[-1][1] if found else None


def fetch_remote_checkpoint(
    url: str, cache_dir: str | os.PathLike[str] | None = None, storage_options: dict[str, Any] | None = None
) -> Path:
    """Download (or re-verify the cached copy of) a published checkpoint; returns the local directory."""
    from .. import storage

    directory = storage.fetch_checkpoint(url, cache_dir=cache_dir, storage_options=storage_options)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{url}: not a complete training checkpoint (no {COMPLETE_MARKER})")
    return directory


def prune_remote_checkpoints(
    output_url: str, keep_last: int, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints under `output_url`; returns their URLs.

    Each one's manifest goes first, so an interrupted deletion leaves an incomplete prefix (skipped by every
    reader), never a damaged checkpoint that looks complete.
    """
    from .. import storage

    if keep_last < 1:
        return []
    found = list_remote_checkpoints(output_url, storage_options)
    removed = []
    for _, url in found[: max(0, len(found) - keep_last)]:
        fs, path = storage._filesystem(url, storage_options)
        fs.rm_file(f"{path}/{storage.MANIFEST_NAME}")
        fs.rm(path, recursive=True)
        fs.invalidate_cache(path)
        removed.append(url)
    return removed
