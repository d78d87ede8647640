"""`deepseek-cne deploy`: render (or apply) the Knative Service for a model, or write the serving Dockerfile."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import __version__
from ..gpu import GIB, GPU_KINDS, LABEL_SCHEMES, GpuChoice, choose_gpu, gpu_kind, weight_bytes

DEFAULT_IMAGE = f"ghcr.io/deepseek-framework/deepseek-cne:{__version__}"
DTYPES = ("bfloat16", "float16", "float32")


def _int(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def register(subparsers: Any) -> None:
    """Add `deploy` to the CLI."""
    p = subparsers.add_parser(
        "deploy",
        help="render or apply the Knative Service of a model (or write the serving Dockerfile)",
        description=(
            "Render a Knative Service (scale to zero, concurrency autoscaling, gVisor sandbox, GPU kind chosen "
            "from the model's size) and apply it to the current cluster, or print it with --dry-run."
        ),
    )
    p.add_argument(
        "--model", help="checkpoint: local dir, s3:// or gs:// URL, or hub id (the server loads it)"
    )
    p.add_argument("--name", help="Knative Service name (DNS label)")
    p.add_argument("--namespace", default="default", help="namespace (default: default)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"serving image (default {DEFAULT_IMAGE})")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="serving dtype (default bfloat16)")
    p.add_argument("--preset", help="size the GPUs from this preset instead of the model's config.json")
    p.add_argument("--min-scale", type=_int(0), default=0, help="minimum pods (default 0: scale to zero)")
    p.add_argument("--max-scale", type=_int(1), default=4, help="maximum pods (default 4)")
    p.add_argument(
        "--target", type=_int(1), default=32, help="in-flight requests per pod to aim for (default 32)"
    )
    p.add_argument("--container-concurrency", type=_int(0), default=64,
                   help="hard limit of in-flight requests per pod, 0 = unlimited (default 64)")  # fmt: skip
    p.add_argument(
        "--scale-down-delay", default="5m", help="keep pods this long after load drops (default 5m)"
    )
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True,
                   help="run under gVisor (runtimeClassName) and emit its RuntimeClass (default: on)")  # fmt: skip
    p.add_argument("--runtime-class", default="gvisor", help="RuntimeClass name (default gvisor)")
    p.add_argument(
        "--runtime-handler", default="runsc", help="CRI handler of the RuntimeClass (default runsc)"
    )
    p.add_argument("--gpu-kind", default="auto",
                   help=f"auto (by model size), none (CPU), or one of: {', '.join(k.name for k in GPU_KINDS)}")  # fmt: skip
    p.add_argument("--gpu-label", default="nvidia", choices=sorted(LABEL_SCHEMES),
                   help="node label naming the GPU: nvidia (nvidia.com/gpu.product) or gke (default nvidia)")  # fmt: skip
    p.add_argument("--secret", help="Secret loaded as environment (object-store credentials)")
    p.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable (repeatable)")  # fmt: skip
    p.add_argument("--knative-features", action="store_true",
                   help="also emit Knative's config-features ConfigMap enabling affinity and runtimeClassName")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="format of --dry-run")
    p.add_argument("--context", help="kubeconfig context to apply to")
    p.add_argument(
        "--dockerfile", metavar="PATH", help="write the serving image's Dockerfile to PATH and exit"
    )
    p.add_argument(
        "--torch-variant", default="cpu", help="default TORCH_VARIANT build arg: cpu, cu126, cu128, ..."
    )
    p.add_argument("--from-source", action="store_true",
                   help="Dockerfile installs deepseek-core/-cne from this repository (build at its root)")  # fmt: skip
    p.set_defaults(handler=run)


def load_config(model: str, preset: str | None) -> Any:
    """The ModelConfig that sizes the deployment: the preset, or config.json of the model (only that file is
    fetched from s3:// / gs://)."""
    from deepseek_core import ModelConfig

    if preset:
        return ModelConfig.from_preset(preset)
    try:
        return ModelConfig.from_pretrained(model)
    except Exception as exc:
        raise ValueError(
            f"--model: cannot read config.json of {model!r} ({exc}); pass --preset NAME to size it"
        ) from None


def pick_gpu(config: Any, dtype: str, kind: str, label: str) -> GpuChoice | None:
    """The GPU placement for --gpu-kind (auto: only kinds that `label` can select)."""
    if kind == "none":
        return None
    if kind == "auto":
        kinds = [k for k in GPU_KINDS if k.label_values(label)]
    else:
        kinds = [gpu_kind(kind)]
        if not kinds[0].label_values(label):
            raise ValueError(f"--gpu-kind: {kinds[0].name} has no {LABEL_SCHEMES[label]} label value")
    return choose_gpu(config, dtype, kinds=kinds)


def build_objects(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The manifests `deploy` applies or prints, in apply order."""
    from ..knative import ServiceSpec, feature_flags_configmap, render_runtime_class, render_service

    if not args.model:
        raise ValueError("--model is required (or --dockerfile PATH)")
    if not args.name:
        raise ValueError("--name is required")
    config = load_config(args.model, args.preset)
    gpu = pick_gpu(config, args.dtype, args.gpu_kind, args.gpu_label)
    spec = ServiceSpec(
        name=args.name,
        model=args.model,
        image=args.image,
        namespace=args.namespace,
        dtype=args.dtype,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        target=args.target,
        container_concurrency=args.container_concurrency,
        scale_down_delay=args.scale_down_delay,
        sandbox=args.sandbox,
        runtime_class=args.runtime_class,
        gpu=gpu,
        gpu_label_scheme=args.gpu_label,
        env=dict(args.env),
        secret=args.secret,
        weight_bytes=weight_bytes(config, args.dtype),
    )
    objects: list[dict[str, Any]] = []
    if args.knative_features:
        objects.append(feature_flags_configmap())
    if args.sandbox:
        objects.append(render_runtime_class(args.runtime_class, args.runtime_handler))
    objects.append(render_service(spec))
    if gpu is None:
        print(f"placement: CPU only ({spec.weight_bytes / GIB:.1f} GiB of weights)", file=sys.stderr)
    else:
        print(
            f"placement: {gpu.count}x {gpu.kind} ({gpu.memory_needed_bytes / GIB:.1f} GiB needed of "
            f"{gpu.total_memory_bytes / GIB:.1f} GiB)",
            file=sys.stderr,
        )
    return objects


def dump(objects: list[dict[str, Any]], fmt: str) -> str:
    """Manifests as multi-document YAML or as a JSON v1 List."""
    if fmt == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    import yaml

    return str(yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False))


def run(args: argparse.Namespace) -> int:
    """Entry point of `deepseek-cne deploy`."""
    if args.dockerfile:
        from deepseek_core.fileio import atomic_write_text

        from ..dockerfile import render_dockerfile

        atomic_write_text(
            args.dockerfile, render_dockerfile(args.torch_variant, from_source=args.from_source)
        )
        print(f"wrote {args.dockerfile}", file=sys.stderr)
        return 0
    objects = build_objects(args)
    if args.dry_run:
        sys.stdout.write(dump(objects, args.output))
        return 0
    from ..kube import apply_manifests

    for applied in apply_manifests(objects, context=args.context):
        print(f"applied {applied}")
    return 0
