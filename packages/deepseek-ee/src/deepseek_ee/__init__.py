"""DeepSeek Enterprise Edition: distributed training, AdaFactor, compression and Kubernetes deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepseek_core import Model
from deepseek_core.training import TrainingConfig

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .trainer import DistributedTrainer, DistributedTrainResult, PeerLostError

# Lightning is a heavy import: the trainer loads on first use, so `deepseek-ee launch --help` stays fast.
_LAZY = {"DistributedTrainer": "trainer", "DistributedTrainResult": "trainer", "PeerLostError": "trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DistributedTrainResult",
    "DistributedTrainer",
    "Model",
    "PeerLostError",
    "TrainingConfig",
    "__version__",
]
