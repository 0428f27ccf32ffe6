"""``chat``, ``embed`` and ``ps`` use a running ``mongars-llm serve`` (a real one on
loopback, tiny model) as the ``ollama`` CLI uses its daemon; ``--local`` and no server
mean loading in-process; a key is sent only when the server asks for one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from mongars_llm.cli import main
from mongars_llm.settings import ModelSettings, Settings, get_settings

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("remote") / "tiny", hidden_size=32)


@pytest.fixture(scope="module")
def manifest(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("remote-manifest") / "llm_models.json"
    entry = {"name": str(tiny_model), "provider": "local"}
    path.write_text(
        json.dumps(
            {
                "profiles": {
                    "t": {
                        "models": {
                            "general": {
                                **entry,
                                "parameters": {"temperature": 0, "max_new_tokens": 4},
                            },
                            "embedding": {**entry, "embedding": {"pooling": "mean"}},
                        }
                    }
                }
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def runtime(tiny_model: Path, manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        tiny_model, device="cpu", dtype="float32", settings=_settings(tiny_model, manifest)
    )
    yield rt
    rt.close()


def _settings(tiny_model: Path, manifest: Path, **extra: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        model=ModelSettings(device="cpu", dtype="float32", max_new_tokens=16),
        llm_models_path=manifest,
        llm_models_profile="t",
        unified_model_dir=tiny_model,
        cache_dir=manifest.parent / "cache",
        llm_adapter_registry_path=manifest.parent / "registry",
        **extra,
    )


@contextmanager
def running_server(
    tiny_model: Path, manifest: Path, runtime: Any, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> Iterator[tuple[Any, list[str | None]]]:
    """A server on the shared runtime at MONGARS_HOST; the Authorization headers it got."""
    from mongars_llm.server import create_app, serve_in_background

    app = create_app(_settings(tiny_model, manifest, **extra), runtime)
    seen: list[str | None] = []

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
        await app(scope, receive, send)

    recording.state = app.state  # type: ignore[attr-defined]
    with serve_in_background(recording) as server:
        monkeypatch.setenv("MONGARS_HOST", server.url)
        yield server, seen


@pytest.fixture
def workspace(manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(manifest))
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "t")
    monkeypatch.setenv("MONGARS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cpu")
    get_settings(reload=True)
    yield tmp_path
    monkeypatch.undo()
    get_settings(reload=True)


QUESTION = "which adapter answers?"


def _server_reply(server: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{server.url}/api/chat",
        json={
            "model": "general",
            "messages": [{"role": "user", "content": QUESTION}],
            "stream": False,
        },
        timeout=60,
    ).json()
    return dict(answer)


def test_chat_uses_the_running_server(
    workspace: Path, tiny_model: Path, manifest: Path, runtime: Any, monkeypatch, capsys
) -> None:
    with running_server(tiny_model, manifest, runtime, monkeypatch) as (server, _):
        expected = _server_reply(server)
        assert main(["chat", "--prompt", QUESTION, "--json"]) == 0
        out, err = capsys.readouterr()
        reply = json.loads(out)
        assert reply["text"] == expected["message"]["content"]
        assert reply["usage"]["completion_tokens"] == expected["eval_count"] <= 4  # role default
        assert "loading" not in err  # no model was loaded in this process

        assert main(["chat", "--prompt", QUESTION]) == 0
        out, err = capsys.readouterr()
        assert out == expected["message"]["content"] + "\n"  # streamed from /api/chat

        monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/clear\n{QUESTION}\n/bye\n"))
        assert main(["chat"]) == 0
        out, _ = capsys.readouterr()
        assert out.count(expected["message"]["content"]) == 2


def test_local_forces_an_in_process_load(
    workspace: Path, tiny_model: Path, manifest: Path, runtime: Any, monkeypatch, capsys
) -> None:
    with running_server(tiny_model, manifest, runtime, monkeypatch) as (server, seen):
        expected = _server_reply(server)
        before = len(seen)
        assert main(["chat", "--local", "--prompt", QUESTION, "--json"]) == 0
        out, err = capsys.readouterr()
        assert "loading role 'general'" in err
        assert json.loads(out)["text"] == expected["message"]["content"]  # same model
        assert len(seen) == before  # not even probed


def test_embed_uses_the_running_server(
    workspace: Path, tiny_model: Path, manifest: Path, runtime: Any, monkeypatch, capsys
) -> None:
    with running_server(tiny_model, manifest, runtime, monkeypatch) as (server, _):
        texts = ["first text", "second text"]
        reference = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": "embedding", "input": texts}, timeout=60
        ).json()
        assert main(["embed", *texts, "--json"]) == 0
        out, err = capsys.readouterr()
        document = json.loads(out)
        assert document["model"] == "embedding"  # the role, not a checkpoint path
        vectors = np.array([d["embedding"] for d in document["data"]])
        assert np.allclose(vectors, [d["embedding"] for d in reference["data"]], atol=1e-6)
        assert "loading" not in err
        assert main(["embed", "general", "a text"]) == 0
        out, _ = capsys.readouterr()
        assert f"general via mongars-llm serve at {server.url}" in out
        # a flag only a local load honours: embedded in-process
        assert main(["embed", "a text", "--pooling", "mean", "--json"]) == 0
        _, err = capsys.readouterr()
        assert "loading role" in err


def test_ps_shows_roles_and_engine(
    workspace: Path, tiny_model: Path, manifest: Path, runtime: Any, monkeypatch, capsys
) -> None:
    with running_server(tiny_model, manifest, runtime, monkeypatch) as (server, _):
        assert main(["ps"]) == 0
        out, _ = capsys.readouterr()
        lines = out.splitlines()
        assert server.url in lines[0]
        assert lines[1].split()[:6] == ["NAME", "ROLE", "ADAPTER", "ENGINE", "SIZE", "UNTIL"]
        rows = {line.split()[0]: line for line in lines[2:]}
        assert set(rows) == {"general", "embedding"}
        assert "torch" in rows["general"] and "while the server runs" in rows["general"]
        assert str(tiny_model) not in out  # names, not paths
        assert main(["ps", "--json"]) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["server"] == server.url
        assert {m["role"] for m in document["models"]} == {"general", "embedding"}


def test_without_a_server_ps_says_so_and_chat_loads_locally(workspace: Path, capsys) -> None:
    assert main(["ps"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no mongars-llm server answers" in err
    assert main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"server": None, "models": []}
    assert main(["chat", "--prompt", "hi", "--json"]) == 0
    assert "loading role 'general'" in capsys.readouterr().err


def test_the_key_is_sent_only_when_the_server_asks(
    workspace: Path, tiny_model: Path, manifest: Path, runtime: Any, monkeypatch, capsys
) -> None:
    key = "cli-key-5e1b0c7d-secret"
    monkeypatch.setenv("MONGARS_API_KEY", key)
    with running_server(tiny_model, manifest, runtime, monkeypatch, api_key=None) as (_, seen):
        assert main(["embed", "a text", "--json"]) == 0
        assert seen and all(header is None for header in seen)  # never asked: never sent
    capsys.readouterr()
    with running_server(tiny_model, manifest, runtime, monkeypatch, api_key=SecretStr(key)) as (
        _,
        seen,
    ):
        assert main(["embed", "a text", "--json"]) == 0
        assert f"Bearer {key}" in seen
        monkeypatch.delenv("MONGARS_API_KEY")
        assert main(["chat", "--prompt", QUESTION]) == 1
        err = capsys.readouterr().err
        assert "401" in err and "MONGARS_API_KEY" in err and key not in err
