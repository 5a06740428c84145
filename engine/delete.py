"""Deleting a run: its rows in runs.db and, if asked, its folder. The console's delete dialog and `rlhf
delete` both come here. A folder is removed only where it carries this runs.db's marker for the run: a folder
another runs.db's run writes into, or a path from before the marker, is kept."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from engine.store import Store, StoreError


def check_deletable(store: Store, run: dict) -> None:
    """StoreError for a run that must not be deleted now: active, or a stage of a pipeline still going (its
    next stage reads this one's export and record)."""
    from engine.pipeline import settled_pipeline
    from engine.run import settled

    # As a look at the run table would find them: a row that says running for processes that are gone is
    # closed first (else neither a stop, which finds nothing to stop, nor this would ever clear it)
    if run["status"] in ("pending", "running"):
        run = settled(store, run["id"])
    if run["status"] in ("pending", "running"):
        raise StoreError(f"run {run['id']} is {run['status']}: stop it before deleting it (rlhf stop "
                         f"{run['id']} --wait)")
    if run.get("pipeline_id"):
        pipeline = settled_pipeline(store, run["pipeline_id"])
        if pipeline["status"] in ("pending", "running"):
            raise StoreError(f"run {run['id']} is a stage of pipeline {pipeline['id']}, which is "
                             f"{pipeline['status']}: its next stages use it; stop the pipeline first")


@dataclass(frozen=True)
class Forgotten:
    """A run whose rows are gone, and what decides the fate of its folder."""

    run: dict
    ours: bool  # the folder carries this runs.db's marker for the run
    foreign: str | None  # why it is another's, where it is not ours


def forget_runs(db_path: str | os.PathLike, run_ids: Sequence[int]) -> list[Forgotten]:
    """Forget the runs and what they logged, all or none (StoreError if one is active or unknown)."""
    with Store(db_path, create=False) as store:
        runs = [store.run(run_id) for run_id in run_ids]
        forgotten = []
        for run in runs:
            check_deletable(store, run)
            ours = store.owns_folder(run)
            forgotten.append(Forgotten(run, ours, store.foreign_folder(run) if not ours else None))
        store.delete_runs(run_ids)  # refuses them all, in its own transaction, where one became active since
        store.vacuum_if_worthwhile()
    return forgotten


def delete_run(db_path: str | os.PathLike, run_id: int, files: bool) -> str | None:
    """Forget run `run_id` and, with `files`, delete its folder. Returns what became of a folder that was
    not deleted whole, or None."""
    [gone] = forget_runs(db_path, [run_id])
    return delete_folder(gone) if files else None


def delete_folder(gone: Forgotten) -> str | None:
    """Delete a forgotten run's folder where it is ours; else, or where files would not go, say what became
    of it."""
    run_id, folder = gone.run["id"], gone.run.get("output_dir")
    if not folder or not Path(folder).exists():
        return None
    if not gone.ours:
        why = gone.foreign or ("it does not carry this runs.db's marker for the run (another runs.db's run, or "
                               "a folder from before schema 5)")
        return f"run {run_id} is forgotten; its folder {folder} was kept: {why}"
    failed: list[str] = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there
        shutil.rmtree(folder, onexc=lambda _f, path, err: failed.append(f"{path}: {err}"))
    else:
        shutil.rmtree(folder, onerror=lambda _f, path, info: failed.append(f"{path}: {info[1]}"))
    if failed:
        return (f"run {run_id} is forgotten; {len(failed)} file(s) of its folder could not be deleted "
                f"(first: {failed[0]})")
    return None
