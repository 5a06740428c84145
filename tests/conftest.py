"""Shared fixtures: the tiny demo (built once through the real code), and a private working folder
per test with its own runs.db, so no test sees the developer's runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
RLHF = [sys.executable, "-m", "engine.cli"]


@pytest.fixture(autouse=True)
def _the_checkouts_runs_folder_stays_untouched():
    """A run registered without an output root gets a folder under cwd's `runs/`: a test that forgets its
    own working folder would leave folders in the checkout (and find the developer's)."""
    runs = REPO / "runs"
    before = set(os.listdir(runs)) if runs.is_dir() else set()
    yield
    after = set(os.listdir(runs)) if runs.is_dir() else set()
    assert after <= before, f"the test wrote into {runs}: {sorted(after - before)[:5]}"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import init_demo

    folder = tmp_path_factory.mktemp("demo")
    init_demo(folder)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd with `demo/` in place, so configs/tiny.yaml runs as shipped; RLHF_DB points inside it."""
    (tmp_path / "demo").symlink_to(demo_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_DB", str(tmp_path / "runs.db"))
    monkeypatch.delenv("RLHF_RUN_ID", raising=False)
    # Subprocesses must import this checkout's engine whatever their cwd.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return tmp_path
