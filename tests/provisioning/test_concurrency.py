"""Concurrent callers share one download: threads, asyncio tasks, processes, file locks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from filelock import FileLock

from mongars_llm.provisioning import (
    aprovision,
    provision,
    register_provider,
    unregister_provider,
)
from mongars_llm.provisioning.huggingface import HuggingFaceProvider

from .conftest import Olah, model_files, write_manifest

pytestmark = pytest.mark.network


class CountingProvider(HuggingFaceProvider):
    """The real Hub provider, counting the downloads it starts."""

    fetches = 0
    _lock = threading.Lock()

    def fetch(self, request, resolution):  # type: ignore[no-untyped-def]
        with CountingProvider._lock:
            CountingProvider.fetches += 1
        return super().fetch(request, resolution)


@pytest.fixture
def counting(hub_env: Olah, tmp_path: Path, tiny_model_dir: Path):
    CountingProvider.fetches = 0
    register_provider("hf-counting", CountingProvider)
    repo_id = f"org/shared-{tmp_path.name[-12:].replace('_', '-')}"
    hub_env.add_repo(repo_id, [model_files(tiny_model_dir)])
    manifest = write_manifest(
        tmp_path / "cfg", {"general": {"name": repo_id, "provider": "hf-counting"}}
    )
    yield manifest, repo_id
    unregister_provider("hf-counting")


def test_sixteen_threads_share_one_download(counting, hub_env: Olah, settings) -> None:
    manifest, repo_id = counting
    barrier = threading.Barrier(16)

    def call(_: int):
        barrier.wait()
        return provision(["general"], manifest=manifest, profile="t", settings=settings)

    with ThreadPoolExecutor(16) as pool:
        reports = list(pool.map(call, range(16)))

    assert CountingProvider.fetches == 1
    assert hub_env.downloads(repo_id, "model.safetensors") == 1
    entries = [r["general"] for r in reports]
    assert {e.action for e in entries} <= {"installed", "exists"}
    # callers that arrived during the download shared its result (single-flight), rather
    # than queueing on the file lock and finding the model afterwards
    assert sum(e.action == "installed" for e in entries) >= 2
    assert len({e.path for e in entries}) == 1 and Path(entries[0].path).is_dir()


async def test_sixteen_asyncio_tasks_share_one_download(counting, hub_env: Olah, settings) -> None:
    manifest, repo_id = counting
    reports = await asyncio.gather(
        *(
            aprovision(["general"], manifest=manifest, profile="t", settings=settings)
            for _ in range(16)
        )
    )
    assert CountingProvider.fetches == 1
    assert hub_env.downloads(repo_id, "model.safetensors") == 1
    assert all(r.ok for r in reports)
    assert sum(r["general"].action == "installed" for r in reports) >= 2
    assert len({r["general"].path for r in reports}) == 1


def test_a_held_lock_times_out_into_a_clear_failed_entry(
    counting, settings, tmp_path: Path
) -> None:
    manifest, repo_id = counting
    impatient = settings.model_copy(update={"provision_lock_timeout": 0.5})
    lock = (
        settings.resolved_models_dir
        / ".locks"
        / "huggingface"
        / f"{repo_id.replace('/', '--')}.lock"
    )
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):  # another process is provisioning this model
        entry = provision(manifest=manifest, profile="t", settings=impatient)["general"]
    assert entry.action == "failed"
    assert "timed out" in entry.error and "lock" in entry.error
    assert CountingProvider.fetches == 0
    # once the lock is free the role installs
    assert provision(manifest=manifest, profile="t", settings=impatient)["general"].action == (
        "installed"
    )


_CHILD = """
import json, sys, time
from mongars_llm.provisioning import provision
from mongars_llm.settings import Settings

first = []
def slow_start(event):  # hold the download (and its lock) a little so the processes overlap
    if event.stage == "download" and not first:
        first.append(1)
        time.sleep(1.0)

settings = Settings(models_dir=sys.argv[2], cache_dir=sys.argv[3], provision_lock_timeout=120)
report = provision(manifest=sys.argv[1], profile="t", settings=settings, progress=slow_start,
                   show_progress=False)
print(json.dumps(report["general"].to_dict()))
"""


@pytest.mark.slow
def test_two_processes_download_once(
    hub_env: Olah, tmp_path: Path, tiny_model_dir: Path, settings
) -> None:
    repo_id = "org/two-processes"
    hub_env.add_repo(repo_id, [model_files(tiny_model_dir)])
    manifest = write_manifest(tmp_path / "cfg", {"general": repo_id})
    env = {**os.environ, "HF_ENDPOINT": hub_env.url}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(manifest),
                str(settings.resolved_models_dir),
                str(tmp_path / f"cache{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    entries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(e["action"] for e in entries) == ["exists", "installed"]
    assert entries[0]["path"] == entries[1]["path"] and Path(entries[0]["path"]).is_dir()
    assert hub_env.downloads(repo_id, "model.safetensors") == 1
