"""One incremental poll of runs.db: the runs table when it changed, the metric rows after the cursor,
and a reload of any run whose history a resume rewrote. Cost per poll: the runs table plus the new rows,
however long the runs are."""

from __future__ import annotations

import os
from typing import Any

from console.messages import HistoryReset, MetricsPolled, RunsPolled

METRIC_BATCH = 50_000  # rows per poll: a long history loads in slices and the UI stays responsive


class StoreFollower:
    def __init__(self, db_path: str | os.PathLike, batch: int = METRIC_BATCH):
        from engine.store import Store  # sqlite-utils (and pandas) load here, off the UI thread

        self.store = Store(db_path)
        self.batch = batch
        self.cursor = 0
        self._versions: dict[int, int] = {}
        self._last_runs: list[dict[str, Any]] | None = None

    def poll(self) -> tuple[list[Any], bool]:
        """Messages for the App, and whether more rows are waiting (poll again at once)."""
        messages: list[Any] = []
        runs = self.store.runs()
        if runs != self._last_runs:
            self._last_runs = runs
            messages.append(RunsPolled(runs))
        for run in runs:
            known = self._versions.get(run["id"])
            if known is not None and known != run["history_version"]:
                messages.append(HistoryReset(run["id"], run["history_version"],
                                             self.store.metrics_of(run["id"], self.cursor)))
            self._versions[run["id"]] = run["history_version"]
        rows = self.store.metrics_since(self.cursor, limit=self.batch)
        if rows:
            self.cursor = rows[-1]["seq"]
            messages.append(MetricsPolled(rows))
        return messages, len(rows) == self.batch

    def close(self) -> None:
        self.store.close()
