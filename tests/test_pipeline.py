"""`rlhf pipeline`: every stage a run of its own, wired by stage, resumable where it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from console.app import RlhfConsole
from console.screens.dialogs import ConfirmScreen
from console.widgets.log_view import LogView
from console.widgets.run_table import RunTable
from engine.launch import request_stop
from engine.store import Store
from tests.conftest import REPO, RLHF, TINY
from tests.helpers import metric, run_row
from tests.pilot import no_gpu, sync, wait_for

ACCEL = str(REPO / "configs" / "accelerate" / "cpu.yaml")
SHORT = ["--set", "sft.train.epochs=1", "--set", "rm.train.epochs=1", "--set", "ppo.steps=2",
         "--set", "ppo.rollout_batch_size=8", "--set", "eval.limit=4"]
# A pipeline of the PPO stage alone (base model, rule reward): what stop, crash and resume tests need.
PPO_ONLY = ["--set", "sft=null", "--set", "rm=null", "--set", "ppo.rollout_batch_size=8"]


def rlhf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout)


def test_the_pipeline_runs_every_stage_wired_by_stage_into_a_score_table(workdir):
    result = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, *SHORT, "--set", "output_root=out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline 1 done" in result.stdout
    assert "pipeline 1: note: ppo.reward_fn engine.demo.rewards:correct_answer is the reward of a PPO run alone" \
        in result.stdout
    with Store(os.environ["RLHF_DB"]) as store:
        runs = store.pipeline_runs(1)
        assert store.pipeline(1)["status"] == "done"
    assert [(r["stage"], r["status"]) for r in runs] == [("sft", "done"), ("rm", "done"), ("ppo", "done"),
                                                          ("eval", "done"), ("eval", "done")]
    sft, rm, ppo, eval_sft, eval_ppo = runs
    out = Path("out").resolve()
    assert all(Path(r["output_dir"]).parent == out for r in runs), [r["output_dir"] for r in runs]  # eval too
    for evaluation in (eval_sft, eval_ppo):  # an evaluation's output is in its own log too, for the console
        log = (Path(evaluation["output_dir"]) / "train.log").read_text(encoding="utf-8")
        assert "judge: the reward model scores" in log and "judged " in log
    ppo_config = json.loads(ppo["config"])["ppo"]
    # The policy is the SFT export, the reward model the RM export, by stage; the rule reward is gone.
    assert ppo_config["model"]["path"] == str(Path(sft["output_dir"]) / "final")
    assert ppo_config["reward_model"] == str(Path(rm["output_dir"]) / "final")
    assert ppo_config["reward_fn"] is None
    assert json.loads(eval_sft["config"])["checkpoint"] == str(Path(sft["output_dir"]) / "final")
    assert json.loads(eval_ppo["config"])["checkpoint"] == str(Path(ppo["output_dir"]) / "final")
    assert json.loads(eval_ppo["config"])["reward_model"] == str(Path(rm["output_dir"]) / "final")
    # Which export answered: its lineage stamp, so that a later export into the folder is told from it
    from engine.lineage import read_lineage

    written = read_lineage(str(Path(ppo["output_dir"]) / "final"))["written"]
    assert json.loads(eval_ppo["config"])["checkpoint_written"] == written
    table = rlhf("eval", "table", "--format", "json")
    rows = {row["name"] for row in json.loads(table.stdout)}
    settings = " [max 24 tokens, first 4, judged by the reward model"  # what sets the two apart from the defaults
    # The PPO policy is judged by the reward model it was trained to please: said in its label and its log
    assert {f"tiny sft (pipeline 1){settings}]", f"tiny ppo (pipeline 1){settings} it was trained against]"} <= rows, \
        table.stdout
    warned = "is a PPO policy trained against this reward model (its rlhf_lineage.json)"
    logs = [(Path(r["output_dir"]) / "train.log").read_text(encoding="utf-8") for r in (eval_sft, eval_ppo)]
    assert warned not in logs[0] and warned in logs[1], logs
    listed = rlhf("runs").stdout.splitlines()  # whole names, and the pipeline each stage belongs to
    assert listed[0].split()[-4:] == ["pipeline", "note", "·", "error"] and len(listed) == 6
    assert all(line.split()[-1] == "1" for line in listed[1:]) and "tiny ppo (pipeline 1)" in listed[5]


def test_a_stopped_pipeline_resumes_in_its_stage_from_the_checkpoint(workdir):
    proc = subprocess.Popen([*RLHF, "pipeline", str(TINY), "--accelerate-config", ACCEL, "--through", "ppo",
                             *PPO_ONLY, "--set", "ppo.steps=12", "--set", "ppo.save_steps=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = os.environ["RLHF_DB"]

    def ppo_run() -> dict | None:
        if not os.path.exists(db):
            return None
        with Store(db) as store:
            return next((r for r in store.pipeline_runs(1) if r["stage"] == "ppo"), None) \
                if store.pipelines() else None

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        run = ppo_run()
        if run is not None and len(metric(run["id"], "kl_ctl_value")) >= 2:
            break
        time.sleep(0.2)
    run = ppo_run()
    request_stop(db, run["id"])  # as the console's x does, on the stage's row
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert f"continue it with: rlhf pipeline --resume 1 --db {db}" in out
    stopped = run_row(run["id"])
    assert stopped["status"] == "stopped"
    with Store(db) as store:
        assert store.pipeline(1)["status"] == "stopped"

    again = rlhf("pipeline", "--resume", "1", "--db", db, "--set", "ppo.steps=3")
    assert again.returncode == 2 and "no recipe, --set or --through" in again.stderr
    resumed = rlhf("pipeline", "--resume", "1", "--db", db)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with Store(db) as store:
        runs = store.pipeline_runs(1)
        assert store.pipeline(1)["status"] == "done"
    assert [r["stage"] for r in runs] == ["ppo"]  # the same ppo run continued, none started anew
    steps = [s for s, _ in metric(run["id"], "kl_ctl_value")]
    assert steps == list(range(1, 13))  # continued from its checkpoint: no gap, no repeat


def test_a_pipeline_stopped_in_its_first_stages_set_up_starts_that_run_over_in_its_own_row(workdir):
    """Stopped before its first step, a stage has trained nothing and has no checkpoint: the resume runs it
    from its first step in the same row (before, each such resume added a run and left a stopped one)."""
    from engine.run import has_checkpoint

    db = os.environ["RLHF_DB"]
    proc = subprocess.Popen([*RLHF, "pipeline", str(TINY), "--accelerate-config", ACCEL, "--through", "sft",
                             "--set", "sft.train.max_steps=2", "--set", "sft.train.logging_steps=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sft_run() -> dict | None:
        if not os.path.exists(db):
            return None
        with Store(db) as store:
            return next(iter(store.pipeline_runs(1)), None) if store.pipelines() else None

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and sft_run() is None:
        time.sleep(0.02)
    run = sft_run()
    request_stop(db, run["id"])  # registered, its processes starting: seconds of imports before any step
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped = run_row(run["id"])
    assert stopped["status"] == "stopped" and not stopped["step"] and not has_checkpoint(stopped)

    resumed = rlhf("pipeline", "--resume", "1", "--db", db)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with Store(db) as store:
        assert store.pipeline(1)["status"] == "done"
        assert [r["id"] for r in store.pipeline_runs(1)] == [run["id"]]  # one row: started over in it
    done = run_row(run["id"])
    assert done["status"] == "done" and done["step"] == 2
    assert [s for s, _ in metric(run["id"], "loss")] == [1, 2]


@pytest.mark.parametrize("judge", ["rm", "openai"])
def test_the_eval_stage_asks_rlhf_eval_for_what_its_recipe_says_and_nothing_it_refuses(judge):
    """`--judge rm` refuses the endpoint's options (they would be ignored); the stage passed --judge-key-env
    to it all the same. An endpoint judge gets the recipe's concurrency, retries and timeout."""
    from engine.cli import build_parser
    from engine.config import load_recipe
    from engine.eval_cli import _config, _given, _no_contradiction
    from engine.pipeline import eval_options

    sets = ["--set", f"eval.judge={judge}"]
    if judge == "openai":
        sets += ["--set", "eval.judge_url=http://127.0.0.1:9/v1", "--set", "eval.judge_model=gpt-4o", "--set",
                 "eval.concurrency=2", "--set", "eval.judge_retries=9", "--set", "eval.judge_timeout=600"]
    recipe = load_recipe(TINY, sets[1::2])
    exports = {"sft": str(REPO), "rm": str(REPO / "engine")}  # any folders: nothing is loaded here
    args = build_parser().parse_args(["eval", "belle", *eval_options(recipe, exports, "sft", "tiny sft")])
    given = _given(args, Path("runs.db"))
    _no_contradiction(args, given)
    config = _config({"checkpoint": exports["sft"], "output_root": "/r", **given})
    assert (config.judge, config.name, config.max_new_tokens, config.batch_size) == \
        (judge, "tiny sft", recipe.eval.max_new_tokens, recipe.eval.batch_size)
    if judge == "rm":
        assert config.reward_model == exports["rm"]
    else:
        assert (config.judge_url, config.judge_model, config.concurrency, config.judge_retries,
                config.judge_timeout) == ("http://127.0.0.1:9/v1", "gpt-4o", 2, 9, 600.0)


def test_stage_references_are_a_pipelines_and_a_reward_model_must_be_one(workdir):
    checked = rlhf("check", str(TINY), "--stage", "rm", "--set", "rm.model.path=@sft")
    assert checked.returncode == 0, checked.stderr  # check accepts references: the pipeline fills them in
    result = rlhf("train", "ppo", str(TINY), "--set", "ppo.model.path=@sft")
    assert result.returncode == 2
    assert "ppo.model.path: '@sft' is the sft stage's export, which only `rlhf pipeline` knows" in result.stderr
    result = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--set", "ppo.model.path=demo/model")
    assert result.returncode == 2 and "in a pipeline the PPO policy is its SFT export" in result.stderr
    result = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--set", "sft=null", "--set",
                  "rm.model.path=@sft")
    assert result.returncode == 2 and "rm.model.path: '@sft', but this pipeline runs no sft stage" in result.stderr
    result = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--set", "eval.eval_dir=demo/nothing")
    assert result.returncode == 2 and "eval.eval_dir" in result.stderr
    # Each stage's launch is checked before the first: a PPO that ZeRO-3 refuses (or, on a machine with no
    # GPU, every stage of a GPU config) never waits for hours of SFT and RM to be refused.
    zero3 = str(Path(ACCEL).parent / "zero3.yaml")
    result = rlhf("pipeline", str(TINY), "--accelerate-config", zero3)
    assert result.returncode == 2 and "zero3.yaml" in result.stderr, result.stderr
    result = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--num-processes", "2")
    assert result.returncode == 2 and "--num-processes 2: " in result.stderr
    assert not Path("runs.db").exists() or not Store(os.environ["RLHF_DB"]).pipelines()
    # A folder that is a model but not a reward model is refused as one (an SFT export where runs/2 was RM).
    result = rlhf("train", "ppo", str(TINY), "--set", "ppo.reward_model=demo/model", "--set", "ppo.reward_fn=null")
    assert result.returncode == 2 and "is not a reward model" in result.stderr


def test_a_pipeline_whose_ppo_sharding_would_refuse_is_refused_before_its_first_stage(workdir, monkeypatch):
    """On a GPU machine (NVML's answer stood in for: there is no driver here), ZeRO-3 passes SFT and RM;
    its PPO launch would be refused after both had trained. The pipeline's check asks it first."""
    import engine.launch
    from engine.config import RecipeError
    from engine.pipeline import check

    monkeypatch.setattr(engine.launch, "_no_gpu_for", lambda accelerate: None)
    monkeypatch.setattr(engine.launch, "_missing_package", lambda accelerate: None)  # DeepSpeed, there
    with pytest.raises(RecipeError, match="zero3.yaml: PPO runs under plain data parallelism only"):
        check(str(TINY), [], None, str(Path(ACCEL).parent / "zero3.yaml"))
    recipe, stages = check(str(TINY), [], "rm", str(Path(ACCEL).parent / "zero3.yaml"))  # no PPO: fine
    assert stages == ["sft", "rm"]


@sync
async def test_the_console_shows_a_pipeline_as_one_row_that_expands_into_its_stages(tmp_path, monkeypatch):
    """Pilot test on a runs.db written here: a three-stage pipeline beside a run of its own."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    config = json.dumps({"name": "tiny", "output_root": str(tmp_path / "runs"), "sft": {"x": 1}, "rm": {"x": 1},
                         "ppo": {"x": 1}, "eval": {"x": 1}})
    with Store(db) as store:
        alone = store.create_run(stage="sft", name="alone", recipe="r.yaml", config="{}")
        store.update_run(alone, status="done")
        pipeline = store.create_pipeline(name="tiny", recipe="r.yaml", config=config, overrides=[], through="eval",
                                         launch={})
        stages = []
        for stage in ("sft", "rm", "ppo"):
            run_id = store.create_run(stage=stage, name="tiny", recipe="r.yaml", config="{}", pipeline_id=pipeline)
            store.update_run(run_id, status="done" if stage != "ppo" else "stopped")
            stages.append(run_id)

    app = RlhfConsole(db, configs_dir=REPO / "configs", gpu_sampler=no_gpu, poll_s=0.05)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.loaded and len(app.runs) == 4 and app.pipelines, 20, "the runs")
        table = app.home.query_one(RunTable)
        await wait_for(pilot, lambda: table.row_count == 2, 10, "the pipeline folded into one row")
        keys = [row.key.value for row in table.ordered_rows]
        assert keys == [str(stages[-1]), str(alone)]  # the pipeline by its newest run, the stage it is at
        head = table.get_row(str(stages[-1]))
        assert str(head[0]).strip() == f"▸{stages[-1]}" and "pipeline 1 3/4" in str(head[2])
        app.home.select_run(stages[-1])
        await wait_for(pilot, lambda: "· pipeline 1 pending" in str(app.home.query_one("#run-info").render()), 10,
                       "the pipeline's status on the info line")
        await pilot.press("enter")
        await wait_for(pilot, lambda: table.row_count == 4, 10, "its stages")
        assert [row.key.value for row in table.ordered_rows] == [str(stages[-1]), str(stages[0]),
                                                                  str(stages[1]), str(alone)]
        assert str(table.get_row(str(stages[0]))[0]).strip() == f"└{stages[0]}"
        assert str(table.get_row(str(stages[-1]))[0]).strip() == f"▾{stages[-1]}"
        await pilot.press("down")  # folded from one of its stages: the selection lands on the row that stays,
        await wait_for(pilot, lambda: app.home.selected == stages[0], 10)  # never on a run that slid in
        await pilot.press("plus")
        await wait_for(pilot, lambda: table.row_count == 2, 10, "folded again")
        assert app.home.selected == stages[-1] and table.selected_run() == stages[-1]
        await pilot.press("F", "F")  # stage rm: the pipeline's rm stage is a row of its own, folded or not
        await wait_for(pilot, lambda: table.stage_filter == "rm" and table.row_count == 1, 10, "the rm stage")
        assert [row.key.value for row in table.ordered_rows] == [str(stages[1])]
        await pilot.press("F", "F")  # ppo, eval (evaluation runs are a stage of the table too): none here
        info = app.home.query_one("#run-info")
        await wait_for(pilot, lambda: table.stage_filter == "eval" and table.row_count == 0, 10, "the eval stage")
        await wait_for(pilot, lambda: "no run of 4 matches: f, F or / changes the filter" in str(info.render()), 10,
                       "an empty table that says why")
        await pilot.press("F")  # then none
        await wait_for(pilot, lambda: table.stage_filter is None and table.row_count == 2, 10, "no filter")
        app.home.select_run(stages[-1])
        await pilot.press("r")  # a pipeline's stage: what resumes is the pipeline, and the question says so
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
        assert app.screen.question.startswith(f"Resume pipeline 1? Its run {stages[-1]} (ppo) goes on where")
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), 10, "no resume")
        # A pipeline that failed outside any run's log (a stage that could not start): its error is pinned.
        view = app.home.query_one(LogView)
        assert view.error is None
        with Store(db) as store:
            store.update_pipeline(pipeline, status="failed", error="Traceback ...\nRecipeError: eval.eval_dir: gone")
        await wait_for(pilot, lambda: view.error_by == "pipeline 1" and "eval_dir: gone" in (view.error or ""), 10,
                       "the pipeline's error pinned above the log")
        # Yes, and its process dies before it takes the pipeline (its Python cannot start): the console says
        # so once that process has ended (it said "resuming" of a pipeline no process took).
        app.clear_notifications()
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
        monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # what the console's worker starts inherits it
        await pilot.press("y")
        await wait_for(pilot, lambda: any(n.title.startswith("resume") for n in app._notifications), 120,
                       "what the resume came to")
        monkeypatch.delenv("PYTHONHOME")
        [said] = [n for n in app._notifications if n.title.startswith("resume")]
        assert said.severity == "error" and "pipeline 1 did not resume: its process ended at once" in \
            str(said.message), said.message


def test_a_crashed_pipeline_resumes_in_its_stage_with_no_step_lost_or_repeated(workdir):
    """Fault injection: the pipeline's own process and its PPO stage's process group killed with SIGKILL
    mid-stage (a crash, an OOM kill, a reboot). `rlhf pipeline --resume` recognises both as gone, closes
    the stage as failed and continues it from its newest checkpoint, under the same run id."""
    import signal

    from engine.procs import group_alive, process_alive

    db = os.environ["RLHF_DB"]
    started = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--through", "ppo", "--detach", *PPO_ONLY,
                   "--set", "ppo.steps=8", "--set", "ppo.save_steps=1")
    assert started.returncode == 0, started.stderr[-2000:]

    def ppo_steps() -> int:
        if not os.path.exists(db):
            return 0
        with Store(db) as store:
            runs = [r for r in store.pipeline_runs(1) if r["stage"] == "ppo"] if store.pipelines() else []
        return len(metric(runs[0]["id"], "kl_ctl_value")) if runs else 0

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and ppo_steps() < 3:
        time.sleep(0.2)
    with Store(db) as store:
        pipeline = store.pipeline(1)
        (ppo,) = [r for r in store.pipeline_runs(1) if r["stage"] == "ppo"]
    assert pipeline["status"] == "running" and ppo["status"] == "running"
    os.kill(pipeline["pid"], signal.SIGKILL)
    os.killpg(ppo["pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (process_alive(pipeline["pid"], pipeline["pid_started"])
                                           or group_alive(ppo["pgid"])):
        time.sleep(0.1)
    assert run_row(ppo["id"])["status"] == "running"  # as the kill left it: nobody recorded the end
    crashed_at = ppo_steps()

    resumed = rlhf("pipeline", "--resume", "1", "--db", db)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with Store(db) as store:
        assert store.pipeline(1)["status"] == "done"
        assert [r["stage"] for r in store.pipeline_runs(1)] == ["ppo"]  # continued, not started anew
    assert run_row(ppo["id"])["status"] == "done"
    steps = [s for s, _ in metric(ppo["id"], "kl_ctl_value")]
    assert steps == list(range(1, 9)) and crashed_at >= 3  # the steps after its checkpoint redone once each
    from engine.pipeline import db_tag

    with Store(db) as store:
        tag = db_tag(store)
    detached_log = (Path(json.loads(pipeline["config"])["output_root"]) / f"pipeline-1.{tag}.log").read_text()
    assert f"pipeline 1: ppo is run {ppo['id']}" in detached_log


def test_two_runs_dbs_with_one_output_root_keep_their_pipelines_files_apart(workdir):
    """Each has a pipeline 1: its recorded recipe (what its stages run, what the console's l and E open)
    and its log are its own. Before, the second pipeline overwrote the first one's recipe file."""
    from engine import pipeline
    from engine.pipeline import _recorded, db_tag

    paths = []
    for db, name in ((workdir / "a.db", "first"), (workdir / "b.db", "second")):
        pipeline_id, note = pipeline.create(str(TINY), [f"name={name}"], "sft", ACCEL, None, db)
        assert note is None  # through sft: no PPO whose reward the pipeline would replace
        with Store(db) as store:
            paths.append(_recorded(store.pipeline(pipeline_id), db_tag(store)))
    assert paths[0] != paths[1]
    assert [json.loads(Path(p).read_text())["name"] for p in paths] == ["first", "second"]
    # The whole recipe: what its creator is told (a detached start prints it, the console's launch shows it).
    _, note = pipeline.create(str(TINY), [], None, ACCEL, None, workdir / "c.db")
    assert note.startswith("ppo.reward_fn engine.demo.rewards:correct_answer is the reward of a PPO run alone")



def _sft_pipeline_training(db: str) -> None:
    """Pipeline 1, through SFT, detached, once its stage (run 1) has logged two steps (a checkpoint each)."""
    started = rlhf("pipeline", str(TINY), "--accelerate-config", ACCEL, "--through", "sft", "--detach",
                   "--set", "sft.train.save_steps=1")
    assert started.returncode == 0, started.stderr[-2000:]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (os.path.exists(db) and len(metric(1, "loss")) >= 2):
        time.sleep(0.2)


def test_a_pipeline_killed_alone_leaves_its_stage_running_and_resumes_only_once_it_ends(workdir):
    """kill -9 of the pipeline's process alone: its stage trains on, and its supervisor (in that process) is
    gone. A detached resume must refuse at once (not return 0 and fail in its log); the stage's stop must
    end it for good; then the pipeline continues the stage from its checkpoint."""
    import signal

    from engine.procs import process_alive

    db = os.environ["RLHF_DB"]
    _sft_pipeline_training(db)
    with Store(db) as store:
        pipeline = store.pipeline(1)
    stage = run_row(1)
    # The stage held still (SIGSTOP) while the test looks: it must not reach its end first on a fast machine.
    os.killpg(stage["pgid"], signal.SIGSTOP)
    os.kill(pipeline["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process_alive(pipeline["pid"], pipeline["pid_started"]):
        time.sleep(0.1)

    refused = rlhf("pipeline", "--resume", "1", "--db", db, "--detach")
    assert refused.returncode == 2 and "its sft stage, run 1, is running in another process" in refused.stderr
    with Store(db) as store:
        assert store.pipeline(1)["status"] == "failed"  # its process found gone; not the resume's doing
        assert "is gone" in store.pipeline(1)["error"] and "rlhf pipeline --resume 1" in store.pipeline(1)["error"]
    shown = rlhf("runs", "--pipeline", "1", "--db", db)  # and the table says what the resume waits for
    assert f"its sft stage, run 1, still runs on its own: resume the pipeline once that run ends (or stop that " \
        f"run: rlhf stop 1 --db {db})" in \
        shown.stdout.splitlines()[0], shown.stdout
    stopping = subprocess.Popen([*RLHF, "stop", "1", "--wait", "--db", db], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run_row(1)["stop_requested"] is None:
        time.sleep(0.1)
    os.killpg(stage["pgid"], signal.SIGCONT)  # the stop is asked: the stage takes it as it goes on
    out, _ = stopping.communicate(timeout=300)
    assert stopping.returncode == 0 and out.strip().endswith("run 1: stopped"), out
    at = run_row(1)["step"]
    resumed = rlhf("pipeline", "--resume", "1", "--db", db)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with Store(db) as store:
        assert store.pipeline(1)["status"] == "done" and [r["id"] for r in store.pipeline_runs(1)] == [1]
    steps = [s for s, _ in metric(1, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == run_row(1)["total_steps"] and at >= 2


def test_two_resumes_of_a_pipeline_at_once_one_resumes_it_and_the_other_says_so(workdir):
    """Both said "resumed", and the one that lost marked the pipeline failed while the other ran it."""
    db = os.environ["RLHF_DB"]
    _sft_pipeline_training(db)
    stopped = rlhf("stop", "1", "--wait", "--db", db)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    def pipeline_status() -> str:
        with Store(db) as store:
            return store.pipeline(1)["status"]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and pipeline_status() != "stopped":
        time.sleep(0.2)
    assert pipeline_status() == "stopped"

    both = [subprocess.Popen([*RLHF, "pipeline", "--resume", "1", "--db", db, "--detach"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = [proc.communicate(timeout=600) for proc in both]
    codes = [proc.returncode for proc in both]
    assert sorted(codes) == [0, 2], said
    out, err = said[codes.index(2)]
    assert "was resumed by another command" in err or "pipeline 1 is running" in err, err
    assert "pipeline 1 resumed" in said[codes.index(0)][0]
    seen = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = pipeline_status()
        seen.add(status)
        if status not in ("pending", "running"):
            break
        time.sleep(0.2)
    with Store(db) as store:
        assert status == "done" and "failed" not in seen, (seen, store.pipeline(1)["error"])
        assert [r["id"] for r in store.pipeline_runs(1)] == [1]  # one stage run, continued once
    # The loser's process, where it started, says why in the pipeline's log in one line, not a traceback.
    log = Path(said[codes.index(0)][0].split("its log: ", 1)[1].strip())
    assert "Traceback" not in log.read_text(encoding="utf-8")


def test_a_pipeline_in_a_terminal_that_goes_away_carries_on_to_its_end(workdir):
    """A dropped SSH hangs up the pipeline's terminal: its stages have sessions of their own, and the
    pipeline that chains them goes on as well (what it prints is lost, every stage's train.log has it)."""
    import signal

    # The hang-up's default action, as from a login shell (a suite run under nohup would ignore it).
    proc = subprocess.Popen([*RLHF, "pipeline", str(TINY), "--accelerate-config", ACCEL, "--through", "rm", *SHORT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("pipeline 1: started, sft → rm")
    proc.stdout.close()  # the terminal is gone: nobody reads any more
    proc.stderr.close()
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=600) == 0
    with Store(os.environ["RLHF_DB"]) as store:
        assert store.pipeline(1)["status"] == "done"
        assert [(r["stage"], r["status"]) for r in store.pipeline_runs(1)] == [("sft", "done"), ("rm", "done")]
