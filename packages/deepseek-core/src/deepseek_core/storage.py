"""Object storage: checkpoints on ``s3://`` and ``gs://`` (or a local path), verified by sha256.

Needs the ``cloud`` extra for remote URLs (``pip install 'deepseek-core[cloud]'``: fsspec, s3fs, gcsfs);
local paths work without it.

Layout of a checkpoint stored at a URL ``U``::

    U/config.json, U/model-00001-of-00002.safetensors, ...   every file of the local directory
    U/checksums.sha256.json                                   the manifest, written LAST

The manifest maps each relative path to its sha256 and size. A prefix holding the manifest is a complete
checkpoint; a prefix without it is an upload still running or one that died half-way, and every reader here
(``fetch_checkpoint``, ``latest_complete_checkpoint``) refuses or skips it. Re-uploading to the same URL first
deletes the old manifest, so a reader never sees a mix of two versions described as complete.

``fetch_checkpoint`` copies a checkpoint into a local cache (``$DEEPSEEK_CACHE/objects``, by default
``~/.cache/deepseek/objects``) and checks every cached file against the manifest on each call: a file whose
hash does not match (a corrupted disk, an interrupted copy, an older version) is fetched again, and a
downloaded file whose hash does not match the manifest is refused with an error naming it.

Endpoints: an S3-compatible server (MinIO, moto, Ceph) is reached through the ``endpoint_url`` storage option
or the ``DEEPSEEK_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` environment variables (in
that order); credentials come from the usual AWS variables or profile. For GCS, gcsfs reads
``GOOGLE_APPLICATION_CREDENTIALS`` and, for an emulator, ``STORAGE_EMULATOR_HOST``.

How trainers (CE ``Trainer``, EE ``DistributedTrainer``) write checkpoints straight to object storage and
resume from it, with ``output_url`` local or remote alike::

    from deepseek_core import storage
    from deepseek_core.fileio import atomic_directory

    # save: write the checkpoint locally (atomically), then publish it; the manifest goes last
    with atomic_directory(scratch / f"step-{step:08d}") as tmp:
        save_model(model, tmp)               # plus optimizer / scheduler / RNG state files
    storage.upload_directory(scratch / f"step-{step:08d}", storage.url_join(output_url, f"step-{step:08d}"))

    # resume: the newest COMPLETE checkpoint (a half-uploaded one is skipped), fetched and verified
    latest = storage.latest_complete_checkpoint(output_url)   # None -> start from scratch
    if latest is not None:
        directory = storage.fetch_checkpoint(latest)          # a local Path; load state from it

``latest_complete_checkpoint`` orders checkpoints by the last integer in their name (``step-00000200``,
``checkpoint-200``, ``epoch=1-step=500``), then by the manifest's creation time. ``load_model("s3://...")``
and ``ModelConfig.from_pretrained("gs://...")`` go through ``fetch_checkpoint`` (see ``hub.resolve_model_dir``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from .errors import CheckpointError, ModelNotFoundError
from .fileio import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "checksums.sha256.json"
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs")
_CHUNK = 8 * 1024 * 1024
_MANIFEST_FORMAT = "deepseek-checksums"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_S3_ENDPOINT_VARS = ("DEEPSEEK_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


# ---------------------------------------------------------------------------------------------- URLs
def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for an object-store URL (``s3://``, ``s3a://``, ``gs://``, ``gcs://``); False for a local path."""
    if not isinstance(url, str) or "://" not in url:
        return False
    return urlsplit(url).scheme.lower() in REMOTE_SCHEMES


def url_join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URL or local path with '/' (no duplicate or trailing slashes)."""
    out = str(base).rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def _filesystem(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    import fsspec

    url = str(url)
    options = dict(storage_options or {})
    if not is_remote(url):
        if "://" in url and not url.startswith("file://"):
            scheme = url.split("://", 1)[0]
            raise ValueError(f"{url}: unsupported URL scheme {scheme!r} (use s3://, gs:// or a local path)")
        return fsspec.filesystem("file"), str(Path(url.removeprefix("file://")).expanduser().absolute())
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("s3", "s3a") and "endpoint_url" not in options:
        endpoint = next((os.environ[v] for v in _S3_ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ImportError(
            f"{url}: {scheme}:// needs the cloud extra: pip install 'deepseek-core[cloud]' ({exc})"
        ) from None
    return fs, str(path).rstrip("/")


def _to_url(fs: Any, path: str, like: str) -> str:
    """Turn a filesystem path back into a URL with the scheme of `like`."""
    if not is_remote(like):
        return path
    scheme = urlsplit(like).scheme
    return f"{scheme}://{path.lstrip('/')}"


# ---------------------------------------------------------------------------------------------- basics
def open_url(
    url: str | os.PathLike[str], mode: str = "rb", storage_options: Mapping[str, Any] | None = None
) -> IO[Any]:
    """Open a file on object storage or on the local disk (parent directories are created for writing).

    A remote object written this way appears only when the file is closed (object stores publish whole
    objects), so readers never see half of it.
    """
    if not is_remote(url):
        local = Path(str(url).removeprefix("file://")).expanduser()
        if any(flag in mode for flag in "wax"):
            local.parent.mkdir(parents=True, exist_ok=True)
        return open(local, mode)  # noqa: SIM115 - the caller closes it
    fs, path = _filesystem(url, storage_options)
    return fs.open(path, mode)  # type: ignore[no-any-return]


def remote_exists(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether an object or a prefix holding objects exists at `url` (local paths work too)."""
    fs, path = _filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def list_prefixes(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The immediate sub-prefixes ("directories") under `url`, as full URLs, sorted; [] when none exist."""
    fs, path = _filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        if entry.get("type") == "directory":
            child = str(entry["name"]).rstrip("/")
            if child.rstrip("/") != path:
                out.append(_to_url(fs, child, str(url)))
    return sorted(out)


# ---------------------------------------------------------------------------------------------- manifest
def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of every regular file under `local_dir` (the manifest itself excluded)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    files: dict[str, dict[str, Any]] = {}
    for item in sorted(root.rglob("*")):
        if not item.is_file():
            continue
        rel = item.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"sha256": file_sha256(item), "size": item.stat().st_size}
    return {
        "format": _MANIFEST_FORMAT,
        "version": 1,
        "algorithm": "sha256",
        "created": time.time(),
        "files": files,
    }


def _parse_manifest(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """Check a manifest and return its `files` mapping; errors name the manifest and the entry."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if (
        not isinstance(data, dict)
        or data.get("algorithm") != "sha256"
        or not isinstance(data.get("files"), dict)
    ):
        raise CheckpointError(
            f"{where}: not a sha256 checksum manifest (needs 'algorithm': 'sha256' and 'files')"
        )
    files: dict[str, dict[str, Any]] = data["files"]
    for rel, entry in files.items():
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or rel == MANIFEST_NAME:
            raise CheckpointError(f"{where}: field 'files' has an unsafe path {rel!r}")
        if not isinstance(entry, dict) or not _SHA256.match(str(entry.get("sha256", ""))):
            raise CheckpointError(f"{where}: field 'files.{rel}.sha256' must be 64 lowercase hex digits")
        if not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise CheckpointError(f"{where}: field 'files.{rel}.size' must be a non-negative integer")
    return files


def read_manifest(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The parsed manifest of the checkpoint at `url`, or None when it has none (incomplete)."""
    fs, path = _filesystem(url, storage_options)
    manifest_path = f"{path}/{MANIFEST_NAME}"
    fs.invalidate_cache(path)
    try:
        raw = fs.cat_file(manifest_path)
    except FileNotFoundError:
        return None
    data = json.loads(raw)
    _parse_manifest(raw, url_join(url, MANIFEST_NAME))
    return data  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- upload
def upload_directory(
    local_dir: str | os.PathLike[str],
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    max_workers: int = 4,
) -> str:
    """Copy every file of `local_dir` to `url`, then write the manifest last; return the URL.

    An existing checkpoint at `url` is replaced: its manifest is deleted first (so it stops being complete),
    files the new one lacks are removed, the new files are written and their sizes checked, and only then is
    the new manifest written. `url` may also be a local path.
    """
    from tqdm.auto import tqdm

    root = Path(local_dir)
    manifest = build_manifest(root)
    files: dict[str, dict[str, Any]] = manifest["files"]
    if not files:
        raise CheckpointError(f"{root}: nothing to upload (the directory has no files)")
    fs, path = _filesystem(url, storage_options)
    fs.invalidate_cache(path)
    manifest_path = f"{path}/{MANIFEST_NAME}"
    if fs.exists(manifest_path):
        fs.rm_file(manifest_path)
    for stale in _existing_files(fs, path):
        if stale not in files:
            fs.rm_file(f"{path}/{stale}")
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)
    total = sum(entry["size"] for entry in files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {url}", disable=None) as bar:

        def put(rel: str) -> None:
            target = f"{path}/{rel}"
            if not is_remote(url):
                fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            fs.put_file(str(root / rel), target)
            bar.update(files[rel]["size"])

        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            list(pool.map(put, files))
    fs.invalidate_cache(path)
    for rel, entry in files.items():
        size = fs.info(f"{path}/{rel}")["size"]
        if size != entry["size"]:
            raise CheckpointError(f"{url_join(url, rel)}: uploaded {size} bytes, expected {entry['size']}")
    payload = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    if is_remote(url):
        fs.pipe_file(manifest_path, payload)
    else:
        atomic_write_bytes(manifest_path, payload)
    log.info("uploaded %d files (%d bytes) to %s", len(files), total, url)
    return str(url).rstrip("/")


def _existing_files(fs: Any, path: str) -> list[str]:
    """Relative paths of the objects already under `path` ([] when there are none)."""
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    prefix = path.rstrip("/") + "/"
    return [str(item)[len(prefix) :] for item in found if str(item).startswith(prefix)]


# ---------------------------------------------------------------------------------------------- fetch
def cache_root() -> Path:
    """Where fetched objects are cached: ``$DEEPSEEK_CACHE/objects`` or ``~/.cache/deepseek/objects``."""
    base = os.environ.get("DEEPSEEK_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "deepseek") / "objects"


def cache_path(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local cache directory that mirrors the remote prefix `url`."""
    parts = urlsplit(url)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    segments = [s for s in f"{parts.netloc}/{parts.path}".split("/") if s]
    if any(s in (".", "..") for s in segments) or not segments:
        raise ValueError(f"{url}: cannot be mapped into the cache (empty or '..' path segments)")
    return root.joinpath(parts.scheme.lower(), *segments)


def fetch_checkpoint(
    url: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    patterns: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_workers: int = 4,
) -> Path:
    """A local directory holding the checkpoint at `url`, downloaded into the cache and verified by sha256.

    Only files matching `patterns` (fnmatch on the relative path, e.g. ``["config.json"]``) are fetched when
    it is given. Cached files are re-hashed on every call; one that does not match the manifest is fetched
    again. A local path is returned as it is. Raises ModelNotFoundError when nothing exists at `url` and
    CheckpointError when it is incomplete (no manifest) or a downloaded file does not match the manifest.
    """
    from tqdm.auto import tqdm

    if not is_remote(url):
        local = Path(str(url)).expanduser()
        if not local.is_dir():
            raise ModelNotFoundError(f"{local}: checkpoint directory does not exist")
        return local
    url = str(url).rstrip("/")
    fs, path = _filesystem(url, storage_options)
    fs.invalidate_cache(path)
    manifest_url = url_join(url, MANIFEST_NAME)
    try:
        raw = fs.cat_file(f"{path}/{MANIFEST_NAME}")
    except FileNotFoundError:
        if not fs.exists(path):
            raise ModelNotFoundError(
                f"{url}: no checkpoint here (nothing exists under this prefix)"
            ) from None
        raise CheckpointError(
            f"{url}: incomplete checkpoint: {MANIFEST_NAME} is missing (an upload still running, or one that "
            "died before finishing); it is not used"
        ) from None
    files = _parse_manifest(raw, manifest_url)
    wanted = list(patterns) if patterns is not None else None
    selected = {
        rel: entry
        for rel, entry in files.items()
        if wanted is None or any(fnmatch.fnmatch(rel, p) for p in wanted)
    }
    if wanted is not None and not selected:
        raise CheckpointError(f"{url}: no file of the checkpoint matches {wanted}")
    dest = cache_path(url, cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        missing = {
            rel: entry
            for rel, entry in selected.items()
            if not _cached_ok(dest / rel, entry, url_join(url, rel))
        }
        total = sum(entry["size"] for entry in missing.values())
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"fetch {url}", disable=True if not missing else None
        ) as bar:

            def get(item: tuple[str, dict[str, Any]]) -> None:
                rel, entry = item
                _download(fs, f"{path}/{rel}", dest / rel, entry, url_join(url, rel), bar)

            with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
                list(pool.map(get, missing.items()))
        for item in dest.rglob("*"):  # files of an older version of this checkpoint
            rel = item.relative_to(dest).as_posix()
            if item.is_file() and rel not in files and rel != MANIFEST_NAME and not item.name.startswith("."):
                item.unlink()
        atomic_write_bytes(dest / MANIFEST_NAME, raw)
    return dest


def _cached_ok(local: Path, entry: dict[str, Any], url: str) -> bool:
    """Whether the cached copy exists and matches the manifest (size, then sha256)."""
    if not local.is_file():
        return False
    if local.stat().st_size != entry["size"] or file_sha256(local) != entry["sha256"]:
        log.warning(
            "%s: cached copy %s does not match its sha256 in the manifest; fetching it again", url, local
        )
        return False
    return True


def _download(
    fs: Any, remote: str, local: Path, entry: dict[str, Any], url: str, bar: Any, attempts: int = 2
) -> None:
    """Stream one object into a temporary file, hashing as it goes; rename it into place when it matches."""
    local.parent.mkdir(parents=True, exist_ok=True)
    got = ""
    for _ in range(attempts):
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            with fs.open(remote, "rb", block_size=_CHUNK) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise CheckpointError(f"{url}: listed in {MANIFEST_NAME} but missing from the store") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        got = digest.hexdigest()
        if got == entry["sha256"] and size == entry["size"]:
            os.replace(tmp, local)  # a model may still map the old file: its inode lives on
            return
        tmp.unlink()
        bar.update(-size)
    raise CheckpointError(
        f"{url}: downloaded content does not match {MANIFEST_NAME} (sha256 {got}, expected {entry['sha256']}): "
        "the stored object is corrupt or was changed after the manifest was written"
    )


@contextlib.contextmanager
def _lock(directory: Path) -> Any:
    """Serialize fetches of the same checkpoint across processes."""
    from filelock import FileLock

    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        yield


# ---------------------------------------------------------------------------------------------- resume
def latest_complete_checkpoint(
    url_prefix: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The newest complete checkpoint (one with a manifest) directly under `url_prefix`, or None.

    Newest means the highest last integer in the name (``step-00000200`` > ``step-00000100``), then the latest
    manifest creation time. Prefixes without a manifest (half-finished uploads) are skipped.
    """
    best: tuple[int, float, str] | None = None
    for child in list_prefixes(url_prefix, storage_options):
        try:
            manifest = read_manifest(child, storage_options)
        except (CheckpointError, ValueError) as exc:
            log.warning("%s: skipped, unreadable %s (%s)", child, MANIFEST_NAME, exc)
            continue
        if manifest is None:
            log.info("%s: skipped, no %s (incomplete)", child, MANIFEST_NAME)
            continue
        numbers = re.findall(r"\d+", child.rstrip("/").rsplit("/", 1)[-1])
        key = (int(numbers[-1]) if numbers else -1, float(manifest.get("created", 0.0)), child)
        if best is None or key > best:
            best = key
    return best[2] if best is not None else None


__all__ = [
    "MANIFEST_NAME",
    "build_manifest",
    "cache_path",
    "cache_root",
    "fetch_checkpoint",
    "file_sha256",
    "is_remote",
    "latest_complete_checkpoint",
    "list_prefixes",
    "open_url",
    "read_manifest",
    "remote_exists",
    "upload_directory",
    "url_join",
]
