"""Scale to zero: each model is loaded into a worker on its first request and unloaded when idle.

States: unloaded -> loading -> loaded -> unloading -> unloaded. Requests arriving while a model loads wait
for that one load; a model is unloaded only when no request holds it and none has for `idle_timeout_s`.
Unloading ends the worker process, which returns the model's memory to the operating system. Checkpoints on
object storage (s3://, gs://) are fetched and verified once, on the first load, into the local cache; later
loads map the cached files directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_core.serving.errors import OpenAIError

from .config import ModelSpec
from .metrics import GatewayMetrics
from .pool import Worker, WorkerError, WorkerPool

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.1


@dataclass
class ModelSlot:
    """What the gateway knows of one model."""

    spec: ModelSpec
    state: str = "unloaded"
    worker: Worker | None = None
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    local_path: Path | None = None
    loading: asyncio.Task[Worker] | None = None
    unloading: asyncio.Task[None] | None = None
    loads: int = 0
    last_load: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None


class ModelManager:
    """Loads models on demand into pool workers and unloads idle ones."""

    def __init__(self, specs: dict[str, ModelSpec], pool: WorkerPool, metrics: GatewayMetrics) -> None:
        self.slots = {name: ModelSlot(spec) for name, spec in specs.items()}
        self.pool = pool
        self.metrics = metrics
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ requests
    async def acquire(self, name: str) -> Worker:
        """The worker serving `name`, loading it first if needed; pair with release()."""
        slot = self.slots[name]
        while True:
            if slot.state == "loaded":
                assert slot.worker is not None
                if slot.worker.alive:
                    slot.inflight += 1
                    slot.last_used = time.monotonic()
                    return slot.worker
                log.error("the worker of %s (pid %d) died; reloading", name, slot.worker.pid)
                self._mark_unloaded(slot)
            if slot.state == "unloading":
                assert slot.unloading is not None
                await asyncio.shield(slot.unloading)
                continue
            if slot.state == "unloaded":
                slot.state = "loading"
                slot.loading = asyncio.get_running_loop().create_task(self._load(slot))
            assert slot.loading is not None
            try:
                await asyncio.shield(slot.loading)
            except WorkerError as exc:
                raise OpenAIError(
                    503,
                    f"model {name!r} could not be loaded; retry later",
                    code="model_unavailable",
                    headers={"Retry-After": "5"},
                ) from exc

    def release(self, name: str) -> None:
        """A request is done with `name`'s worker."""
        slot = self.slots[name]
        slot.inflight = max(0, slot.inflight - 1)
        slot.last_used = time.monotonic()

    def worker_failed(self, name: str, worker: Worker) -> None:
        """The worker of `name` stopped answering: forget it so the next request loads the model again."""
        slot = self.slots[name]
        if slot.worker is worker and slot.state == "loaded" and not worker.alive:
            self._mark_unloaded(slot)

    # ------------------------------------------------------------------ loading
    async def _resolve(self, slot: ModelSlot) -> Path:
        if slot.local_path is None:
            from deepseek_core.storage import fetch_checkpoint

            slot.local_path = Path(await asyncio.to_thread(fetch_checkpoint, slot.spec.uri))
        return slot.local_path

    async def _load(self, slot: ModelSlot) -> Worker:
        try:
            return await self._load_into_worker(slot)
        except BaseException:
            slot.state, slot.loading = "unloaded", None
            raise

    async def _load_into_worker(self, slot: ModelSlot) -> Worker:
        name = slot.spec.name
        t0 = time.perf_counter()
        try:
            path = await self._resolve(slot)
        except Exception as exc:
            log.error("model %s: cannot fetch %s: %s", name, slot.spec.uri, exc)
            raise WorkerError(f"{slot.spec.uri}: {exc}") from exc
        t1 = time.perf_counter()
        worker = await self.pool.take()
        t2 = time.perf_counter()
        try:
            info = await worker.load({**slot.spec.worker_options(), "path": str(path)})
        except BaseException as exc:
            log.error("%s", exc)
            await worker.stop(timeout=2.0)
            raise
        t3 = time.perf_counter()
        slot.worker, slot.state, slot.loading = worker, "loaded", None
        slot.last_used = time.monotonic()
        slot.loads += 1
        slot.max_model_len = info.get("max_model_len")
        slot.last_load = {
            "total_s": round(t3 - t0, 4),
            "fetch_s": round(t1 - t0, 4),
            "wait_worker_s": round(t2 - t1, 4),
            "worker_load_s": round(t3 - t2, 4),
            **{k: info[k] for k in ("engine_s", "app_s", "kv_cache_bytes") if k in info},
        }
        self.metrics.model_loaded(name, t3 - t0)
        log.info("model %s loaded in worker %d in %.3f s %s", name, worker.pid, t3 - t0, slot.last_load)
        return worker

    # ------------------------------------------------------------------ unloading
    def _mark_unloaded(self, slot: ModelSlot) -> None:
        worker = slot.worker
        slot.worker, slot.state = None, "unloaded"
        self.metrics.model_unloaded(slot.spec.name)
        if worker is not None:
            asyncio.get_running_loop().create_task(worker.stop(timeout=1.0))

    async def unload(self, name: str) -> bool:
        """Unload `name` now if it is loaded and idle; True when it was unloaded."""
        slot = self.slots[name]
        if slot.state != "loaded" or slot.inflight > 0:
            return False
        slot.state = "unloading"
        slot.unloading = asyncio.get_running_loop().create_task(self._stop(slot))
        await asyncio.shield(slot.unloading)
        return True

    async def _stop(self, slot: ModelSlot) -> None:
        worker = slot.worker
        try:
            if worker is not None:
                await worker.stop()
        finally:
            slot.worker, slot.state, slot.unloading = None, "unloaded", None
            self.metrics.model_unloaded(slot.spec.name)
            log.info("model %s unloaded (worker %s exited)", slot.spec.name, worker.pid if worker else None)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for name, slot in self.slots.items():
                timeout = slot.spec.idle_timeout_s
                if slot.state == "loaded" and slot.worker is not None and not slot.worker.alive:
                    log.error("the worker of %s (pid %d) died", name, slot.worker.pid)
                    self._mark_unloaded(slot)
                elif (
                    timeout is not None
                    and slot.state == "loaded"
                    and slot.inflight == 0
                    and now - slot.last_used >= timeout
                ):
                    try:
                        await self.unload(name)
                    except Exception:
                        log.exception("cannot unload %s", name)
            self.pool.refill()

    def start(self) -> None:
        """Start the idle reaper, and ask the kernel to read local models' weights into the page cache."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        prefetch_weights([Path(s.spec.uri) for s in self.slots.values() if Path(s.spec.uri).is_dir()])

    async def close(self) -> None:
        """Stop the reaper and every model worker."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        workers = [s.worker for s in self.slots.values() if s.worker is not None]
        for slot in self.slots.values():
            slot.worker, slot.state = None, "unloaded"
        await asyncio.gather(*(w.stop(timeout=5.0) for w in workers), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """Per-model state, worker pid, requests in flight, idle seconds and the last load's timings."""
        now = time.monotonic()
        return {
            name: {
                "state": slot.state,
                "pid": slot.worker.pid if slot.worker is not None else None,
                "inflight": slot.inflight,
                "idle_s": round(now - slot.last_used, 3),
                "idle_timeout_s": slot.spec.idle_timeout_s,
                "loads": slot.loads,
                "last_load": slot.last_load,
            }
            for name, slot in self.slots.items()
        }


def prefetch_weights(directories: list[Path]) -> None:
    """Start asynchronous readahead of the checkpoints' weight files (POSIX_FADV_WILLNEED; returns at once).

    A cold start maps the weights; when the files are already in the page cache (not counted in any process's
    memory, and reclaimable), mapping them costs no disk reads, also for the first load after a node starts.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for directory in directories:
        for path in directory.glob("*.safetensors"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
