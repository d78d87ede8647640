"""Worker processes: starting them, talking to them over their Unix socket, and the warm pool.

The pool keeps `size` workers started and idle (torch, the engine and the server already imported and
warmed up). Loading a model takes one of them, so a cold start only maps the weights; the pool then
starts a replacement in the background. With no idle worker left, a load waits for one that is starting
(or starts one): the slow path, which pays the imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .worker import HEALTH_PATH, LOAD_PATH

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
LOAD_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 10.0
REFILL_DELAY_S = 2.0
_POLL_S = 0.02


class WorkerError(RuntimeError):
    """A worker could not start, or could not load its model."""


class Worker:
    """One worker process and an HTTP client bound to its Unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://worker",
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=240.0),
        )

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return int(self.proc.pid)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll the health endpoint until the worker answers (it binds its socket after warming up)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise WorkerError(
                    f"worker {self.pid} exited with status {self.proc.returncode} while starting"
                )
            if self.socket_path.exists():
                try:
                    response = await self.client.get(HEALTH_PATH, timeout=5.0)
                    if response.status_code == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {self.pid} not ready after {timeout:.0f} s")
            await asyncio.sleep(_POLL_S)

    async def load(self, options: dict[str, Any]) -> dict[str, Any]:
        """Ask the worker to load a model; returns what it reports (timings, context length)."""
        try:
            response = await self.client.post(LOAD_PATH, json=options, timeout=LOAD_TIMEOUT_S)
        except httpx.TransportError as exc:
            raise WorkerError(
                f"worker {self.pid}: load request failed ({type(exc).__name__}: {exc})"
            ) from None
        if response.status_code != 200:
            try:
                detail = response.json().get("error")
            except ValueError:
                detail = response.text[:500]
            raise WorkerError(f"worker {self.pid} cannot load {options.get('name')!r}: {detail}")
        info: dict[str, Any] = response.json()
        return info

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the worker's stdin (it exits at once), wait for it, kill it if it lingers."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        if self.alive:
            log.warning("worker %d did not exit within %.0f s: killing it", self.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 30)
        else:
            self.proc.wait()
        await self.client.aclose()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def kill_now(self) -> None:
        """Kill the process without waiting (shutdown of a gateway that cannot await)."""
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.kill()


class WorkerPool:
    """Keeps `size` idle warm workers; take() hands one out and starts a replacement."""

    def __init__(
        self,
        size: int,
        runtime_dir: Path,
        threads: int,
        log_level: str = "warning",
        engine_priority: str = "normal",
    ) -> None:
        self.size = size
        self.runtime_dir = runtime_dir
        self.threads = threads
        self.engine_priority = engine_priority
        self.log_level = log_level
        self.idle: list[Worker] = []
        self.starting: set[Worker] = set()
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Condition | None = None
        self._ids = itertools.count(1)
        self._waiting = 0
        self._hold_until = 0.0
        self._closed = False

    @property
    def changed(self) -> asyncio.Condition:
        """Notified whenever a worker becomes ready or fails to start."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def spawn(self) -> Worker:
        """Start one worker process (it becomes ready seconds later)."""
        socket_path = self.runtime_dir / f"worker-{os.getpid()}-{next(self._ids)}.sock"
        cmd = [
            sys.executable,
            "-m",
            "deepseek_cne.gateway.worker",
            "--socket",
            str(socket_path),
            "--threads",
            str(self.threads),
            "--log-level",
            self.log_level,
            "--engine-priority",
            self.engine_priority,
        ]
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
        worker = Worker(proc, socket_path)
        self.starting.add(worker)
        task = asyncio.get_running_loop().create_task(self._await_ready(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _await_ready(self, worker: Worker) -> None:
        try:
            await worker.wait_ready()
        except Exception as exc:
            self.last_error = str(exc)
            log.error("%s", exc)
            self.starting.discard(worker)
            await worker.stop(timeout=1.0)
        else:
            self.starting.discard(worker)
            if self._closed:
                await worker.stop()
                return
            self.idle.append(worker)
            self.last_error = None
            log.info("worker %d ready in %.2f s", worker.pid, worker.ready_after or 0.0)
        async with self.changed:
            self.changed.notify_all()

    def refill(self) -> None:
        """Start workers until idle + starting covers the pool size and the loads waiting for one.

        Replacements for handed-out workers start REFILL_DELAY_S later: a new worker's imports would compete
        for the CPU with the cold model's first forward pass.
        """
        if self._closed:
            return
        self.idle = [w for w in self.idle if w.alive]
        wanted = self.size + self._waiting
        if self._waiting == 0 and time.monotonic() < self._hold_until:
            return
        while len(self.idle) + len(self.starting) < wanted:
            self.spawn()

    async def take(self) -> Worker:
        """An idle warm worker (waiting for one to start when none is idle)."""
        self._waiting += 1
        try:
            while True:
                self.idle = [w for w in self.idle if w.alive]
                if self.idle:
                    worker = self.idle.pop(0)
                    break
                if self.last_error is not None and not self.starting:
                    error, self.last_error = self.last_error, None
                    raise WorkerError(f"no worker could start: {error}")
                self.refill()
                async with self.changed:
                    await self.changed.wait()
        finally:
            self._waiting -= 1
        self._hold_until = time.monotonic() + REFILL_DELAY_S
        return worker

    async def wait_full(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the pool holds `size` idle workers (startup)."""
        deadline = time.monotonic() + timeout
        self.refill()
        while len(self.idle) < self.size:
            if self.last_error is not None and not self.starting:
                raise WorkerError(f"the warm pool cannot start: {self.last_error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"the warm pool is not ready after {timeout:.0f} s")
            async with self.changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
            self.refill()

    async def close(self) -> None:
        """Stop every idle and starting worker."""
        self._closed = True
        workers = list(self.idle) + list(self.starting)
        self.idle.clear()
        await asyncio.gather(*(w.stop(timeout=2.0) for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    def status(self) -> dict[str, Any]:
        """Pool size, idle worker pids and how many are starting."""
        return {
            "size": self.size,
            "idle": [w.pid for w in self.idle if w.alive],
            "starting": len(self.starting),
            "last_error": self.last_error,
        }
