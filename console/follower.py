"""One incremental poll of runs.db: the runs table when it changed, the metric rows after the cursor,
and whole histories only for the runs being looked at.

At start nothing is read row by row: SQLite aggregates each run's best-metric extremes, and each run
gets its newest rows (for the ETA); the cursor starts at the newest row. A run that is selected or
overlaid has its whole history loaded then, a slice per poll (a run of millions of rows took one call of
seconds, and every other run's figures stood still meanwhile), and sent once whole. Cost per poll: the runs
table, the new rows and a slice, however long the runs are; memory: the histories being looked at, not every
row of runs.db.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from console.messages import HistoryLoading, HistoryReset, MetricsPolled, RunsPolled
from console.series import BEST, LIGHT_POINTS

SETTLE_S = 5.0  # how often the runs that claim to be running have their processes looked at
METRIC_BATCH = 50_000  # rows per poll: a long history loads in slices and the UI stays responsive
BEST_NAMES = sorted({name for choices in BEST.values() for name, _ in choices})


@dataclass
class _Load:
    """A whole history being read: the run's version it belongs to, its columns so far, its last run_seq."""

    version: int
    columns: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    after: int = 0


class StoreFollower:
    def __init__(self, db_path: str | os.PathLike, batch: int = METRIC_BATCH):
        from engine.store import Store  # sqlite-utils (and pandas) load here, off the UI thread

        self.store = Store(db_path)
        self.batch = batch
        self.cursor: int | None = None  # None until the first poll has seeded every run
        self._versions: dict[int, int] = {}
        self._last_runs: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self.followed: frozenset[int] = frozenset()  # set by the App: the runs being looked at
        self._full: set[int] = set()  # runs whose whole history has been sent, or is being read
        self._loading: dict[int, _Load] = {}  # the whole histories being read, a slice per poll
        self.requests: queue.SimpleQueue[int] = queue.SimpleQueue()  # runs to load whole, from the App
        self._settled_at = 0.0

    def _settle(self, runs: list[dict[str, Any]], pipelines: list[dict[str, Any]]) -> bool:
        """A run whose processes died unrecorded (a kill -9, an OOM) is closed as failed, as `rlhf runs` and
        a resume close it: the table never says running for nothing, and `r` can resume it at once. Whether
        any was closed."""
        from engine.pipeline import settle_pipelines
        from engine.run import settle_active

        try:  # and a pipeline whose own process died: its row would say running for ever
            return bool(settle_active(self.store, runs)) | settle_pipelines(self.store, pipelines)
        except sqlite3.Error:  # a runs.db this user may only read: the table shows such a run as lost
            return False

    def _light(self, run_id: int, version: int) -> HistoryReset:
        assert self.cursor is not None
        return HistoryReset(run_id, version, self.store.recent_metrics(run_id, self.cursor, LIGHT_POINTS * 4),
                            full=False, extremes=self.store.metric_extremes(BEST_NAMES, self.cursor, run_id)
                            .get(run_id, {}))

    def _whole(self, run_id: int, version: int) -> None:
        """Start reading the run's whole history (again: a resume that rewrote it starts it over)."""
        self._full.add(run_id)
        self._loading[run_id] = _Load(version)

    def _read_slices(self) -> tuple[list[HistoryReset | HistoryLoading], bool]:
        """Up to a batch of rows of the histories being read; each one read up to the cursor is sent whole
        (the rows after it come as every run's do), one still being read says how far it is. Whether any is
        still being read."""
        assert self.cursor is not None
        done: list[HistoryReset | HistoryLoading] = []
        budget = self.batch
        for run_id, load in list(self._loading.items()):
            if budget <= 0:
                break
            if run_id not in self.followed:  # no longer looked at: not worth finishing
                del self._loading[run_id]
                continue
            before = sum(len(cols[2]) for cols in load.columns.values())
            load.columns, load.after = self.store.metric_columns(run_id, self.cursor, load.after, budget, load.columns)
            budget -= sum(len(cols[2]) for cols in load.columns.values()) - before
            if budget > 0:  # fewer rows than asked for: it reached the cursor
                done.append(HistoryReset(run_id, load.version, [], full=True, columns=load.columns))
                del self._loading[run_id]
            else:
                done.append(HistoryLoading(run_id, sum(len(cols[2]) for cols in load.columns.values())))
        return done, bool(self._loading)

    def poll(self) -> tuple[list[Any], bool]:
        """Messages for the App, and whether more rows are waiting (poll again at once)."""
        messages: list[Any] = []
        runs, pipelines = self.store.runs(), self.store.pipelines()
        if time.monotonic() - self._settled_at >= SETTLE_S:
            self._settled_at = time.monotonic()
            if self._settle(runs, pipelines):
                runs, pipelines = self.store.runs(), self.store.pipelines()  # as closed
        if (runs, pipelines) != self._last_runs:
            self._last_runs = (runs, pipelines)
            messages.append(RunsPolled(runs, pipelines))
        if self.cursor is None:  # start: a light history per run, then only what is new
            self.cursor = self.store.max_seq()
            for run in runs:
                self._versions[run["id"]] = run["history_version"]
                messages.append(self._light(run["id"], run["history_version"]))
        for run in runs:
            known = self._versions.get(run["id"])
            if known is not None and known != run["history_version"]:  # a resume dropped part of the history
                if run["id"] in self.followed:
                    self._whole(run["id"], run["history_version"])
                else:
                    messages.append(self._light(run["id"], run["history_version"]))
            self._versions[run["id"]] = run["history_version"]
        while True:
            try:
                run_id = self.requests.get_nowait()
            except queue.Empty:
                break
            if run_id in self._versions and run_id not in self._full:
                self._whole(run_id, self._versions[run_id])
        self._full &= set(self.followed)  # a run no longer looked at is light again (the App lightens it)
        whole, reading = self._read_slices()
        messages += whole
        rows = self.store.metrics_since(self.cursor, limit=self.batch)
        if rows:
            self.cursor = rows[-1]["seq"]
            messages.append(MetricsPolled(rows))
        return messages, len(rows) == self.batch or reading

    def close(self) -> None:
        self.store.close()
