"""Plain-text run logs (stdout and output_dir/train.log) and the loss-curve PNG."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from deepseek_core.fileio import atomic_write_bytes
from tqdm.auto import tqdm


class RunLog:
    """Writes each line, time-stamped, to a log file and (through tqdm, so a progress bar stays intact) stdout."""

    def __init__(self, path: str | os.PathLike[str], echo: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._file.write(line + "\n")
        self._file.flush()
        if self.echo:
            tqdm.write(line)

    def close(self) -> None:
        """Close the log file."""
        if not self._file.closed:
            self._file.close()


def plot_loss_curve(
    path: str | os.PathLike[str],
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]] = (),
    title: str = "training loss",
) -> Path:
    """Save a PNG of train loss per step (raw and smoothed) and eval loss points; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
            window = max(1, len(losses) // 50)
            if window > 1:
                smooth = [
                    sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1)
                    for i in range(len(losses))
                ]
                ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train ({window}-step mean)")
        if evals:
            steps, losses = zip(*evals)
            ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target
