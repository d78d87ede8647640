"""`deepseek-cne deploy --dockerfile`: the serving image's Dockerfile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deepseek_cne.cli import main

REPO = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def write(tmp_path: Path, *extra: str) -> list[tuple[str, str]]:
    target = tmp_path / "Dockerfile"
    assert main(["deploy", "--dockerfile", str(target), *extra]) == 0
    return instructions(target.read_text())


def test_dockerfile_pins_torch_and_runs_the_server(tmp_path: Path) -> None:
    steps = write(tmp_path)
    kinds = [k for k, _ in steps]
    args = dict((k, v) for k, v in steps if k in ("FROM", "USER", "EXPOSE", "ENTRYPOINT", "CMD"))
    build_args = dict(v.split("=", 1) for k, v in steps if k == "ARG")
    assert build_args["TORCH_VARIANT"] == "cpu" and build_args["TORCH_VERSION"] == "2.13.0"
    assert (
        re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim", args["FROM"])
        and build_args["PYTHON_VERSION"] == "3.11"
    )
    runs = [v for k, v in steps if k == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    assert "--index-url https://download.pytorch.org/whl/${TORCH_VARIANT}" in torch_run
    assert '"torch==${TORCH_VERSION}"' in torch_run
    # torch comes first, and the later install is constrained to it
    assert kinds.index("RUN") == runs.index(torch_run) + kinds.index("RUN")
    assert any("-c /tmp/constraints.txt" in r and "deepseek-cne==0.1.0" in r for r in runs)
    assert json.loads(args["ENTRYPOINT"]) == ["deepseek-core", "serve"]
    assert json.loads(args["CMD"]) == ["--host", "0.0.0.0", "--port", "8080"]
    assert args["EXPOSE"] == "8080"
    assert int(args["USER"]) > 0  # numeric, so Knative's runAsNonRoot can check it


def test_cuda_variant_and_source_build(tmp_path: Path) -> None:
    steps = write(tmp_path, "--torch-variant", "cu128", "--from-source")
    assert dict(v.split("=", 1) for k, v in steps if k == "ARG")["TORCH_VARIANT"] == "cu128"
    copies = [v.split()[0] for k, v in steps if k == "COPY"]
    assert copies == ["packages/deepseek-core", "packages/deepseek-cne"]
    assert all((REPO / c / "pyproject.toml").is_file() for c in copies)


def test_bad_variant_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--dockerfile", str(tmp_path / "D"), "--torch-variant", "cuda12"]) == 1
    assert "--torch-variant" in capsys.readouterr().err
    assert not (tmp_path / "D").exists()
