"""CPU priority of the engine's stepping thread.

On a CPU server the stepping thread is the one that is always busy, while the event loop's work (taking a
request, writing a token) is short and waits on it. At "idle" priority (Linux SCHED_IDLE) the kernel runs the
stepping thread only when no ordinary thread of any process on the machine wants the CPU, so request handling
never queues behind a model step: under a flood, a newcomer's time to first token stays near its unloaded one.
The engine still gets every cycle the host does not need for anything else.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

STEP_PRIORITIES = ("normal", "idle")


def check_step_priority(priority: str, name: str = "step_priority") -> str:
    """`priority` if it is one of STEP_PRIORITIES; ValueError naming `name` otherwise."""
    if priority not in STEP_PRIORITIES:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, STEP_PRIORITIES))}, got {priority!r}")
    return priority


def apply_step_priority(priority: str) -> None:
    """Give the CALLING thread `priority`; where the platform cannot, log a warning and leave it normal."""
    if priority == "normal":
        return
    sched_idle = getattr(os, "SCHED_IDLE", None)
    if sched_idle is None or not hasattr(os, "sched_setscheduler"):
        log.warning(
            "step priority %r: not available on this platform; the engine steps at normal priority", priority
        )
        return
    try:
        os.sched_setscheduler(0, sched_idle, os.sched_param(0))  # 0: the calling thread (Linux: a task id)
    except OSError as exc:
        log.warning("step priority %r: %s; the engine steps at normal priority", priority, exc)
