"""Fixtures for provisioning tests: a real ``olah`` Hub mirror on 127.0.0.1, tiny models.

olah serves git repositories under ``<mirrors>/models/<org>/<name>`` through the
Hub's HTTP API, offline. The CLI comes from ``MONGARS_TEST_OLAH_CLI`` (the nox
``tests`` session sets it); without it the olah tests skip, or fail when
``MONGARS_TEST_STRICT=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mongars_llm.provisioning import clear_cache
from mongars_llm.settings import Settings

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "mongars tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "mongars tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _strict() -> bool:
    return os.environ.get("MONGARS_TEST_STRICT", "").strip().lower() in {"1", "true", "yes"}


def _need(what: str) -> None:
    if _strict():
        pytest.fail(f"{what} (MONGARS_TEST_STRICT=1 makes this a failure)")
    pytest.skip(what)


# ---------------------------------------------------------------- git mirrors
def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(repo)}
    out = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def commit_files(
    repo: Path, files: dict[str, bytes | Path], message: str, *, tag: str | None = None
) -> str:
    """Write ``files`` into the git repo at ``repo`` (created if needed) and commit."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q")
    for rel, content in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    if tag:
        git(repo, "tag", tag)
    return git(repo, "rev-parse", "HEAD")


def model_files(model_dir: Path) -> dict[str, bytes | Path]:
    return {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file()}


class Olah:
    """A running olah server with its mirror folder; ``url`` is the Hub endpoint."""

    def __init__(self, cli: str, root: Path) -> None:
        self.cli = cli
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = root / "olah.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def add_repo(self, repo_id: str, commits: list[dict[str, bytes | Path]]) -> list[str]:
        return [
            commit_files(self.repo(repo_id), files, f"commit {i}")
            for i, files in enumerate(commits)
        ]

    def start(self, timeout: float = 90.0) -> None:
        self.port = free_port()
        config = self.root / f"olah-{self.port}.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"mirrors-path = [{json.dumps(str(self.mirrors))}]\n"
            f"repos-path = {json.dumps(str(self.root / 'repos'))}\n"
            "metadata-cache-ttl = 0\n"
            "[accessibility]\n"
            "offline = true\n"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.cli, "-c", str(config)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not listen on {self.port} in {timeout}s: {self.log_text()}")

    def stop(self) -> None:
        """Kill the server at once (SIGKILL to its process group) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def downloads(self, repo_id: str, filename: str) -> int:
        """How many times the file was served (GET .../resolve/<rev>/<filename>)."""
        return sum(
            1
            for line in self.log_text().splitlines()
            if f'"GET /{repo_id}/resolve/' in line and f"/{filename} HTTP" in line
        )


def _olah_cli() -> str:
    cli = os.environ.get("MONGARS_TEST_OLAH_CLI")
    if not cli or not Path(cli).exists():
        _need(
            "olah is not available: set MONGARS_TEST_OLAH_CLI to an olah-cli (nox -s tests "
            "does; or python3 -m venv v && v/bin/pip install olah==0.5.4)"
        )
    if shutil.which("git") is None:
        _need("git is needed for olah's mirror repositories")
    return str(cli)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real checkpoint per session (random weights, real tokenizer)."""
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32)


@pytest.fixture(scope="session")
def olah_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Olah]:
    """A session-wide olah serving ``org/tiny`` (two commits, the first tagged ``v1``)."""
    cli = _olah_cli()
    server = Olah(cli, tmp_path_factory.mktemp("olah"))
    repo = server.repo("org/tiny")
    first = commit_files(repo, model_files(tiny_model_dir), "tiny model", tag="v1")
    second = commit_files(repo, {"extra.json": b'{"second": true}\n'}, "second commit")
    server.commits = {"org/tiny": [first, second]}  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def olah_factory(tmp_path: Path, tiny_model_dir: Path) -> Iterator[type[Olah] | object]:
    """Private olah servers a test may kill (``factory()`` returns a started one)."""
    cli = _olah_cli()
    started: list[Olah] = []

    def factory(root_name: str = "olah-private") -> Olah:
        server = Olah(cli, tmp_path / f"{root_name}-{len(started)}")
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, olah_server: Olah) -> Olah:
    """Point the Hub client at the session olah; never offline."""
    monkeypatch.setenv("HF_ENDPOINT", olah_server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return olah_server


@pytest.fixture(autouse=True)
def _fresh_provisioning_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        llm_adapter_registry_path=tmp_path / "registry",
        provision_lock_timeout=60,
    )


def write_manifest(folder: Path, roles: dict[str, object], profile: str = "t") -> Path:
    """A manifest file with one profile; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llm_models.json"
    path.write_text(json.dumps({"profiles": {profile: {"models": roles}}}, indent=2))
    return path
