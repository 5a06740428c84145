"""Small readers over runs.db for the training tests."""

from __future__ import annotations

import os

from engine.store import Store


def metric(run_id: int, name: str, db: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, in the order written."""
    with Store(db or os.environ["RLHF_DB"]) as store:
        return [(r["step"], r["value"]) for r in store.metrics_since(0, run_id=run_id) if r["name"] == name]


def run_row(run_id: int, db: str | None = None) -> dict:
    with Store(db or os.environ["RLHF_DB"]) as store:
        return store.run(run_id)
