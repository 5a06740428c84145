"""The run table: id, stage, recipe, status, step / total, ETA, best metric, started.

Rows are updated in place (no flicker, the cursor stays on its run); sorting and the status/stage
filter are the table's own state. A pipeline's runs are one row, its newest run (the stage it is at, with
`pipeline N k/n` beside the recipe), until enter expands it into all its stages.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Iterable

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding
from textual.timer import Timer
from textual.widgets import DataTable

from console.colours import run_colour
from console.text import terminal_safe
from engine.run_facts import SHARED_FIELDS, current_start, elapsed, format_duration, shown_status, user_overrides

if TYPE_CHECKING:
    from console.series import History

COLUMNS = ("id", "stage", "recipe", "status", "step", "ETA", "time", "best", "trend", "overrides", "started")
TREND_POINTS = 8
_BLOCKS = "▁▂▃▄▅▆▇█"
SORTS = ("id", "stage", "status", "started", "best", "ETA")
# The best column names its metric: an SFT run shows eval_loss once it has one, loss before.
BEST_LABEL = {"eval_loss": "eval", "loss": "loss", "eval_accuracy": "eval acc", "accuracy": "acc",
              "rollout_scores/mean": "score", "eval/score_mean": "item mean", "eval/score_macro": "macro"}
STATUS_STYLE = {"running": "bold green", "pending": "yellow", "done": "", "failed": "bold red",
                "stopped": "magenta", "diverged": "bold red", "lost": "red"}


PIPELINE_ORDER = ("sft", "rm", "ppo", "eval")


def pipeline_stages(pipeline: dict[str, Any]) -> list[str]:
    """The stages a pipeline runs, from its recorded recipe (as engine.pipeline.plan, without pydantic)."""
    try:
        config = json.loads(pipeline.get("config") or "{}")
    except ValueError:
        return []
    through = pipeline.get("through") or "eval"
    return [s for s in PIPELINE_ORDER if config.get(s) and PIPELINE_ORDER.index(s) <= PIPELINE_ORDER.index(through)]


def pipeline_label(run: dict[str, Any], pipeline: dict[str, Any] | None) -> str:
    """`pipeline N k/n` for a pipeline's run: where in its pipeline this stage is."""
    if pipeline is None:
        return f"pipeline {run['pipeline_id']}"
    stages = pipeline_stages(pipeline)
    where = f" {stages.index(run['stage']) + 1}/{len(stages)}" if run["stage"] in stages else ""
    return f"pipeline {pipeline['id']}{where}"


def cells(run: dict[str, Any], history: History, marked: bool, group: str = "",
          pipeline: dict[str, Any] | None = None, shared: frozenset[str] = frozenset()) -> tuple:
    """`group`: "▸" / "▾" on a pipeline's row (collapsed / expanded), "└" on its other stages; `shared`:
    the overrides every run of its stage and recipe has (shown after its own)."""
    from console.series import best_metric, eta_seconds, silent_seconds  # numpy: not before the first frame

    status = shown_status(run)
    step = f"{run['step'] or 0}/{run['total_steps'] or '?'}"
    if (run.get("world_size") or 1) > 1:
        step += f" ×{run['world_size']}"  # processes
    eta: str | Text = "-"
    if status == "running":  # not a run stopping: it ends at its next step, not at its last
        silent = silent_seconds(history.runs.get(run["id"]), time.time(), since=current_start(run))
        eta = (Text(f"silent {format_duration(silent)}", style="bold yellow") if silent is not None and
               status == "running" else
               format_duration(eta_seconds(run["step"], run["total_steps"], history.runs.get(run["id"]),
                                           since=current_start(run))))
    best = best_metric(run["stage"], history.runs.get(run["id"]))
    started = time.strftime("%m-%d %H:%M", time.localtime(run["started"])) if run["started"] else "-"
    mark = "●" if marked else " "
    in_pipeline = pipeline_label(run, pipeline) if run.get("pipeline_id") is not None else None
    name = run["name"]
    if in_pipeline and name.endswith(f" (pipeline {run['pipeline_id']})"):
        # A pipeline's evaluation is named for the score table; here its pipeline label says it, with k/n.
        name = name[: -len(f" (pipeline {run['pipeline_id']})")]
    return (
        Text(f"{mark}{group}{run['id']}", style=run_colour(run["id"]) if marked else ""),
        run["stage"],
        # a user's text: never markup, never a terminal escape; cut, so that one long note never pushes status,
        # step and ETA off an 80-column screen (a column only widens), the whole on the line under the table
        _cut(Text(terminal_safe(" · ".join(filter(None, (name, in_pipeline, run.get("note"))))))),
        Text(status, style=STATUS_STYLE.get(status, "")),
        step,
        eta,
        format_duration(elapsed(run)) if run["started"] else "-",
        f"{BEST_LABEL.get(best[0], best[0])} {best[1]:.4g}" if best else "-",
        trend(run, history),
        Text(terminal_safe(overrides_text(run, pipeline, shared))),
        started,
    )


def trend(run: dict[str, Any], history: History) -> str:
    """The last TREND_POINTS points of the run's main metric as blocks, on their own min-max scale: which
    way it is going, at a glance."""
    from console.series import DEFAULT_METRIC

    series = history.runs.get(run["id"])
    values = series.series.get(DEFAULT_METRIC.get(run["stage"], "")) if series is not None else None
    if values is None or len(values) < 2:
        return ""
    key = (run["id"], id(values), len(values), values.values.view[-1].item())
    if _trend_cache.get(run["id"], (None, ""))[0] == key:  # the table asks at every poll; points come slower
        return _trend_cache[run["id"]][1]
    recent = [v for v in values.values.view[-TREND_POINTS:].tolist() if v == v]  # NaN: a diverged step
    if len(recent) < 2:
        return ""
    lo, hi = min(recent), max(recent)
    span = (hi - lo) or 1.0
    text = "".join(_BLOCKS[round((v - lo) / span * (len(_BLOCKS) - 1))] for v in recent)
    _trend_cache[run["id"]] = (key, text)
    return text


_trend_cache: dict[int, tuple[tuple, str]] = {}


def searchable(run: dict[str, Any], pipeline: dict[str, Any] | None = None) -> str:
    """What `/` matches a run against, lower case."""
    label = f"pipeline {run['pipeline_id']}" if run.get("pipeline_id") is not None else ""
    return " ".join(str(part) for part in (run["id"], run["stage"], run["name"], run.get("note") or "", label,
                                           overrides_text(run, pipeline), shown_status(run))).lower()


RECIPE_CELLS = 36  # the recipe column's widest text
RECIPE_CELLS_MIN = 12  # and its narrowest, on a terminal too narrow for the rest
IN_VIEW = COLUMNS[: COLUMNS.index("best") + 1]  # what the recipe column gives up its width to keep on screen


def _cut(text: Text) -> Text:
    text.truncate(RECIPE_CELLS, overflow="ellipsis")
    text.no_wrap, text.overflow = True, "ellipsis"  # narrower still where the terminal is: the column's width
    return text


def override_items(run: dict[str, Any], pipeline: dict[str, Any] | None = None) -> list[str]:
    """The run's --set overrides, short (a pipeline's stage: its pipeline's, not the wiring every stage of it
    has). A key set again (a resume's --allow-change) shows its newest value alone, where it was last set:
    the settings in effect, not their history."""
    newest: dict[str, str] = {}
    for item in user_overrides(run, pipeline):
        own = item.split(".", 1)[1] if item.startswith(f"{run['stage']}.") else None
        short = own if own is not None and own.split(".", 1)[0].split("=", 1)[0] not in SHARED_FIELDS else item
        key = short.split("=", 1)[0]
        newest.pop(key, None)
        newest[key] = short
    return list(newest.values())


def overrides_text(run: dict[str, Any], pipeline: dict[str, Any] | None = None,
                   shared: frozenset[str] = frozenset()) -> str:
    """What tells ten runs of one recipe apart: the overrides, those every run of its stage and recipe has
    (`shared`) last. First, they filled the cell and cut off the one that differed."""
    items = override_items(run, pipeline)
    return " ".join([i for i in items if i not in shared] + [i for i in items if i in shared])


def shared_overrides(runs: Iterable[dict[str, Any]], pipelines: dict[int, dict[str, Any]]
                     ) -> dict[tuple[str, str], frozenset[str]]:
    """Per (stage, recipe) of two runs or more, the overrides all of them have."""
    groups: dict[tuple[str, str], list[set[str]]] = {}
    for run in runs:
        items = set(override_items(run, pipelines.get(run.get("pipeline_id"))))
        groups.setdefault((run["stage"], run.get("recipe") or ""), []).append(items)
    return {key: frozenset(set.intersection(*sets)) for key, sets in groups.items() if len(sets) > 1}


class RunTable(DataTable):
    # Home and End go to the first and last run, as in htop or a file manager (a row table's DataTable
    # scrolls sideways with them; left and right still do).
    BINDINGS = [
        Binding("home", "scroll_top", "First run", show=False),
        Binding("end", "scroll_bottom", "Last run", show=False),
    ]

    def __init__(self, **kwargs: Any):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_by = "id"
        self.sort_reverse = True  # newest first
        self.status_filter: str | None = None
        self.text_filter = ""  # `/`: rows whose id, recipe, note, overrides, stage or status hold it
        self.stage_filter: str | None = None
        self._shown: dict[str, tuple] = {}  # row key -> cells as last drawn: only changed cells are redrawn
        self._shared: dict[tuple[str, str], frozenset[str]] = {}  # shared_overrides of the runs shown
        self.history: History | None = None
        self._sorted_label: tuple[str, bool] | None = None
        self.pipelines: dict[int, dict[str, Any]] = {}
        self.expanded: set[int] = set()  # pipelines shown stage by stage
        self._cells_drawn = 0.0  # when the live cells were last drawn (monotonic)
        self._pending: tuple | None = None  # a throttled show's arguments, drawn by the timer
        self._flush: Timer | None = None

    def on_mount(self) -> None:
        for name in COLUMNS:
            self.add_column(name, key=name)

    def heads(self, runs: dict[int, dict[str, Any]]) -> dict[int, int]:
        """Pipeline id -> its newest run: the row that stands for the pipeline."""
        newest: dict[int, int] = {}
        for run in runs.values():
            if run.get("pipeline_id") is not None:
                newest[run["pipeline_id"]] = max(newest.get(run["pipeline_id"], 0), run["id"])
        return newest

    def visible(self, runs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows in order: filtered and sorted, a pipeline by its newest run with (expanded) its other runs
        right below it, oldest first."""
        heads = self.heads(runs)
        members: dict[int, list[dict[str, Any]]] = {}
        for run in runs.values():
            pipeline = run.get("pipeline_id")
            if pipeline is not None and heads[pipeline] != run["id"]:
                members.setdefault(pipeline, []).append(run)
        # Filtered, every run that matches is a row of its own: an rm stage folded under its pipeline's newest
        # run would otherwise never match "rm".
        folded = self.status_filter is None and self.stage_filter is None and not self.text_filter
        chosen = [r for r in runs.values()
                  if (not folded or r.get("pipeline_id") is None or heads[r["pipeline_id"]] == r["id"])
                  and (self.status_filter is None or shown_status(r) == self.status_filter)
                  and (self.stage_filter is None or r["stage"] == self.stage_filter)
                  and (not self.text_filter or
                       self.text_filter in searchable(r, self.pipelines.get(r.get("pipeline_id"))))]
        key = {"id": lambda r: r["id"], "stage": lambda r: (r["stage"], r["id"]),
               "status": lambda r: (shown_status(r), r["id"]), "started": lambda r: (r["started"] or 0, r["id"]),
               "best": lambda r: (self._best_key(r), r["id"]), "ETA": lambda r: (self._eta_key(r), r["id"])}
        rows = []
        for run in sorted(chosen, key=key[self.sort_by], reverse=self.sort_reverse):
            rows.append(run)
            if folded and run.get("pipeline_id") in self.expanded:
                rows += sorted(members.get(run["pipeline_id"], []), key=lambda r: r["id"])
        return rows

    def _cells(self, run: dict[str, Any], history: History, marked: set[int], heads: dict[int, int]) -> tuple:
        pipeline = run.get("pipeline_id")
        group = ""
        if pipeline is not None:
            group = ("▾" if pipeline in self.expanded else "▸") if heads.get(pipeline) == run["id"] else "└"
        return cells(run, history, run["id"] in marked, group, self.pipelines.get(pipeline),
                     self._shared.get((run["stage"], run.get("recipe") or ""), frozenset()))

    def toggle_pipeline(self, run_id: int, runs: dict[int, dict[str, Any]]) -> bool:
        """Expand or fold the pipeline of `run_id`; False when the run is not a pipeline's."""
        pipeline = runs.get(run_id, {}).get("pipeline_id")
        if pipeline is None:
            return False
        self.expanded ^= {pipeline}
        return True

    def _best_key(self, run: dict[str, Any]) -> float:
        """Better runs sort first when the order is ascending: a loss as it is, a score or accuracy negated;
        runs without the metric last."""
        from console.series import BEST, best_metric

        best = best_metric(run["stage"], self.history.runs.get(run["id"])) if self.history is not None else None
        if best is None:
            return math.inf
        higher = dict(BEST.get(run["stage"], ())).get(best[0], False)
        return -best[1] if higher else best[1]

    def _eta_key(self, run: dict[str, Any]) -> float:
        from console.series import eta_seconds

        if self.history is None or run["status"] != "running":
            return math.inf
        eta = eta_seconds(run["step"], run["total_steps"], self.history.runs.get(run["id"]), since=current_start(run))
        return math.inf if eta is None else eta

    # Live cells (step, ETA, time, best, trend) redraw at most this often: any changed cell makes the table
    # render every cell again (its render cache is keyed by a table-wide update count), about half of what
    # the console spent following ten busy runs. htop and nvitop refresh every 1.5-2 s too.
    LIVE_CELLS_S = 2.0

    def show(self, runs: dict[int, dict[str, Any]], history: History, marked: set[int],
             pipelines: dict[int, dict[str, Any]] | None = None, throttle: bool = False) -> None:
        """Show the runs. `throttle` (a poll's new data): the live cells wait until LIVE_CELLS_S has passed
        since they were last drawn (a timer draws what is pending then); new, gone or reordered rows and
        what the user did show at once."""
        if throttle and self.row_count:
            wait = self._cells_drawn + self.LIVE_CELLS_S - time.monotonic()
            visible = self.visible(runs)
            if wait > 0 and [row.key.value for row in self.ordered_rows] == [str(r["id"]) for r in visible] \
                    and not self._status_changed(visible):
                self._pending = (runs, history, marked, pipelines)
                if self._flush is None:
                    self._flush = self.set_timer(wait, self._draw_pending)
                return
        self._pending = None
        self._cells_drawn = time.monotonic()
        self.history = history
        if pipelines is not None:
            self.pipelines = pipelines
        self._shared = shared_overrides(runs.values(), self.pipelines)
        self._mark_sorted_column()
        heads = self.heads(runs)
        wanted = self.visible(runs)
        wanted_keys = [str(r["id"]) for r in wanted]
        current_keys = [row.key.value for row in self.ordered_rows]
        selected = self.selected_run()
        at = self.cursor_row
        if current_keys != wanted_keys:
            # Refilling moves the cursor through row 0: the selection must not follow it there.
            with self.prevent(DataTable.RowHighlighted):
                self.clear()
                self._shown = {}
                for run in wanted:
                    row = self._cells(run, history, marked, heads)
                    self.add_row(*row, key=str(run["id"]))
                    self._shown[str(run["id"])] = row
                if selected is not None and str(selected) in wanted_keys:
                    self.move_cursor(row=wanted_keys.index(str(selected)))
                elif wanted_keys and selected is not None:  # it was deleted: its neighbour, not the top row
                    self.move_cursor(row=min(at, len(wanted_keys) - 1))
            self.fit_height()
            self.fit_columns()
            return
        resized = False
        for run in wanted:
            key = str(run["id"])
            row, before = self._cells(run, history, marked, heads), self._shown.get(key, ())
            for i, (column, value) in enumerate(zip(COLUMNS, row)):
                if i >= len(before) or before[i] != value:
                    # Widening a column re-lays out the whole screen: only when the text no longer fits.
                    wider = cell_len(str(value)) > self.columns[column].content_width
                    self.update_cell(key, column, value, update_width=wider)
                    # a note removed, an ETA from 10m to 9m: the column may narrow
                    resized = resized or i >= len(before) or cell_len(str(value)) != cell_len(str(before[i]))
            self._shown[key] = row
        if resized:
            self.fit_columns()

    def _status_changed(self, runs: list[dict[str, Any]]) -> bool:
        """A run's status is not a live cell: the line under the table shows it at once, and so must the row
        (a run seen running in the table and done in that line, side by side, for up to two seconds)."""
        column = COLUMNS.index("status")
        for run in runs:
            shown = self._shown.get(str(run["id"]))
            if shown is None or str(shown[column]) != shown_status(run):
                return True
        return False

    @property
    def pending(self) -> bool:
        """Live cells are waiting for their next redraw."""
        return self._pending is not None

    def _draw_pending(self) -> None:
        self._flush = None
        if self._pending is not None:
            self.show(*self._pending)

    SHARE_OF_SCREEN = 0.35

    def fit_height(self) -> None:
        """As tall as its rows and header, at most SHARE_OF_SCREEN of the screen; beyond that it scrolls."""
        if self.has_class("-maximized"):  # zoomed (z): the whole screen
            self.styles.height = "1fr"
            return
        cap = max(4, int(self.app.size.height * self.SHARE_OF_SCREEN))
        height = max(4, min(self.row_count + 1, cap))
        if self.styles.height is None or self.styles.height.unit.name != "CELLS" or self.styles.height.value != height:
            self.styles.height = height

    def on_resize(self) -> None:
        self.fit_height()
        self.fit_columns()

    def fit_columns(self) -> None:
        """Each column as wide as what it shows now (a DataTable column only ever widens: a note since
        removed, a sort arrow since moved, kept `time` and `best` off an 80-column screen), and the recipe
        column as wide as the terminal leaves it once the columns up to `best` are in view."""
        if not self.columns or not self.size.width:  # not laid out yet: its first Resize comes back here
            return
        widths = {}
        before = [(c.content_width, c.width, c.auto_width) for c in self.columns.values()]
        for k, name in enumerate(COLUMNS):
            column = self.columns[name]
            widths[name] = max([column.label.cell_len, *(cell_len(str(row[k])) for row in self._shown.values())])
            column.content_width = widths[name]
        pad = 2 * self.cell_padding
        # The scrollbar's room is kept whether or not it shows: one more run can bring it without a Resize.
        # `size`, not the region: a table hidden behind a zoomed pane keeps its size, and has no region.
        width = self.size.width - self.styles.scrollbar_size_vertical
        room = width - sum(widths[n] + pad for n in IN_VIEW if n != "recipe") - pad
        recipe = self.columns["recipe"]
        recipe.auto_width = False  # its width is this one, not the widest cell's
        recipe.width = max(min(widths["recipe"], room), min(widths["recipe"], RECIPE_CELLS_MIN))
        if [(c.content_width, c.width, c.auto_width) for c in self.columns.values()] != before:
            self._require_update_dimensions = True
            self._clear_caches()
            self.refresh()

    def _mark_sorted_column(self) -> None:
        """The sorted column's header carries an arrow (and is the only one in bold)."""
        state = (self.sort_by, self.sort_reverse)
        if state == self._sorted_label or not self.columns:
            return
        self._sorted_label = state
        for name in COLUMNS:
            column = self.columns.get(name)
            if column is None:
                continue
            sorted_here = name == self.sort_by
            column.label = Text(f"{name} {'↓' if self.sort_reverse else '↑'}" if sorted_here else name,
                                style="bold reverse" if sorted_here else "")
        self.fit_columns()  # the arrow widens its header, and the header it left is narrow again
        self._clear_caches()  # the headers' text changed, whatever their widths did
        self.refresh()

    def selected_run(self) -> int | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # the cursor is past the last row while the table refills
            return None
        return int(key.value) if key.value is not None else None

    def select(self, run_id: int) -> bool:
        keys = [row.key.value for row in self.ordered_rows]
        if str(run_id) not in keys:
            return False
        self.move_cursor(row=keys.index(str(run_id)))
        return True
