"""Kubernetes manifests for EE: multi-node training jobs and autoscaled serving, plus applying them."""

from __future__ import annotations

from .common import dump_manifests, to_manifest
from .serving import ServingSpec, render_serving
from .training import JOB_KINDS, render_training

__all__ = ["JOB_KINDS", "ServingSpec", "dump_manifests", "render_serving", "render_training", "to_manifest"]
