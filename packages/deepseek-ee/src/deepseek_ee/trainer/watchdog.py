"""Peer watchdog: heartbeats through the rendezvous store so that a lost rank fails the job fast, by name.

A rank killed with SIGKILL (or a node that disappears) leaves its peers inside a collective. Gloo usually
notices the closed connection at once, NCCL may wait for the collective timeout, and neither error says
which rank went away. Each rank therefore runs a daemon thread that bumps a counter in the job's
TCPStore (the one torch.distributed rendezvoused on, MASTER_ADDR:MASTER_PORT) every `interval_s` and
watches its two ring neighbours' counters:

- a neighbour whose counter has not moved for `timeout_s` is reported lost and this process exits
  (exit code EXIT_PEER_LOST) with a message naming it, even if the main thread is stuck in a collective;
- when a collective fails in the main thread, `find_lost()` reads every rank's counter twice a few
  intervals apart and names the ranks that stopped; a store that no longer answers means rank 0, which
  hosts it, is gone.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["EXIT_PEER_LOST", "PeerLostError", "PeerWatchdog"]

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the job failed because of another process; a rerun can resume
_DONE = b"done"


class PeerLostError(RuntimeError):
    """A training process of the same job stopped (killed, crashed, node lost); the job cannot go on."""

    def __init__(
        self, rank: int, world_size: int, lost: list[int], detail: str, resume_hint: str | None = None
    ) -> None:
        names = ", ".join(f"rank {r}" for r in lost) or "a peer"
        hint = f" {resume_hint}" if resume_hint else ""
        super().__init__(f"rank {rank} of {world_size}: lost {names} ({detail}); the job failed.{hint}")
        self.rank = rank
        self.world_size = world_size
        self.lost = lost


class PeerWatchdog:
    """Heartbeat thread of one rank; see the module docstring."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 60.0,
        namespace: str = "deepseek_ee",
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= interval_s:
            raise ValueError(
                f"peer watchdog: need 0 < interval_s < timeout_s, got {interval_s} and {timeout_s}"
            )
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.namespace = namespace
        self.on_lost = on_lost or _exit_lost
        self._store: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._suspended = False  # the main thread is diagnosing; it reports instead of the thread
        self._counter = 0
        neighbours = {(rank + 1) % world_size, (rank - 1) % world_size} - {rank}
        self._watched = sorted(neighbours)

    # ------------------------------------------------------------------ store access
    def _key(self, rank: int) -> str:
        return f"{self.namespace}/heartbeat/{rank}"

    def _connect(self) -> Any:
        import torch.distributed as dist

        return dist.TCPStore(
            self.host, self.port, is_master=False, timeout=timedelta(seconds=max(2.0, self.interval_s * 3)),
            wait_for_workers=False,
        )  # fmt: skip

    def _read(self, ranks: list[int]) -> dict[int, bytes | None]:
        """Current counters of `ranks` (None: never written). Raises on store errors."""
        out: dict[int, bytes | None] = {}
        with self._lock:
            for r in ranks:
                key = self._key(r)
                out[r] = self._store.get(key) if self._store.check([key]) else None
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PeerWatchdog:
        """Connect to the store, publish the first heartbeat and start the thread."""
        self._store = self._connect()
        self._beat()
        self._thread = threading.Thread(
            target=self._run, name=f"deepseek-ee-peer-watchdog-{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """Stop the thread; `finished` tells peers this rank left on purpose (it is then never reported)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 3)
        if finished and self._store is not None:
            try:
                with self._lock:
                    self._store.set(self._key(self.rank), _DONE)
            except Exception:  # the store may be gone already (rank 0 finished first)
                pass

    def _beat(self) -> None:
        self._counter += 1
        with self._lock:
            self._store.set(self._key(self.rank), str(self._counter).encode())

    def _store_port_open(self) -> bool:
        """A plain TCP probe of the store's port (c10d's own client logs a stack trace per failed try)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=max(1.0, self.interval_s)):
                return True
        except OSError:
            return False

    def _run(self) -> None:
        last_value: dict[int, bytes | None] = {}
        last_change = {r: time.monotonic() for r in self._watched}
        store_failing_since: float | None = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                if self._store is None:  # the connection broke earlier: reconnect only once the port answers
                    if not self._store_port_open():
                        raise ConnectionRefusedError(f"{self.host}:{self.port} refuses connections")
                    self._store = self._connect()
                self._beat()
                values = self._read(self._watched)
                store_failing_since = None
            except Exception as exc:  # connection refused/reset: the store host (rank 0) may be gone
                self._store = None
                store_failing_since = store_failing_since or now
                if (
                    now - store_failing_since > self.timeout_s
                    and not self._suspended
                    and not self._stop.is_set()
                ):
                    detail = (
                        f"the rendezvous store at {self.host}:{self.port}, hosted by rank 0, stopped answering: "
                        f"{type(exc).__name__}"
                    )
                    self.on_lost(self._message([0], detail))
                    return
                continue
            for r, value in values.items():
                if value == _DONE:
                    last_change[r] = now
                elif value != last_value.get(r):
                    last_value[r] = value
                    last_change[r] = now
            stale = [
                r for r in self._watched if values.get(r) != _DONE and now - last_change[r] > self.timeout_s
            ]
            if stale and not self._suspended and not self._stop.is_set():
                self.on_lost(self._message(stale, f"no heartbeat for {self.timeout_s:g}s"))
                return

    def _message(self, lost: list[int], detail: str) -> str:
        return str(PeerLostError(self.rank, self.world_size, lost, detail))

    # ------------------------------------------------------------------ diagnosis
    def find_lost(self, grace_s: float | None = None) -> tuple[list[int], str]:
        """Ranks whose heartbeat stopped, and how that was seen; takes about `grace_s` (default 3 intervals).

        Meant for the main thread after a collective failed; the thread's own reporting is suspended.
        """
        suspended, self._suspended = self._suspended, True
        grace = grace_s if grace_s is not None else 3 * self.interval_s
        everyone = [r for r in range(self.world_size) if r != self.rank]
        try:
            if self._store is None:
                if not self._store_port_open():
                    raise ConnectionRefusedError(f"{self.host}:{self.port} refuses connections")
                self._store = self._connect()
            before = self._read(everyone)
            time.sleep(grace)
            after = self._read(everyone)
        except Exception as exc:
            detail = f"the rendezvous store at {self.host}:{self.port}, hosted by rank 0, stopped answering: {type(exc).__name__}"
            return ([0] if self.rank != 0 else []), detail
        finally:
            self._suspended = suspended
        lost = [r for r in everyone if after[r] != _DONE and (after[r] is None or after[r] == before[r])]
        return lost, f"its heartbeat stopped; checked over {grace:g}s"


def _exit_lost(message: str) -> None:
    print(f"deepseek-ee: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)
