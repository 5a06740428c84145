"""Small readers over runs.db for the training tests, and the set-ups of a shared server's files."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from engine.store import Store


def metric(run_id: int, name: str, db: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, in the order written."""
    with Store(db or os.environ["RLHF_DB"]) as store:
        return [(r["step"], r["value"]) for r in store.metrics_since(0, run_id=run_id) if r["name"] == name]


def run_row(run_id: int, db: str | None = None) -> dict:
    with Store(db or os.environ["RLHF_DB"]) as store:
        return store.run(run_id)


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A folder every user may write, as a team's runs folder is (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="rlhf-shared-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@contextlib.contextmanager
def as_user(uid: int) -> Iterator[None]:
    """This process acts as another user (root only: its real id stays, so it can come back)."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@contextlib.contextmanager
def read_only(db: Path) -> Iterator[None]:
    """runs.db that this user can read and not write: an immutable file for root (file modes do not stop
    it; skipped where chattr does not work), a read-only file in a read-only folder for anyone else."""
    import pytest

    for leftover in db.parent.glob(db.name + "-*"):
        leftover.unlink()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
            pytest.skip("root, and no chattr on this file system: no way to make a file read-only")
        undo = ["chattr", "-i", str(db)]
    else:
        db.chmod(0o444)
        db.parent.chmod(0o555)
        undo = ["chmod", "-R", "u+w", str(db.parent)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def assert_disk_estimate(stage: str, overrides: list[str], checkpoint: Path, final: Path) -> None:
    """The disk estimate of the recipe's stage against what the run wrote: a checkpoint and the export, each
    within 2 % and the small files' allowance."""
    from engine.config import load_recipe
    from engine.disk_estimate import estimate_disk, folder_bytes
    from engine.estimate import Parallel
    from tests.conftest import TINY

    [disk] = estimate_disk(load_recipe(TINY, overrides, stage), [stage], Parallel(cpu=True), cuda=False)
    for what, estimated, folder in (("checkpoint", disk.checkpoint_bytes, checkpoint), ("export", disk.export, final)):
        real = folder_bytes(folder)
        assert abs(real - estimated) <= 0.02 * estimated + 64 * 1024, (what, real, estimated, disk.checkpoint)

