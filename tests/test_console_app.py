"""The console driven by Textual's pilot, against real runs: real `accelerate launch` on CPU through the
detached supervisor, the real runs.db, real logs. The GPU sampler is the only stand-in (no driver here)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from textual.widgets import Input, Static, TabbedContent

from console.screens.config_diff import ConfigDiffScreen
from console.screens.gpu import GpuScreen
from console.screens.help import HelpScreen
from console.screens.launch import LaunchScreen
from console.widgets.log_view import LogView
from engine.store import Store
from tests.conftest import REPO, RLHF, TINY
from tests.helpers import run_row
from tests.pilot import console, help_text, open_launch_form, sync, wait_for

CONFIGS = REPO / "configs"
CPU = str(CONFIGS / "accelerate" / "cpu.yaml")


def ended(app, run_id: int, status: str) -> bool:
    """The run has that status and its supervisor has recorded the exit code (the very last write)."""
    run = app.runs.get(run_id)
    return run is not None and run["status"] == status and run["exit_code"] is not None


def db_rows(run_id: int) -> list[dict]:
    with Store(os.environ["RLHF_DB"]) as store:
        return store.metrics_since(0, run_id=run_id)


async def type_into(pilot, app, field: str, text: str) -> None:
    widget = app.screen.query_one(f"#field-{field}", Input)
    widget.focus()
    widget.value = ""
    await pilot.press(*text)


@sync
async def test_launch_from_the_form_runs_to_done_and_draws_its_curve(workdir):
    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        form = await open_launch_form(pilot, app)
        assert form.query_one("#field-model", Input).value == "demo/model"
        await type_into(pilot, app, "length", "1")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(app.runs) == 1, 60, "the run to be registered")
        run_id = next(iter(app.runs))
        await wait_for(pilot, lambda: ended(app, run_id, "done"), 600, "the run to finish")
        home = app.home
        assert app.screen is home and home.selected == run_id
        run = app.runs[run_id]
        assert run["exit_code"] == 0 and json.loads(run["overrides"]) == ["sft.train.epochs=1"]
        assert json.loads(run["launch"])["accelerate_config"] == CPU
        await wait_for(pilot, lambda: app.history.runs.get(run_id) is not None
                       and app.history.runs[run_id].rows == len(db_rows(run_id)), 10, "every row")
        await wait_for(pilot, lambda: home.last_draw_points > 0, 10, "the curve")
        assert home.metric == "loss"
        losses = [r["step"] for r in db_rows(run_id) if r["name"] == "loss"]
        assert list(app.history.runs[run_id].series["loss"].steps.view) == losses
        # its log is in view, progress bars folded
        await pilot.press("2")
        await wait_for(pilot, lambda: any("sft data:" in line for line in home.query_one(LogView).lines), 10,
                       "the log tail")


@sync
async def test_a_bad_field_is_shown_on_the_field_before_anything_starts(workdir):
    app = console()
    async with app.run_test(size=(80, 24)) as pilot:
        form = await open_launch_form(pilot, app)
        await type_into(pilot, app, "batch", "0")
        await pilot.press("ctrl+s")
        error = form.query_one("#error-batch", Static)
        await wait_for(pilot, lambda: "greater than 0" in str(error.render()), 20, "the field's error")
        assert form.query_one("#field-batch", Input).has_class("-invalid-field")
        await type_into(pilot, app, "batch", "4")
        await type_into(pilot, app, "lr", "fast")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "not a valid float" in str(form.query_one("#error-lr", Static).render()), 5)
        # every problem at once: a type error here and the recipe's own about another field, in one check
        await type_into(pilot, app, "batch", "0")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "greater than 0" in str(error.render()), 20, "the recipe's error beside it")
        assert "not a valid float" in str(form.query_one("#error-lr", Static).render())
        await type_into(pilot, app, "batch", "4")
        await type_into(pilot, app, "lr", "0.001")
        await type_into(pilot, app, "processes", "-3")  # not a recipe value: the form is its only check
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "at least 1" in str(form.query_one("#error-processes", Static).render()), 5)
        # What the launch would refuse, Validate refuses too (it said "the recipe is valid")
        await type_into(pilot, app, "processes", "2")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "cpu.yaml runs one process" in str(form.query_one("#error-general", Static)
                                                                         .render()), 20, "the launch's own check")
        await type_into(pilot, app, "processes", "")
        # a path is passed as a string whatever YAML would make of it ("#" starts a YAML comment)
        await type_into(pilot, app, "data", "demo/data/run #2.jsonl")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "does not exist" in str(form.query_one("#error-data", Static).render()), 20)
        assert 'sft.data.0.path="demo/data/run #2.jsonl"' in form.overrides()
        # An emptied field is the recipe's value, which its placeholder shows (as the empty processes field's
        # default): not an override of null
        await type_into(pilot, app, "lr", "")
        assert not [item for item in form.overrides() if item.startswith("sft.train.lr")]
        from engine.config import load_recipe

        assert form.query_one("#field-lr", Input).placeholder == str(load_recipe(TINY).sft.train.lr)
        assert app.screen is form and app.runs == {}
    assert not Path(os.environ["RLHF_DB"]).exists() or Store(os.environ["RLHF_DB"]).runs() == []


@sync
async def test_stop_then_resume_continues_the_same_history(workdir):
    app = console(stop_grace_s=120)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20)
        app.launch_run("sft", str(TINY), ["train.max_steps=100", "train.logging_steps=1", "train.save_steps=1000"],
                       CPU, None)
        await wait_for(pilot, lambda: app.runs and next(iter(app.runs.values()))["status"] == "running", 600)
        run_id = next(iter(app.runs))
        await wait_for(pilot, lambda: (app.runs[run_id]["step"] or 0) >= 3, 600, "a few steps")
        home = app.home
        home.select_run(run_id)
        await pilot.press("x")
        await pilot.press("y")
        await wait_for(pilot, lambda: ended(app, run_id, "stopped"), 600, "the stop")
        stopped = app.runs[run_id]
        # 143: the trainer's own exit after saving; -15: `accelerate launch` itself died of the SIGTERM
        assert stopped["exit_code"] in (143, -15) and stopped["stop_requested"] is not None
        with Store(os.environ["RLHF_DB"]) as store:
            (checkpoint,) = store.checkpoints(run_id)
        assert checkpoint["step"] == stopped["step"] and Path(checkpoint["path"]).is_dir()
        stopped_at = stopped["step"]
        assert stopped_at < 100
        await pilot.press("r")
        await pilot.press("y")
        await wait_for(pilot, lambda: app.runs[run_id]["status"] in ("pending", "running"), 60, "the resume")
        await wait_for(pilot, lambda: ended(app, run_id, "done"), 900, "the resumed run to finish")
        rows = db_rows(run_id)
        assert [r["run_seq"] for r in rows] == list(range(1, len(rows) + 1))
        assert [r["step"] for r in rows if r["name"] == "loss"] == list(range(1, 101))
        await wait_for(pilot, lambda: app.history.runs[run_id].rows == len(rows), 10)
        assert list(app.history.runs[run_id].series["loss"].steps.view) == list(range(1, 101))


@sync
async def test_a_crash_shows_failed_with_exit_code_and_traceback(workdir):
    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20)
        # a model folder that passes validation (a config, whole weights, a tokenizer) but that no class
        # loads: loading it fails inside the run
        broken = workdir / "broken-model"
        shutil.copytree(workdir / "demo" / "model", broken)
        (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
        app.launch_run("sft", str(TINY), [f"model.path={broken}"], CPU, None)
        await wait_for(pilot, lambda: app.runs and ended(app, next(iter(app.runs)), "failed"), 600)
        run = next(iter(app.runs.values()))
        assert run["exit_code"] not in (None, 0) and "Traceback" in run["error"]
        home = app.home
        home.select_run(run["id"])
        await wait_for(pilot, lambda: any("Traceback" in line for line in home.query_one(LogView).lines), 20)
        await pilot.press("t")
        assert home.query_one(TabbedContent).active == "log"
        info = str(home.query_one("#run-info", Static).render())
        assert "failed" in info and f"exit {run['exit_code']}" in info


@sync
async def test_reattach_to_a_run_started_elsewhere(workdir):
    started = subprocess.run([*RLHF, "launch", "sft", str(TINY), "--accelerate-config", CPU, "--detach",
                              "--set", "train.epochs=1", "--set", "train.logging_steps=1"],
                             capture_output=True, text=True, check=True)
    assert "started" in started.stdout
    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: len(app.runs) == 1, 30)
        run_id = next(iter(app.runs))
        await wait_for(pilot, lambda: ended(app, run_id, "done"), 600)
        await wait_for(pilot, lambda: app.history.runs[run_id].rows == len(db_rows(run_id)), 10)
        assert app.home.selected == run_id


@sync
async def test_two_consoles_on_one_db_see_the_same_rows(workdir):
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="hand", recipe="x.yaml", config="{}")
        store.update_run(run_id, status="running", total_steps=300)

    async def write():
        with Store(os.environ["RLHF_DB"]) as store:
            for step in range(1, 301):
                store.log_metrics(run_id, step, {"loss": 1.0 / step, "learning_rate": 1e-3})
                if step % 50 == 0:
                    await asyncio.sleep(0.05)
            store.update_run(run_id, status="done")

    first, second = console(), console()
    async with first.run_test(size=(80, 24)) as p1, second.run_test(size=(80, 24)) as p2:
        await write()
        for app, pilot in ((first, p1), (second, p2)):
            await wait_for(pilot, lambda: app.runs.get(run_id, {}).get("status") == "done"
                           and app.history.runs.get(run_id) is not None
                           and app.history.runs[run_id].rows == 600, 20)
            assert list(app.history.runs[run_id].series["loss"].steps.view) == list(range(1, 301))


@sync
async def test_gpu_panel_without_a_driver_and_the_rest_still_works(workdir):
    app = console()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded and app.gpu_unavailable is not None, 20)
        await pilot.press("g")
        assert isinstance(app.screen, GpuScreen)
        status = str(app.screen.query_one("#gpu-status", Static).render())
        assert "No GPU panel" in status and "NVML Shared Library Not Found" in status
        await pilot.press("q")  # back, as on every screen but the runs one; it quit the console
        assert app.screen is app.home and app.is_running
        await pilot.press("n")
        assert isinstance(app.screen, LaunchScreen)
        assert not isinstance(app.focused, Input)  # the stage select: q reaches the screen
        await pilot.press("q")
        assert app.screen is app.home and app.is_running


@sync
async def test_help_at_80_columns_keeps_each_description_beside_its_keys(workdir):
    """At 80x24 a long entry wrapped to a flush-left "enter)", chart keys read "ctrl+shift+equals_sign", and
    the footer under the help listed the run table's keys, none of which work there."""
    from textual.widgets._footer import FooterKey

    app = console()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20, "the first poll")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen) and list(app.screen.query(FooterKey))
                       and app.screen.query_one(Static).content_region.width > 0, 10, "help, laid out, and its footer")
        lines = help_text(app).splitlines()
        titles = {title for title, _ in app.screen.sections} | {"Also", "Esc closes this screen.",
                                                                 "Metrics (the curves the runs log)"}
        assert [line for line in lines if line and line not in titles and not line.startswith("  ")] == []
        entry = next(k for k, line in enumerate(lines) if "Pipeline: show its stages" in line)
        assert lines[entry + 1].strip() and not lines[entry + 1].lstrip().startswith("+"), lines[entry:entry + 2]
        # the rest of the description goes on under the description, not under the keys
        column = lines[entry].index("Pipeline")
        assert len(lines[entry + 1]) - len(lines[entry + 1].lstrip()) == column, lines[entry:entry + 2]
        text = "\n".join(lines)
        assert "ctrl+shift+=" in text and "equals_sign" not in text and "escape" not in text
        flowing = " ".join(text.split())  # descriptions wrap at 80 columns
        assert "policy/kl_per_token" in text and "what the KL penalty charges" in flowing  # what a curve means
        assert [k.description for k in app.screen.query(FooterKey)] == ["Close"]
        await pilot.press("escape")
        assert app.screen is app.home


@sync
async def test_stopping_a_pipelines_stage_says_whether_the_pipeline_stops_with_it(workdir):
    """A stage resumed on its own (rlhf launch --resume-run) runs without its pipeline: the stop dialog said
    the pipeline stops with it."""
    from console.screens.dialogs import ConfirmScreen

    with Store(os.environ["RLHF_DB"]) as store:
        stages = {}
        for status in ("running", "stopped"):
            pipeline = store.create_pipeline(name="tiny", recipe="", config="{}", overrides=[], through="ppo",
                                             launch={})
            store.update_pipeline(pipeline, status=status)
            stages[status] = store.create_run(stage="sft", name="tiny", recipe="", config="{}", pipeline_id=pipeline)
            # another machine's run: no look here judges its processes
            store.update_run(stages[status], status="running", host="elsewhere", started=time.time())
    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.pipelines) == 2, 20, "the runs")
        questions = {}
        for status, run_id in stages.items():
            app.home.select_run(run_id)
            await wait_for(pilot, lambda: app.home.selected == run_id, 10, "the stage selected")
            await pilot.press("x")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the stop dialog")
            questions[status] = app.screen.question
            await pilot.press("n")
            await wait_for(pilot, lambda: app.screen is app.home, 10, "back")
    assert "the pipeline stops with it" in questions["running"]
    assert "the pipeline stops with it" not in questions["stopped"]
    assert "running on its own: the pipeline is stopped, and nothing waits" in questions["stopped"]


@sync
async def test_gpu_panel_shows_each_device_and_the_runs_on_it(workdir):
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="ppo", name="on-gpu", recipe="x.yaml", config="{}")
        store.update_run(run_id, status="running", pgid=os.getpgid(0))
    reading = SimpleNamespace(index=0, name="NVIDIA H100", utilization=87.0, memory_used=40 * 2**30,
                              memory_total=80 * 2**30, temperature=71.0, power=512.0, power_limit=700.0,
                              pids=(os.getpid(),))

    class Sampler:
        def read(self):
            return [reading]

        def close(self):
            pass

    app = console(gpu_sampler=Sampler)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded and app.gpu_readings, 20)
        await pilot.press("g")
        await wait_for(pilot, lambda: app.screen.query("GpuCard"), 5)
        await wait_for(pilot, lambda: f"run {run_id}" in str(app.screen.query_one(".procs", Static).render()), 5)
        head = str(app.screen.query_one(".stats", Static).render())
        assert "NVIDIA H100" in head and "512 W / 700 W" in head and "71°C" in head
        assert str(app.screen.query_one("#util-bar").render()).endswith("87%")
        assert str(app.screen.query_one("#mem-bar").render()).endswith("40.0 / 80.0 GiB")
        await wait_for(pilot, lambda: len(app.gpu_history[0]["util"]) >= 2, 5, "a history")


@sync
async def test_config_diff_delete_help_and_palette(workdir):
    with Store(os.environ["RLHF_DB"]) as store:
        a = store.create_run(stage="sft", name="a", recipe="x.yaml", config=json.dumps({"lr": 1, "seed": 0}))
        b = store.create_run(stage="sft", name="b", recipe="x.yaml", config=json.dumps({"lr": 2, "seed": 0}))
        c = store.create_run(stage="sft", name="c", recipe="x.yaml", config=json.dumps({"lr": 3, "seed": 0}))
        for run_id in (a, b, c):
            store.update_run(run_id, status="done")
        # --set items: the wiring both share is left out, the ones each has alone shown
        wiring = ["model.path=runs/1/final", "train.max_steps=6"]
        store.update_run(b, overrides=json.dumps(wiring + ["train.lr=2"]))
        store.update_run(c, overrides=json.dumps(wiring + ["train.lr=3", "seed=5"]))
    assert (workdir / "runs" / str(a)).is_dir()  # a run's folder is made when it is registered
    app = console()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.runs) == 3, 20)
        home = app.home
        home.select_run(a)
        await pilot.press("space")
        home.select_run(b)
        await pilot.press("d")
        assert isinstance(app.screen, ConfigDiffScreen)
        table = app.screen.query_one("DataTable")
        assert table.row_count == 2 and [str(c) for c in table.get_row_at(0)] == ["lr", "1", "2"]
        assert [str(c) for c in table.get_row_at(1)] == ["--set (not in both)", "—",
                                                         "model.path=runs/1/final train.max_steps=6 train.lr=2"]
        await pilot.press("escape")
        home.select_run(b)  # three marked: the last two, and the console says which
        await pilot.press("space")
        home.select_run(c)
        await pilot.press("space")
        await pilot.press("d")
        assert isinstance(app.screen, ConfigDiffScreen)
        table = app.screen.query_one("DataTable")
        assert [str(cell) for cell in table.get_row_at(0)] == ["lr", "2", "3"]
        assert [str(cell) for cell in table.get_row_at(1)] == ["--set (not in both)", "train.lr=2",
                                                                 "train.lr=3 seed=5"]
        assert "1 changed key, and --set items not in both" in str(app.screen.query_one(Static).render())
        assert any(f"runs {b} and {c}: the last two marked" in str(n.message) for n in app._notifications)
        await pilot.press("escape")
        home.select_run(a)
        await pilot.press("D")
        await pilot.press("y")
        await wait_for(pilot, lambda: a not in app.runs, 20, "the delete")
        assert (workdir / "runs" / str(a)).is_dir()  # files kept unless asked
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        shown = help_text(app)
        assert "Stop" in shown and "Resume" in shown and "ctrl+p" in shown
        await pilot.press("escape")
        await pilot.press("ctrl+p")
        from textual.command import CommandPalette

        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), 5)


@sync
async def test_ppo_samples_browse_by_step_and_a_lost_run_is_closed_as_failed(workdir):
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="ppo", name="samples", recipe="x.yaml", config="{}")
        store.update_run(run_id, status="running", pgid=gone.pid)  # its processes are gone
        for step in (1, 2, 3):
            store.log_metrics(run_id, step, {"rollout_scores/mean": 0.1 * step})
            # model output is arbitrary text: markup-like brackets must show as they are
            store.add_samples(run_id, step, [(f"prompt {step}.{i}", f"response {step}.{i} [/INST] [b]", 0.5 * i)
                                             for i in range(2)])
    app = console()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20)
        home = app.home
        table = home.query_one("RunTable")
        # Closed by the console's look, as `rlhf runs` or a resume would: not "running", and resumable.
        await wait_for(pilot, lambda: "failed" in str(table.get_row(str(run_id))[3]), 20, "the run closed")
        assert run_row(run_id)["orphaned"] is not None and "processes are gone" in run_row(run_id)["error"]
        await pilot.press("3")
        samples = home.query_one("#samples-table")
        await wait_for(pilot, lambda: home.sample_step == 3 and samples.row_count == 2, 10, "the newest step")
        assert [str(c) for c in samples.get_row_at(1)[1:]] == ["prompt 3.1", "response 3.1 [/INST] [b]"]
        await pilot.press("left_square_bracket")
        await wait_for(pilot, lambda: home.sample_step == 2, 10)
        assert str(samples.get_row_at(0)[1]) == "prompt 2.0"
        assert "step 2 (2 of 3)" in str(home.query_one("#samples-head").render())


@sync
async def test_the_form_launches_the_whole_pipeline_and_x_stops_it_in_its_stage(workdir):
    """`pipeline` in the stage list: no per-stage field, a memory line per trained stage, the same checks as
    `rlhf pipeline` before anything is registered; it starts detached and its first stage is a run like any
    other, which x stops with its pipeline."""
    from textual.widgets import Select

    # The tiny recipe with an SFT stage long enough that x surely lands while it trains.
    configs = workdir / "configs"
    configs.mkdir()
    (configs / "accelerate").symlink_to(CONFIGS / "accelerate")
    tiny = TINY.read_text()
    assert "    epochs: 4\n" in tiny
    (configs / "tiny.yaml").write_text(tiny.replace("    epochs: 4\n", "    epochs: 400\n", 1))
    with Store(os.environ["RLHF_DB"]) as store:  # selected when the form opens; the new pipeline's run after
        earlier = store.create_run(stage="sft", name="earlier", recipe="", config="{}")
        store.update_run(earlier, status="done")
    app = console(configs_dir=configs)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.home.selected == earlier, 10)
        form = await open_launch_form(pilot, app)
        assert form.recipe == str(configs / "tiny.yaml")
        assert not form.query_one(".field-through").display  # a stage alone has no `through`
        form.query_one("#stage", Select).value = "pipeline"
        estimate = form.query_one("#estimate", Static)
        await wait_for(pilot, lambda: "sft" in str(estimate.render()) and "ppo" in str(estimate.render()), 20,
                       "a memory line per trained stage")
        assert not form.query_one(".field-model").display and form.query_one(".field-processes").display
        assert form.query_one(".field-through").display
        # PPO as the pipeline runs it: scored by the pipeline's RM export, not the recipe's rule reward.
        from engine.config import load_recipe
        from engine.estimate import estimate_recipe, gib, parallel_from_config

        wired = load_recipe(TINY, ["ppo.reward_model=@rm", "ppo.reward_fn=null"])
        (ppo,) = estimate_recipe(wired, ["ppo"], parallel_from_config(CPU, None))
        (alone,) = estimate_recipe(load_recipe(TINY), ["ppo"], parallel_from_config(CPU, None))
        assert ppo.peak > alone.peak and f"ppo {gib(ppo.peak)}" in str(estimate.render())
        assert form.overrides() == []
        # Through rm (`rlhf pipeline --through rm`): the memory line drops PPO, and the pipeline stops there.
        form.query_one("#through", Select).value = "rm"
        await wait_for(pilot, lambda: "rm" in str(estimate.render()) and "ppo" not in str(estimate.render()), 20,
                       "the memory line through rm")
        # A check's answer about another form (the stage changed while it ran) launches nothing.
        from console.screens.launch import Validated

        form.post_message(Validated(None, {}, True, ("pipeline", form.recipe, [], CPU, None)))  # through: all
        await pilot.pause()  # handled: a launch would have disabled the button at once
        assert not form.query_one("#launch").disabled and app.screen is form and not app.pipelines
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is app.home and len(app.pipelines) == 1, 60, "the pipeline")
        pipeline_id = next(iter(app.pipelines))
        with Store(os.environ["RLHF_DB"]) as store:
            row = store.pipeline(pipeline_id)
        assert row["through"] == "rm" and json.loads(row["launch"])["accelerate_config"] == CPU
        await wait_for(pilot, lambda: any(r.get("pipeline_id") == pipeline_id and r["status"] == "running"
                                          for r in app.runs.values()), 300, "its first stage running")
        (run_id,) = [i for i, r in app.runs.items() if r.get("pipeline_id") == pipeline_id]
        assert app.runs[run_id]["stage"] == "sft"
        # Stopped once it trains, as the stop-and-resume test does. (Pressed the moment the stage showed
        # running, in one full-suite run, the stop did not end it within 300 s; not reproduced alone.)
        home = app.home
        await wait_for(pilot, lambda: home.selected == run_id, 10, "the pipeline's run selected")
        await wait_for(pilot, lambda: (app.runs[run_id]["step"] or 0) >= 2, 300, "a few steps")
        await pilot.press("x")
        await wait_for(pilot, lambda: app.screen is not home, 10, "the stop dialog")
        await pilot.press("y")
        await wait_for(pilot, lambda: ended(app, run_id, "stopped")
                       and app.pipelines[pipeline_id]["status"] == "stopped", 300, "the stage and its pipeline")
