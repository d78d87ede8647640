"""Developer sessions: one per package (each in its own environment), plus lint, typecheck, quickstart.

`nox -s tests` runs every package's tests; `nox -s quickstart` runs the main job.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

TORCH = "torch==2.13.0"  # install first: the pinned CPU wheel, never a multi-GB CUDA build
CORE = "packages/deepseek-core"
PACKAGES = {
    "core": CORE,
    "ce": "packages/deepseek-ce",
    "ee": "packages/deepseek-ee",
    "cne": "packages/deepseek-cne",
}


def _install(session: nox.Session, *specs: str) -> None:
    session.install("--upgrade", "pip")
    session.install(TORCH)
    session.install(*specs)


def _pytest(session: nox.Session, *paths: str) -> None:
    # pytest exits 5 when it collects nothing; that is a failure here, never a silent pass.
    # CI deselects `slow` (latency checks that need an otherwise idle machine) unless posargs choose markers.
    markers = ["-m", "not slow"] if os.environ.get("CI") and "-m" not in session.posargs else []
    session.run("pytest", *paths, *markers, *session.posargs)


def _package_session(name: str, path: str) -> None:
    @nox.session(name=name, python=None)
    def run(session: nox.Session) -> None:
        # Core from this checkout, in the same resolve, so pip never looks for it on PyPI.
        specs = [f"./{path}[test]"] if path == CORE else [f"./{CORE}[serve]", f"./{path}[test]"]
        _install(session, *specs)
        _pytest(session, f"tests/{name}")

    run.__doc__ = f"Install only {path} (with its test extra) and run tests/{name}."


for _name, _path in PACKAGES.items():
    _package_session(_name, _path)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package journeys: every package installed together."""
    _install(session, f"./{CORE}[test]", *(f"./{p}[test]" for p in PACKAGES.values() if p != CORE))
    _pytest(session, "tests/integration")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Install the system packages the tests need, then run every package's session and the journeys."""
    session.run("bash", "tools/setup-system.sh", external=True)
    for name in (*PACKAGES, *(["integration"] if _has_tests("tests/integration") else [])):
        session.notify(name)


def _has_tests(folder: str) -> bool:
    from pathlib import Path

    return any(Path(folder).glob("test_*.py"))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over each package's src/."""
    _install(session, "mypy>=1.10", *(f"./{p}" for p in PACKAGES.values()))
    for path in PACKAGES.values():
        session.run("mypy", f"{path}/src")


@nox.session
def quickstart(session: nox.Session) -> None:
    """The main job: train a tokenizer and deepseek-tiny on the standard library, then generate."""
    _install(session, f"./{CORE}", "./packages/deepseek-ce")
    session.run("deepseek-ce", "quickstart", *session.posargs)
