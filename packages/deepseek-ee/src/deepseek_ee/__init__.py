"""DeepSeek Enterprise Edition: distributed training, AdaFactor, compression and Kubernetes deployment."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
