"""The serving image's Dockerfile: python slim, the pinned torch (CPU or a CUDA variant), deepseek-cne."""

from __future__ import annotations

import re

from . import __version__

TORCH_VERSION = "2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl"
SERVE_PORT = 8080
RUNTIME_UID = 10001


def render_dockerfile(
    torch_variant: str = "cpu", python_version: str = "3.11", from_source: bool = False
) -> str:
    """Dockerfile text. `torch_variant` is the default of the TORCH_VARIANT build arg ('cpu', 'cu126', ...);
    `from_source` installs deepseek-core and deepseek-cne from this repository (build from its root) instead of
    from PyPI."""
    if not re.fullmatch(r"cpu|cu\d{3}|rocm\d+(\.\d+)*", torch_variant):
        raise ValueError(
            f"--torch-variant: {torch_variant!r} is not a PyTorch wheel variant (cpu, cu126, cu128, ...)"
        )
    if not re.fullmatch(r"3\.\d{2}", python_version):
        raise ValueError(f"--python-version: {python_version!r} (expected e.g. 3.11)")
    if from_source:
        install = (
            "COPY packages/deepseek-core /src/deepseek-core\n"
            "COPY packages/deepseek-cne /src/deepseek-cne\n"
            'RUN pip install -c /tmp/constraints.txt "/src/deepseek-core[serve,cloud]" /src/deepseek-cne \\\n'
            "    && rm -rf /src\n"
        )
    else:
        install = f'RUN pip install -c /tmp/constraints.txt "deepseek-cne=={__version__}"\n'
    return f"""\
# syntax=docker/dockerfile:1
# Serving image of deepseek-cne, written by `deepseek-cne deploy --dockerfile`.
#   CPU:  docker build -t REGISTRY/deepseek-cne:{__version__} .
#   CUDA: docker build --build-arg TORCH_VARIANT=cu128 -t REGISTRY/deepseek-cne:{__version__}-cu128 .
# The CUDA wheels carry their own CUDA libraries; the node needs only the NVIDIA driver and container toolkit.
ARG PYTHON_VERSION={python_version}
FROM python:${{PYTHON_VERSION}}-slim

ARG TORCH_VARIANT={torch_variant}
ARG TORCH_VERSION={TORCH_VERSION}
ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    DEEPSEEK_CACHE=/tmp/deepseek-cache \\
    HF_HOME=/tmp/huggingface \\
    PORT={SERVE_PORT}

# torch first, from the variant's index; the constraint keeps later installs from replacing it.
RUN pip install --index-url {TORCH_INDEX}/${{TORCH_VARIANT}} "torch==${{TORCH_VERSION}}" \\
    && echo "torch==${{TORCH_VERSION}}" > /tmp/constraints.txt
{install}
RUN useradd --uid {RUNTIME_UID} --create-home --shell /usr/sbin/nologin deepseek
USER {RUNTIME_UID}
WORKDIR /home/deepseek
EXPOSE {SERVE_PORT}
ENTRYPOINT ["deepseek-core", "serve"]
CMD ["--host", "0.0.0.0", "--port", "{SERVE_PORT}"]
"""
