"""prepare_dataset: plan tasks, run them on a Dask cluster with bounded in-flight work, write index.json.

Resuming: every finished task leaves a done-marker (.done/task-NNNNNN.json) naming its shards and a
fingerprint of its inputs and settings. A rerun skips tasks whose marker matches and whose shard files
are intact, so finished shards are never rewritten. index.json is rewritten atomically every few
seconds while running ("complete": false) and once at the end ("complete": true).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deepseek_core.fileio import atomic_directory, atomic_write_text
from deepseek_core.training.shards import DTYPES, INDEX_NAME, DatasetIndex, ShardInfo, dtype_for_vocab

from .errors import DataError
from .plan import Task, plan_tasks, task_bytes, task_fingerprint
from .sources import SourceFile, discover
from .worker import DONE_DIR, TaskSettings, marker_path, run_task

DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MiB of uint16
DEFAULT_CHUNK_BYTES = 64 << 20  # input bytes per task
TOKENIZER_SUBDIR = "tokenizer"
INDEX_INTERVAL_S = 5.0
# Dask's housekeeping timers cost ~2-3% of a core per process at their defaults (stack sampling every
# 10 ms, event-loop ticks every 20 ms, memory checks every 100 ms): CPU our own LocalCluster gives to
# tokenization instead. Memory limits are still enforced, checked once a second.
_LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}
MAX_PRINTED_ERRORS = 20


def prepare_dataset(
    inputs: str | Sequence[str],
    output_dir: str | os.PathLike[str],
    tokenizer: Any,
    scheduler: str | None = None,
    n_workers: int = 2,
    *,
    client: Any = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,  # at most this much input per task (see plan.task_bytes)
    dtype: str | None = None,
    text_field: str = "text",
    on_error: str = "fail",
    append_eos: bool = False,
    max_in_flight: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> DatasetIndex:
    """Tokenize `inputs` (paths, globs, directories or fsspec URLs of .txt/.jsonl/.parquet files) into
    packed token shards in `output_dir`; returns the written index.

    tokenizer: a directory with tokenizer.json (or a deepseek_core.Tokenizer); a copy is stored in
    output_dir/tokenizer, which is what the workers load. Work runs on `client`, else on the scheduler at
    `scheduler` (tcp://host:8786), else on a LocalCluster of `n_workers` processes. on_error: "fail" raises
    DataError at the first bad record; "skip" drops bad records, lists them in index.json and prints a
    summary. A rerun on the same output_dir resumes.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if chunk_bytes < 1024:
        raise ValueError(f"chunk_bytes must be >= 1024, got {chunk_bytes}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    storage_options = dict(storage_options or {})
    log = _Log(progress)
    sources = discover([inputs] if isinstance(inputs, str) else list(inputs), storage_options)
    out = Path(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)

    with _exclusive(out):
        tok_meta, tok_dir = _store_tokenizer(tokenizer, out)
        chosen = dtype or dtype_for_vocab(tok_meta["vocab_size"])
        if tok_meta["vocab_size"] > 1 << (8 * DTYPES[chosen]().itemsize):
            raise ValueError(f"dtype {chosen} cannot hold a vocabulary of {tok_meta['vocab_size']} tokens")
        if append_eos and tok_meta["eos_token_id"] is None:
            raise ValueError(f"append_eos: tokenizer in {tokenizer} has no eos_token (tokenizer_config.json)")
        settings = TaskSettings(
            output_dir=str(out),
            tokenizer_dir=str(tok_dir),
            tokenizer_sha256=tok_meta["sha256"],
            dtype=chosen,
            shard_tokens=shard_tokens,
            text_field=text_field,
            append_eos=append_eos,
            eos_token_id=tok_meta["eos_token_id"],
            on_error=on_error,
            storage_options=storage_options,
        )
        chunk_bytes = task_bytes(sum(s.size for s in sources), chunk_bytes)
        tasks = plan_tasks(sources, chunk_bytes, storage_options)
        fingerprints = [task_fingerprint(t, sources, settings.fingerprint()) for t in tasks]
        done = _load_markers(out, tasks, fingerprints, DTYPES[chosen]().itemsize)
        if on_error == "fail":
            for summary in done.values():
                if summary["skipped"]:
                    raise DataError.from_dict(summary["skipped"][0])
        pending = [t for t in tasks if t.task_id not in done]
        log(f"{len(sources)} files, {len(tasks)} tasks: {len(done)} already done, {len(pending)} to run")
        options = {
            "text_field": text_field,
            "append_eos": append_eos,
            "shard_tokens": shard_tokens,
            "chunk_bytes": chunk_bytes,
            "on_error": on_error,
        }

        def index(complete: bool) -> DatasetIndex:
            return _build_index(tasks, done, sources, chosen, tok_meta, options, complete)

        if pending:
            with _connect(client, scheduler, n_workers) as dask_client:
                _run(
                    dask_client,
                    pending,
                    sources,
                    settings,
                    fingerprints,
                    done,
                    index,
                    out,
                    log,
                    max_in_flight,
                )
        result = index(complete=True)
        _write_index(out, result)
        _remove_leftovers(out, result, tasks)
    if result.skipped:
        log(_skipped_summary(result.skipped))
    log(f"{result.total_tokens} tokens in {len(result.shards)} shards -> {out / INDEX_NAME}")
    return result


# ---------------------------------------------------------------------- running
def _run(
    dask_client: Any,
    pending: list[Task],
    sources: list[SourceFile],
    settings: TaskSettings,
    fingerprints: list[str],
    done: dict[int, dict[str, Any]],
    index: Any,
    out: Path,
    log: _Log,
    max_in_flight: int | None,
) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    if max_in_flight is None:
        threads = sum(dask_client.nthreads().values()) or 1
        max_in_flight = 2 * threads
    queue = iter(pending)
    by_key: dict[str, Task] = {}
    run_id = uuid.uuid4().hex[:12]  # fresh keys: never a result cached by the scheduler from another run

    def submit(task: Task) -> Any:
        needed = {p.source: sources[p.source] for p in task.pieces}
        key = f"deepseek-data-{run_id}-{task.name}"
        future = dask_client.submit(
            run_task, task, needed, settings, fingerprints[task.task_id], key=key, pure=False
        )
        by_key[future.key] = task
        return future

    started = [submit(t) for t in _take(queue, max_in_flight)]
    futures = as_completed(started)
    tokens = sum(_task_tokens(s) for s in done.values())
    printed = 0
    last_index = time.monotonic()
    bar = tqdm(
        total=sum(t.nbytes for t in pending),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not log.enabled,
        file=sys.stderr,
    )
    try:
        for future in futures:
            task = by_key.pop(future.key)
            try:
                summary = future.result()
            except DataError as exc:
                raise DataError(exc.path, exc.message, exc.line, exc.row) from None
            done[task.task_id] = summary
            tokens += _task_tokens(summary)
            for item in summary["skipped"]:
                if printed < MAX_PRINTED_ERRORS:
                    bar.write(f"skipped {DataError.from_dict(item)}", file=sys.stderr)
                printed += 1
            bar.update(task.nbytes)
            bar.set_postfix(tokens=tokens, refresh=False)
            for nxt in _take(queue, 1):
                futures.add(submit(nxt))
            if time.monotonic() - last_index > INDEX_INTERVAL_S:
                _write_index(out, index(complete=False))
                last_index = time.monotonic()
    except BaseException:
        # stop the rest, keep what finished: a rerun resumes from the markers and this partial index
        for future in list(futures.futures):
            future.cancel()
        _write_index(out, index(complete=False))
        raise
    finally:
        bar.close()


def _take(queue: Iterator[Task], n: int) -> list[Task]:
    return [t for _, t in zip(range(n), queue)]


def _task_tokens(summary: dict[str, Any]) -> int:
    return sum(s["tokens"] for s in summary["shards"])


@contextlib.contextmanager
def _connect(client: Any, scheduler: str | None, n_workers: int) -> Iterator[Any]:
    """The given client, a client of `scheduler`, or a fresh LocalCluster of n_workers processes."""
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler, timeout=30) as remote:
            yield remote
        return
    import dask

    with dask.config.set(_LOCAL_CLUSTER_CONFIG):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # bad-data errors reach the client as DataError
            env={"TOKENIZERS_PARALLELISM": "false"},  # each worker process uses one core
        )
    try:
        with Client(cluster) as local:
            yield local
    finally:
        cluster.close()


# ---------------------------------------------------------------------- state on disk
def _store_tokenizer(tokenizer: Any, out: Path) -> tuple[dict[str, Any], Path]:
    """Copy the tokenizer into the dataset (workers load it from there); its hash, vocab size, EOS."""
    from deepseek_core import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(str(tokenizer))
    target = out / TOKENIZER_SUBDIR
    with atomic_directory(target) as tmp:
        tok.save_pretrained(tmp)
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digest.update((target / name).read_bytes())
    meta = {
        "path": TOKENIZER_SUBDIR,
        "source": str(tokenizer) if not isinstance(tokenizer, Tokenizer) else None,
        "sha256": digest.hexdigest(),
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
    }
    return meta, target


def _load_markers(
    out: Path, tasks: list[Task], fingerprints: list[str], itemsize: int
) -> dict[int, dict[str, Any]]:
    """Summaries of tasks finished by an earlier run whose inputs, settings and shard files are unchanged."""
    done: dict[int, dict[str, Any]] = {}
    for task in tasks:
        path = marker_path(out, task)
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        try:
            if summary["fingerprint"] != fingerprints[task.task_id] or summary["kind"] != task.kind:
                continue
            intact = all(
                (out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["tokens"] * itemsize
                for s in summary["shards"]
            )
        except (KeyError, TypeError):  # a marker from another version or tampered with: redo the task
            continue
        if intact:
            done[task.task_id] = summary
    return done


def _build_index(
    tasks: list[Task],
    done: dict[int, dict[str, Any]],
    sources: list[SourceFile],
    dtype: str,
    tok_meta: dict[str, Any],
    options: dict[str, Any],
    complete: bool,
) -> DatasetIndex:
    shards: list[ShardInfo] = []
    skipped: list[dict[str, Any]] = []
    per_source: dict[int, dict[str, Any]] = {}
    for task in tasks:  # task order = stream order
        summary = done.get(task.task_id)
        if summary is None:
            continue
        shards.extend(ShardInfo(s["file"], int(s["tokens"]), list(s["sources"])) for s in summary["shards"])
        skipped.extend(summary["skipped"])
        for key, info in summary["sources"].items():
            entry = per_source.setdefault(int(key), {"tokens": 0})
            entry["tokens"] += info.get("tokens", 0)
            for field in ("sha256", "size"):
                if field in info:
                    entry[field] = info[field]
    source_list = []
    for src in sources:
        entry = per_source.get(src.index, {})
        source_list.append(
            {
                "path": src.url,
                "format": src.format,
                "compression": src.compression,
                "size": entry.get("size", src.size),
                "sha256": entry.get("sha256"),
                "tokens": entry.get("tokens", 0),
            }
        )
    return DatasetIndex(
        dtype=dtype,
        shards=shards,
        complete=complete,
        tokenizer=tok_meta,
        sources=source_list,
        skipped=skipped,
        options=options,
    )


def _write_index(out: Path, index: DatasetIndex) -> None:
    atomic_write_text(out / INDEX_NAME, json.dumps(index.to_dict(), indent=1) + "\n")


def _remove_leftovers(out: Path, index: DatasetIndex, tasks: list[Task]) -> None:
    """Shards, temporaries and markers no longer part of the dataset (earlier plans, killed writes)."""
    keep = {s.file for s in index.shards}
    for path in out.glob("shard-*.bin"):
        if path.name not in keep:
            path.unlink()
    for path in out.glob(".shard-*.tmp"):
        path.unlink()
    markers = {marker_path(out, t).name for t in tasks}
    for path in (out / DONE_DIR).glob("*"):
        if path.name not in markers:
            path.unlink()


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One prepare run per output directory (an OS lock: released even when the run is killed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{out}: another prepare run is writing this directory") from None
        yield


def _skipped_summary(skipped: list[dict[str, Any]]) -> str:
    files = {item["path"] for item in skipped}
    lines = [
        f"skipped {len(skipped)} bad records in {len(files)} files (listed under 'skipped' in {INDEX_NAME}):"
    ]
    lines += [f"  {DataError.from_dict(item)}" for item in skipped[:MAX_PRINTED_ERRORS]]
    if len(skipped) > MAX_PRINTED_ERRORS:
        lines.append(f"  ... and {len(skipped) - MAX_PRINTED_ERRORS} more")
    return "\n".join(lines)


class _Log:
    """Progress messages to stderr, silenced with progress=False."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
