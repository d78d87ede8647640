"""The model's linear layer: an nn.Linear whose forward an inference engine may reroute on its own thread.

An engine keeps faster copies of the weights for inference (oneDNN-prepacked on CPU, engine/cpu_linear.py)
without modifying the model: while it runs a forward pass it installs a router for the current thread only,
so training or plain calls on other threads (and everywhere else) keep the ordinary F.linear. A thread-local
lookup per linear call costs far less than a TorchFunctionMode, which intercepts every torch call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearRouter = Callable[["Linear", torch.Tensor], torch.Tensor]

_local = threading.local()


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) that honours the thread's linear router."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        router: LinearRouter | None = getattr(_local, "router", None)
        if router is not None:
            return router(self, input)
        return F.linear(input, self.weight, self.bias)


def swap_linear_router(router: LinearRouter | None) -> LinearRouter | None:
    """Send every `Linear` call on this thread to `router(module, input)` (None: F.linear); returns the
    previous router, to be put back when done."""
    previous: LinearRouter | None = getattr(_local, "router", None)
    _local.router = router
    return previous
