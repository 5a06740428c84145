"""A run's life in runs.db: registered, running, then done, stopped or failed (with the reason).

A launcher registers the run and hands its id to every rank through `RLHF_RUN_ID`; a run started
in-process registers itself. Only rank 0 writes.
"""

from __future__ import annotations

import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.config import Recipe, Stage, recipe_to_json
from engine.store import Store

RUN_ID_ENV = "RLHF_RUN_ID"
DB_ENV = "RLHF_DB"


@dataclass
class RunHandle:
    run_id: int
    output_dir: Path
    store: Store | None  # None on ranks other than 0
    status: str = "done"  # what the run ends as when its body returns normally


def register_run(store: Store, stage: Stage, recipe: Recipe, recipe_path: str, overrides: list[str]) -> int:
    return store.create_run(
        stage=stage,
        name=recipe.name,
        recipe=str(recipe_path),
        config=recipe_to_json(recipe),
        overrides=overrides,
        output_root=recipe.output_root,
    )


@contextmanager
def tracked_run(
    db_path: str | os.PathLike, stage: Stage, recipe: Recipe, recipe_path: str, overrides: list[str]
) -> Iterator[RunHandle]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    given = os.environ.get(RUN_ID_ENV)
    if given is None and world > 1:
        raise RuntimeError(f"a run with {world} processes needs {RUN_ID_ENV}: start it with `rlhf launch`")
    store = Store(db_path) if rank == 0 else None
    if given is not None:
        run_id = int(given)
    else:
        assert store is not None
        run_id = register_run(store, stage, recipe, recipe_path, overrides)
    output_dir = Path(recipe.output_root) / str(run_id)
    handle = RunHandle(run_id, output_dir, store)
    if store is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        fields = {"status": "running", "started": time.time(), "world_size": world}
        if given is None:  # in-process run; a launcher records the process group it started itself
            fields.update(pid=os.getpid(), pgid=os.getpgid(0))
        store.update_run(run_id, **fields)
    try:
        yield handle
    except BaseException as err:
        if store is not None:
            status = "stopped" if isinstance(err, KeyboardInterrupt) else "failed"
            tail = "".join(traceback.format_exception(err))[-4000:]
            store.update_run(run_id, status=status, ended=time.time(), error=tail)
        raise
    else:
        if store is not None:
            store.update_run(run_id, status=handle.status, ended=time.time())
    finally:
        if store is not None:
            store.close()
