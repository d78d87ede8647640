"""The loss-curve PNG of a training run (train loss per step, eval loss where it was measured)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from deepseek_core.fileio import atomic_write_bytes

__all__ = ["plot_loss_curve"]


def plot_loss_curve(
    path: str | os.PathLike[str],
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]] = (),
    title: str = "deepseek-ee training loss",
) -> Path | None:
    """Write a PNG of the loss curves to `path` (atomically); None when there is nothing to plot."""
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # the object API: no pyplot global state, safe in threads

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target
