"""The console as a daily user drives it (issue 11): the acted-on run is the highlighted one, 80x24 with
many runs, the footer, the log, samples and GPU bars. Pilot tests against a runs.db written here."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from rich.cells import cell_len
from textual.widgets import Static

from console.app import RlhfConsole
from console.screens.dialogs import DeleteScreen
from console.widgets.run_table import COLUMNS, RunTable
from engine.store import Store
from tests.conftest import REPO
from tests.pilot import help_text, no_gpu, sync, wait_for

T0 = 1_767_225_600.0


@pytest.fixture
def many_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """12 runs: 11 done SFT runs and run 4 failed, each with a short loss curve."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    with Store(db) as store:
        for i in range(1, 13):
            run_id = store.create_run(stage="sft", name="tiny", recipe="configs/tiny.yaml",
                                      config=json.dumps({"sft": {"lr": 0.001 * i}}))
            for step in range(1, 6):
                store.log_metrics(run_id, step, {"loss": 5.0 / (step + i)}, wall_time=T0 + step)
            failed = run_id == 4
            store.update_run(run_id, status="failed" if failed else "done", started=T0, ended=T0 + 5, step=5,
                             total_steps=5, exit_code=1 if failed else 0,
                             error="Traceback (most recent call last):\nValueError: bad" if failed else None)
    return db


def app_for(db: Path) -> RlhfConsole:
    return RlhfConsole(db, configs_dir=REPO / "configs", gpu_sampler=no_gpu, poll_s=0.05)


@contextlib.asynccontextmanager
async def loaded(db: Path, size: tuple[int, int]) -> AsyncIterator[tuple[RlhfConsole, Any]]:
    """The console on `db` at `size`, once its 12 runs are shown."""
    app = app_for(db)
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 12, 20, "the runs")
        yield app, pilot


def info(app) -> str:
    return str(app.home.query_one("#run-info", Static).render())


@sync
async def test_the_acted_on_run_is_always_the_highlighted_one(many_runs):
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home, table = app.home, app.home.query_one(RunTable)
        home.select_run(4)
        await wait_for(pilot, lambda: home.selected == 4, 10, "run 4 selected")
        while table.status_filter != "done":  # a filter that hides run 4
            await pilot.press("f")
        await wait_for(pilot, lambda: table.row_count == 11, 10, "run 4 filtered out")
        assert table.selected_run() not in (None, 4)
        assert home.selected == table.selected_run() and info(app).startswith(f"[status=done] run {home.selected} ")
        while table.status_filter is not None:  # back to every run
            await pilot.press("f")
        await wait_for(pilot, lambda: table.row_count == 12, 10, "every run again")
        highlighted = table.selected_run()
        assert home.selected == highlighted and info(app).startswith(f"run {highlighted} ")
        table.move_cursor(row=5)  # the middle of the table
        await wait_for(pilot, lambda: home.selected == table.selected_run() == int(table.ordered_rows[5].key.value),
                       10, "the sixth row")
        highlighted, below = table.selected_run(), int(table.ordered_rows[6].key.value)
        # Another run trained from its export: the dialog says so before its files can go
        folder = app.runs[highlighted]["output_dir"]
        with Store(many_runs) as store:
            store.update_run(below, config=json.dumps({"ppo": {"model": {"path": f"{folder}/final"}}}))
        await wait_for(pilot, lambda: folder in (app.runs[below].get("config") or ""), 20, "the new config read")
        await pilot.press("D")
        await wait_for(pilot, lambda: isinstance(app.screen, DeleteScreen), 10, "the delete dialog")
        assert app.screen.run_id == highlighted
        assert str(app.screen.query_one("#used-by").render()).startswith(f"run {below} uses its files")
        await pilot.press("y")
        await wait_for(pilot, lambda: highlighted not in app.runs and table.row_count == 11, 20, "the delete")
        assert table.cursor_row == 5 and home.selected == below  # its neighbour, not the top row


@sync
async def test_80x24_with_12_runs_scrolls_the_table_and_keeps_the_status_line_and_footer(many_runs):
    from textual.widgets._footer import FooterKey

    async with loaded(many_runs, (80, 24)) as (app, pilot):
        home, table = app.home, app.home.query_one(RunTable)
        line = home.query_one("#run-info", Static)
        await pilot.press("end")  # to the oldest run, at the bottom
        await wait_for(pilot, lambda: home.selected == 1 and "run 1 " in info(app), 10, "the oldest run")
        assert table.selected_run() == 1 and home.selected == 1
        # what is on screen at the highlighted row's line is the table, and at the status line's the line
        row_y = table.region.y + 1 + table.cursor_row - int(table.scroll_offset.y)  # 1: the header
        assert row_y < 24 and app.screen.get_widget_at(3, row_y)[0] is table
        assert app.screen.get_widget_at(3, line.region.y)[0] is line and "run 1 " in info(app)
        await wait_for(pilot, lambda: list(home.query(FooterKey)), 10, "the footer")
        keys = {k.key_display or k.key: k for k in home.query(FooterKey)}
        for key in ("n", "g", "?"):
            assert key in keys and keys[key].region.right <= 80, (key, sorted(keys))
        await pilot.press("home")  # and back to the newest, at the top
        await wait_for(pilot, lambda: home.selected == 12 and table.scroll_offset.y == 0, 10, "the newest run")


@sync
async def test_the_palette_finds_every_action_and_help_lists_each_once(many_runs):
    from textual.command import CommandPalette

    from console.screens.gpu import GpuScreen
    from console.screens.help import HelpScreen
    from console.screens.runs import RunsScreen

    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        titles = {c.title: c for c in app.get_system_commands(home)}
        for binding in RunsScreen.BINDINGS:  # generated from the bindings: none is missing
            assert binding.description in titles, binding.description
        for word in ("smooth", "overlay", "filter", "sort", "metric", "tab", "new run", "gpus"):
            assert any(word in t.lower() for t in titles), word
        before = home.smoothing
        titles["Smooth"].callback()
        await wait_for(pilot, lambda: home.smoothing != before, 10, "the smoothing to change")
        assert home.smoothing == before + 1  # an entry does what its key does
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), 5, "the palette")
        await pilot.press(*"filter stage")
        await wait_for(pilot, lambda: "Filter stage" in str(app.screen.query_one("CommandList").get_option_at_index(0)
                                                              .prompt), 10, "the match")
        await pilot.press("enter")
        await wait_for(pilot, lambda: home.query_one(RunTable).stage_filter == "sft", 10, "the filter")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 5, "help")
        text = help_text(app)
        assert "?, ?" not in text and "[/b]" not in text and "[, ]" not in text
        assert "?, f1" in text and "Samples: previous step" in text and text.count("Help") == 1
        assert text.index("\nRuns\n") < text.index("\nLaunch\n") < text.index("\nGPUs\n")
        # One action name on two screens (runs' space marks for the overlay, scores' space for deltas): both.
        scores = text.split("\nScores\n", 1)[1].split("\n\n", 1)[0]
        assert "Mark" in scores and "Export" in scores and "Paired delta" in scores, scores
        gpus = text.split("\nGPUs\n", 1)[1].split("\n\n", 1)[0]
        launch = text.split("\nLaunch\n", 1)[1].split("\n\n", 1)[0]
        assert "Back to runs" in gpus and "ctrl+s" in launch, (gpus, launch)
        chart = text.split("\nChart (when it has focus)\n", 1)[1].split("\n\n", 1)[0]  # its zoom was footer-only
        assert "Zoom in" in chart and "Pan left" in chart and "Reset scales" in chart, chart
        await pilot.press("escape", "g")  # help on another screen lists that screen's keys first
        await wait_for(pilot, lambda: isinstance(app.screen, GpuScreen), 5, "the GPU screen")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 5, "help")
        text = help_text(app)
        assert text.startswith("Everywhere") and text.index("\nGPUs\n") < text.index("\nRuns\n")
        assert text.count("Samples: previous step") == 1


@sync
async def test_a_failed_runs_own_error_is_pinned_and_t_finds_the_trainers_traceback(many_runs):
    """The log of a launched run ends with accelerate's wrapper traceback (CalledProcessError) after the
    trainer's: `t` goes to the trainer's, and the error runs.db holds stays above the log."""
    from textual.widgets import Log, TabbedContent

    from console.widgets.log_view import LogView

    with Store(many_runs) as store:
        out = Path(store.run(4)["output_dir"])
        run_error = store.run(4)["error"]
    trainer = ["Traceback (most recent call last):", '  File "engine/sft.py", line 9, in train',
               "ValueError: bad"]
    wrapper = ["Traceback (most recent call last):", '  File "accelerate/commands/launch.py", line 1',
               "subprocess.CalledProcessError: Command '['python', '-m', 'engine.cli']' returned non-zero "
               "exit status 1."]
    steps = [f"step {i}" for i in range(200)]
    (out / "train.log").write_text("\n".join([*steps, *trainer, "", *wrapper, *steps[:40]]) + "\n")
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        home.select_run(4)
        await pilot.press("2")
        view = home.query_one(LogView)
        await wait_for(pilot, lambda: len(view.lines) >= 247, 20, "the log")
        pinned = view.query_one("#log-error", Static)
        assert pinned.display
        # the exception is on the first line, whatever the box shows of the traceback's tail below it
        assert str(pinned.render()).splitlines()[0].startswith("error on record: ")
        assert str(pinned.render()).splitlines()[0].endswith(run_error.splitlines()[-1].strip())
        await pilot.press("t")
        log = view.query_one(Log)
        await wait_for(pilot, lambda: log.lines[int(log.scroll_offset.y)] == trainer[0], 10, "the jump")
        top = int(log.scroll_offset.y)
        assert log.lines[top] == trainer[0] and log.lines[top + 2] == "ValueError: bad"
        assert home.query_one(TabbedContent).active == "log"
        home.select_run(5)  # a run that did not fail: nothing pinned
        await wait_for(pilot, lambda: not pinned.display, 10, "the pin to go")
        # A launcher killed mid-progress-bar leaves the bar's redraws in the recorded error: shown as a
        # terminal would show them, its last state only.
        view.pin_error("Loading:  10%|#  | 1/9\r Loading:  90%|## | 8/9\x1b[A\nW1128 rank 0 killed\n"
                       "its launcher was killed by SIGKILL")
        await wait_for(pilot, lambda: pinned.display, 10, "the pin")
        shown = str(pinned.render()).splitlines()
        assert shown == ["error on record: its launcher was killed by SIGKILL",
                         " Loading:  90%|## | 8/9", "W1128 rank 0 killed"], shown


@sync
async def test_gpu_bars_are_0_to_100_and_nothing_wraps_at_80_columns(many_runs):
    """A GPU at 97-99 % reads as full (nvitop's fixed scale, not the strip's own min and max); each line of
    a card is one line at 80 columns; each process shows its memory."""
    from types import SimpleNamespace

    from console.widgets.gpu_panel import History, Meter

    busy = iter([97.0, 99.0, 98.0, 97.0, 99.0] * 100)

    class Sampler:
        def read(self):
            return [SimpleNamespace(index=0, name="NVIDIA H100 80GB HBM3", utilization=next(busy),
                                    memory_used=75 * 2**30, memory_total=80 * 2**30, temperature=81.0,
                                    power=690.0, power_limit=700.0, pids=(4242, 4343),
                                    process_memory=(70 * 2**30, None))]

        def close(self):
            pass

    app = RlhfConsole(many_runs, configs_dir=REPO / "configs", gpu_sampler=Sampler, poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded and app.gpu_readings, 20, "a reading")
        await pilot.press("g")
        await wait_for(pilot, lambda: len(app.gpu_history.get(0, {}).get("util", [])) >= 3, 10, "a history")
        screen = app.screen
        await wait_for(pilot, lambda: len(str(screen.query_one("#util", History).render()).split(" ")[-1].strip()) >= 3,
                       10, "the strip drawn")
        strip = str(screen.query_one("#util", History).render()).split(" ")[-1].strip()
        assert strip and set(strip) <= {"█", "▇"}, strip  # all near the top of a 0-100 scale
        util = str(screen.query_one("#util-bar", Meter).render())
        assert util.count("█") >= 0.9 * (util.count("█") + util.count("░"))
        for widget in (*screen.query(Meter), *screen.query(History), screen.query_one(".stats")):
            assert widget.region.height == 1 and widget.region.right <= 80
        procs = str(screen.query_one(".procs", Static).render())
        assert "pid 4242" in procs and "70.0 GiB" in procs and "pid 4343" in procs


@sync
async def test_a_console_started_elsewhere_with_db_finds_the_projects_recipes(many_runs, tmp_path, monkeypatch):
    """`rlhf console --db project/runs.db` from another directory: the form lists the project's recipes and
    accelerate configs (from the configs folder beside runs.db), as absolute paths."""
    import shutil

    from textual.widgets import Select

    from console.screens.launch import LaunchScreen

    shutil.copytree(REPO / "configs", many_runs.parent / "configs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    app = RlhfConsole(str(many_runs), gpu_sampler=no_gpu, poll_s=0.05)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20, "the runs")
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the form")
        recipe = app.screen.query_one("#recipe", Select).value
        assert recipe != Select.NULL and Path(str(recipe)).is_absolute() and Path(str(recipe)).is_file()
        assert str(recipe).startswith(str(many_runs.parent / "configs"))


@sync
async def test_a_running_runs_time_moves_on_while_it_writes_nothing(many_runs):
    """A 7B PPO step writes nothing for minutes: its time cell went on with the clock only at its next write."""
    import time

    with Store(many_runs) as store:
        run_id = store.create_run(stage="ppo", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(run_id, status="running", started=time.time() - 30, step=5, total_steps=50)
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and run_id in app.runs, 20, "the runs")
        table = app.home.query_one(RunTable)
        column = COLUMNS.index("time")

        def shown() -> str:
            return str(table.get_row(str(run_id))[column])

        seen = {shown()}  # a first redraw with the first metrics read, then the clock's own
        assert all(text.endswith("s") for text in seen)
        await wait_for(pilot, lambda: seen.add(shown()) or len(seen) >= 3, 30,
                       "the time cell to move on, twice")


@sync
async def test_samples_hide_the_shared_preamble_open_whole_move_a_step_per_press_and_follow(many_runs):
    from textual.widgets import DataTable

    from console.widgets.samples_view import SampleScreen

    preamble = "SYSTEM: You are a helpful assistant. Answer briefly and truthfully.\nUSER: "
    with Store(many_runs) as store:
        run_id = store.create_run(stage="ppo", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(run_id, status="running", started=T0, step=5, total_steps=50)
        for step in range(1, 6):
            store.add_samples(run_id, step, [(f"{preamble}question {step}.{i}", f"answer {step}.{i}", 0.1 * i)
                                             for i in range(3)])
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and run_id in app.runs, 20, "the runs")
        home = app.home
        home.select_run(run_id)
        await pilot.press("3")
        table = home.query_one("#samples-table", DataTable)
        await wait_for(pilot, lambda: home.sample_step == 5 and table.row_count == 3, 10, "the newest step")
        assert str(table.get_row_at(0)[1]) == "…USER: question 5.0"  # the preamble is not repeated on every row
        head = str(home.query_one("#samples-head").render())
        assert "following" in head and "shared start" in head
        await pilot.press("left_square_bracket", "left_square_bracket")  # two quick presses: two steps
        await wait_for(pilot, lambda: str(table.get_row_at(0)[1]) == "…USER: question 3.0", 10, "step 3")
        assert home.sample_step == 3 and not home.samples_following
        await pilot.press("right_square_bracket")
        await wait_for(pilot, lambda: str(table.get_row_at(0)[1]) == "…USER: question 4.0", 10, "step 4")
        # 3 gave the samples the keys (enter went to the run table, and folded a pipeline there).
        await wait_for(pilot, lambda: app.focused is table, 10, "the samples focused")
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, SampleScreen), 10, "the whole sample")
        whole = str(app.screen.query_one(Static).render())
        assert preamble.strip() in whole and "answer 4.1" in whole
        await pilot.press("escape")
        await pilot.press("right_square_bracket")  # back at the newest: following again
        await wait_for(pilot, lambda: home.sample_step == 5 and home.samples_following, 10, "step 5")
        with Store(many_runs) as store:  # the live run records a new step
            store.add_samples(run_id, 6, [(f"{preamble}question 6.{i}", f"answer 6.{i}", 0.0) for i in range(3)])
            store.log_metrics(run_id, 6, {"loss": 0.1})
        await wait_for(pilot, lambda: home.sample_step == 6 and str(table.get_row_at(0)[1]) == "…USER: question 6.0",
                       20, "the new step, followed")
        assert "· following" in str(home.query_one("#samples-head").render())
        with Store(many_runs) as store:  # it ends: nothing more comes, and the heading stops saying it follows
            store.update_run(run_id, status="done", ended=T0 + 60)
        await wait_for(pilot, lambda: "following" not in str(home.query_one("#samples-head").render()), 20,
                       "the heading of an ended run")
        assert "step 6 (6 of 6)" in str(home.query_one("#samples-head").render())


@sync
async def test_runs_are_told_apart_by_overrides_time_and_a_labelled_best_and_sort_by_best(many_runs):
    with Store(many_runs) as store:
        store.update_run(7, overrides=json.dumps(["sft.train.lr=3e-4", "seed=7"]), world_size=2)
        store.log_metrics(3, 6, {"loss": 0.001}, wall_time=T0 + 6)  # run 3 becomes the best
    async with loaded(many_runs, (160, 48)) as (app, pilot):
        table = app.home.query_one(RunTable)
        await wait_for(pilot, lambda: table.row_count == 12, 10, "the rows")
        # best and trend come with the metric history, which arrives after the runs
        await wait_for(pilot, lambda: str(table.get_row("7")[COLUMNS.index("trend")]) != "", 10, "run 7's metrics")
        row = {name: str(cell) for name, cell in zip(table.columns, table.get_row("7"))}
        assert row["overrides"] == "train.lr=3e-4 seed=7" and row["time"] != "-"
        assert row["best"].startswith("loss ")  # the metric is named
        assert row["step"] == "5/5 ×2" and row["trend"] == "█▆▄▂▁"  # 5 / (step + 7), falling
        while table.sort_by != "best":
            await pilot.press("o")
        await wait_for(pilot, lambda: int(table.ordered_rows[0].key.value) == 3, 10, "sorted by best")
        order = [int(r.key.value) for r in table.ordered_rows]
        # run 3 has the lowest loss; then loss 5 / (step + i) is lowest for the highest run id
        assert order == [3, *[i for i in range(12, 0, -1) if i != 3]]
        assert str(table.columns["best"].label).startswith("best ")
        assert table.selected_run() == app.home.selected


@sync
async def test_a_run_without_the_metric_gets_plain_axes_and_no_legend_entry(many_runs):
    from console.widgets.chart import MetricChart

    with Store(many_runs) as store:
        empty = store.create_run(stage="sft", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(empty, status="pending")
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and empty in app.runs, 20, "the runs")
        home = app.home
        home.select_run(5)
        await wait_for(pilot, lambda: home.last_draw_points > 0, 10, "run 5's curve")
        plot = home.query_one(MetricChart).plot
        assert plot._y_max < 2  # the loss of run 5: about 1
        await pilot.press("space")  # run 5 overlaid
        home.select_run(empty)
        await wait_for(pilot, lambda: home.selected == empty, 10, "the empty run")
        home.marked.clear()
        home.redraw_chart()
        assert home.last_draw_points == 0 and (plot._x_min, plot._x_max, plot._y_min, plot._y_max) == (0, 1, 0, 1)
        title = str(home.query_one("#chart-title", Static).render())
        assert f"run {empty}" not in title and "run 5" not in title


@sync
async def test_y_copies_the_runs_command_line_and_z_zooms_the_focused_pane(many_runs):
    import shlex

    with Store(many_runs) as store:
        store.update_run(6, overrides=json.dumps(["sft.train.lr=3e-4", "seed=7"]),
                         launch=json.dumps({"accelerate_config": "/abs/configs/accelerate/cpu.yaml",
                                            "num_processes": 2}))
        folder = store.run(6)["output_dir"]
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        home.select_run(6)
        await wait_for(pilot, lambda: home.selected == 6, 10)
        await pilot.press("y")
        # From the folder its recipe's relative paths are resolved in, into its own runs.db: pasted anywhere.
        assert shlex.split(app.clipboard) == ["cd", str(Path.cwd()), "&&",
            "rlhf", "launch", "sft", "configs/tiny.yaml", "--set", "sft.train.lr=3e-4", "--set", "seed=7",
            "--accelerate-config", "/abs/configs/accelerate/cpu.yaml", "--num-processes", "2",
            "--db", str(many_runs.resolve())]
        await pilot.press("Y")
        assert app.clipboard == folder
        table = home.query_one(RunTable)
        await pilot.press("z")
        await wait_for(pilot, lambda: table.region.height > 20, 10, "the zoom")
        assert home.maximized is table and table.region.height > 20
        await pilot.press("z")
        await wait_for(pilot, lambda: home.maximized is None, 10, "back")
        assert home.maximized is None


@sync
async def test_log_search_finds_marks_and_moves_between_hits_and_n_is_new_run_again_after(many_runs):
    from textual.widgets import Log

    from console.screens.launch import LaunchScreen
    from console.widgets.log_view import LogView

    with Store(many_runs) as store:
        out = Path(store.run(8)["output_dir"])
    lines = [f"step {i} loss {i / 100:.2f}" + (" NEEDLE here" if i in (50, 120, 300) else "") for i in range(400)]
    (out / "train.log").write_text("\n".join(lines) + "\n")
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        home.select_run(8)
        await pilot.press("2")
        view = home.query_one(LogView)
        await wait_for(pilot, lambda: len(view.lines) == 400, 20, "the log")
        log = view.query_one(Log)
        await wait_for(pilot, lambda: app.focused is log, 10, "the log focused: its keys at once")
        log.scroll_to(y=0, animate=False)
        await pilot.press("slash", *"needle", "enter")
        await wait_for(pilot, lambda: int(log.scroll_offset.y) == 50, 10, "the first hit")
        assert view.term == "needle" and int(log.scroll_offset.y) == 50 and app.focused is log
        marked = [seg for seg in log._render_line_strip(50, log.rich_style) if seg.text == "NEEDLE"]
        assert marked and marked[0].style.bgcolor.name == "yellow"  # the hit is marked in the line
        await pilot.press("n")
        await wait_for(pilot, lambda: int(log.scroll_offset.y) == 120, 10, "the next hit")
        await pilot.press("n")
        await wait_for(pilot, lambda: int(log.scroll_offset.y) == 300, 10, "the hit after")
        await pilot.press("N")
        await wait_for(pilot, lambda: int(log.scroll_offset.y) == 120, 10, "the hit before")
        # Lines that come meanwhile land below, unseen: the line under the log says so until e follows.
        with open(out / "train.log", "a") as more:
            more.write("".join(f"step {i}\n" for i in range(400, 405)))
        progress = view.query_one("#log-progress", Static)
        await wait_for(pilot, lambda: "↓ 5 new lines below (e follows)" in str(progress.render()), 20, "the note")
        assert int(log.scroll_offset.y) == 120  # the view stayed where the reader is
        await pilot.press("e")
        await wait_for(pilot, lambda: log.is_vertical_scroll_end and "new line" not in str(progress.render()), 10)
        await pilot.press("escape")  # search off: n is New run again
        await wait_for(pilot, lambda: not view.term, 10, "the search to end")
        assert app.focused is log
        await pilot.press("escape")  # and back to the runs: up and down move the selection again
        await wait_for(pilot, lambda: app.focused is home.query_one(RunTable), 10, "the table's focus")
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen), 10, "the launch form")


@sync
async def test_a_note_tells_a_run_apart_and_is_stored(many_runs):
    from textual import events

    from console.screens.dialogs import NoteScreen

    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        home.select_run(9)
        await wait_for(pilot, lambda: home.selected == 9, 10)
        await pilot.press("N")
        await wait_for(pilot, lambda: isinstance(app.screen, NoteScreen), 10, "the note dialog")
        await pilot.press(*"lr sweep [b]", "enter")
        table = home.query_one(RunTable)
        await wait_for(pilot, lambda: str(table.get_row("9")[2]) == "tiny · lr sweep [b]", 20, "the note shown")
        # A long note is cut in the table (status, step and ETA stay on an 80-column screen), whole below it.
        long = "the lr sweep that diverged at step 40 when warmup was off, kept for the comparison"
        await pilot.press("N")
        await wait_for(pilot, lambda: isinstance(app.screen, NoteScreen), 10, "the note dialog")
        await pilot.press("ctrl+u", *long, "enter")
        await wait_for(pilot, lambda: str(table.get_row("9")[2]).endswith("…"), 20, "the long note, cut")
        assert table.columns[table.ordered_columns[2].key].content_width <= 36
        await wait_for(pilot, lambda: f"({long[:80]})" in str(home.query_one("#run-info").render()), 10)
        # A note pasted from several lines is kept whole, on one line (the Input kept the first line alone).
        await pilot.press("N")
        await wait_for(pilot, lambda: isinstance(app.screen, NoteScreen), 10, "the note dialog")
        await pilot.press("ctrl+u")
        app.screen.query_one("#note").post_message(events.Paste("lr 2e-5\nkl 0.05\n\nwarmup off\n"))
        await wait_for(pilot, lambda: app.screen.query_one("#note").value == "lr 2e-5 kl 0.05 warmup off", 10)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "(lr 2e-5 kl 0.05 warmup off)" in str(home.query_one("#run-info").render()), 10)
        with Store(many_runs) as store:
            assert store.run(9)["note"] == "lr 2e-5 kl 0.05 warmup off"
        # Longer than the note's 80 characters once joined: cut to them (Input dropped it whole)
        await pilot.press("N")
        await wait_for(pilot, lambda: isinstance(app.screen, NoteScreen), 10, "the note dialog")
        await pilot.press("ctrl+u")
        pasted = "lr sweep over 1e-5 2e-5 5e-5,\nwarmup 3% of the steps,\nkl target 6 with horizon 10000 as trlx"
        app.screen.query_one("#note").post_message(events.Paste(pasted))
        joined = " ".join(pasted.split())
        assert len(joined) > 80
        await wait_for(pilot, lambda: app.screen.query_one("#note").value == joined[:80], 10, "the paste, cut")


@sync
async def test_at_80_columns_the_columns_up_to_best_stay_in_view_and_a_column_narrows_again(many_runs):
    """A note, or sorting by stage once, pushed `time` and `best` off an 80-column screen for good: a
    DataTable column only ever widens. The recipe column now gives up what the terminal lacks."""
    with Store(many_runs) as store:
        store.update_run(9, note="the lr sweep that diverged at step 40 when warmup was off")
    async with loaded(many_runs, (80, 24)) as (app, pilot):
        table = app.home.query_one(RunTable)

        def width(name: str) -> int:
            return table.columns[name].get_render_width(table)

        def best_in_view() -> bool:
            return sum(width(name) for name in COLUMNS[: COLUMNS.index("best") + 1]) \
                <= table.scrollable_content_region.width

        await wait_for(pilot, lambda: "the lr sweep" in str(table.get_row("9")[2]) and best_in_view()
                       and str(table.get_row("9")[COLUMNS.index("best")]).startswith("loss"), 10, "best in view")
        narrow, stage = width("recipe"), width("stage")
        assert narrow - 2 < cell_len(str(table.get_row("9")[2])), narrow  # the note is cut to make room
        await pilot.press("o")  # sorted by stage: its header carries the arrow
        await wait_for(pilot, lambda: table.sort_by == "stage" and width("stage") > stage and best_in_view(), 10)
        while table.sort_by != "id":
            await pilot.press("o")
        await wait_for(pilot, lambda: width("stage") == stage and width("recipe") == narrow, 10, "the old widths")
        await pilot.resize_terminal(140, 30)  # room again: the recipe column takes it
        await wait_for(pilot, lambda: width("recipe") - 2 == cell_len(str(table.get_row("9")[2])), 10, "room")
        assert best_in_view()
        with Store(many_runs) as store:  # the note goes: its width goes with it
            store.update_run(9, note=None)
        await wait_for(pilot, lambda: str(table.get_row("9")[2]) == "tiny", 10, "the note gone")
        await wait_for(pilot, lambda: width("recipe") - 2 == len("recipe"), 10, "the column as wide as its header")


@sync
async def test_l_opens_the_launch_form_filled_from_the_run_keeping_what_no_field_shows(many_runs):
    import shutil

    from textual.widgets import Input, Select

    from console.screens.launch import LaunchScreen
    from engine.config import load_recipe, recipe_to_json, with_absolute_paths

    shutil.copytree(REPO / "configs", many_runs.parent / "configs")
    recipe = str(many_runs.parent / "configs" / "tiny.yaml")
    accel = str(many_runs.parent / "configs" / "accelerate" / "cpu.yaml")
    ran = recipe_to_json(with_absolute_paths(load_recipe(recipe, ["train.lr=0.0003", "seed=7"], "sft")))
    with Store(many_runs) as store:
        store.update_run(7, recipe=recipe, overrides=json.dumps(["train.lr=0.0003", "seed=7"]), config=ran,
                         launch=json.dumps({"accelerate_config": accel, "num_processes": 2}))
    app = RlhfConsole(many_runs, gpu_sampler=no_gpu, poll_s=0.05)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 12, 20, "the runs")
        home = app.home

        async def form_from(run_id: int) -> LaunchScreen:
            """`l` on the run, once the form holds its values."""
            home.select_run(run_id)
            await wait_for(pilot, lambda: home.selected == run_id, 10)
            await pilot.press("l")
            await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen) and app.screen.loaded, 20, "the form")
            await wait_for(pilot, lambda: not app.screen._run_pending, 10, "the run's values")
            return app.screen

        form = await form_from(7)
        assert form.stage == "sft" and form.recipe == recipe
        assert str(form.query_one("#recipe-changed", Static).render()) == ""  # the file as the run had it
        assert str(form.query_one("#accelerate", Select).value) == accel
        assert form.query_one("#field-lr", Input).value == "0.0003"
        assert form.query_one("#field-processes", Input).value == "2" and form.processes() == 2
        assert "seed=7" in str(form.query_one("#kept-overrides", Static).render())
        form.query_one("#field-batch", Input).value = "3"  # the change this relaunch is for
        assert sorted(form.overrides()) == ["seed=7", "sft.train.batch_size=3", "sft.train.lr=0.0003"]

        # A pipeline's PPO stage: its model came in as a whole section (the SFT export), not as the recipe's.
        wired = {"path": "/exports/sft-final", "dtype": "float32", "trust_remote_code": False}
        with Store(many_runs) as store:
            store.update_run(8, stage="ppo", recipe=recipe, launch=json.dumps({"accelerate_config": accel}),
                             overrides=json.dumps(["ppo.model=" + json.dumps(wired),
                                                   "ppo.reward_model=/exports/rm-final", "ppo.reward_fn=null"]))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is not form and app.runs[8]["stage"] == "ppo", 20, "run 8 as ppo")
        form = await form_from(8)
        assert form.query_one("#field-model", Input).value == "/exports/sft-final"  # the model the run used
        form.query_one("#field-model", Input).value = "/exports/other"
        from engine.config import load_recipe

        relaunched = load_recipe(recipe, form.overrides(), "ppo")
        assert relaunched.ppo.model.path == "/exports/other" and relaunched.ppo.model.dtype == "float32"

        # The recipe file edited since run 7 ran: the form starts from the file, and says what differs
        text = Path(recipe).read_text(encoding="utf-8")
        Path(recipe).write_text(text.replace("max_length: 192", "max_length: 96", 1), encoding="utf-8")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is not form, 20, "the form closed")
        form = await form_from(7)
        await wait_for(pilot, lambda: "changed since run 7" in str(form.query_one("#recipe-changed").render()), 20)
        assert "sft.train.max_length 192 -> 96 (the launch takes the file as it is now)" in \
            str(form.query_one("#recipe-changed").render())


@sync
async def test_the_launch_form_lists_the_recipes_runs_were_launched_from(many_runs):
    """A user's recipes live in their project, not in the console's configs folder: the form listed those
    alone, so launching again from one's own recipe meant the command line."""
    import shutil

    from textual.widgets import Select
    from textual.widgets._select import InvalidSelectValueError

    from console.screens.launch import LaunchScreen

    shutil.copytree(REPO / "configs", many_runs.parent / "configs")
    mine = many_runs.parent / "project" / "sweep-kl.yaml"
    mine.parent.mkdir()
    shutil.copy(REPO / "configs" / "tiny.yaml", mine)
    staged = many_runs.parent / "project" / "pipeline-3.abc.recipe.json"  # a pipeline's copy, its stages'
    staged.write_text("{}")
    with Store(many_runs) as store:
        store.update_run(5, recipe=str(mine))
        store.update_run(6, recipe=str(many_runs.parent / "project" / "deleted.yaml"))
        store.update_run(4, recipe=str(staged), pipeline_id=store.create_pipeline(
            name="tiny", recipe=str(mine), config="{}", overrides=[], through="all", launch={}))
    app = RlhfConsole(many_runs, gpu_sampler=no_gpu, poll_s=0.05, configs_dir=many_runs.parent / "configs")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 12, 20, "the runs")
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen) and app.screen.loaded, 20, "the form")
        recipe = app.screen.query_one("#recipe", Select)
        recipe.value = str(mine.resolve())  # an option now (a value no option has is refused)
        await wait_for(pilot, lambda: app.screen.recipe == str(mine.resolve()), 10, "the project's recipe chosen")
        with pytest.raises(InvalidSelectValueError):  # a recipe file since deleted is not offered
            recipe.value = str((many_runs.parent / "project" / "deleted.yaml").resolve())
        with pytest.raises(InvalidSelectValueError):  # nor a pipeline's own copy
            recipe.value = str(staged.resolve())


@sync
async def test_the_footer_shows_the_focused_panes_keys_first(many_runs):
    from textual.widgets import Log
    from textual.widgets._footer import FooterKey

    from console.widgets.log_view import LogView

    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home

        def footer() -> list[str]:
            return [k.description for k in home.query(FooterKey)]

        await wait_for(pilot, lambda: footer()[:1] == ["New run"], 10, "the footer")
        await pilot.press("2")
        await wait_for(pilot, lambda: home.query(LogView) and home.query_one(LogView).query(Log), 20, "the log")
        home.query_one(LogView).query_one(Log).focus()
        await wait_for(pilot, lambda: footer()[:1] == ["Search"], 10, "the log's keys")
        keys = footer()
        assert keys[0] == "Search" and "Next hit" not in keys and "New run" in keys  # no search yet: n is New run
        # Back to the curves: the hidden log gives its keys back to the table (they went to nothing)
        await pilot.press("1")
        await wait_for(pilot, lambda: app.focused is home.query_one(RunTable), 10, "the table's focus")
        row = home.selected
        await pilot.press("down")
        await wait_for(pilot, lambda: home.selected != row, 10, "the selection to move")
        await pilot.press("3")
        await wait_for(pilot, lambda: home.query("#samples-table"), 20, "the samples")
        home.query_one("#samples-table").focus()
        await wait_for(pilot, lambda: footer()[:2] == ["Prev step", "Next step"], 10, "the samples' keys")
        assert footer()[:2] == ["Prev step", "Next step"]  # enter (whole sample) is the table's own key


@sync
async def test_slash_on_the_run_table_finds_runs_by_their_text(many_runs):
    with Store(many_runs) as store:
        store.update_run(5, note="lr sweep")
        store.update_run(9, overrides=json.dumps(["sft.train.lr=9e-4"]))
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        table = app.home.query_one(RunTable)
        table.focus()
        await pilot.press("slash", *"LR")
        await wait_for(pilot, lambda: table.row_count == 2, 10, "two runs")
        assert {int(r.key.value) for r in table.ordered_rows} == {5, 9}
        assert app.home.selected == table.selected_run() in (5, 9)  # the highlighted run is still acted on
        await pilot.press("enter")
        assert app.focused is table and table.row_count == 2
        assert info(app).startswith("[find='lr'] run ")  # first: the line's end is cut at 80 columns
        await pilot.press("slash", "escape")
        await wait_for(pilot, lambda: table.row_count == 12, 10, "every run again")


@sync
async def test_a_one_point_chart_has_short_readable_axes(many_runs):
    from console.widgets.chart import MetricChart

    with Store(many_runs) as store:
        one = store.create_run(stage="sft", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.log_metrics(one, 1, {"loss": 2.0}, wall_time=T0)
        store.update_run(one, status="running", started=T0, step=1, total_steps=10)
    app = app_for(many_runs)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded and one in app.runs, 20, "the runs")
        home = app.home
        home.select_run(one)
        await wait_for(pilot, lambda: home.selected == one and home.last_draw_points > 0, 20, "the point")
        plot = home.query_one(MetricChart).plot
        # a span around the one value: ticks like 1.9, 2.0, 2.1, not 1.99999999
        assert (plot._x_min, plot._x_max) == (0, 2) and (plot._y_min, plot._y_max) == pytest.approx((1.8, 2.2))


@sync
async def test_w_wraps_long_log_lines_at_the_pane_width_and_back(many_runs):
    from rich.cells import cell_len
    from textual.widgets import Log

    from console.widgets.log_view import LogView

    with Store(many_runs) as store:
        out = Path(store.run(8)["output_dir"])
    long_line = "x" * 150 + " 训练 " + "y" * 100
    (out / "train.log").write_text("short line\n" + long_line + "\nlast line\n")
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        home = app.home
        home.select_run(8)
        await pilot.press("2")
        view = home.query_one(LogView)
        await wait_for(pilot, lambda: len(view.lines) == 3, 20, "the log")
        log = view.query_one(Log)
        log.focus()
        assert list(log.lines) == ["short line", long_line, "last line"]
        await pilot.press("w")
        await wait_for(pilot, lambda: log.line_count > 3, 10, "the long line wrapped")
        width = log.scrollable_content_region.width
        assert all(cell_len(line) <= width for line in log.lines)
        assert "".join(list(log.lines)[1:-1]) == long_line  # folded, nothing lost
        await pilot.press("w")
        await wait_for(pilot, lambda: log.line_count == 3, 10, "unwrapped")


@sync
async def test_slash_finds_in_the_focused_pane_metrics_and_samples_too(many_runs):
    from textual.widgets import DataTable, Input, OptionList

    with Store(many_runs) as store:
        run_id = store.create_run(stage="ppo", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(run_id, status="done", started=T0, step=2, total_steps=2)
        for step in (1, 2):
            store.log_metrics(run_id, step, {"losses/policy_loss": 0.1, "losses/value_loss": 0.2,
                                             "kl_ctl_value": 0.05, "rollout_scores/mean": 0.3}, wall_time=T0 + step)
        store.add_samples(run_id, 2, [("what is 2 plus 3?", "5", 1.0), ("opposite of hot?", "cold", 0.5),
                                      ("what is 4 plus 4?", "8", 0.9)])
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and run_id in app.runs, 20, "the runs")
        home = app.home
        home.select_run(run_id)
        metrics = home.query_one("#metric-list", OptionList)

        def names() -> list[str]:
            return [metrics.get_option_at_index(i).id for i in range(metrics.option_count)
                    if not metrics.get_option_at_index(i).disabled]

        await wait_for(pilot, lambda: "losses/value_loss" in names(), 20, "the metrics")
        runs = home.query_one(RunTable)
        runs.focus()
        await pilot.press("slash", *"ppo", "enter")  # a find kept in the table...
        await wait_for(pilot, lambda: runs.row_count == 1 and app.focused is runs, 10, "the ppo run alone")
        await pilot.press("escape")  # ...ends with escape there too
        await wait_for(pilot, lambda: runs.row_count == 13, 10, "every run again")
        assert not home.query_one("#run-find", Input).display
        metrics.focus()
        await pilot.press("slash", *"loss")
        await wait_for(pilot, lambda: set(names()) - {home.metric} == {"losses/policy_loss", "losses/value_loss"}
                       - {home.metric}, 10, "only the losses")
        assert "kl_ctl_value" not in names()
        await pilot.press("escape")
        await wait_for(pilot, lambda: "kl_ctl_value" in names(), 10, "every metric again")
        assert not home.query_one("#metric-find", Input).display and app.focused is metrics

        await pilot.press("3")
        table = home.query_one("#samples-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 3, 20, "the samples")
        table.focus()
        await pilot.press("slash", *"plus")
        await wait_for(pilot, lambda: table.row_count == 2, 10, "the two sums")
        assert "2 of 3 hold 'plus'" in str(home.query_one("#samples-head").render())
        await pilot.press("enter")  # kept; enter on the table then opens the first match whole
        await wait_for(pilot, lambda: app.focused is table, 10)
        await pilot.press("slash")
        await pilot.press("escape")
        await wait_for(pilot, lambda: table.row_count == 3, 10, "every sample again")


@sync
async def test_x_tick_labels_are_never_cut_at_the_right_edge_at_80_columns(many_runs):
    from textual_hires_canvas import Canvas

    from console.widgets.chart import MetricChart

    with Store(many_runs) as store:
        run = store.create_run(stage="sft", name="tiny", recipe="configs/tiny.yaml", config="{}")
        for step in range(1, 1002):  # ticks 200 ... 1000, the last one cell from the right edge
            store.log_metrics(run, step, {"loss": 1.0 / step}, wall_time=T0 + step)
        store.update_run(run, status="done", started=T0, step=1001, total_steps=1001)
    app = app_for(many_runs)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded and run in app.runs, 20, "the runs")
        home = app.home
        home.select_run(run)
        await wait_for(pilot, lambda: home.selected == run and home.last_draw_points > 0, 20, "the curve")
        plot = home.query_one(MetricChart).plot
        await pilot.pause()
        ticks, labels = plot._x_formatter.get_ticks_and_labels(plot._x_min, plot._x_max)
        row = plot.query_one("#margin-bottom", Canvas).render_line(0).text
        shown = row.split()
        assert shown and all(token in labels for token in shown), (row, labels)  # whole labels only
        assert shown == [label for label in labels if label in shown]  # in order, none half-drawn


@sync
async def test_live_cells_from_polls_redraw_at_most_every_two_seconds_and_user_actions_at_once(many_runs):
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        table = app.home.query_one(RunTable)
        await wait_for(pilot, lambda: not table.pending, 10, "the first live cells drawn")
        step = list(COLUMNS).index("step")
        runs = {k: dict(v) for k, v in app.runs.items()}
        table.show(runs, app.history, set())  # a draw now
        runs[3]["step"] = 4
        table.show(runs, app.history, set(), throttle=True)  # a poll right after it: it waits
        assert table.pending and str(table.get_row("3")[step]).startswith("5/")
        await wait_for(pilot, lambda: not table.pending, 10, "the timer's redraw")
        assert str(table.get_row("3")[step]).startswith("4/")
        table.show(runs, app.history, set())  # a draw now
        runs[3]["step"], runs[3]["status"] = 5, "failed"
        table.show(runs, app.history, set(), throttle=True)  # a poll with a new status: at once, as below it
        status = list(COLUMNS).index("status")
        assert not table.pending and str(table.get_row("3")[status]) == "failed"
        assert str(table.get_row("3")[step]).startswith("5/")
        runs[3]["step"] = 3
        table.show(runs, app.history, {3})  # what the user did (a mark, a note): at once
        assert not table.pending and str(table.get_row("3")[step]).startswith("3/")
        assert str(table.get_row("3")[0]).startswith("●")


@sync
async def test_c_and_l_say_why_not_for_runs_they_cannot_serve(many_runs):
    from textual.widgets._toast import Toast

    from console.screens.chat import ChatScreen
    from console.screens.runs import RunsScreen

    with Store(many_runs) as store:
        rm = store.create_run(stage="rm", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(rm, status="done", started=T0, ended=T0 + 5)
        evaluation = store.create_run(stage="eval", name="tiny sft", recipe="", config="{}")
        store.update_run(evaluation, status="done", started=T0, ended=T0 + 5)
        judged = store.create_run(stage="eval", name="tiny ppo", recipe="",
                                  config=json.dumps({"checkpoint": "/models/ppo-final"}))
        store.update_run(judged, status="done", started=T0, ended=T0 + 5)
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32), notifications=True) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 15, 20, "the runs")
        home = app.home
        home.select_run(rm)
        await wait_for(pilot, lambda: home.selected == rm, 10)
        await pilot.press("c")

        def toasts() -> str:
            return " ".join(str(t.render()) for t in app.screen.query(Toast))

        await wait_for(pilot, lambda: "reward model" in toasts(), 10, "why not")
        assert f"run {rm} is a reward model" in toasts() and isinstance(app.screen, RunsScreen)
        home.select_run(evaluation)  # l on an evaluation: what launches it again, not a form that cannot hold it
        await wait_for(pilot, lambda: home.selected == evaluation, 10)
        await pilot.press("l")
        await wait_for(pilot, lambda: "--answers-from" in toasts(), 10, "how to run it again")
        assert isinstance(app.screen, RunsScreen)
        home.select_run(judged)  # c on an evaluation: the model it evaluated (rlhf chat ID finds it the same way)
        await wait_for(pilot, lambda: home.selected == judged, 10)
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat screen")
        assert app.screen.specs == {"left": str(judged), "right": None}
        await wait_for(pilot, lambda: f"run {judged} evaluated /models/ppo-final, which" in " ".join(
            str(w.render()) for w in app.screen.query(".pane-error")), 20, "the pane's reason")
        app.pop_screen()
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), 10, "back")
        home.select_run(evaluation)
        await wait_for(pilot, lambda: home.selected == evaluation, 10)
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat screen")
        await wait_for(pilot, lambda: "is an evaluation that names no checkpoint" in " ".join(
            str(w.render()) for w in app.screen.query(".pane-error")), 20, "the pane's reason")
        app.pop_screen()
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), 10, "back")
        home.select_run(9)
        await wait_for(pilot, lambda: home.selected == 9, 10)
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat screen")
        assert app.screen.query_one("#chat-input").placeholder.startswith("ask the model")  # one side, not "both"
        # Run 9 has no export on disk here: its pane says so, and nothing else breaks.
        await wait_for(pilot, lambda: "has no model" in " ".join(
            str(w.render()) for w in app.screen.query(".pane-error")), 20, "the pane's reason")


@sync
async def test_shift_c_opens_a_chat_with_what_is_typed_on_each_side_an_endpoint_too(many_runs):
    """c takes runs only; C asks what each side runs, starting from the runs c would take, so an
    OpenAI-compatible endpoint can sit beside a run without leaving the console."""
    from console.screens.chat import ChatScreen, ChatSidesScreen

    with Store(many_runs) as store:
        rm = store.create_run(stage="rm", name="tiny", recipe="configs/tiny.yaml", config="{}")
        store.update_run(rm, status="done", started=T0, ended=T0 + 5)
    app = app_for(many_runs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and rm in app.runs, 20, "the runs")
        home = app.home
        home.select_run(9)
        await wait_for(pilot, lambda: home.selected == 9, 10)
        await pilot.press("C")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatSidesScreen), 10, "the sides dialog")
        dialog = app.screen
        left, right = dialog.query_one("#side-left"), dialog.query_one("#side-right")
        assert (left.value, right.value) == ("9", "") and right.has_focus

        def error() -> str:
            return str(dialog.query_one("#sides-error").render())

        for typed, why in ((f"{rm}", f"run {rm} is a reward model"), ("openai:served", "openai:MODEL@BASE_URL"),
                           ("/no/such/model", "no such folder"), ("999", "no run 999")):
            right.value = typed
            await pilot.press("enter")
            await wait_for(pilot, lambda: why in error(), 10, f"why not {typed}")
            assert app.screen is dialog  # nothing opened
        right.value = "openai:served@http://127.0.0.1:9/v1"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat")
        assert app.screen.specs == {"left": "9", "right": "openai:served@http://127.0.0.1:9/v1"}
        # A run by its id and stage, not by its folder's path (what the user picked it by)
        chat = app.screen
        run9 = app.runs[9]
        await wait_for(pilot, lambda: str(chat.panes["left"].heading.render()) ==
                       f"left: {run9['stage']} run 9 {run9['name']}", 20, "the left pane's title")
        app.pop_screen()
        await wait_for(pilot, lambda: app.screen is home, 10, "back")
        await pilot.press("C")  # Esc leaves without a chat
        await wait_for(pilot, lambda: isinstance(app.screen, ChatSidesScreen), 10, "the sides dialog")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is home, 10, "back, no chat")


@sync
async def test_with_no_color_the_console_draws_its_charts_without_colour(many_runs, monkeypatch):
    """NO_COLOR (set, even empty) turns the screen monochrome: the charts' canvas must survive it (its
    empty lines carry no style, which Textual's monochrome filter did not expect: the console crashed)."""
    monkeypatch.setenv("NO_COLOR", "")
    async with loaded(many_runs, (100, 32)) as (app, pilot):
        assert app.no_color
        home = app.home
        # Drawn through the filters by now (the runs and a curve on screen): a crash ends the app, and run_test
        # raises it.
        await wait_for(pilot, lambda: home.last_draw_points > 0, 20, "a curve")


@sync
async def test_a_note_or_a_delete_on_a_runs_db_this_user_cannot_write_says_why(many_runs):
    """Read access only (a teammate's runs.db): the console shows the runs, and a note or a delete says why
    it failed (both vanished without a word)."""
    from console.screens.dialogs import DeleteScreen, NoteScreen
    from tests.helpers import read_only

    with read_only(many_runs):
        async with loaded(many_runs, (100, 32)) as (app, pilot):
            home = app.home
            home.select_run(9)
            await wait_for(pilot, lambda: home.selected == 9, 10)

            def said(title: str) -> str:
                return " ".join(str(n.message) for n in app._notifications if n.title == title)

            await pilot.press("N")
            await wait_for(pilot, lambda: isinstance(app.screen, NoteScreen), 10, "the note dialog")
            await pilot.press(*"sweep", "enter")
            await wait_for(pilot, lambda: said("note failed"), 20, "the note's failure")
            assert "readonly" in said("note failed")
            await pilot.press("D")
            await wait_for(pilot, lambda: isinstance(app.screen, DeleteScreen), 10, "the delete dialog")
            await pilot.press("y")
            await wait_for(pilot, lambda: said("delete failed"), 20, "the delete's failure")
            assert "readonly" in said("delete failed") and 9 in app.runs
    with Store(many_runs) as store:
        assert store.run(9)["note"] is None


def test_an_evaluations_command_line_is_rlhf_eval_belle_with_what_differs_from_the_defaults(tmp_path):
    import shlex

    from console.screens.runs import command_line

    # A training run: launched, with its accelerate config; started by `rlhf train`, by that (it copied an
    # `rlhf launch` without an accelerate config, which is refused)
    trained = {"stage": "sft", "recipe": "/c/tiny.yaml", "overrides": '["train.lr=1e-3"]', "launch": None}
    assert shlex.split(command_line(trained, "/r/runs.db"))[3:] == [
        "rlhf", "train", "sft", "/c/tiny.yaml", "--set", "train.lr=1e-3", "--db", "/r/runs.db"]
    launched = {**trained, "launch": '{"accelerate_config": "/c/cpu.yaml", "num_processes": null}'}
    assert shlex.split(command_line(launched, "/r/runs.db"))[3:] == [
        "rlhf", "launch", "sft", "/c/tiny.yaml", "--set", "train.lr=1e-3", "--accelerate-config", "/c/cpu.yaml",
        "--db", "/r/runs.db"]
    # Changed by a resume at step 14: the command that started it, then the change and its step (its
    # overrides whole would train the latest settings from step 1)
    changed = {**launched, "overrides": '["train.lr=1e-3", "train.epochs=4", "train.lr=5e-4"]',
               "changes": json.dumps([{"step": 14, "at": 0, "set": ["train.epochs=4", "train.lr=5e-4"],
                                       "fields": ["sft.train.epochs (2 -> 4)", "sft.train.lr (0.001 -> 0.0005)"]}])}
    line = command_line(changed, "/r/runs.db")
    assert shlex.split(line, comments=True)[3:] == [
        "rlhf", "launch", "sft", "/c/tiny.yaml", "--set", "train.lr=1e-3", "--accelerate-config", "/c/cpu.yaml",
        "--db", "/r/runs.db"]
    assert line.endswith("  # then resumed with --allow-change from step 14: --set train.epochs=4 --set train.lr=5e-4")
    from engine.run_facts import changes_text

    assert changes_text(changed) == " · changed at step 14: sft.train.epochs (2 -> 4), sft.train.lr (0.001 -> 0.0005)"
    assert changes_text(launched) == ""
    from engine.evaluate import EvalConfig

    # An older record of a reward-model judge holds endpoint settings (the pipeline passed --judge-key-env):
    # the command leaves them out, as rlhf eval belle refuses them beside --judge rm
    config = EvalConfig(name="sft export", checkpoint="/m/final", eval_dir="/belle", judge="rm",
                        reward_model="/rm/final", per_class=2, judge_model="gpt-3.5-turbo", rewrite_reference=True,
                        judge_key_env="MY_KEY", concurrency=4, judge_timeout=300)
    run = {"stage": "eval", "config": config.model_dump_json(), "recipe": ""}
    assert shlex.split(command_line(run, tmp_path / "runs.db"))[3:] == [
        "rlhf", "eval", "belle", "/m/final", "--name", "sft export", "--eval-dir", "/belle", "--judge", "rm",
        "--reward-model", "/rm/final", "--per-class", "2", "--rewrite-reference", "--db", str(tmp_path / "runs.db")]
    from engine.cli import build_parser

    parsed = build_parser().parse_args(shlex.split(command_line(run, tmp_path / "runs.db"))[4:])  # as the CLI reads it
    assert (parsed.checkpoint, parsed.judge, parsed.per_class, parsed.rewrite_reference) == ("/m/final", "rm", 2, True)
    from engine.eval_cli import _given, _no_contradiction

    _no_contradiction(parsed, _given(parsed, tmp_path / "runs.db"))  # not refused
    judged_again = EvalConfig(name="again", checkpoint="/m/final", eval_dir="/belle", answers_from=7,
                              max_new_tokens=32)  # its source's, which it records and is not given
    assert shlex.split(command_line({"stage": "eval", "config": judged_again.model_dump_json()}, "/r/runs.db"))[3:] == [
        "rlhf", "eval", "belle", "--name", "again", "--eval-dir", "/belle", "--answers-from", "7", "--db", "/r/runs.db"]
