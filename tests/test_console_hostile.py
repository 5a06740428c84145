"""What a run writes (its name, its log, its samples, its folder) must not hurt the console: no markup is
read from it, no escape sequence reaches the terminal, an endless log line costs bounded memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from textual.widgets import Checkbox, DataTable, Static

from console.logtail import MAX_LINE_BYTES, LogTail
from console.screens.dialogs import ConfirmScreen, DeleteScreen
from console.widgets.log_view import LogView
from console.widgets.run_table import RunTable
from engine.store import Store
from tests.pilot import console, sync, wait_for

ESC_FILL = "\x1b#8"  # DECALN: fills the whole screen with E


def hostile_runs(workdir: Path) -> tuple[int, int]:
    with Store(os.environ["RLHF_DB"]) as store:
        running = store.create_run(stage="sft", name="exp [lr=1e-5]", recipe="r.yaml", config="{}")
        store.update_run(running, status="running", started=1.0)
        stopped = store.create_run(stage="ppo", name=f"tiny [/] {ESC_FILL}\x1b[2J", recipe="r.yaml", config="{}",
                                   launch=json.dumps({"accelerate_config": "/c/cpu.yaml"}))  # r asks
        folder = workdir / "data" / "runs[old]" / str(stopped)
        (folder / "checkpoint-1").mkdir(parents=True)
        (folder / "checkpoint-1" / "trainer_state.json").write_text("{}")  # complete: r asks to resume
        store.update_run(stopped, status="stopped", exit_code=143, output_dir=str(folder), started=1.0, ended=2.0)
        store.add_samples(stopped, 1, [(f"prompt {ESC_FILL}", "answer \x1b]0;title\x07 [b]bold?[/b] \x07", 0.5)])
        store.log_metrics(stopped, 1, {"loss": 1.0})
        (folder / "train.log").write_bytes(
            b"x" * (100 * 1024) + b"\nplain line\n" + ESC_FILL.encode() + b"after fill\n\x1b[31mred\x1b[0m\n"
            + b"w" * (40 * 1024) + b"\n" + b"y" * (60 * 1024))  # then an unfinished line, longer than the cap
    return running, stopped


@sync
async def test_markup_and_escapes_from_a_run_reach_no_terminal(workdir):
    running, stopped = hostile_runs(workdir)
    app = console()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 2, 20, "the runs")
        home = app.home
        table = home.query_one(RunTable)
        names = [str(table.get_row(str(k))[2]) for k in (running, stopped)]
        assert names[0] == "exp [lr=1e-5]" and names[1].startswith("tiny [/] ") and "\x1b" not in names[1]

        home.select_run(running)
        await pilot.press("x")  # the stop dialog names the run: it must not parse "[lr=1e-5]" as markup
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the stop dialog")
        assert "exp [lr=1e-5]" in str(app.screen.query_one(".question", Static).render())
        await pilot.press("n")

        home.select_run(stopped)
        home.query_one("PlotWidget").focus()  # focus lands on the chart easily: its own keys must not take r
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the resume dialog")
        question = str(app.screen.query_one(".question", Static).render())
        assert "tiny [/]" in question and "\x1b" not in question
        await pilot.press("n")
        await pilot.press("D")
        await wait_for(pilot, lambda: isinstance(app.screen, DeleteScreen), 10, "the delete dialog")
        assert "runs[old]" in str(app.screen.query_one(Checkbox).label)
        await pilot.press("n")

        await pilot.press("2")  # the log
        view = home.query_one(LogView)
        await wait_for(pilot, lambda: any("after fill" in line for line in view.lines), 20, "the log")
        assert all("\x1b" not in line and len(line.encode()) <= MAX_LINE_BYTES + 100 for line in view.lines)
        assert "red" in view.lines
        await pilot.press("3")  # the samples
        await wait_for(pilot, lambda: home.query_one("#samples-table", DataTable).row_count == 1, 20, "samples")
        row = [str(c) for c in home.query_one("#samples-table", DataTable).get_row_at(0)]
        assert not any(ch in cell for cell in row for ch in "\x1b\x07") and "[b]bold?[/b]" in row[2]


def test_an_endless_log_line_costs_bounded_memory(tmp_path):
    log = tmp_path / "train.log"
    tail = LogTail(log)
    with open(log, "wb") as fh:
        for _ in range(64):  # 64 MB that never ends its line
            fh.write(b"z" * (1024 * 1024))
            fh.flush()
            lines, pending = tail.read()
            assert lines == [] and len(pending) <= MAX_LINE_BYTES
        fh.write(b"\ndone\n")
    lines, pending = tail.read()
    assert lines[-1] == "done" and len(tail._partial) == 0


@sync
async def test_a_log_past_the_views_line_cap_keeps_showing_its_newest_lines():
    """Once the view holds MAX_LINES, Textual's Log drops the oldest and repaints only rows past the old end,
    at the same scroll offset: the screen stood still at its 5,000th line while the run wrote on."""
    import re

    from textual.app import App

    from console.widgets.log_view import MAX_LINES

    class Bare(App):
        def compose(self):
            yield LogView()

    def newest_on_screen(app) -> int:
        return max(int(n) for n in re.findall(r"line&#160;(\d+)", app.export_screenshot()))

    app = Bare()
    async with app.run_test(size=(100, 20)) as pilot:
        view = app.query_one(LogView)
        view.append(1, [f"line {n}" for n in range(MAX_LINES)], "", True, False)
        await pilot.pause()
        assert newest_on_screen(app) == MAX_LINES - 1
        for first in range(MAX_LINES, MAX_LINES + 300, 100):  # the run writes on, in bursts
            view.append(1, [f"line {n}" for n in range(first, first + 100)], "", False, False)
            await pilot.pause()
            assert newest_on_screen(app) == first + 99


@sync
async def test_the_launch_form_shows_what_would_have_ended_the_console(workdir):
    import shutil

    from console.screens.launch import LaunchScreen, RecipeLoaded, recipe_keys
    from tests.conftest import REPO

    configs = workdir / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "latin1.yaml").write_bytes(b"name: caf\xe9\nmodel: {path: demo/model}\n")
    app = console()
    app.configs_dir = configs
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20, "the runs")
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen) and app.screen.query("#recipe"), 10, "form")
        form = app.screen
        # Typed before the recipe's values arrive: kept, not overwritten by them.
        form.query_one("#field-lr").value = "7e-4"
        form.on_recipe_loaded(RecipeLoaded("sft", form.recipe, {"lr": "0.003", "model": "demo/model"},
                                           recipe_keys("sft", False), None))
        assert form.query_one("#field-lr").value == "7e-4" and form.query_one("#field-model").value == "demo/model"

        form.query_one("#recipe").value = str(configs / "latin1.yaml")
        await wait_for(pilot, lambda: "not UTF-8" in str(form.query_one("#error-recipe").render()), 20,
                       "the recipe's error on the form")
        form.query_one("#recipe").value = str(configs / "tiny.yaml")
        await wait_for(pilot, lambda: form.loaded.get("model") == "demo/model", 20, "tiny.yaml's values")
        form.query_one("#field-model").value = "/" + "x" * 5000  # a long pasted path
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "name too long" in str(form.query_one("#error-model").render()), 20,
                       "the path's error under its field")
        assert app.is_running and isinstance(app.screen, LaunchScreen)


@sync
async def test_a_damaged_runs_db_is_said_in_place_of_the_runs(workdir):
    Path(os.environ["RLHF_DB"]).write_bytes(b"garbage, not SQLite" * 50)
    app = console()
    async with app.run_test(size=(100, 30)) as pilot:
        info = lambda: str(app.home.query_one("#run-info", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "cannot read runs.db" in info(), 20, "the error in the info line")
        assert "move it aside" in info()
        await pilot.pause()
        # All of it on screen, what to do at its end included: not one line cut at the pane's width.
        assert app.home.query_one("#run-info", Static).region.height >= 3


@sync
async def test_a_runs_db_that_was_not_there_is_said_to_be_new(workdir):
    """`rlhf console --db` with a mistyped path makes an empty runs.db: the console says it is new, so an
    empty table is not taken for a project whose runs are gone."""
    assert not Path(os.environ["RLHF_DB"]).exists()
    app = console()
    async with app.run_test(size=(140, 30)) as pilot:
        info = lambda: str(app.home.query_one("#run-info", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "no runs yet" in info(), 20, "the empty table's line")
        assert "a new runs database: there was none" in info()
    again = console()  # the same file, now there: an empty project, not a new file
    async with again.run_test(size=(140, 30)) as pilot:
        info = lambda: str(again.home.query_one("#run-info", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "no runs yet" in info(), 20, "the empty table's line")
        assert "new runs database" not in info()


@sync
async def test_end_and_page_down_on_a_table_without_rows_do_nothing(workdir):
    """On an empty runs.db, and on a find that matches nothing, End and PageDown highlight no row: they
    ended the console (a highlight event without a row key)."""
    with Store(os.environ["RLHF_DB"]) as store:
        store.create_run(stage="sft", name="tiny", recipe="r.yaml", config="{}")
    app = console()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.loaded and app.runs, 20, "the runs")
        table = app.home.query_one(RunTable)
        await pilot.press("slash", *"nomatch", "enter")
        await wait_for(pilot, lambda: table.row_count == 0, 10, "a find without a match")
        await pilot.press("end", "pagedown", "home")
        await pilot.pause()
        assert app.is_running and app.screen is app.home
    os.remove(os.environ["RLHF_DB"])
    app = console()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20, "an empty runs.db")
        await pilot.press("end", "pagedown")
        await pilot.pause()
        assert app.is_running and app.home.selected is None


@sync
async def test_r_on_a_run_without_a_checkpoint_says_so_before_asking(workdir):
    """Nothing to resume from (steps trained, no save completed): said at once, instead of a question whose
    yes then fails. One that ended before its first step is offered a start over."""
    launched = json.dumps({"accelerate_config": "/c/cpu.yaml", "num_processes": None})
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="tiny", recipe="r.yaml", config="{}", launch=launched)
        store.update_run(run_id, status="failed", exit_code=1, step=4)
        unstarted = store.create_run(stage="sft", name="tiny", recipe="r.yaml", config="{}", launch=launched)
        store.update_run(unstarted, status="stopped", exit_code=143)
        done = store.create_run(stage="ppo", name="tiny", recipe="r.yaml", config="{}", launch=launched)
        store.update_run(done, status="done", exit_code=0, step=20)
        alone = store.create_run(stage="sft", name="tiny", recipe="r.yaml", config="{}")  # by `rlhf train`
        store.update_run(alone, status="stopped", exit_code=143, step=3)
        folder = Path(store.run(run_id)["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint-3.partial").mkdir()  # saves that never completed are not ones
    (folder / "checkpoint-4").mkdir()  # (no trainer_state.json: the trainer writes it last)
    app = console()
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await wait_for(pilot, lambda: app.loaded and done in app.runs, 20, "the runs")
        app.home.select_run(done)  # a resume would train nothing: said, not asked and then refused
        await pilot.press("r")
        await wait_for(pilot, lambda: any(f"run {done} is done at step 20: a resume would train nothing" in
                                          str(n.message) for n in app._notifications), 10, "why not")
        assert not isinstance(app.screen, ConfirmScreen)
        assert f"rlhf launch ppo --resume-run {done} --db " in next(
            str(n.message) for n in app._notifications if "is done at step" in str(n.message))
        app.home.select_run(alone)  # no accelerate config to launch it with: said before, not after, the question
        await pilot.press("r")
        await wait_for(pilot, lambda: any(f"run {alone} was started in its own terminal, not launched: resume it the "
                                          f"same way, `rlhf train sft --resume-run {alone}" in str(n.message)
                                          for n in app._notifications), 10, "how to resume it")
        assert not isinstance(app.screen, ConfirmScreen)
        app.home.select_run(unstarted)
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the start-over question")
        assert app.screen.question.startswith(f"Start run {unstarted} (sft tiny) over? It ended before its first step")
        await pilot.press("n")
        app.home.select_run(run_id)
        await pilot.press("r")
        await wait_for(pilot, lambda: any(f"run {run_id} has no checkpoint in {folder}" in str(n.message)
                                          for n in app._notifications), 10, "the reason")
        assert not isinstance(app.screen, ConfirmScreen)
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the resume dialog")
        # Where it ended, which the answer depends on
        assert app.screen.question == (f"Resume run {run_id} (sft tiny) from its last full-state checkpoint? It "
                                       "ended at step 4/?.")

