"""argparse `type=` callables for bounded numbers, shared by every edition's command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

__all__ = ["bounded", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]

N = TypeVar("N", int, float)


def bounded(kind: Callable[[str], N], accept: Callable[[N], bool], requirement: str) -> Callable[[str], N]:
    """Parse with `kind` (int or float) and require `accept(value)`; argparse shows `requirement` otherwise
    (NaN fails every comparison, so it is refused too)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value

    return parse


positive_int = bounded(int, lambda v: v >= 1, "must be >= 1")
non_negative_int = bounded(int, lambda v: v >= 0, "must be >= 0")
positive_float = bounded(float, lambda v: v > 0, "must be > 0")
non_negative_float = bounded(float, lambda v: v >= 0, "must be >= 0")
