"""Snapshots of the main screens at 80x24 and 160x48 (pytest-textual-snapshot).

The runs.db behind them is written here with fixed times and values, so a snapshot changes only when
the screen does. Update after an intended change: `pytest tests/test_console_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from console.app import RlhfConsole
from engine.store import Store
from tests.conftest import REPO
from tests.pilot import no_gpu, wait_for

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def _run(store: Store, stage: str, name: str, config: dict, status: str, steps: int, metrics) -> int:
    run_id = store.create_run(stage=stage, name=name, recipe=f"configs/{name}.yaml", config=json.dumps(config))
    for step in range(1, steps + 1):
        store.log_metrics(run_id, step, metrics(step), wall_time=T0 + 10 * step)
    store.update_run(run_id, status=status, started=T0, ended=T0 + 10 * steps, total_steps=steps, step=steps,
                     exit_code=0 if status == "done" else 1)
    return run_id


@pytest.fixture
def snapshot_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    with Store(db) as store:
        _run(store, "sft", "tiny", {"sft": {"lr": 0.003}}, "done", 60,
             lambda s: {"loss": 6.0 * math.exp(-s / 20) + 0.3 * math.sin(s), "learning_rate": 0.003})
        _run(store, "rm", "tiny", {"rm": {"lr": 0.002}}, "done", 40,
             lambda s: {"loss": 0.7 * math.exp(-s / 15), "accuracy": min(1.0, 0.5 + s / 60), "margin": s / 10})
        ppo = _run(store, "ppo", "tiny", {"ppo": {"lr": 0.0001}}, "failed", 80,
                   lambda s: {"rollout_scores/mean": math.tanh(s / 30) + 0.1 * math.cos(s),
                              "policy/approx_kl": 0.01 * s, "kl_ctl_value": 0.05 + 0.0005 * s,
                              "losses/policy_loss": -0.01 * math.sin(s), "losses/value_loss": 1 / s})
        store.update_run(ppo, error="Traceback (most recent call last):\nRuntimeError: boom")
        out = Path(store.run(ppo)["output_dir"])
    assert out.is_dir()  # made when the run was registered
    (out / "train.log").write_text("step 1\n 10%|#  |\r100%|##########|\nTraceback (most recent call last):\n"
                                   '  File "train.py", line 1\nRuntimeError: boom\n')
    return db


def app_for(db: Path) -> RlhfConsole:
    return RlhfConsole(db, configs_dir=REPO / "configs", gpu_sampler=no_gpu, poll_s=0.05)


async def settled(pilot, chart: bool = True) -> None:
    """Wait for the first poll, the chart (`chart`: the run selected has curves) and the table's live cells,
    then for the screen to be idle."""
    app = pilot.app

    def drawn() -> bool:
        home = app.home
        return bool(app.loaded and home is not None and (home.last_draw_points or not chart) and app.gpu_unavailable
                    and not home.query_one("#run-table").pending)  # the live cells drawn (they redraw every 2 s)

    await wait_for(pilot, drawn, 20, "the first poll, the chart and the live cells")
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_runs_screen(snap_compare, snapshot_db, size):
    async def before(pilot):
        await settled(pilot)

    assert snap_compare(app_for(snapshot_db), terminal_size=size, run_before=before)


def test_runs_screen_overlay_of_two_runs(snap_compare, snapshot_db):
    async def before(pilot):
        await settled(pilot)
        await pilot.press("space", "down", "space", "s")
        await settled(pilot)

    assert snap_compare(app_for(snapshot_db), terminal_size=(160, 48), run_before=before)


def test_failed_run_log_at_its_traceback(snap_compare, snapshot_db):
    async def before(pilot):
        await settled(pilot)
        home = pilot.app.home
        await pilot.press("2")
        await wait_for(pilot, lambda: home.query_one("TabbedContent").active == "log"
                       and any("RuntimeError" in line for line in home.query_one("LogView Log").lines), 20,
                       "the failed run's log")
        await pilot.press("t")
        await wait_for(pilot, lambda: not home.query_one("LogView Log").auto_scroll, 20, "the jump to its traceback")
        await settled(pilot)

    assert snap_compare(app_for(snapshot_db), terminal_size=(80, 24), run_before=before)


@pytest.mark.parametrize("key", ["n", "g", "question_mark"])
def test_other_screens(snap_compare, snapshot_db, key):
    async def before(pilot):
        await settled(pilot)
        await pilot.press(key)
        await wait_for(pilot, lambda: pilot.app.screen is not pilot.app.home and pilot.app.screen.is_mounted, 20,
                       "the screen")
        if key == "n":  # the form fills from two workers: the recipe's values, then the memory line
            await wait_for(pilot, lambda: pilot.app.screen.loaded
                           and str(pilot.app.screen.query_one("#estimate").render()).strip(), 20, "the filled form")
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(app_for(snapshot_db), terminal_size=(80, 24), run_before=before)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_score_table(snap_compare, snapshot_db, size):
    from engine.belle import CATEGORIES
    from engine.judge import Verdict
    from engine.store import EvalStore

    with Store(snapshot_db) as store:
        evals = EvalStore(store)
        for name, base in (("sft export", 0.45), ("ppo export", 0.6)):
            run_id = store.create_run(stage="eval", name=name, recipe="", config="{}")
            items = [{"item_id": k, "category": CATEGORIES[k % 9], "class": CATEGORIES[k % 9],
                      "question": f"question {k}", "reference": ""} for k in range(90)]
            evals.add_items(run_id, items)
            evals.set_answers(run_id, [(k, f"answer {k}", 5, "eos") for k in range(90)])
            for k in range(90):
                score = round(min(1.0, base + 0.05 * (k % 9) - 0.1 * ((k // 9) % 3)), 2)
                verdict = (Verdict(None, "unscored", "no score") if k == 7
                           else Verdict(score, "scored", f"得分: {score}"))
                evals.set_judgment(run_id, k, "openai:judge@http://127.0.0.1/v1", verdict)
            store.update_run(run_id, status="done", started=T0, ended=T0 + 60)

    async def before(pilot):
        await settled(pilot, chart=False)  # an evaluation selected: no curve
        await pilot.press("v")
        await wait_for(pilot, lambda: pilot.app.screen.query("ScoreTable")
                       and pilot.app.screen.query_one("ScoreTable").row_count == 3, 20, "the score table")
        await pilot.press("right", "down")
        table = pilot.app.screen.query_one("ScoreTable")
        await wait_for(pilot, lambda: tuple(table.cursor_coordinate) == (1, 1) and "evaluation runs" not in
                       str(pilot.app.screen.query_one("#cell-info").render()), 20, "the cell's line")
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(app_for(snapshot_db), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_twelve_runs_with_the_oldest_highlighted(snap_compare, tmp_path, monkeypatch, size):
    """Twelve runs: the table scrolls to the highlighted (oldest) run, the status line and the whole
    footer stay on screen."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    with Store(db) as store:
        for i in range(1, 13):
            _run(store, "sft", "tiny", {"sft": {"lr": 0.001 * i}}, "done", 20,
                 lambda s, i=i: {"loss": 4.0 * math.exp(-s / (5 + i)) + 0.1})

    async def before(pilot):
        await settled(pilot)
        await pilot.press(*["down"] * 11)
        await settled_on(pilot, 1)

    assert snap_compare(app_for(db), terminal_size=size, run_before=before)


async def settled_on(pilot, run_id: int) -> None:
    """After a selection change: the run's whole history has arrived and the chart is drawn from it (the
    first draw may use the light history that came first)."""
    app = pilot.app
    home = app.home

    def whole() -> bool:
        run = app.history.runs.get(run_id)
        return home.selected == run_id and run is not None and run.full and home._redraw_timer is None

    await wait_for(pilot, whole, 20, f"run {run_id}'s whole history")
    home.redraw_chart()
    await settled(pilot)
