"""The console's copy of the metric history: appended to by each poll, read by the charts.

Pure Python and numpy (no Textual, no torch), so the arithmetic is tested on its own. Nothing here grows
with the number of polls: rows are appended to amortised arrays, smoothing is extended incrementally,
and a chart asks for at most a few points per column of its width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

# A run nobody is looking at keeps only its recent points (for the ETA) and the extremes of its metrics
# (for the best column): memory is per looked-at run, not per row of runs.db.
LIGHT_POINTS = 128


class _Column:
    """A float64 array that grows by doubling: appending n rows costs O(n) overall."""

    def __init__(self) -> None:
        self._data = np.empty(64)
        self.size = 0

    def extend(self, values: list[float]) -> None:
        need = self.size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)))
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:need] = values
        self.size = need

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]

    def keep_last(self, n: int) -> None:
        if self.size > n:
            self._data[:n] = self._data[self.size - n : self.size]
            self.size = n


class Series:
    """One metric of one run: steps, wall times and values in arrival order (which is step order)."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap  # keep at most about 2 x cap points (the newest), extremes over all of them
        self.steps = _Column()
        self.walls = _Column()
        self.values = _Column()
        self._smoothed = _Column()
        self._smooth_weight: float | None = None
        self._ema_state = (0.0, 0.0)  # running (biased average, sum of weights) for the debiased EMA
        self._extremes = (0, math.nan, math.nan)  # (points seen, min, max), extended like the EMA

    def __len__(self) -> int:
        return self.values.size

    def extend(self, steps: list[float], walls: list[float], values: list[float]) -> None:
        self.steps.extend(steps)
        self.walls.extend(walls)
        self.values.extend(values)
        if self.cap is not None and self.values.size > 2 * self.cap:
            self.extremes()  # folded in before the oldest points go
            for column in (self.steps, self.walls, self.values):
                column.keep_last(self.cap)
            self._extremes = (self.values.size, *self._extremes[1:])
            self._smooth_weight = None  # a light series is never drawn; start over if it ever is

    def seed_extremes(self, lo: float | None, hi: float | None) -> None:
        """Extremes known from runs.db's own aggregate, for points never loaded here."""
        seen, cur_lo, cur_hi = self._extremes
        values = [v for v in (lo, hi, cur_lo, cur_hi) if v is not None and not math.isnan(v)]
        self._extremes = (seen, min(values), max(values)) if values else (seen, math.nan, math.nan)

    def extremes(self) -> tuple[float, float]:
        """(min, max) of the finite values, NaN if none; only the points added since the last call are read."""
        seen, lo, hi = self._extremes
        if seen < self.values.size:
            new = self.values.view[seen:]
            if np.isfinite(new).any():
                lo = float(np.nanmin(new)) if math.isnan(lo) else min(lo, float(np.nanmin(new)))
                hi = float(np.nanmax(new)) if math.isnan(hi) else max(hi, float(np.nanmax(new)))
            self._extremes = (self.values.size, lo, hi)
        return lo, hi

    def smoothed(self, weight: float) -> np.ndarray:
        """Debiased exponential moving average (TensorBoard's smoothing), extended only over new points.

        NaN values (a non-finite metric) are carried through without poisoning the average.
        """
        if weight != self._smooth_weight:
            self._smoothed = _Column()
            self._smooth_weight = weight
            self._ema_state = (0.0, 0.0)
        done, total = self._smoothed.size, self.values.size
        if done < total:
            average, norm = self._ema_state
            out = []
            for v in self.values.view[done:total].tolist():
                if math.isnan(v):
                    out.append(math.nan)
                    continue
                average = weight * average + (1 - weight) * v
                norm = weight * norm + (1 - weight)
                out.append(average / norm if norm else v)
            self._ema_state = (average, norm)
            self._smoothed.extend(out)
        return self._smoothed.view


@dataclass
class RunHistory:
    run_id: int
    history_version: int = 0
    series: dict[str, Series] = field(default_factory=dict)
    rows: int = 0
    full: bool = True  # every point loaded (a run being looked at); else light: recent points and extremes
    loading: int = 0  # rows of its whole history read so far, while that takes more than one poll

    def add(self, rows: Iterable[Mapping]) -> None:
        grouped: dict[str, tuple[list, list, list]] = {}
        for row in rows:
            value = row["value"]
            cols = grouped.setdefault(row["name"], ([], [], []))
            cols[0].append(float(row["step"]))
            cols[1].append(float(row["wall_time"]))
            cols[2].append(math.nan if value is None else float(value))
        for name, (steps, walls, values) in grouped.items():
            self.series.setdefault(name, Series(None if self.full else LIGHT_POINTS)).extend(steps, walls, values)
            self.rows += len(values)

    def lighten(self) -> None:
        """Forget all but the recent points (the run is no longer looked at)."""
        if self.full:
            self.full = False
            for series in self.series.values():
                series.cap = LIGHT_POINTS
                series.extend([], [], [])


class History:
    """The runs' metrics, fed by `seq > cursor` polls: every point of the runs being looked at
    (`followed`), recent points and extremes of the others."""

    def __init__(self) -> None:
        self.runs: dict[int, RunHistory] = {}
        self.cursor = 0  # highest seq seen
        self.followed: set[int] = set()

    def ingest(self, rows: list[Mapping]) -> set[int]:
        """Append polled rows (seq order); returns the ids of the runs that got new points."""
        by_run: dict[int, list[Mapping]] = {}
        for row in rows:
            if row["seq"] <= self.cursor:
                continue  # already seen: a poll that overlapped a reload
            by_run.setdefault(row["run_id"], []).append(row)
            self.cursor = row["seq"]
        for run_id, run_rows in by_run.items():
            self.runs.setdefault(run_id, RunHistory(run_id, full=run_id in self.followed)).add(run_rows)
        return set(by_run)

    def replace(self, run_id: int, history_version: int, rows: list[Mapping], full: bool = True,
                extremes: Mapping[str, tuple[float | None, float | None]] | None = None,
                columns: Mapping[str, tuple] | None = None) -> None:
        """The run's history anew: all of it (a run now looked at, or one whose resume dropped its tail; as
        rows or packed columns), or light: its recent rows and the extremes runs.db aggregated for it."""
        fresh = RunHistory(run_id, history_version, full=full)
        fresh.add(rows)
        for name, (steps, walls, values) in (columns or {}).items():
            series = fresh.series.setdefault(name, Series(None if full else LIGHT_POINTS))
            series.extend(*(np.frombuffer(c, dtype=np.float64) for c in (steps, walls, values)))
            fresh.rows += len(values)
        for name, (lo, hi) in (extremes or {}).items():
            fresh.series.setdefault(name, Series(None if full else LIGHT_POINTS)).seed_extremes(lo, hi)
        self.runs[run_id] = fresh

    def forget(self, run_id: int) -> None:
        self.runs.pop(run_id, None)


def downsample(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 points per bucket: each bucket's minimum and maximum, in x order.

    A chart `buckets` cells wide cannot show more, and min/max keeps every spike a stride would drop.
    """
    n = len(x)
    if n <= 2 * buckets or buckets <= 0:
        return x, y
    size = n // buckets
    usable = size * buckets
    ys = y[:usable].reshape(buckets, size)
    clean = np.where(np.isnan(ys), np.nanmean(y) if np.isfinite(y).any() else 0.0, ys)
    lo = clean.argmin(axis=1) + np.arange(buckets) * size
    hi = clean.argmax(axis=1) + np.arange(buckets) * size
    idx = np.sort(np.concatenate([lo, hi, np.arange(usable, n)]))
    return x[idx], y[idx]


def metric_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Metric names grouped by their prefix before '/' (`losses/policy_loss` -> `losses`), sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.split("/", 1)[0] if "/" in name else name, []).append(name)
    return groups


# What "best" means per stage: (metric, higher is better), the first one the run has.
BEST = {
    "sft": (("eval_loss", False), ("loss", False)),
    "rm": (("eval_accuracy", True), ("accuracy", True)),
    "ppo": (("rollout_scores/mean", True),),
    # The score table's headline (a macro over the categories), once every category has a score; the mean of
    # the items before (another figure than the table's, where categories differ in size and score)
    "eval": (("eval/score_macro", True), ("eval/score_mean", True)),
}
# Running means (each point is the mean so far): a run's figure is its newest point, not its largest.
RUNNING = {"eval/score_mean", "eval/score_macro"}

# Which metrics a run's chart opens on.
DEFAULT_METRIC = {"sft": "loss", "rm": "loss", "ppo": "rollout_scores/mean"}


def best_metric(stage: str, run: RunHistory | None) -> tuple[str, float] | None:
    if run is None:
        return None
    for name, higher in BEST.get(stage, ()):
        series = run.series.get(name)
        if series is not None and len(series) and name in RUNNING:
            finite = series.values.view[np.isfinite(series.values.view)]
            if len(finite):
                return name, float(finite[-1])
        elif series is not None and len(series):
            lo, hi = series.extremes()
            if not math.isnan(lo):
                return name, hi if higher else lo
    return None


def eta_seconds(step: int | None, total: int | None, run: RunHistory | None, window: int = 64,
                since: float | None = None) -> float | None:
    """Seconds to go, from the step rate over the last `window` logged points of the densest metric among
    those logged up to the newest step (an evaluation answers, then judges: its answering metrics stop where
    judging starts, and their rate is not the judge's); `since`: only points logged from then on (a resumed
    run's own stretch, not the pause before it)."""
    if not step or not total or run is None or step >= total or not run.series:
        return None
    logged = [s for s in run.series.values() if len(s)]
    if not logged:
        return None
    newest = max(s.steps.view[-1] for s in logged)
    series = max((s for s in logged if s.steps.view[-1] == newest), key=len)
    steps, walls = series.steps.view[-window:], series.walls.view[-window:]
    if since is not None:
        keep = walls >= since
        steps, walls = steps[keep], walls[keep]
    if len(steps) < 2 or walls[-1] <= walls[0] or steps[-1] <= steps[0]:
        return None
    rate = (steps[-1] - steps[0]) / (walls[-1] - walls[0])
    return (total - step) / rate


def silent_seconds(run: RunHistory | None, now: float, since: float | None = None) -> float | None:
    """`silent_for` on the points this history holds of the run: the moments it logged at since `since`
    (its current stretch's start)."""
    import numpy as np

    from engine.run_facts import STALL_WINDOW, silent_for

    if run is None:
        return None
    recent = [s.walls.view[-STALL_WINDOW:] for s in run.series.values() if len(s)]
    if not recent:
        return None
    walls = np.unique(np.concatenate(recent))  # one logged step writes every metric with one wall time
    if since is not None:
        walls = walls[walls >= since]
    return silent_for(walls.tolist(), now)
