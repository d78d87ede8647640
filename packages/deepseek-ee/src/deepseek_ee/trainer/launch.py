"""How the processes of a job are found or started: Lightning strategies, cluster environments, launcher.

- One process per device. On a node, Lightning's subprocess launcher re-runs the same command once per
  extra device (LOCAL_RANK=1..n-1); across nodes each node runs the command with NODE_RANK, MASTER_ADDR
  and MASTER_PORT set. torchrun (TorchElastic) and SLURM are detected by Lightning and start the
  processes themselves.
- On Kubernetes (``deepseek-ee launch``) every pod is a node that sets NODE_RANK; Lightning does not
  auto-detect Kubeflow, so its plain environment applies and it starts the pod's processes itself.
- The launcher is Lightning's, with a different child observer: when a child process dies it names the
  lost rank and its exit status, then gives the survivors time to report and exit before ending them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

__all__ = ["EEDDPStrategy", "make_strategy"]


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _ChildWatch(threading.Thread):
    """Watches the processes this node's rank 0 started; reports a dead one by global rank."""

    def __init__(self, procs: list[subprocess.Popen[Any]], first_rank: int, grace_s: float = 20.0) -> None:
        super().__init__(daemon=True, name="deepseek-ee-child-watch")
        self.procs = procs
        self.first_rank = first_rank  # global rank of procs[0]
        self.grace_s = grace_s

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                break
        names = ", ".join(
            f"rank {self.first_rank + i} (pid {self.procs[i].pid}, {_signal_name(c)})" for i, c in failed
        )  # type: ignore[arg-type]
        print(
            f"deepseek-ee: error: lost {names}; the job failed and is stopping", file=sys.stderr, flush=True
        )
        # The survivors' collectives fail now; let them report and exit on their own, then end the rest
        # (a process stuck in a collective may not react to SIGTERM).
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.5)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        time.sleep(self.grace_s)  # the main process normally exits meanwhile (daemon thread)
        os.kill(os.getpid(), signal.SIGKILL)


class _Launcher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with _ChildWatch as the observer."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            first = self.cluster_environment.node_rank() * self.num_processes + 1
            _ChildWatch(self.procs, first).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class EEDDPStrategy(DDPStrategy):
    """DDPStrategy whose subprocess launcher reports a lost child rank by name (see _ChildWatch)."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _Launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            super()._configure_launcher()


def make_strategy(
    name: str,
    world_size: int,
    backend: str,
    timeout_s: float,
    *,
    layer_class: type | None = None,
    find_unused_parameters: bool = False,
) -> Any:
    """The Lightning strategy for `name` ("ddp" | "fsdp"); "auto" (one device, no process group) for a
    single-process DDP run."""
    timeout = timedelta(seconds=timeout_s)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(
            auto_wrap_policy={layer_class} if layer_class is not None else None,
            process_group_backend=backend,
            timeout=timeout,
            state_dict_type="full",
            use_orig_params=True,  # keeps parameter names, so core's decay/no-decay groups still apply
            sharding_strategy="FULL_SHARD",
        )
    if name != "ddp":
        raise ValueError(f"strategy: must be 'ddp' or 'fsdp', got {name!r}")
    if world_size == 1:
        return "auto"
    return EEDDPStrategy(
        process_group_backend=backend,
        timeout=timeout,
        find_unused_parameters=find_unused_parameters,
    )
