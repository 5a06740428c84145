"""Home: the run table, and for the selected run its curves, log tail and PPO samples."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.lazy import Lazy
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, OptionList, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option

from console.colours import run_colour
from console.logtail import clean_line
from console.messages import LogRead, SamplesLoaded
from console.text import terminal_safe
from console.widgets.log_view import LogView
from console.widgets.run_table import SORTS, RunTable
from console.widgets.samples_view import SamplesView
from engine.run_facts import (
    changes_text,
    error_summary,
    pipeline_waits_for,
    run_changes,
    run_segments,
    runs_using,
    shown_status,
)

SMOOTHING = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)
STATUSES = (None, "running", "pending", "stopping", "done", "failed", "stopped", "diverged", "lost")
STAGES = (None, "sft", "rm", "ppo", "eval")
# Beyond this many overlaid runs, smoothed lines are drawn without their raw ones: ten faint raw lines
# are noise on noise, and the raw lines are most of a redraw's cost.
RAW_BESIDE_SMOOTHED = 3
REDRAW_S = 1.0  # at most one chart redraw a second, however fast rows arrive


def segments_text(run: dict[str, Any]) -> str:
    """` · 3 segments 05-02 10:00–10:40, 11:02–11:30, 12:15–` for a resumed run; nothing for one stretch."""
    segments = run_segments(run)
    if len(segments) < 2:
        return ""

    def clock(t: float | None, day: bool = False) -> str:
        return time.strftime("%m-%d %H:%M" if day else "%H:%M", time.localtime(t)) if t else ""

    spans = [f"{clock(a, day=i == 0)}–{clock(b)}" for i, (a, b) in enumerate(segments)]
    return f" · {len(segments)} segments {', '.join(spans)}"


class RunsScreen(Screen):
    # The footer shows these in this order, before the app's own keys, and the palette (^p) at its right
    # end: at 80 columns that is all that fits, so only these are shown; the rest is in help (?) and the
    # palette.
    BINDINGS = [
        Binding("n", "app.launch", "New run"),
        Binding("space", "mark", "Overlay", key_display="␣"),
        Binding("x", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("s", "smoothing(1)", "Smooth"),
        Binding("g", "app.gpus", "GPUs"),
        Binding("question_mark", "app.help", "Help", key_display="?"),
        Binding("S", "smoothing(-1)", "Smooth less", show=False),
        Binding("w", "x_axis", "X axis: step or time", show=False),
        Binding("o", "sort", "Sort", show=False),
        Binding("O", "sort_reverse", "Reverse sort", show=False),
        Binding("f", "filter_status", "Filter status", show=False),
        Binding("F", "filter_stage", "Filter stage", show=False),
        Binding("c", "chat", "Chat with the run's model", show=False),
        Binding("C", "chat_with", "Chat with any model or endpoint", show=False),
        Binding("v", "scores", "Scores (BELLE evaluations)", show=False),
        Binding("delete,D", "delete", "Delete run", show=False),
        Binding("d", "diff", "Config diff", show=False),
        Binding("t", "traceback", "Jump to traceback", show=False),
        Binding("e", "follow_log", "Follow the log", show=False),
        Binding("1", "tab('curves')", "Curves tab", show=False),
        Binding("2", "tab('log')", "Log tab", show=False),
        Binding("3", "tab('samples')", "Samples tab", show=False),
        Binding("left_square_bracket", "sample_step(-1)", "Samples: previous step", show=False),
        Binding("right_square_bracket", "sample_step(1)", "Samples: next step", show=False),
        Binding("slash", "find", "Find runs", show=False),
        Binding("plus", "expand", "Pipeline: show its stages or fold them (also enter)", show=False),
        Binding("N", "note", "Note on the run", show=False),
        Binding("l", "relaunch", "Launch the run again, with changes", show=False),
        Binding("exclamation_mark", "shell", "Shell in the run's folder", show=False),
        Binding("E", "edit", "Editor on the run's recipe", show=False),
        Binding("y", "copy_command", "Copy the run's command line", show=False),
        Binding("Y", "copy_folder", "Copy the run's folder", show=False),
        Binding("z", "zoom", "Zoom the focused pane", show=False),
        Binding("comma", "metric(-1)", "Previous metric", show=False),
        Binding("full_stop", "metric(1)", "Next metric", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: int | None = None
        self.marked: list[int] = []  # overlay order: also the two runs a diff compares
        self.metric: str | None = None
        self.smoothing = 1  # index into SMOOTHING
        self.by_wall_time = False
        self._redraw_due = 0.0
        self._redraw_timer: Timer | None = None
        self._metric_names: list[str] = []
        self.metric_filter = ""  # `/` in the metric list
        self.sample_steps: list[int] = []
        self.sample_step: int | None = None
        self.samples_following = True  # showing the newest step, and moving on with the run
        self.last_draw_points = 0
        self._info = ""
        self._want_selected: int | None = None
        self._want_pipeline: int | None = None  # launched here: its first run is selected once it appears
        self._chart_ready = False
        self.log_view = LogView(id="log-view")  # held: it is mounted lazily, and log lines may come first

    def compose(self) -> ComposeResult:
        with Vertical(id="runs-top"):
            yield RunTable(id="run-table")
            yield Static("loading runs.db…", id="run-info")
            yield Input(placeholder="find runs: id, recipe, note, overrides, stage or status (enter keeps, esc clears)",
                        id="run-find", compact=True)
        with TabbedContent(id="tabs", initial="curves"):
            with TabPane("Curves", id="curves"):
                with Horizontal():
                    with Vertical(id="metric-col"):
                        yield OptionList(id="metric-list")
                        yield Input(placeholder="find metrics", id="metric-find", compact=True)
                    yield Vertical(id="chart-slot")  # the chart mounts after the first frame (numpy, plot)
            # Hidden at start: mounted just after the first frame, which they would only slow down.
            with TabPane("Log", id="log"):
                yield Lazy(self.log_view)
            with TabPane("Samples", id="samples"):
                yield Lazy(SamplesView(id="samples-view"))
        yield Lazy(Footer())  # it recomposes at each focus change while the screen mounts: after the first frame

    def on_mount(self) -> None:
        self.query_one(RunTable).focus()
        self.call_after_refresh(self._mount_chart)
        # A live run's time and ETA move on with the clock, not only when it writes: a 7B PPO step writes
        # nothing for minutes, and its time cell stood still all along.
        self.set_interval(RunTable.LIVE_CELLS_S, self._clock_ticked)

    def _clock_ticked(self) -> None:
        if any(run["status"] == "running" for run in self.app.runs.values()):
            self.query_one(RunTable).show(self.app.runs, self.app.history, set(self.marked), self.app.pipelines,
                                          throttle=True)

    async def _mount_chart(self) -> None:
        from console.widgets.chart import MetricChart

        await self.query_one("#chart-slot").mount(MetricChart(id="chart"))
        self._chart_ready = True
        self.schedule_redraw()

    # -- called by the App when its state changed --------------------------------------------------------
    def runs_changed(self, polled: bool = False) -> None:
        """`polled`: new data from runs.db (the table's live cells may wait for their next redraw)."""
        table = self.query_one(RunTable)
        self.marked = [r for r in self.marked if r in self.app.runs]
        table.show(self.app.runs, self.app.history, set(self.marked), self.app.pipelines, throttle=polled)
        if self._want_selected in self.app.runs:  # a run launched here: selected once the table has it
            self.select_run(self._want_selected)
            self._want_selected = None
        if self._want_pipeline is not None:
            self.select_pipeline(self._want_pipeline)
        # What x, r and D act on is what is highlighted: a filter that hid the selected run moved the
        # cursor, and the selection follows it (never the other way round).
        if table.selected_run() != self.selected:
            self._select(table.selected_run())
        self._pin_error()
        for view in self.query(SamplesView):
            view.set_following(self._samples_come())
        self.query_one("#run-info").remove_class("whole")
        self._update_info()
        if not self.app.runs:
            new = " (a new runs database: there was none)" if self.app.db_is_new else ""
            self._set_info(f"no runs yet in {self.app.db_path}{new} — press n to launch one")

    def store_failed(self, reason: str) -> None:
        # Whole, not cut at the pane's width: what to do about it comes at the end of the reason.
        self.query_one("#run-info").add_class("whole")
        self._set_info(f"cannot read runs.db: {reason}")

    def metrics_changed(self, run_ids: set[int]) -> None:
        # best and ETA come from the metrics; only cells whose text changed are redrawn
        self.query_one(RunTable).show(self.app.runs, self.app.history, set(self.marked), self.app.pipelines,
                                      throttle=True)
        if self.selected in run_ids or run_ids & set(self.marked):
            self._update_metric_list()
            self.schedule_redraw(REDRAW_S)
        if (self.selected in run_ids and self.samples_following
                and self.query_one(TabbedContent).active == "samples"):
            self.app.load_samples(self.selected, None)  # the newest step: a live run's new samples

    def log_read(self, message: LogRead) -> None:
        if message.run_id == self.selected:
            self.log_view.append(message.run_id, message.lines, message.pending, message.reset,
                                 message.skipped_start)
            if message.reset and not message.lines and not message.pending:
                self._show_error_if_silent()

    def samples_loaded(self, message: SamplesLoaded) -> None:
        if message.run_id != self.selected:
            return
        self.sample_steps, self.sample_step = message.steps, message.step
        # At the newest step the view follows the run: new samples are shown as they are recorded.
        self.samples_following = not message.steps or message.step == message.steps[-1]
        for view in self.query(SamplesView):
            view.show(message.run_id, message.steps, message.step, message.rows, self._samples_come())

    def _samples_come(self) -> bool:
        """Whether the samples shown follow the selected run: its newest step, of a PPO run still going (an
        SFT run, or one that ended, records no more)."""
        run = self.app.runs.get(self.selected) or {}
        return self.samples_following and run.get("stage") == "ppo" and run.get("status") in ("pending", "running")

    def select_run(self, run_id: int) -> None:
        if self.query_one(RunTable).select(run_id):
            self._select(run_id)
        else:
            self._want_selected = run_id

    def select_pipeline(self, pipeline_id: int) -> None:
        """Its newest run (the stage it is at), or, until it has one, as soon as it does."""
        stages = [run_id for run_id, run in self.app.runs.items() if run.get("pipeline_id") == pipeline_id]
        self._want_pipeline = None if stages else pipeline_id
        if stages:
            self.select_run(max(stages))

    # -- selection --------------------------------------------------------------------------------------
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "run-table":
            self.action_expand()

    def action_expand(self) -> None:
        table = self.query_one(RunTable)
        if self.selected is not None and table.toggle_pipeline(self.selected, self.app.runs):
            pipeline = self.app.runs[self.selected]["pipeline_id"]
            table.show(self.app.runs, self.app.history, set(self.marked), self.app.pipelines)
            if pipeline not in table.expanded:  # folded from one of its stages: onto the row that stays
                self.select_pipeline(pipeline)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # No row key: the table has no rows (an empty runs.db, a find without a match) and End was pressed.
        if event.data_table.id == "run-table" and event.row_key is not None and event.row_key.value is not None:
            self._want_pipeline = None  # the user moved on: a pipeline's first run must not pull them back
            self._select(int(event.row_key.value))

    def _select(self, run_id: int | None) -> None:
        if run_id == self.selected:
            return
        self.selected = run_id
        self.app.follow(self._chart_runs())
        run = self.app.runs.get(run_id) if run_id is not None else None
        self.log_view.clear()
        self._pin_error()
        self.app.log_target = None if run is None else (run_id, Path(run["output_dir"]) / "train.log")
        self.metric = None
        self._update_metric_list()
        self._update_info()
        self.schedule_redraw()
        if run is not None and self.query_one(TabbedContent).active == "samples":
            self.app.load_samples(run_id, None)

    def _pin_error(self) -> None:
        """A failed run's own error (runs.db holds the trainer's traceback) stays above its log; so does the
        error of the failed pipeline a run belongs to (a stage that could not start, the pipeline's own
        crash), which no run's log holds."""
        run = self.app.runs.get(self.selected) if self.selected is not None else None
        if run is not None and run["status"] in ("failed", "diverged") and run.get("error"):
            self.log_view.pin_error(run["error"])
            return
        pipeline = self.app.pipelines.get(run.get("pipeline_id")) if run is not None else None
        if pipeline is not None and pipeline["status"] == "failed" and pipeline.get("error"):
            self.log_view.pin_error(pipeline["error"], f"pipeline {pipeline['id']}")
            return
        self.log_view.pin_error(None)

    def _show_error_if_silent(self) -> None:
        run = self.app.runs.get(self.selected)
        if run is None:
            return
        if run.get("error"):
            if run["status"] not in ("failed", "diverged"):  # else it is pinned above the log already
                self.log_view.append(run["id"], [clean_line(line) for line in run["error"].split("\n")], "", False,
                                     False)
        elif run.get("output_dir"):
            self.log_view.append(run["id"], [], f"(nothing in {run['output_dir']}/train.log yet)", False, False)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id != "log":
            self.log_view.wants_focus = False  # a log that mounts later, unseen, must not take the keys
        if event.pane.id == "samples" and self.selected is not None:
            self.app.load_samples(self.selected, self.sample_step)
        if event.pane.id == "curves":
            self.schedule_redraw()

    # -- the chart ---------------------------------------------------------------------------------------
    def _chart_runs(self) -> list[int]:
        ids = list(self.marked)
        if self.selected is not None and self.selected not in ids:
            ids.insert(0, self.selected)
        return ids

    def _update_metric_list(self) -> None:
        from console.series import DEFAULT_METRIC, metric_groups

        names: set[str] = set()
        for run_id in self._chart_runs():
            run = self.app.history.runs.get(run_id)
            if run is not None:
                names.update(run.series)
        if self.metric_filter:  # `/` on the list: only the names that hold the text
            shown = {n for n in names if self.metric_filter in n.lower()}
            names = shown | ({self.metric} if self.metric in names else set())
        ordered = [n for group in metric_groups(names).values() for n in group]
        if self.metric is None or self.metric not in names:
            stage = self.app.runs.get(self.selected, {}).get("stage", "")
            default = DEFAULT_METRIC.get(stage)
            self.metric = default if default in names else (ordered[0] if ordered else None)
        if ordered == self._metric_names:
            self._highlight_metric()
            return
        self._metric_names = ordered
        options: list[Option | None] = []
        for group, members in metric_groups(names).items():
            if len(members) > 1:
                options.append(Option(f"[b]{group}/[/b]", id=f"group:{group}", disabled=True))
            for name in members:
                label = name.split("/", 1)[1] if len(members) > 1 and "/" in name else name
                options.append(Option(("  " if len(members) > 1 else "") + label, id=name))
        metric_list = self.query_one("#metric-list", OptionList)
        metric_list.clear_options()
        metric_list.add_options(options)
        self._highlight_metric()

    def _highlight_metric(self) -> None:
        metric_list = self.query_one("#metric-list", OptionList)
        if self.metric is not None:
            try:
                metric_list.highlighted = metric_list.get_option_index(self.metric)
            except Exception:  # not listed yet
                pass

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id and not event.option.id.startswith("group:") and event.option.id != self.metric:
            self.metric = event.option.id
            self.schedule_redraw()

    def schedule_redraw(self, delay: float = 0.05) -> None:
        """Coalesce redraws: a key press redraws at once, new rows of a live run at most every REDRAW_S."""
        due = time.monotonic() + delay
        if self._redraw_timer is not None:
            if self._redraw_due <= due:
                return
            self._redraw_timer.stop()
        self._redraw_due = due
        self._redraw_timer = self.set_timer(delay, self.redraw_chart)

    def redraw_chart(self) -> None:
        self._redraw_timer = None
        if not self._chart_ready:
            return  # it redraws once mounted
        from console.widgets.chart import ChartLine, MetricChart

        chart = self.query_one(MetricChart)
        weight = SMOOTHING[self.smoothing]
        lines = []
        chart_runs = self._chart_runs()
        for run_id in chart_runs:
            run = self.app.history.runs.get(run_id)
            series = run.series.get(self.metric) if run is not None and self.metric else None
            if series is None or not len(series):
                continue
            if self.by_wall_time:
                walls = series.walls.view
                x = (walls - walls[0]) / 60.0
            else:
                x = series.steps.view
            lines.append(ChartLine(f"run {run_id}", run_colour(run_id), x, series.values.view,
                                   series.smoothed(weight) if weight else None,
                                   show_raw=not weight or len(chart_runs) <= RAW_BESIDE_SMOOTHED))
        with_data = {int(line.label.split()[-1]) for line in lines}
        legend = "  ".join(f"[{run_colour(i)}]■ run {i}[/]" for i in chart_runs if i in with_data)
        title = f"{self.metric or 'no metrics yet'}   {legend}   smoothing {weight:g}"
        loading = {i: run.loading for i in chart_runs if (run := self.app.history.runs.get(i)) is not None
                   and not run.full and run.loading}
        for run_id, rows in loading.items():  # its newest points until the whole history has been read
            title += f"   run {run_id}: its newest points; {rows:,} rows of the rest read…"
        self.last_draw_points = chart.draw(title, lines, "minutes" if self.by_wall_time else "step")

    # -- the info line -------------------------------------------------------------------------------------
    def _update_info(self) -> None:
        run = self.app.runs.get(self.selected) if self.selected is not None else None
        table = self.query_one(RunTable)
        filters = []
        if table.status_filter:
            filters.append(f"status={table.status_filter}")
        if table.stage_filter:
            filters.append(f"stage={table.stage_filter}")
        if table.text_filter:
            filters.append(f"find={table.text_filter!r}")
        sort = f"sort {table.sort_by}{' ↓' if table.sort_reverse else ' ↑'}"
        # A filter first, where 80 columns never cut it off: a table that hides runs must say so.
        shown = f"[{'  '.join(filters)}] " if filters else ""
        if run is None:
            hidden = f"no run of {len(self.app.runs)} matches: f, F or / changes the filter · " \
                if filters and not table.row_count and self.app.runs else ""
            self._set_info(f"{shown}{hidden}{sort}")
            return
        status = shown_status(run)
        note = f" ({run['note']})" if run.get("note") else ""  # whole here: the table's cell may be cut
        text = f"run {run['id']} {run['stage']} {run['name']}{note} · {status}"
        if run["exit_code"] is not None:
            text += f" (exit {run['exit_code']})"
        text += changes_text(run) + segments_text(run)  # a change first: at 80 columns the times are cut
        pipeline = self.app.pipelines.get(run.get("pipeline_id"))
        if pipeline is not None:
            text += f" · pipeline {pipeline['id']} {pipeline['status']}"
            waits = pipeline_waits_for(pipeline, list(self.app.runs.values()), str(self.app.db_path))
            if waits:  # not its error's "resume it": a resume is refused while that stage runs
                text += f" ({waits})"
            elif pipeline.get("error") and pipeline["status"] == "failed":
                text += f" ({error_summary(pipeline['error'])[:60]})"
        if status in ("failed", "diverged") and run.get("error"):
            text += f" · {error_summary(run['error'])[:60]}"
        self._set_info(f"{shown}{text}   {sort}")

    def _set_info(self, text: str) -> None:
        if text != self._info:  # an update re-lays out the screen even when the text is the same
            self._info = text
            # run names, errors: neither markup nor terminal escapes
            self.query_one("#run-info", Static).update(Text(terminal_safe(text)))

    # -- actions -------------------------------------------------------------------------------------------
    def action_mark(self) -> None:
        if self.selected is None:
            return
        if self.selected in self.marked:
            self.marked.remove(self.selected)
        else:
            self.marked.append(self.selected)
        self.app.follow(self._chart_runs())
        self.query_one(RunTable).show(self.app.runs, self.app.history, set(self.marked))
        self._update_metric_list()
        self.schedule_redraw()

    def action_smoothing(self, direction: int) -> None:
        self.smoothing = max(0, min(len(SMOOTHING) - 1, self.smoothing + direction))
        self.schedule_redraw()

    def action_x_axis(self) -> None:
        self.by_wall_time = not self.by_wall_time
        self.schedule_redraw()

    def action_sort(self) -> None:
        table = self.query_one(RunTable)
        table.sort_by = _after(SORTS, table.sort_by)
        table.sort_reverse = table.sort_by in ("id", "started")  # newest first; best and soonest first
        self.runs_changed()

    def action_sort_reverse(self) -> None:
        table = self.query_one(RunTable)
        table.sort_reverse = not table.sort_reverse
        self.runs_changed()

    def action_filter_status(self) -> None:
        table = self.query_one(RunTable)
        table.status_filter = _after(STATUSES, table.status_filter)
        self.runs_changed()

    def action_filter_stage(self) -> None:
        table = self.query_one(RunTable)
        table.stage_filter = _after(STAGES, table.stage_filter)
        self.runs_changed()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        if tab in ("log", "samples"):
            # Its keys at once (the log's search, follow, wrap; enter on a sample), not after two Tabs:
            # enter went to the run table and folded a pipeline. Once its pane shows.
            self.call_after_refresh(self._focus_pane, tab)
        elif self.focused is not None and any(pane in (self.focused, *self.focused.ancestors)
                                              for pane in (self.log_view, *self.query(SamplesView))):
            # What it held is hidden now: the keys go back to the table, not to nothing.
            self.query_one(RunTable).focus()

    def _focus_pane(self, tab: str, tries: int = 3) -> None:
        if self.query_one(TabbedContent).active != tab:  # another tab since: a hidden pane keeps no keys
            return
        if tab == "log":
            self.log_view.take_focus()
            return
        table = self.query("#samples-table")
        if table:
            table.first().focus()
        elif tries:  # Lazy: mounted once its pane shows
            self.call_after_refresh(self._focus_pane, tab, tries - 1)

    def action_traceback(self) -> None:
        self.action_tab("log")
        if not self.log_view.jump_to_traceback():
            self.notify("no traceback in the log's loaded lines")

    def action_follow_log(self) -> None:
        self.log_view.follow()

    def action_metric(self, direction: int) -> None:
        if not self._metric_names:
            return
        i = self._metric_names.index(self.metric) if self.metric in self._metric_names else 0
        self.metric = self._metric_names[(i + direction) % len(self._metric_names)]
        self._highlight_metric()
        self.schedule_redraw()

    def action_sample_step(self, direction: int) -> None:
        if self.selected is None or not self.sample_steps:
            return
        i = self.sample_steps.index(self.sample_step) if self.sample_step in self.sample_steps else 0
        i = max(0, min(len(self.sample_steps) - 1, i + direction))
        # Moved at once, not when the load returns: two quick presses move two recorded steps.
        self.sample_step = self.sample_steps[i]
        self.samples_following = i == len(self.sample_steps) - 1
        self.app.load_samples(self.selected, self.sample_step)

    def _selected_run(self) -> dict[str, Any] | None:
        run = self.app.runs.get(self.selected) if self.selected is not None else None
        if run is None:
            self.notify("no run selected")
        return run

    def action_stop(self) -> None:
        from console.screens.dialogs import ConfirmScreen

        run = self._selected_run()
        if run is None:
            return
        if run["status"] not in ("pending", "running"):
            self.notify(f"run {run['id']} is {run['status']}: nothing to stop")
            return
        what = ("ends after the batch in hand, every stored answer and verdict kept" if run["stage"] == "eval" else
                "saves a checkpoint and exits")
        question = (f"Stop run {run['id']} ({run['stage']} {run['name']})?\n\nIt gets SIGTERM, {what}; it is "
                    "killed if it is still there after the grace period.")
        if run.get("pipeline_id") is not None:
            status = (self.app.pipelines.get(run["pipeline_id"]) or {}).get("status")
            if status in ("done", "stopped", "failed"):  # resumed on its own (rlhf launch --resume-run)
                question += (f"\n\nIt is a stage of pipeline {run['pipeline_id']}, running on its own: the pipeline "
                             f"is {status}, and nothing waits on this stage.")
            else:
                question += (f"\n\nIt is a stage of pipeline {run['pipeline_id']}: the pipeline stops with it, and "
                             "r resumes the pipeline from this stage.")
        self.app.push_screen(ConfirmScreen(question, "Stop"),
                             lambda ok: self.app.stop_run(run["id"]) if ok else None)

    def action_resume(self) -> None:
        from console.screens.dialogs import ConfirmScreen

        run = self._selected_run()
        if run is None:
            return
        if run["status"] in ("pending", "running"):
            self.notify(_still_active(run, "resume"), severity="warning")
            return
        pipeline = self.app.pipelines.get(run["pipeline_id"]) if run.get("pipeline_id") is not None else None
        if pipeline is not None and pipeline["status"] == "done":  # said before the question, not after a yes
            self.notify(f"pipeline {pipeline['id']} is done: every stage through {pipeline['through']} finished",
                        severity="warning")
            return
        from engine.run import has_checkpoint, never_trained, resume_hint

        launched = bool((json.loads(run.get("launch") or "null") or {}).get("accelerate_config"))
        if pipeline is None and run["stage"] != "eval" and run["status"] == "done":
            more = "ppo.steps=N" if run["stage"] == "ppo" else f"{run['stage']}.train.max_steps=N"
            command = resume_hint(run["stage"], run["id"], self.app.db_path, "launch" if launched else "train")
            self.notify(f"run {run['id']} is done at step {run['step'] or 0}: a resume would train nothing; to train "
                        f"it further: {command} --allow-change --set {more} (N past its step)", severity="warning")
            return
        if pipeline is None and run["stage"] != "eval" and not launched:
            # Guessing its accelerate config (a CPU config for a GPU run, say) would be worse than asking.
            self.notify(f"run {run['id']} was started in its own terminal, not launched: resume it the same way, "
                        f"`{resume_hint(run['stage'], run['id'], self.app.db_path)}`", severity="warning")
            return

        over = never_trained(run)
        if run["stage"] != "eval" and run.get("pipeline_id") is None and not has_checkpoint(run) and not over:
            # Said before the question, not after a yes (a pipeline's stage without one starts again).
            self.notify(f"run {run['id']} has no checkpoint in {run['output_dir']}: nothing to resume from "
                        "(l launches it again)", severity="warning")
            return
        question = (f"Resume evaluation run {run['id']} ({run['name']})? It answers and judges what it has not yet."
                    if run["stage"] == "eval" else
                    f"Start run {run['id']} ({run['stage']} {run['name']}) over? It ended before its first step: "
                    "nothing was trained, and it runs again as recorded." if over else
                    f"Resume run {run['id']} ({run['stage']} {run['name']}) from its last full-state checkpoint? "
                    f"It ended at step {run['step'] or 0}/{run['total_steps'] or '?'}"
                    + (f", on {run['world_size']} processes (as many again)" if (run.get("world_size") or 1) > 1
                       else "") + ".")
        if run.get("pipeline_id") is not None:
            question = (f"Resume pipeline {run['pipeline_id']}? Its run {run['id']} ({run['stage']}) goes on where "
                        "it stopped, then the pipeline's later stages.")
        self.app.push_screen(ConfirmScreen(question, "Resume"),
                             lambda ok: self.app.resume_run(run["id"]) if ok else None)

    def action_delete(self) -> None:
        from console.screens.dialogs import DeleteScreen

        run = self._selected_run()
        if run is None:
            return
        if run["status"] in ("pending", "running"):
            self.notify(_still_active(run, "delete"), severity="warning")
            return

        def done(choice: tuple[bool, bool] | None) -> None:
            if choice and choice[0]:
                self.app.delete_run(run["id"], choice[1])

        used_by = runs_using(run, self.app.runs.values())
        self.app.push_screen(DeleteScreen(run["id"], run["output_dir"], used_by), done)

    def action_diff(self) -> None:
        from console.screens.config_diff import ConfigDiffScreen

        pair = self.marked[-2:] if len(self.marked) >= 2 else [*self.marked[-1:], self.selected]
        if len(pair) != 2 or None in pair or pair[0] == pair[1]:
            self.notify("mark a run with space, select another, then press d", title="config diff")
            return
        a, b = (self.app.runs[i] for i in pair)
        if len(self.marked) > 2:  # which two, of the marked runs
            self.notify(f"runs {pair[0]} and {pair[1]}: the last two marked", title="config diff")
        self.app.push_screen(ConfigDiffScreen(a, b))

    def action_relaunch(self) -> None:
        from console.screens.launch import LaunchScreen

        run = self._selected_run()
        if run is not None and run["stage"] not in ("sft", "rm", "ppo"):  # the form launches training stages
            self.notify(f"run {run['id']} is an evaluation: `rlhf eval belle --answers-from {run['id']}` judges its "
                        "answers again, `rlhf eval belle CHECKPOINT` answers anew", title="launch again", markup=False)
        elif run is not None:
            self.app.push_screen(LaunchScreen(self.app.configs_dir, from_run=run, used=self.app.recipes_used()),
                                 self.app.launched)

    # `/` finds in the pane that has focus: runs in the table, metrics in their list, samples in theirs
    # (the log has its own search). Each box narrows as the text is typed; enter keeps it, escape clears.
    FINDS = {"run-find": "run-table", "metric-find": "metric-list"}

    def action_find(self) -> None:
        focused = self.focused
        if focused is not None and focused.id == "samples-table":
            self.query_one(SamplesView).action_find()
            return
        box = self.query_one("#metric-find" if focused is not None and focused.id == "metric-list" else "#run-find",
                             Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "run-find":  # the table narrows as the text is typed
            self.query_one(RunTable).text_filter = event.value.strip().lower()
            self.runs_changed()
        elif event.input.id == "metric-find":
            self.metric_filter = event.value.strip().lower()
            self._update_metric_list()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in self.FINDS:
            event.input.display = bool(event.value.strip())  # a kept filter stays in sight
            self.query_one(f"#{self.FINDS[event.input.id]}").focus()

    def on_key(self, event: Any) -> None:
        focused = self.focused
        if event.key == "escape" and focused is not None and focused.id in self.FINDS:
            focused.value = ""  # Changed clears the filter
            focused.display = False
            self.query_one(f"#{self.FINDS[focused.id]}").focus()
            event.stop()
        elif event.key == "escape" and focused is not None and focused.id == "run-table" and \
                self.query_one(RunTable).text_filter:
            box = self.query_one("#run-find", Input)  # a kept find: escape in the table ends it too
            box.value = ""
            box.display = False
            event.stop()
        elif event.key == "escape" and focused is not None and self.maximized is None and \
                not isinstance(focused, Input) and self.query_one(TabbedContent) in focused.ancestors and \
                not (self.log_view.term and self.log_view in focused.ancestors_with_self):  # that ends the search
            # Back from the log, the samples or the metric list to the runs, whose keys then work again (as
            # 1 and 3 give them back; with the log, up and down had scrolled a pane one could not see focused).
            self.query_one(RunTable).focus()
            event.stop()

    def action_note(self) -> None:
        from console.screens.dialogs import NoteScreen

        run = self._selected_run()
        if run is None:
            return

        def done(note: str | None) -> None:
            if note is not None and note != (run.get("note") or ""):
                self.app.set_note(run["id"], note)

        self.app.push_screen(NoteScreen(run["id"], run.get("note")), done)

    def action_shell(self) -> None:
        """$SHELL in the run's folder, the console suspended until it exits (as lazygit's shell key)."""
        import os

        run = self._selected_run()
        if run is not None and run.get("output_dir"):
            self._suspended([os.environ.get("SHELL") or "/bin/sh"], run["output_dir"])

    def action_edit(self) -> None:
        """$EDITOR (or $VISUAL, else vi) on the recipe the run recorded, read-only, in the run's folder: a
        view (runs.db holds the recipe; a resume rewrites the run's copy, so edits would be lost silently)."""
        import os
        import shlex
        import tempfile

        run = self._selected_run()
        if run is None or not run.get("output_dir"):
            return
        folder = Path(run["output_dir"])
        try:
            settings = json.loads(run.get("config") or "null")
        except ValueError:
            settings = None
        if not settings:
            self.notify(f"run {run['id']} recorded no recipe or settings", severity="warning")
            return
        if not folder.is_dir():
            self.notify(f"{folder} is not there", severity="warning", markup=False)
            return
        # From runs.db: the file it was launched from may have changed since (or be another's). A file of its
        # own, for this user alone, gone once the editor returns.
        from engine.run import recipe_text

        text = recipe_text(run)
        try:
            handle, name = tempfile.mkstemp(prefix=f"rlhf-run-{run['id']}-", suffix=".recipe.yaml")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(name, 0o400)
        except OSError as err:
            self.notify(f"cannot write the recorded recipe: {err}", severity="error", markup=False)
            return
        try:
            editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
            if not self._suspended([*shlex.split(editor), name], str(folder)):
                return
            changed = Path(name).read_text(encoding="utf-8") != text  # root saves a read-only file regardless
        except OSError:
            changed = False
        finally:
            Path(name).unlink(missing_ok=True)
        said = "edits to that view are not kept" if changed else "a read-only view"
        self.notify(f"run {run['id']}'s recipe as recorded ({said}): l launches it again with changes",
                    severity="warning" if changed else "information", markup=False)

    def _suspended(self, argv: list[str], cwd: str) -> bool:
        """Run `argv` in `cwd` with the terminal handed over; whether it ran (its failure is said)."""
        import subprocess

        from textual.app import SuspendNotSupported

        if not Path(cwd).is_dir():
            self.notify(f"{cwd} is not there", severity="warning", markup=False)
            return False
        try:
            with self.app.suspend():
                done = subprocess.run(argv, cwd=cwd)
        except SuspendNotSupported:
            self.notify("this terminal cannot hand itself over (no suspend here)", severity="warning")
            return False
        except OSError as err:
            self.notify(f"{argv[0]}: {err}", severity="error", markup=False)
            return False
        if done.returncode != 0:
            self.notify(f"{argv[0]} exited with {done.returncode}", markup=False)
        return True

    def action_copy_command(self) -> None:
        """The command that launches this run again, to the clipboard (OSC 52: it works over SSH)."""
        run = self._selected_run()
        if run is not None:
            command = command_line(run, self.app.db_path)
            self.app.copy_to_clipboard(command)
            self.notify(command, title="copied", markup=False)

    def action_copy_folder(self) -> None:
        run = self._selected_run()
        if run is not None and run.get("output_dir"):
            self.app.copy_to_clipboard(run["output_dir"])
            self.notify(run["output_dir"], title="copied", markup=False)

    def action_zoom(self) -> None:
        """The focused pane fills the screen; z again (or escape) puts it back."""
        if self.maximized is not None:
            self.minimize()
        elif self.focused is not None:
            self.maximize(self.focused)
        self.query_one(RunTable).fit_height()  # its height is its own (see RunTable.fit_height)

    def action_chat(self) -> None:
        """Chat with the selected run's model, beside the last marked run's if one is marked."""
        if self.selected is None:
            self.notify("select a run with a model (an SFT or PPO export), then press c (C: any model or an "
                        "endpoint)", title="chat")
            return
        specs = [str(run_id) for run_id in self._chat_runs() if run_id is not None]
        for spec in specs:
            problem = self._chat_problem(spec)
            if problem:
                self.notify(problem, title="chat", markup=False)
                return
        self.app.open_chat(specs[0], specs[1] if len(specs) > 1 else None)

    def action_chat_with(self) -> None:
        """Chat with what the user types on each side: a run, a model folder or an OpenAI-compatible endpoint."""
        from console.screens.chat import ChatSidesScreen

        def chosen(sides: tuple[str, str | None] | None) -> None:
            if sides is not None:
                self.app.open_chat(*sides)

        selected, other = self._chat_runs()
        self.app.push_screen(ChatSidesScreen(None if selected is None else str(selected),
                                             None if other is None else str(other), self._chat_problem), chosen)

    def _chat_runs(self) -> tuple[int | None, int | None]:
        """The selected run, and the last marked other than it."""
        return self.selected, next((r for r in reversed(self.marked) if r != self.selected), None)

    def _chat_problem(self, spec: str) -> str | None:
        """Why a chat side cannot be `spec` (checked before the chat opens), or None."""
        from console.chat_client import spec_problem

        return spec_problem(spec, self.app.runs.get)

    def action_scores(self) -> None:
        from console.screens.scores import ScoresScreen

        self.app.push_screen(ScoresScreen())

    def commands(self) -> Iterable[SystemCommand]:
        """The palette's entries for this screen: one per key binding, named as the footer and help name it."""
        from console.keys import commands

        yield from commands(self, self.BINDINGS)


def command_line(run: dict[str, Any], db_path: str | Path) -> str:
    """The command that starts this run again, shell-quoted, from the console's folder and with the runs.db it
    is recorded in: `rlhf launch` with the run's stage, recipe, overrides and accelerate settings, or for an
    evaluation `rlhf eval belle` with the settings that differ from the defaults."""
    import shlex

    note = ""
    if run["stage"] == "eval":
        from engine.evaluate import ANSWERED_BY, ENDPOINT_ONLY, EvalConfig  # no torch: pydantic, the BELLE readers

        defaults = {key: field.default for key, field in EvalConfig.model_fields.items()}
        config = json.loads(run.get("config") or "{}")
        argv = ["rlhf", "eval", "belle"]
        judged_again = config.get("answers_from") is not None  # its answers' settings are its source's
        if not judged_again and config.get("checkpoint"):
            argv.append(config["checkpoint"])
        # What the command refuses as ignored (an older record may hold it): an endpoint's settings beside the
        # reward model's judge, a second subset
        # (checkpoint_written is recorded when the run starts, not an option)
        ignored = {*ENDPOINT_ONLY, "checkpoint_written"} if config.get("judge") == "rm" else {"checkpoint_written"}
        if config.get("limit") is not None:
            ignored.add("per_class")
        for key, value in config.items():
            if key == "checkpoint" or value is None or value is False or defaults.get(key, ...) == value \
                    or (judged_again and key in ANSWERED_BY) or key in ignored:
                continue
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    else:
        # A run changed mid-way by a resume: the command that started it, and what changed from which step
        # (its overrides whole would train the latest settings from step 1, another run; its launch is the
        # latest resume's, which may run another number of processes)
        changes = run_changes(run)
        started = next((c["launch"] for c in changes if c.get("launch")), None)
        launch = json.loads(started or run.get("launch") or "{}")
        # A run started in its own terminal (`rlhf train`) has no accelerate config to launch it with
        argv = ["rlhf", "launch" if launch.get("accelerate_config") else "train", run["stage"],
                run["recipe"] or "RECIPE"]
        overrides = [str(item) for item in json.loads(run.get("overrides") or "[]")]
        later = sum(len(change.get("set") or []) for change in changes)
        for item in overrides[: len(overrides) - later]:
            argv += ["--set", item]
        if launch.get("accelerate_config"):
            argv += ["--accelerate-config", launch["accelerate_config"]]
        if launch.get("num_processes"):
            argv += ["--num-processes", str(launch["num_processes"])]
        if changes:
            then = "; ".join((f"from step {c['step']}" if c.get("step") is not None else "next") + ": "
                             + (" ".join(f"--set {item}" for item in c.get("set") or [])
                                or ", ".join(c.get("fields") or [])) for c in changes)
            note = f"  # then resumed with --allow-change {then}"
    # From the folder the console resolves recipes in (a recipe's model and data paths are relative to it).
    return f"cd {shlex.quote(str(Path.cwd()))} && " + shlex.join(argv + ["--db", str(Path(db_path).resolve())]) + note


def _after(choices: tuple, current: object) -> object:
    """The choice after `current`, wrapping round: how the sort and filter keys cycle."""
    return choices[(choices.index(current) + 1) % len(choices)]


def _still_active(run: dict[str, Any], what: str) -> str:
    """Why `what` (resume, delete) waits: the run as the table shows it (a stop under way is no "running")."""
    status = shown_status(run)
    if status == "stopping":
        return f"run {run['id']} is stopping (writing its checkpoint): {what} it once it has stopped"
    if status == "lost":
        return f"run {run['id']}'s processes are gone: its record is being closed, {what} it then"
    return f"run {run['id']} is {status}: stop it first (x)"
