"""`mongars-llm models list --installed` and `mongars-llm models rm` on real installs.

The installs are real: a tiny ``.gguf`` file (``local`` provider, converted into
``<models_dir>/gguf/``), the same file laid out as an Ollama model in a store on
disk (converted into ``<models_dir>/ollama/``), and a Hub snapshot served by a
local olah mirror (``<models_dir>/huggingface/``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mongars_llm._fs import human_bytes
from mongars_llm.cli import main
from mongars_llm.provisioning import clear_cache

pytest.importorskip("gguf")


def _load(name: str) -> ModuleType:
    """A helper module of tests/provisioning (that folder is a package of its own)."""
    path = Path(__file__).parents[1] / "provisioning" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_models_cli_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_gguf_support = _load("gguf_support")
_hub = _load("conftest")
# the olah Hub mirror fixtures of tests/provisioning/conftest.py
tiny_model_dir = _hub.tiny_model_dir
olah_server = _hub.olah_server
hub_env = _hub.hub_env


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    root = tmp_path_factory.mktemp("models-cli")
    checkpoint = build_tiny_model(root / "checkpoint", hidden_size=32, seed=0)
    return _gguf_support.write_tiny_gguf(checkpoint, root / "tiny.gguf")


@pytest.fixture
def workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path, tiny_model_dir: Path
) -> Iterator[Path]:
    """A manifest with a GGUF role, an Ollama role and a local folder role; nothing installed."""
    import mongars_llm.settings

    for name in ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MONGARS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("MONGARS_PROVISION_LOCK_TIMEOUT", "60")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-store"))
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{_hub.free_port()}")  # no daemon
    monkeypatch.setattr(mongars_llm.settings, "_settings", None)
    _gguf_support.layout_ollama_store(tmp_path / "ollama-store", tiny_gguf, "tiny", "135m")
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    manifest = {
        "profiles": {
            "t": {
                "models": {
                    "chat": {"name": "tiny.gguf", "provider": "local"},
                    "small": {"name": "tiny:135m", "provider": "ollama"},
                    "mine": {"name": str(tiny_model_dir), "provider": "local"},
                }
            }
        }
    }
    (tmp_path / "llm_models.json").write_text(json.dumps(manifest))
    clear_cache()
    yield tmp_path
    clear_cache()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--manifest", "llm_models.json", "--profile", "t"])
    out, err = capsys.readouterr()
    return code, out, err


def _provision(capsys: pytest.CaptureFixture[str], *roles: str) -> dict[str, dict]:
    code, out, err = _cli(capsys, "provision", "--json", *(["--roles", *roles] if roles else []))
    assert code == 0, out + err
    return {entry["role"]: entry for entry in json.loads(out)["entries"]}


def _installed(capsys: pytest.CaptureFixture[str]) -> dict:
    code, out, err = _cli(capsys, "models", "list", "--installed", "--json")
    assert code == 0, err
    return json.loads(out)


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mongars-llm: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ list --installed
def test_list_installed_shows_every_install_with_its_roles_and_size(
    workdir: Path, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    assert _installed(capsys)["models"] == []
    code, out, _ = _cli(capsys, "models", "list", "--installed")
    assert code == 0 and "nothing installed" in out

    entries = _provision(capsys)
    listing = _installed(capsys)
    assert listing["models_dir"] == str(workdir / "models")
    assert listing["active_profile"] == "t"
    by_role = {tuple(m["roles"]): m for m in listing["models"]}
    # the local folder role is used in place: not an install, never listed
    assert set(by_role) == {("chat",), ("small",)}
    assert not any(str(tiny_model_dir) in m["path"] for m in listing["models"])

    gguf, ollama = by_role[("chat",)], by_role[("small",)]
    assert (gguf["provider"], gguf["path"]) == ("local", entries["chat"]["path"])
    assert gguf["revision"] == entries["chat"]["revision"]  # the GGUF's sha256
    assert gguf["source"] == str(workdir / "tiny.gguf")
    assert (ollama["provider"], ollama["model"]) == ("ollama", "tiny:135m")
    assert ollama["path"] == entries["small"]["path"]
    for model in (gguf, ollama):
        assert model["bytes"] == _files_bytes(Path(model["path"])) > 10_000
        assert model["size"] == human_bytes(model["bytes"])
    assert listing["bytes"] == gguf["bytes"] + ollama["bytes"]

    code, out, _ = _cli(capsys, "models", "list", "--installed")
    assert code == 0
    header, *rows, footer = out.strip().splitlines()
    # names, not paths: the GGUF install is shown by its file name; -v adds the folders
    assert header.split() == ["MODEL", "REVISION", "PROVIDER", "ROLES", "SIZE"]
    assert gguf["name"] == "tiny.gguf" and ollama["name"] == "tiny:135m"
    assert any(
        "tiny:135m" in row and " small " in row and human_bytes(ollama["bytes"]) in row
        for row in rows
    )
    assert any(row.startswith("tiny.gguf ") and " chat " in row for row in rows)
    assert str(workdir) not in "\n".join(rows)
    assert footer.startswith("2 installed, ") and str(workdir / "models") in footer

    code, out, _ = _cli(capsys, "models", "ls", "--installed", "-v")  # ls: as `ollama ls`
    assert code == 0
    header, *rows, _ = out.strip().splitlines()
    assert header.split()[-1] == "PATH"
    assert any(row.startswith("tiny.gguf ") and row.endswith(gguf["path"]) for row in rows)


# ------------------------------------------------------------------ rm
def test_rm_a_role_deletes_its_install_and_provision_reinstalls_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mongars_llm.provisioning import provision

    entries = _provision(capsys)
    folder = Path(entries["chat"]["path"])
    # this process cached the report: rm must not leave a stale "exists" behind
    assert provision(["chat"], manifest="llm_models.json", profile="t")["chat"].action == "exists"

    code, out, err = _cli(capsys, "models", "rm", "chat", "--yes")
    assert code == 0, err
    assert str(folder) in out and "removed 1 install(s)" in out
    assert not folder.exists()
    assert not [p.name for p in folder.parent.iterdir()]  # no trash left behind
    assert (workdir / "tiny.gguf").is_file()  # the user's file is never touched
    assert Path(entries["small"]["path"], "config.json").is_file()  # nor the other install
    assert [m["roles"] for m in _installed(capsys)["models"]] == [["small"]]

    again = provision(["chat"], manifest="llm_models.json", profile="t")["chat"]
    assert (again.action, again.path, again.revision) == (
        "installed",
        str(folder),
        entries["chat"]["revision"],
    )
    assert Path(again.path, "config.json").is_file()


def test_rm_by_model_name_removes_the_model_folder(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _provision(capsys)
    folder = Path(entries["small"]["path"])
    code, out, err = _cli(capsys, "models", "rm", "tiny:135m", "--yes", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [m["path"] for m in report["removed"]] == [str(folder)]
    assert report["bytes"] > 0
    assert not folder.parent.exists()  # ollama/<name>/ held only that install
    assert (workdir / "ollama-store" / "blobs").is_dir()  # Ollama's own store is untouched
    assert _provision(capsys, "small")["small"]["action"] == "installed"


def test_rm_a_path_under_the_models_dir_and_a_dry_run(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _provision(capsys, "chat")
    folder = Path(entries["chat"]["path"])
    relative = folder.relative_to(workdir)
    for target in (str(relative), "tiny.gguf"):  # the folder, or the GGUF file it came from
        code, out, err = _cli(capsys, "models", "rm", target, "--dry-run")
        assert code == 0, err
        assert str(folder) in out and folder.is_dir()  # a dry run deletes nothing
    code, _, err = _cli(capsys, "models", "rm", str(relative), "--yes")
    assert code == 0, err
    assert not folder.exists()


def test_rm_refuses_what_provisioning_did_not_install(
    workdir: Path, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    _provision(capsys, "chat")
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    notes = workdir / "notes"  # a local folder that is not even a checkpoint
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    manifest = json.loads((workdir / "llm_models.json").read_text())
    manifest["profiles"]["t"]["models"]["notes"] = {"name": "notes", "provider": "local"}
    (workdir / "llm_models.json").write_text(json.dumps(manifest))

    # a local role's own folder, by role and by path: refused, exit 2, nothing deleted
    for target in ("mine", "notes", str(tiny_model_dir), str(workdir)):
        code, _, err = _cli(capsys, "models", "rm", target, "--yes")
        line = _one_error_line(err)
        assert code == 2, line
        assert "refusing to remove" in line and str(workdir / "models") in line
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    assert (notes / "todo.txt").read_text() == "keep me"

    # the models dir itself or a whole kind folder
    for target in ("models", "models/gguf"):
        code, _, err = _cli(capsys, "models", "rm", target, "--yes")
        assert code == 2 and "name one model" in _one_error_line(err)

    # nothing matches: exit 1 naming the roles and the way to list installs
    code, _, err = _cli(capsys, "models", "rm", "nope", "--yes")
    line = _one_error_line(err)
    assert code == 1 and "chat, small, mine, notes" in line and "models list --installed" in line
    code, _, err = _cli(capsys, "models", "rm", "small", "--yes")  # a role not installed
    assert code == 1 and "nothing is installed for role 'small'" in _one_error_line(err)
    code, out, _ = _cli(capsys, "models", "rm", "nope", "--yes", "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    assert len(_installed(capsys)["models"]) == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rm_asks_first_in_a_terminal_and_needs_yes_elsewhere(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(_provision(capsys, "chat")["chat"]["path"])

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a pipe: no one to ask
    code, _, err = _cli(capsys, "models", "rm", "chat")
    assert code == 2 and "pass --yes" in _one_error_line(err)
    assert folder.is_dir()

    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, _, err = _cli(capsys, "models", "rm", "chat")
    assert code == 1 and "[y/N]" in err and "nothing removed" in err
    assert folder.is_dir()

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, _, err = _cli(capsys, "models", "rm", "chat")
    assert code == 0 and "[y/N]" in err
    assert not folder.exists()


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_rm_never_deletes_under_a_running_download(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mongars_llm.settings

    folder = Path(_provision(capsys, "chat")["chat"]["path"])
    lock = workdir / "models" / ".locks" / "gguf" / f"{folder.name}.lock"
    monkeypatch.setenv("MONGARS_PROVISION_LOCK_TIMEOUT", "1")
    monkeypatch.setattr(mongars_llm.settings, "_settings", None)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, _, err = _cli(capsys, "models", "rm", "chat", "--yes")
        line = _one_error_line(err)
        assert code == 1 and "timed out after 1s" in line and str(lock) in line
        assert Path(folder, "config.json").is_file()
    finally:
        holder.communicate("\n", timeout=30)
    code, _, err = _cli(capsys, "models", "rm", "chat", "--yes")
    assert code == 0, err
    assert not folder.exists()


# ------------------------------------------------------------------ Hub snapshots
def test_hub_snapshots_are_listed_and_removed_with_their_refs(
    workdir: Path, capsys: pytest.CaptureFixture[str], hub_env
) -> None:
    first, second = hub_env.commits["org/tiny"]
    manifest = json.loads((workdir / "llm_models.json").read_text())
    manifest["profiles"]["t"]["models"] = {
        "general": "org/tiny",
        "pinned": {"name": "org/tiny", "revision": "v1"},
    }
    (workdir / "llm_models.json").write_text(json.dumps(manifest))
    entries = _provision(capsys)
    assert (entries["general"]["revision"], entries["pinned"]["revision"]) == (second, first)

    listing = {m["revision"]: m for m in _installed(capsys)["models"]}
    assert set(listing) == {first, second}
    assert listing[second]["roles"] == ["general"] and listing[first]["roles"] == ["pinned"]
    assert all(
        m["model"] == "org/tiny" and m["provider"] == "huggingface" for m in listing.values()
    )

    # one revision by NAME@REV: the other stays, and so does the repo folder
    code, _, err = _cli(capsys, "models", "rm", f"org/tiny@{first[:8]}", "--yes")
    assert code == 0, err
    repo = workdir / "models" / "huggingface" / "org--tiny"
    assert not (repo / first).exists() and (repo / second / "config.json").is_file()
    assert not (repo / "refs" / "v1").exists()  # no ref names a removed commit
    assert (repo / "refs" / "main").read_text().strip() == second

    # the whole model by name: the repo folder goes, refs included
    code, _, err = _cli(capsys, "models", "rm", "org/tiny", "--yes")
    assert code == 0, err
    assert not repo.exists()
    assert _installed(capsys)["models"] == []
    again = _provision(capsys)
    assert {e["action"] for e in again.values()} == {"installed"}


# ------------------------------------------------------------------ Python API
def test_the_python_api_lists_and_removes_installs(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from mongars_llm import ModelManager, provision
    from mongars_llm.provisioning import installed_models, remove_models

    entries = _provision(capsys)
    manager = ModelManager("llm_models.json", profile="t")
    installed = {model.roles: model for model in installed_models(manager=manager)}
    assert set(installed) == {("chat",), ("small",)}
    chat = installed[("chat",)]
    assert str(chat.path) == entries["chat"]["path"] and chat.bytes > 0

    assert provision(["chat"], manager=manager)["chat"].action == "exists"  # now cached
    with caplog.at_level(logging.INFO, logger="mongars_llm.provision"):
        removed = remove_models("chat", manager=manager)
    assert [model.path for model in removed] == [chat.path] and not chat.path.exists()
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "provision_remove"]
    assert record.fields["path"] == str(chat.path) and record.fields["bytes"] == chat.bytes
    assert [model.roles for model in installed_models(manager=manager)] == [("small",)]
    # the cached report of the removed install no longer answers: it is installed again
    assert provision(["chat"], manager=manager)["chat"].action == "installed"


def test_ensure_models_installed_puts_a_removed_install_back(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mongars_llm import ModelManager
    from mongars_llm.provisioning import installed_models, remove_models

    _provision(capsys)
    manager = ModelManager("llm_models.json", profile="t")
    assert {model.roles for model in installed_models(manager=manager)} == {
        ("chat",),
        ("small",),
    }
    (removed,) = remove_models("chat", manager=manager)
    assert not removed.path.exists()
    report = manager.ensure_models_installed(["chat"])
    assert report["chat"].action == "installed" and Path(str(report["chat"].path)).exists()


# ------------------------------------------------------------------ shared installs
def test_rm_a_role_whose_install_other_roles_share_needs_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((workdir / "llm_models.json").read_text())
    manifest["profiles"]["t"]["models"]["coding"] = {"name": "tiny.gguf", "provider": "local"}
    (workdir / "llm_models.json").write_text(json.dumps(manifest))
    entries = _provision(capsys, "chat", "coding")
    folder = Path(entries["chat"]["path"])
    assert entries["coding"]["path"] == str(folder)  # one install, two roles

    code, _, err = _cli(capsys, "models", "rm", "chat", "--yes")
    line = _one_error_line(err)
    assert code == 2 and "also used by role(s) 'coding'" in line and "--force" in line
    assert folder.is_dir()  # refused: nothing deleted

    code, _, err = _cli(capsys, "models", "rm", "chat", "--dry-run")  # a dry run says it
    assert code == 0 and "also used by role(s) 'coding'" in err and folder.is_dir()

    code, _, err = _cli(capsys, "models", "rm", "chat", "coding", "--yes")  # both named
    assert code == 0, err
    assert not folder.exists()
    _provision(capsys, "chat")
    code, _, err = _cli(capsys, "models", "rm", "chat", "--yes", "--force")
    assert code == 0, err
    assert "also used by role(s) 'coding'" in err and not folder.exists()


# ------------------------------------------------------------------ provision output
def test_provision_says_when_each_role_and_its_conversion_start(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(capsys, "provision", "--roles", "chat", "--no-progress")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("chat: local tiny.gguf ...")
    assert lines[1].startswith("chat: converting the GGUF file")
    header = out.splitlines()[0].split()
    assert header == ["ROLE", "PROVIDER", "MODEL", "ACTION", "REVISION", "SIZE", "TIME"]
    assert str(workdir / "models") not in out.splitlines()[1]  # no path unless -v

    code, out, err = _cli(capsys, "provision", "--roles", "chat", "-v")
    assert code == 0
    assert "converting" not in err  # installed: nothing to convert
    assert out.splitlines()[0].split()[-1] == "PATH" and str(workdir / "models") in out
