"""A run's record never lies: orphans are recognised and become resumable, only recorded processes are
signalled, a runs.db never touches another one's folders, resume reads the recorded recipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from engine.config import RecipeError
from engine.launch import prepare, request_stop, start_detached
from engine.procs import process_alive, process_start
from engine.run import check_resumable
from engine.store import RUN_MARKER, Store, folder_owner
from tests.conftest import REPO, RLHF, TINY
from tests.helpers import metric, run_row

ACCEL = REPO / "configs" / "accelerate"


def wait(predicate, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_two_databases_with_one_output_root_never_share_a_folder(tmp_path):
    root = tmp_path / "runs"
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        first = a.create_run(stage="sft", name="a", recipe="", config="{}", output_root=str(root))
        second = b.create_run(stage="sft", name="b", recipe="", config="{}", output_root=str(root))
        assert (first, second) == (1, 2)  # b skips the folder a handed out
        assert folder_owner(root / "1") == {"db_id": a.db_id, "run_id": 1, "db": str(tmp_path / "a.db")}
        assert folder_owner(root / "2") == {"db_id": b.db_id, "run_id": 2, "db": str(tmp_path / "b.db")}
        # a row naming another file's folder (a copied runs.db, an edited row) is not trusted with it
        b.update_run(second, output_dir=str(root / "1"))
        row = b.run(second)
        assert not b.owns_folder(row) and "belongs to run 1 of another runs.db" in b.foreign_folder(row)
        assert a.owns_folder(a.run(first))
        b.update_run(second, status="running", pid=os.getpid(), pgid_started=process_start(os.getpid()))
    with pytest.raises(RecipeError, match="not signalling it"):
        request_stop(tmp_path / "b.db", second)


def test_a_copied_workspace_never_resumes_into_or_deletes_from_the_originals_folders(tmp_path):
    """`cp -a` of a workspace: the copy's runs.db (same identity) names the original's folders by their
    absolute paths. A resume from the copy wrote into the original's folder and its checkpoint rotation
    deleted the original's checkpoints."""
    original, copy = tmp_path / "ws", tmp_path / "ws-copy"
    original.mkdir()
    with Store(original / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="a", recipe="", config="{}", output_root=str(original / "runs"))
        store.update_run(run_id, status="stopped", step=3, exit_code=143)
    (original / "runs" / str(run_id) / "checkpoint-3").mkdir()
    (original / "runs" / str(run_id) / "checkpoint-3" / "trainer_state.json").write_text("{}")
    shutil.copytree(original, copy)
    with Store(copy / "runs.db") as store:
        row = store.run(run_id)
        assert row["output_dir"] == str(original / "runs" / str(run_id))  # the original's folder
        assert not store.owns_folder(row)
        assert store.foreign_folder(row) == (f"{row['output_dir']} belongs to run {run_id} of {original / 'runs.db'}, "
                                             f"of which {copy / 'runs.db'} is a copy (a copied workspace's runs.db "
                                             "still names the original's folders)")
    with pytest.raises(RecipeError, match=f"run {run_id}: .* of which .* is a copy .*; not resuming from its "):
        check_resumable(copy / "runs.db", run_id, "sft")
    from engine.evaluate import resolve_checkpoint  # its model by the run's id: perhaps not the one recorded

    with pytest.raises(RecipeError, match=f"checkpoint {run_id}: .* is a copy .*; give the model's folder itself"):
        resolve_checkpoint(str(run_id), copy / "runs.db")
    result = subprocess.run([*RLHF, "delete", str(run_id), "--files", "--db", str(copy / "runs.db")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "was kept" in result.stderr, result.stderr
    assert (original / "runs" / str(run_id) / "checkpoint-3").is_dir()
    # The original is still its folders' owner; and so is a runs.db moved away from where it was (nothing to
    # tell it from the original then)
    with Store(original / "runs.db") as store:
        assert store.owns_folder(store.run(run_id)) and store.foreign_folder(store.run(run_id)) is None
    (original / "runs.db").rename(original / "moved.db")
    with Store(original / "moved.db") as store:
        assert store.owns_folder(store.run(run_id))
    with Store(original / "runs.db"):  # a new runs.db where it was: another identity, not the original
        pass
    with Store(original / "moved.db") as store:
        assert store.owns_folder(store.run(run_id)) and store.foreign_folder(store.run(run_id)) is None


@pytest.mark.parametrize("how", ["supervisor killed", "run killed"])
def test_a_launched_run_whose_processes_died_becomes_resumable(workdir, how):
    run = prepare("sft", str(TINY), ["train.max_steps=400", "train.logging_steps=1", "train.save_steps=2"],
                  str(ACCEL / "cpu.yaml"))
    supervisor = start_detached(run)
    wait(lambda: len(metric(run.run_id, "loss")) >= 3)
    row = run_row(run.run_id)
    os.kill(supervisor, signal.SIGKILL)  # nothing is left to record how the run ends
    if how == "run killed":
        os.killpg(row["pgid"], signal.SIGKILL)
    else:
        os.killpg(row["pgid"], signal.SIGKILL)  # a reboot: supervisor and run gone together
    wait(lambda: subprocess.run(["ps", "-o", "pid=", "-g", str(row["pgid"])], capture_output=True).stdout == b"")
    assert run_row(run.run_id)["status"] == "running"  # as the kill left it
    check_resumable(os.environ["RLHF_DB"], run.run_id, "sft")  # recognised as gone: closed, resumable
    closed = run_row(run.run_id)
    assert closed["status"] == "failed" and "processes are gone" in closed["error"] and "resume it" in closed["error"]
    resumed = subprocess.run([*RLHF, "launch", "sft", str(TINY), "--accelerate-config", str(ACCEL / "cpu.yaml"),
                              "--resume-run", str(run.run_id), "--allow-change", "--set", "train.max_steps=6"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [s for s, _ in metric(run.run_id, "loss")]
    assert steps == list(range(1, 7)) and run_row(run.run_id)["status"] == "done"


def _training_on_two_ranks() -> tuple:
    """(prepared run, its supervisor's pid, its launcher's pid, its ranks' pids) of a detached SFT run on
    two CPU processes, once it has logged three steps."""
    run = prepare("sft", str(TINY), ["train.max_steps=400", "train.logging_steps=1", "train.save_steps=50"],
                  str(ACCEL / "cpu_ddp.yaml"))
    supervisor = start_detached(run)
    wait(lambda: len(metric(run.run_id, "loss")) >= 3, timeout=300)
    launcher = run_row(run.run_id)["pgid"]
    ranks = [int(name.split(".")[1]) for name in os.listdir(Path(run.log_path).parent / ".ranks")
             if name.startswith(f"{launcher}.")]
    return run, supervisor, launcher, ranks


def test_ranks_whose_launcher_was_killed_alone_save_stop_and_are_waited_for(workdir):
    """torchrun starts each rank in a session of its own: kill -9 of `accelerate launch` alone (the OOM
    killer's choice) left both ranks training under nobody while the run read failed, and its resume
    trained a second copy into the same folder. The ranks end with their launcher, as a stop (a
    checkpoint), and the run's end is recorded once they are gone."""
    run, _, launcher, ranks = _training_on_two_ranks()
    assert len(ranks) == 2 and all(os.getsid(pid) == pid for pid in ranks)  # sessions of their own
    os.kill(launcher, signal.SIGKILL)
    try:
        wait(lambda: run_row(run.run_id)["exit_code"] is not None, timeout=300)
        row = run_row(run.run_id)
        assert not [pid for pid in ranks if process_alive(pid, None)]  # no rank outlives the record
    finally:  # a failure leaves no rank training
        for pid in ranks:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert row["status"] == "stopped" and row["exit_code"] == 143, row
    assert "its launcher was killed by SIGKILL" in row["error"]
    step = row["step"]
    assert step and (Path(row["output_dir"]) / f"checkpoint-{step}").is_dir()  # saved where it stopped
    assert not list((Path(row["output_dir"]) / ".ranks").iterdir())


def test_a_stop_continues_a_rank_paused_with_sigstop(workdir):
    """The stop's SIGCONT went to the launcher's group alone: a rank paused in its own session held the
    SIGTERM its launcher passed on until the grace period ran out (10 minutes), and the kill lost the save."""
    run, _, _, ranks = _training_on_two_ranks()
    os.kill(ranks[-1], signal.SIGSTOP)
    try:
        request_stop(os.environ["RLHF_DB"], run.run_id)
        wait(lambda: run_row(run.run_id)["exit_code"] is not None, timeout=300)  # the grace is 600 s
    finally:
        for pid in ranks:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    row = run_row(run.run_id)
    assert row["status"] == "stopped" and (Path(row["output_dir"]) / f"checkpoint-{row['step']}").is_dir(), row
    # torchrun's answer to the stop (SignalException, once the ranks have ended) is a line, not a traceback
    # at the end of the log
    log = Path(run.log_path).read_text(encoding="utf-8")
    assert "Traceback" not in log and "SignalException" not in log, log[-3000:]
    assert "[rlhf] launcher: SIGTERM passed on to the ranks, which have ended" in log


def _pending(pid: int) -> int:
    """The signals waiting at a process (a stopped one holds them), as /proc's bit mask."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def test_a_second_ctrl_c_kills_the_ranks_too_not_a_stop_more(workdir):
    """The second Ctrl-C means now: it killed the launcher's group alone, and its ranks (sessions of their
    own, ending with their launcher as at a stop) took that for a stop, a grace period more (600 s): here a
    rank paused with SIGSTOP, which a stop waits for, would have held it that long."""
    run, supervisor, _, ranks = _training_on_two_ranks()
    os.kill(ranks[-1], signal.SIGSTOP)
    try:
        os.kill(supervisor, signal.SIGINT)  # the stop, passed on to the ranks: pending at the paused one
        wait(lambda: _pending(ranks[-1]) & (1 << (signal.SIGTERM - 1)), 120)
        time.sleep(0.5)  # past Presses.SAME_S: a second press, not the first one delivered twice
        os.kill(supervisor, signal.SIGINT)
        wait(lambda: run_row(run.run_id)["exit_code"] is not None, timeout=120)
        assert not [pid for pid in ranks if process_alive(pid, None)]
    finally:
        for pid in ranks:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_a_pending_run_whose_supervisor_died_has_a_way_out(workdir):
    run = prepare("sft", str(TINY), [], str(ACCEL / "cpu.yaml"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(dead.pid)
    dead.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        store.set_supervisor(run.run_id, dead.pid, started)  # as start_detached records it, then it died
    assert request_stop(os.environ["RLHF_DB"], run.run_id) is None
    row = run_row(run.run_id)
    assert row["status"] == "failed" and row["orphaned"] is not None
    with Store(os.environ["RLHF_DB"]) as store:
        store.delete_runs([run.run_id])  # and it can be deleted


def test_a_look_closes_runs_whose_processes_died_but_never_one_resumed_meanwhile(workdir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(dead.pid)
    dead.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        gone = store.create_run(stage="sft", name="killed", recipe="", config="{}")
        store.update_run(gone, status="running", pid=dead.pid, pgid_started=started)  # as a kill -9 left it
        live = store.create_run(stage="sft", name="alive", recipe="", config="{}")
        store.update_run(live, status="running", pid=os.getpid(), pgid_started=process_start(os.getpid()))
        elsewhere = store.create_run(stage="sft", name="other-node", recipe="", config="{}")
        store.update_run(elsewhere, status="running", pid=dead.pid, pgid_started=started, host="another-node")
        stale = store.run(gone)

    listed = subprocess.run([*RLHF, "runs"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    status = {int(line.split()[0]): line.split()[3] for line in listed.stdout.splitlines()[1:]}
    assert status == {gone: "failed", live: "running", elsewhere: "running"}  # another node's: not ours to judge
    assert "processes are gone" in run_row(gone)["error"]

    with Store(os.environ["RLHF_DB"]) as store:  # resumed by someone else between a look and its write
        assert store.claim_for_resume(gone)
        store.update_run(gone, pid=os.getpid(), pgid_started=process_start(os.getpid()))
        assert not store.close_orphan(gone, stale)
        assert store.run(gone)["status"] == "pending"
        # Registered on another node and resumed here: the row names this machine now, and only it judges.
        store.update_run(elsewhere, status="pending")
        store.set_process(elsewhere, os.getpid(), os.getpid(), process_start(os.getpid()))
        assert store.run(elsewhere)["host"] == __import__("socket").gethostname()


def test_rlhf_runs_says_how_long_and_why_and_where_a_pipeline_stands_to_people_and_to_scripts(workdir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(dead.pid)
    dead.wait()
    host = __import__("socket").gethostname()
    with Store(os.environ["RLHF_DB"]) as store:
        pipelines = [store.create_pipeline(name=f"p{i}", recipe="r.yaml", config="{}", overrides=[], through="eval",
                                           launch={}) for i in range(3)]
        # Killed (-9) while running; the same on another node (not ours to judge); created, not yet started.
        store.update_pipeline(pipelines[0], status="running", pid=dead.pid, pid_started=started, host=host)
        store.update_pipeline(pipelines[1], status="running", pid=dead.pid, pid_started=started, host="another-node")
        stale = store.pipeline(pipelines[0])
        failed = store.create_run(stage="sft", name="broken", recipe="", config="{}")
        store.update_run(failed, status="failed", started=100.0, ended=110.0, pipeline_id=pipelines[0],
                         error='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad batch\n')
        resumed = store.create_run(stage="rm", name="twice", recipe="", config="{}")
        store.update_run(resumed, status="done", started=100.0, ended=230.0, segments="[[100, 160], [200, 230]]",
                         world_size=2, step=40, total_steps=40)
        # Asked to stop, its checkpoint not yet written: stopping, as the console says (it read running)
        stopping = store.create_run(stage="sft", name="halting", recipe="", config="{}")
        store.set_process(stopping, os.getpid(), None, process_start(os.getpid()))
        store.update_run(stopping, status="running", started=100.0, stop_requested=time.time())

    listed = subprocess.run([*RLHF, "runs"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[-5:] == ["started", "pipeline", "note", "·", "error"] and " time " in header
    line = {int(row.split()[0]): row for row in rows}
    assert line[failed].endswith(" ValueError: bad batch") and " 10s " in line[failed]
    assert " 1m30s " in line[resumed]  # two stretches; the 40 s it sat stopped do not count
    assert " 40/40 ×2 " in line[resumed]  # its processes, as the console's table says
    assert line[stopping].split()[3] == "stopping", line[stopping]
    with Store(os.environ["RLHF_DB"]) as store:  # a plain look closes a dead pipeline too
        assert store.pipeline(pipelines[0])["status"] == "failed"

    only = subprocess.run([*RLHF, "runs", "--pipeline", str(pipelines[0])], capture_output=True, text=True,
                          timeout=60)
    assert only.returncode == 0, only.stderr
    first, _, *its = only.stdout.splitlines()
    assert first.startswith(f"pipeline {pipelines[0]} p0 (through eval): failed") and f"pid {dead.pid}" in first
    assert [int(row.split()[0]) for row in its] == [failed]
    for other, said in ((pipelines[1], f"is running (pid {dead.pid} on another-node); stop it first"),
                        (pipelines[2], "is pending (its process is starting); stop it first")):
        again = subprocess.run([*RLHF, "pipeline", "--resume", str(other)], capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 2 and said in again.stderr, again.stderr
    with Store(os.environ["RLHF_DB"]) as store:
        assert [store.pipeline(p)["status"] for p in pipelines] == ["failed", "running", "pending"]
        # Resumed by another process between a look and its write: left as it is.
        store.update_pipeline(pipelines[0], status="running", pid=os.getpid(),
                              pid_started=process_start(os.getpid()), host=host, error=None)
        assert not store.close_orphan_pipeline(pipelines[0], stale)
        assert store.pipeline(pipelines[0])["status"] == "running"

    scripted = subprocess.run([*RLHF, "runs", "--json"], capture_output=True, text=True, timeout=60)
    assert scripted.returncode == 0, scripted.stderr
    objects = {row["id"]: row for row in map(json.loads, scripted.stdout.splitlines())}
    assert set(objects) == {failed, resumed, stopping} and "config" not in objects[failed]
    assert objects[resumed]["elapsed_s"] == 90.0 and objects[failed]["status"] == "failed"
    assert objects[failed]["error"].endswith("ValueError: bad batch\n") and objects[failed]["pipeline_id"] == 1
    assert isinstance(objects[resumed]["segments"], list)  # JSON values, not strings of JSON
    assert isinstance(objects[failed]["overrides"], list)


def test_rlhf_runs_names_a_running_run_that_has_logged_nothing_far_past_its_own_pace(workdir):
    """A hung rank or a SIGSTOPped trainer keeps its processes, so a look leaves it running: the list says
    how long nothing has arrived, judged as the console's table judges it, on the run's current stretch."""
    now = time.time()
    alive = {"pid": os.getpid(), "pgid_started": process_start(os.getpid())}
    with Store(os.environ["RLHF_DB"]) as store:
        runs = {}
        for name, quiet, resumed in (("hung", 900.0, False), ("busy", 4.0, False), ("resumed", 900.0, True)):
            runs[name] = store.create_run(stage="sft", name=name, recipe="", config="{}")
            stretch = [[now - 1100, now - 20], [now - 10, None]] if resumed else [[now - 1100, None]]
            store.update_run(runs[name], status="running", started=now - 1100, segments=json.dumps(stretch),
                             step=50, total_steps=500, **alive)
            for step in range(1, 51):  # a step every 2 s, each with two metrics, the newest `quiet` ago
                store.log_metrics(runs[name], step, {"loss": 1.0, "lr": 1e-4},
                                  wall_time=now - quiet - 2 * (50 - step))
        store.update_run(runs["busy"], note="lr sweep,\nwarmup off")  # the console's n: shown here too
        wide = store.create_run(stage="sft", name="中文配方测试", recipe="", config="{}")
        store.update_run(wide, status="done")

    listed = subprocess.run([*RLHF, "runs"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    line = {int(row.split()[0]): row for row in listed.stdout.splitlines()[1:]}
    # A Chinese name takes two columns a character: the columns after it stay in line (len() padded it short).
    from rich.cells import cell_len

    status_at = {cell_len(row[: row.index(" running " if " running " in row else " done ")]) for row in line.values()}
    assert len(status_at) == 1, listed.stdout
    assert " running " in line[runs["hung"]] and "silent 15m" in line[runs["hung"]], listed.stdout
    assert "silent" not in line[runs["busy"]] and line[runs["busy"]].endswith(" lr sweep, warmup off")
    assert "silent" not in line[runs["resumed"]]  # its 15 quiet minutes were a stop: resumed 10 s ago
    scripted = subprocess.run([*RLHF, "runs", "--json"], capture_output=True, text=True, timeout=60)
    objects = {row["id"]: row for row in map(json.loads, scripted.stdout.splitlines())}
    assert objects[runs["hung"]]["silent_s"] == pytest.approx(900.0, abs=60)
    assert objects[runs["busy"]]["silent_s"] is None and objects[runs["resumed"]]["silent_s"] is None


def test_a_look_that_closed_a_launched_run_before_its_supervisor_did_gives_way_to_the_exit_code(workdir):
    """The group is gone a moment before the supervisor records the exit: a look in between closes the row as
    failed with a guess. The supervisor's record (the exit code, the log's last lines) replaces the guess."""
    from engine.launch import record_exit
    from engine.run import settle_active

    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    started = process_start(dead.pid)
    dead.wait()
    log = workdir / "train.log"
    log.write_text("Traceback (most recent call last):\nValueError: the real reason\n")
    with Store(os.environ["RLHF_DB"]) as store:
        crashed = store.create_run(stage="sft", name="crashed", recipe="", config="{}")
        store.update_run(crashed, status="running", segments=json.dumps([[time.time(), None]]))
        store.set_process(crashed, dead.pid, dead.pid, started)
        waiting = store.create_run(stage="sft", name="stopped while pending", recipe="", config="{}")
        store.set_process(waiting, dead.pid, dead.pid, started)
        store.mark_stop_requested(waiting)
        assert sorted(settle_active(store)) == [crashed, waiting]  # the look's guess
    assert record_exit(os.environ["RLHF_DB"], crashed, 1, log_path=log, pgid=dead.pid) == "failed"
    row = run_row(crashed)
    assert "ValueError: the real reason" in row["error"] and row["orphaned"] is None and row["exit_code"] == 1
    assert record_exit(os.environ["RLHF_DB"], waiting, 143, log_path=log, pgid=dead.pid) == "stopped"
    row = run_row(waiting)
    assert row["status"] == "stopped" and row["error"] is None and row["exit_code"] == 143


def test_a_train_run_from_a_script_is_stopped_through_its_own_pid_and_never_a_stranger(workdir):
    # Not a process-group leader (a child of this test): the stop reaches its pid, checked by start time.
    proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=2000", "--set",
                             "train.logging_steps=1", "--set", "train.save_steps=1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait(lambda: os.path.exists("runs.db") and len(metric(1, "loss")) >= 2)
    row = run_row(1)
    assert row["pgid"] is None and row["pid"] == proc.pid and row["pgid_started"] == process_start(proc.pid)
    request_stop(os.environ["RLHF_DB"], 1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert run_row(1)["status"] == "stopped"

    stranger = subprocess.Popen(["sleep", "60"])
    try:
        with Store(os.environ["RLHF_DB"]) as store:  # a row naming a live pid that started at another time
            other = store.create_run(stage="sft", name="t", recipe="", config="{}")
            store.update_run(other, status="running", pid=stranger.pid, pgid_started=1)
        request_stop(os.environ["RLHF_DB"], other)
        time.sleep(0.5)  # give a wrongly sent signal time to land
        assert stranger.poll() is None  # untouched
        assert run_row(other)["status"] == "failed"  # and the row is closed: its own process is gone
    finally:
        stranger.kill()


def test_resume_reads_the_recorded_recipe_from_any_directory(workdir, tmp_path_factory):
    done = subprocess.run([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=2", "--set",
                           "train.save_steps=2", "--set", "train.logging_steps=1", "--set", "train.lr=0.01"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = run_row(1)
    assert Path(recorded["recipe"]).is_absolute()
    refused = subprocess.run([*RLHF, "train", "sft", "--resume-run", "1", "--allow-change", "--set",
                              "train.max_steps=4", "--set", "sft.data.0.path=nope.jsonl"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "'nope.jsonl' does not exist" in refused.stderr, refused.stderr
    # Refused before it claimed the run: left as it was (it stayed pending, for good, with no process).
    assert {k: run_row(1)[k] for k in recorded} == recorded
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no demo/ here: the recorded paths are absolute
    changed = elsewhere / "tiny.yaml"
    changed.write_text(TINY.read_text().replace("lr: 3.0e-3", "lr: 9.0"))
    resumed = subprocess.run([*RLHF, "train", "sft", str(changed), "--resume-run", "1", "--allow-change", "--set",
                              "train.max_steps=4", "--db", os.environ["RLHF_DB"]], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_row(1)["status"] == "done" and run_row(1)["started"] == recorded["started"]  # first start kept
    lrs = [v for _, v in metric(1, "learning_rate")]
    assert lrs[-1] == pytest.approx(0.01)  # the recorded recipe's rate, not the changed file's
    assert (Path(recorded["output_dir"]) / RUN_MARKER).is_file()


def test_a_runs_db_locked_beyond_its_timeout_never_stops_training(workdir, tmp_path):
    import sqlite3

    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=24", "--set",
                                 "train.logging_steps=1", "--set", "train.save_steps=8", "--set", "train.eval_ratio=0"],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RLHF_DB_BUSY_S": "0.3"})
        wait(lambda: os.path.exists("runs.db") and len(metric(1, "loss")) >= 3)
        blocker = sqlite3.connect("runs.db", isolation_level=None, timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds runs.db far longer than the run's timeout
        try:
            wait(lambda: "10 writes held back" in err_file.read_text() or proc.poll() is not None)
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        assert proc.wait(timeout=300) == 0, err_file.read_text()[-3000:]
    assert "runs.db write failed (database is locked)" in err_file.read_text()  # it did meet the lock
    assert [s for s, _ in metric(1, "loss")] == list(range(1, 25))  # nothing lost, nothing twice, in order
    with Store(os.environ["RLHF_DB"]) as store:
        rows = store.metrics_since(0, run_id=1)
        assert sorted(r["run_seq"] for r in rows) == list(range(1, len(rows) + 1))
        assert store.run(1)["status"] == "done"
        assert [c["step"] for c in store.checkpoints(1) if c["full_state"]][-1] == 24


def test_a_launched_run_resumed_in_process_is_its_new_process_not_the_old_group(workdir):
    from engine.run_facts import shown_status

    run = prepare("sft", str(TINY), ["train.max_steps=400", "train.logging_steps=1", "train.save_steps=2"],
                  str(ACCEL / "cpu.yaml"))
    start_detached(run)
    wait(lambda: len(metric(run.run_id, "loss")) >= 3)
    request_stop(os.environ["RLHF_DB"], run.run_id)
    wait(lambda: run_row(run.run_id)["exit_code"] is not None)
    assert run_row(run.run_id)["status"] == "stopped"
    proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--resume-run", str(run.run_id), "--set",
                             "train.max_steps=400"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait(lambda: run_row(run.run_id)["status"] == "running" and run_row(run.run_id)["pid"] == proc.pid)
    row = run_row(run.run_id)
    assert row["launch"] is None and row["pgid_started"] == process_start(proc.pid)
    assert shown_status(row) == "running"  # not "lost": the row names the live process, not the old group
    request_stop(os.environ["RLHF_DB"], run.run_id)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-2000:]
    row = run_row(run.run_id)
    assert row["status"] == "stopped" and row["error"] is None


def test_deleting_runs_gives_the_space_back(tmp_path):
    db = tmp_path / "runs.db"
    with Store(db) as store:
        ids = [store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(tmp_path / "runs"))
               for _ in range(2)]
        for step in range(1, 3001):
            store.log_metrics(ids[0], step, {f"m{k}": float(step) for k in range(20)})
        store.update_run(ids[0], status="done")
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = db.stat().st_size
        store.delete_runs([ids[0]])
        with Store(db) as console:  # another connection open (a console), idle between its polls
            console.runs()
            assert store.vacuum_if_worthwhile(min_free_bytes=1024)
            wal = db.with_name(db.name + "-wal")
            # the VACUUM wrote the whole file into the WAL: emptied, not left at that size for the console's life
            assert db.stat().st_size < before / 4 and (not wal.exists() or wal.stat().st_size < before / 4)
            assert console.db.execute("PRAGMA journal_size_limit").fetchone()[0] == 64 * 1024 * 1024
        assert not store.vacuum_if_worthwhile(min_free_bytes=1024)  # nothing left to give back


def test_a_stop_that_lands_inside_an_import_still_ends_the_run_as_stopped(workdir):
    """SIGTERM before training raises StopRequested; inside a lazy import (trl's) it arrives wrapped."""
    from engine.config import load_recipe
    from engine.run import StopRequested, tracked_run

    with tracked_run(os.environ["RLHF_DB"], "sft", load_recipe(TINY), str(TINY), []) as handle:
        try:
            raise StopRequested()
        except StopRequested as stop:
            raise RuntimeError("Failed to import trl.trainer.sft_config") from stop
    assert handle.status == "stopped" and run_row(handle.run_id)["status"] == "stopped"


def test_ctrl_c_on_a_run_in_its_own_terminal_saves_a_checkpoint_and_stops(workdir):
    """As a terminal sends it to the foreground process: the first Ctrl-C is the graceful stop (a checkpoint,
    `stopped`, 143), not a KeyboardInterrupt that records `stopped` with nothing saved."""
    proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=400",
                             "--set", "train.logging_steps=1", "--set", "train.save_steps=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait(lambda: os.path.exists(os.environ["RLHF_DB"]) and len(metric(1, "loss")) >= 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Ctrl-C: stopping after this step, with a checkpoint" in err and "KeyboardInterrupt" not in err
    row = run_row(1)
    assert row["status"] == "stopped" and row["exit_code"] == 143 and row["error"] is None
    with Store(os.environ["RLHF_DB"]) as store:
        saved = store.checkpoints(1)
    assert saved and saved[-1]["step"] == row["step"] < 400
    assert "continue it with: rlhf train sft --resume-run 1" in out
    log = (Path(row["output_dir"]) / "train.log").read_text(encoding="utf-8")  # what the terminal showed
    assert "Ctrl-C: stopping after this step" in log and "'loss'" in log


def test_resume_follows_its_own_hint_from_anywhere_with_the_recorded_config(workdir, tmp_path_factory):
    """The printed hint names the database and needs no --set: followed from another directory it goes on
    to the run's own step count. A --set that changes the recipe is refused without --allow-change, and a
    finished run is not resumed to no more steps. In-process, runs.db records a stop as 143, as the shell."""
    db = str(workdir / "elsewhere.db")
    proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--db", db, "--set", "train.max_steps=150",
                             "--set", "train.logging_steps=1", "--set", "train.save_steps=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait(lambda: os.path.exists(db) and len(metric(1, "loss", db)) >= 2)
    request_stop(db, 1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    row = run_row(1, db)
    assert row["status"] == "stopped" and row["exit_code"] == 143
    hint = out.split("continue it with: ")[1].strip()
    assert hint == f"rlhf train sft --resume-run 1 --db {db}"

    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no recipe, no demo, no runs.db here
    changed = subprocess.run([*RLHF, *hint.split()[1:], "--set", "train.max_steps=10"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    assert "sft.train.max_steps (150 -> 10)" in changed.stderr and "--allow-change" in changed.stderr
    assert run_row(1, db)["status"] == "stopped"  # untouched

    stopped_at = row["step"]
    resumed = subprocess.run([*RLHF, *hint.split()[1:], "--allow-change", "--set",
                              f"train.max_steps={stopped_at + 2}"], cwd=elsewhere, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    row = run_row(1, db)
    assert row["status"] == "done" and row["step"] == stopped_at + 2 and row["exit_code"] == 0
    tokens = [v for _, v in metric(1, "num_tokens", db)]  # trl counts from 0 in each process: carried on
    assert len(tokens) == stopped_at + 2 and all(a < b for a, b in zip(tokens, tokens[1:])), tokens
    assert f"train.max_steps={stopped_at + 2}" in row["overrides"]  # the change is on the run's record
    (first, first_end), (second, second_end) = json.loads(row["segments"])  # two stretches, both closed
    assert row["started"] == first < first_end <= second < second_end == row["ended"]
    from console.screens.runs import segments_text

    assert segments_text(row).startswith(" · 2 segments ") and segments_text(run_row(1, db) | {"segments": "[]"}) == ""

    again = subprocess.run([*RLHF, *hint.split()[1:]], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"run 1 is done at step {stopped_at + 2}" in again.stderr
    with Store(db) as store:
        assert [c["step"] for c in store.checkpoints(1) if Path(c["path"]).name == "final"] == [stopped_at + 2]


def test_a_stop_whose_exception_python_dropped_still_stops_the_trainer(monkeypatch):
    """A SIGTERM during a run's set-up raises StopRequested from the signal handler; landing inside a weakref
    callback (importlib fires one on every import) Python prints and drops it. The stop is remembered, and
    the trainer's stop flag starts raised."""
    import weakref

    from engine import run
    from engine.track import StopFlag

    monkeypatch.setattr(run, "_stop_seen", False)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)

    class Lock:
        pass

    lock = Lock()
    ref = weakref.ref(lock, lambda _: run._raise_stop())
    del lock  # the callback runs here; its exception goes to the unraisable hook, not to this frame
    assert ref() is None and [type(d.exc_value).__name__ for d in dropped] == ["StopRequested"]
    assert run.stop_seen()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert StopFlag().requested  # stops at the end of its first step, with a checkpoint
        monkeypatch.setattr(run, "_stop_seen", False)
        assert not StopFlag().requested
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_one_ctrl_c_delivered_twice_is_one_stop_and_a_second_press_ends_the_run(monkeypatch):
    """`timeout --foreground rlhf train ...`: the terminal's Ctrl-C reaches the run, and timeout passes its own
    copy on right after. Taken as a second press, it ended the run unsaved (failed, 130)."""
    from engine import run

    now = [100.0]
    monkeypatch.setattr(run, "_clock", lambda: now[0])
    monkeypatch.delenv(run.LAUNCHED_ENV, raising=False)
    stops = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP)
    try:
        run.catch_stops(lambda: stops.append(now[0]), "stopping after this step, with a checkpoint")
        signal.raise_signal(signal.SIGINT)
        assert stops == [100.0]
        now[0] += 0.01
        signal.raise_signal(signal.SIGINT)  # the same Ctrl-C, passed on by the wrapper
        assert stops == [100.0]
        now[0] += 1.0
        with pytest.raises(KeyboardInterrupt):  # a press of its own: at once, unsaved
            signal.raise_signal(signal.SIGINT)
        assert stops == [100.0]
    finally:
        for signum, handler in zip((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), before):
            signal.signal(signum, handler)
    # `rlhf launch` counts its signals so (the second kills the run's processes): the same rule.
    presses = run.Presses()
    assert [presses.press() for _ in range(2)] == [True, False] and presses.count == 1
    now[0] += 1.0
    assert presses.press() and presses.count == 2


def test_a_run_in_this_process_puts_back_the_signal_handlers_it_found(workdir):
    from engine.config import load_recipe
    from engine.run import StopRequested, tracked_run

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for ending in ("done", "stopped", "failed", "bad input", "second Ctrl-C"):
        try:
            with tracked_run(os.environ["RLHF_DB"], "sft", load_recipe(TINY), str(TINY), []) as handle:
                assert signal.getsignal(signal.SIGINT) is not before[1]  # Ctrl-C is the run's stop meanwhile
                if ending == "stopped":
                    raise StopRequested()
                if ending == "failed":
                    raise ValueError("boom")
                if ending == "bad input":
                    raise RecipeError("sft.data.0: x.jsonl: no usable SFT record")
                if ending == "second Ctrl-C":
                    raise KeyboardInterrupt()
        except (ValueError, KeyboardInterrupt):  # RecipeError is a ValueError too
            pass
        row = run_row(handle.run_id)
        assert row["status"] == ("failed" if ending in ("bad input", "second Ctrl-C") else ending)
        # The exit code as the shell saw it: Python ends on a KeyboardInterrupt with 130, the CLI on bad input
        # with 2.
        assert row["exit_code"] == {"done": 0, "stopped": 143, "second Ctrl-C": 130, "bad input": 2}.get(ending, 1)
        # The reason in the log too, not only on the terminal that showed it: bad input as the one line the
        # terminal shows, anything else with its traceback.
        log = (Path(run_row(handle.run_id)["output_dir"]) / "train.log").read_text(encoding="utf-8")
        if ending == "failed":
            assert "Traceback" in log and "ValueError: boom" in log
        if ending == "bad input":  # and in runs.db, where the console shows it
            assert log == "error: sft.data.0: x.jsonl: no usable SFT record\n" == row["error"] + "\n"
        if ending == "second Ctrl-C":  # what its resume does: nothing trained, no checkpoint (it said "resume
            # from the last checkpoint", and the resume found none)
            assert row["error"].endswith("it trained no step: a resume starts it over")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_stop_while_a_run_registers_leaves_no_pending_row_and_ends_it_before_anything_loads(workdir,
                                                                                              monkeypatch):
    """A Ctrl-C between the row's insert and its processes being recorded left a pending row that no look
    could ever close (nothing on it to find gone). It is held until the row is complete, then taken as a stop
    during set-up: the run ends stopped before its model loads."""
    from engine import run
    from engine.train import run_stage

    real = run.register_run

    def register_then_ctrl_c(*args):
        run_id = real(*args)
        signal.raise_signal(signal.SIGINT)  # its handler runs as this returns, in this very frame
        return run_id

    monkeypatch.setattr(run, "register_run", register_then_ctrl_c)
    loaded = []
    monkeypatch.setattr("engine.sft.load_causal_lm", lambda spec: loaded.append(spec))  # never reached
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_id, status = run_stage("sft", str(TINY), ["train.max_steps=2"])
    assert status == "stopped" and not loaded
    row = run_row(run_id)
    assert row["status"] == "stopped" and row["exit_code"] == 143 and row["pid"] == os.getpid()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_killed_stretch_counts_to_its_last_sign_of_life_not_to_when_a_look_noticed(workdir):
    """A run killed -9 and noticed days later: its record ends at its last metric, and on resume that
    stretch keeps its length (before: the time column counted the days, then zero once resumed)."""
    from engine.config import load_recipe
    from engine.run import RUN_ID_ENV, settle_active, tracked_run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(dead.pid)
    dead.wait()
    t0 = time.time() - 3 * 86400
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="killed", recipe="", config="{}")
        store.update_run(run_id, status="running", started=t0, segments=json.dumps([[t0, None]]),
                         pid=dead.pid, pgid_started=started)
        store.log_metrics(run_id, 5, {"loss": 1.0}, wall_time=t0 + 600)
        assert settle_active(store) == [run_id]
        row = store.run(run_id)
    assert row["status"] == "failed" and row["ended"] == pytest.approx(t0 + 600, abs=1)

    with Store(os.environ["RLHF_DB"]) as store:  # as --resume-run does: claimed, then continued here
        assert store.claim_for_resume(run_id)
    os.environ[RUN_ID_ENV] = str(run_id)
    try:
        with tracked_run(os.environ["RLHF_DB"], "sft", load_recipe(TINY), str(TINY), []):
            segments = json.loads(run_row(run_id)["segments"])
    finally:
        del os.environ[RUN_ID_ENV]
    assert segments[0] == [t0, pytest.approx(t0 + 600, abs=1)] and segments[1][1] is None


def test_a_stop_that_comes_with_the_last_step_ends_the_run_as_done():
    """Stopped on its last step, a run had a checkpoint at max_steps and no export; its resume then trained
    one step past max_steps (the trainer takes a step before it checks): 4/3. The stop now lets it finish."""
    from transformers import TrainerControl, TrainerState

    from engine.track import GracefulStop

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = GracefulStop()
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    stop.flag.requested = True
    last, control = TrainerState(global_step=3, max_steps=3), TrainerControl()
    stop.on_step_end(None, last, control)
    assert not stop.stopped and not control.should_training_stop and not control.should_save
    stop.on_step_end(None, TrainerState(global_step=2, max_steps=3), control)
    assert stop.stopped and control.should_training_stop and control.should_save


def test_a_run_left_at_its_last_step_resumes_to_its_export_alone(workdir):
    """Stopped on its last step (as a stop there left a run before), or killed while it exported `final`
    (its folder half written): a checkpoint at max_steps and no export. Its resume was refused ("nothing is
    left to train"), for good, and its pipeline's with it; it exports now, without a training step (the
    trainer, resumed, takes one past the end before it checks). Fewer steps than trained are refused."""
    from transformers import AutoModelForCausalLM

    done = subprocess.run([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=3", "--set",
                           "train.save_steps=1", "--set", "train.eval_ratio=0"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = Path(run_row(1)["output_dir"]) / "final"
    for cut_short in ("stopped", "failed"):
        shutil.rmtree(final)
        final.mkdir()
        (final / "config.json").write_text((Path(run_row(1)["output_dir"]) / "checkpoint-3" / "config.json")
                                           .read_text())  # what an export killed after its first file leaves
        with Store(os.environ["RLHF_DB"]) as store:
            store.update_run(1, status=cut_short, exit_code=143 if cut_short == "stopped" else -9)
        fewer = subprocess.run([*RLHF, "train", "sft", "--resume-run", "1", "--set", "train.max_steps=2",
                                "--allow-change"], capture_output=True, text=True, timeout=120)
        assert fewer.returncode == 2 and "has trained 3 steps; a resume goes on to more steps" in fewer.stderr
        # Sharded, its checkpoint loads only as part of training: refused before the claim (it was refused
        # inside the trainer, after the run was claimed and its model loaded).
        sharded = subprocess.run([*RLHF, "launch", "sft", "--resume-run", "1", "--allow-change",
                                  "--accelerate-config", str(REPO / "configs" / "accelerate" / "fsdp.yaml")],
                                 capture_output=True, text=True, timeout=120, env={**os.environ, "RLHF_GPU_CHECK": "0"})
        assert sharded.returncode == 2 and "checkpoint-3 is at the run's last step, and a run sharded with fsdp" \
            in sharded.stderr, sharded.stderr[-2000:]
        assert run_row(1)["status"] == cut_short
        again = subprocess.run([*RLHF, "train", "sft", "--resume-run", "1"], capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert (run_row(1)["status"], run_row(1)["step"]) == ("done", 3)  # not 4/3
        assert max(s for s, _ in metric(1, "loss")) <= 3  # no step trained past the end
        AutoModelForCausalLM.from_pretrained(final)  # whole
        with Store(os.environ["RLHF_DB"]) as store:
            assert any(c["path"] == str(final) and c["step"] == 3 for c in store.checkpoints(1))


def test_a_stop_says_what_it_will_leave_for_the_run_it_is_asked_of():
    from engine.run_facts import stop_outcome

    assert stop_outcome({"stage": "sft", "step": 12}) == "it saves a checkpoint and ends"
    # Still loading its model, or pending: a stop ends it with nothing saved ("r" would find no checkpoint).
    assert stop_outcome({"stage": "ppo", "step": None}).startswith("it has not trained a step yet")
    # Running at step 0: its first step may be under way, and a stop then saves it ("just ends" was wrong).
    assert stop_outcome({"stage": "sft", "step": 0, "status": "running"}).startswith(
        "in its first step, it saves a checkpoint after it and ends")
    assert stop_outcome({"stage": "eval", "step": 30}).startswith("it ends after the batch in hand")


def test_rlhf_stop_stops_a_run_from_another_terminal(workdir):
    """`rlhf stop ID --wait`: as x in the console, from a script: the run saves its checkpoint, ends
    stopped, and the command returns once it has; a run that has ended has nothing to stop."""
    proc = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=400", "--set",
                             "train.logging_steps=1", "--set", "train.save_steps=1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: os.path.exists(os.environ["RLHF_DB"]) and len(metric(1, "loss")) >= 2)
        stopped = subprocess.run([*RLHF, "stop", "1", "--wait"], capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        assert "run 1: stop asked; it saves a checkpoint and ends\n" in stopped.stdout  # training: said so alone
        assert stopped.stdout.strip().endswith("run 1: stopped")
        assert proc.wait(timeout=60) == 143
        with Store(os.environ["RLHF_DB"]) as store:
            assert store.checkpoints(1)[-1]["step"] == run_row(1)["step"]
    finally:
        proc.kill()
    again = subprocess.run([*RLHF, "stop", "1"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == "run 1 is stopped: nothing to stop\n"  # a script's stop

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a run whose processes died unrecorded
    started = process_start(dead.pid)
    dead.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        gone = store.create_run(stage="sft", name="killed", recipe="", config="{}")
        store.update_run(gone, status="running", pid=dead.pid, pgid_started=started)
    found = subprocess.run([*RLHF, "stop", str(gone), "--wait"], capture_output=True, text=True, timeout=60)
    assert found.returncode == 1 and f"run {gone}: its processes were already gone" in found.stdout
    assert run_row(gone)["status"] == "failed" and run_row(gone)["orphaned"] is not None


def test_a_runs_log_copy_holds_a_librarys_own_warnings_too(tmp_path):
    """transformers logs through a handler of its own, made at its import with the stderr of that moment,
    that does not propagate: an in-process run's train.log must hold its warnings as a launched run's does."""
    import logging

    from engine.run import _log_copy

    library = logging.getLogger("some_library_of_its_own")
    library.propagate = False
    own = logging.StreamHandler(sys.stderr)
    library.addHandler(own)
    try:
        with _log_copy(tmp_path / "train.log"):
            library.warning("There were missing keys in the checkpoint")
    finally:
        library.removeHandler(own)
    assert own.stream is sys.stderr  # put back as it was
    assert "There were missing keys in the checkpoint" in (tmp_path / "train.log").read_text(encoding="utf-8")


def test_rlhf_stop_wait_kills_a_run_that_does_not_end_within_the_grace_period_and_says_so(workdir):
    """A run that takes the stop but never ends (hung in a collective, a save that never returns): after
    RLHF_STOP_GRACE_S its group is killed, and the row says it was killed before its checkpoint."""
    import threading

    ignores = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                "time.sleep(600)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert ignores.stdout.readline() == "ready\n"
    reaper = threading.Thread(target=ignores.wait, daemon=True)  # as the shell that started it would
    reaper.start()
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="hung", recipe="", config="{}")
        store.update_run(run_id, status="running", started=time.time(), segments=json.dumps([[time.time(), None]]))
        store.set_process(run_id, ignores.pid, ignores.pid, process_start(ignores.pid))
    try:
        stopped = subprocess.run([*RLHF, "stop", str(run_id), "--wait"], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "RLHF_STOP_GRACE_S": "1"})
        reaper.join(timeout=30)
        assert ignores.returncode == -signal.SIGKILL  # killed by the command (the clean-up below comes later)
    finally:
        ignores.kill()
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert f"run {run_id}: still running 1 s after the stop: killed" in stopped.stdout
    row = run_row(run_id)
    assert row["status"] == "failed" and row["error"].startswith("killed by rlhf stop") and row["stop_requested"]
    assert stopped.stdout.strip().endswith(f"run {run_id}: failed (killed by rlhf stop: still running 1 s after "
                                           "its stop, before its checkpoint was recorded; resume it from its "
                                           "newest complete checkpoint)")


def test_a_run_whose_supervisor_was_killed_stops_ends_for_good_and_resumes(workdir):
    """kill -9 of the supervisor alone (or of a pipeline's process): the run trains on, and a stop must
    still end it for good: its trainer records stopped, nobody records the exit, a look sees both gone."""
    run = prepare("sft", str(TINY), ["train.max_steps=400", "train.logging_steps=1", "train.save_steps=1000"],
                  str(ACCEL / "cpu.yaml"))
    supervisor = start_detached(run)
    wait(lambda: len(metric(run.run_id, "loss")) >= 2)
    assert run_row(run.run_id)["supervisor_pid"] == supervisor
    os.kill(supervisor, signal.SIGKILL)  # not collected by this test: a zombie, dead all the same
    stopped = subprocess.run([*RLHF, "stop", str(run.run_id), "--wait"], capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr[-2000:]
    assert stopped.stdout.strip().endswith(f"run {run.run_id}: stopped")
    row = run_row(run.run_id)
    assert row["status"] == "stopped" and row["exit_code"] == 143 and row["orphaned"] is None
    check_resumable(os.environ["RLHF_DB"], run.run_id, "sft")  # not "still shutting down", for ever


def test_an_ended_run_keeps_waiting_for_a_live_supervisor_or_a_recent_end(workdir):
    """Its exit is left to its supervisor while it lives; a row from before supervisors were recorded is
    left alone for a while after its end, then closed."""
    from engine.run import UNRECORDED_AFTER_S, settle_active

    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    started = process_start(gone.pid)
    gone.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        ids = [store.create_run(stage="sft", name=name, recipe="", config="{}")
               for name in ("alive", "old", "older", "bad input")]
        for run_id in ids:  # its start recorded: a later process given the pid is not taken for it
            store.update_run(run_id, status="stopped", launch="{}", pgid=gone.pid, pgid_started=started,
                             ended=time.time())
        store.update_run(ids[0], supervisor_pid=os.getpid(), supervisor_started=process_start(os.getpid()))
        store.update_run(ids[2], ended=time.time() - UNRECORDED_AFTER_S - 1)
        # a trainer that failed on bad input meant 2, whoever records its exit
        store.update_run(ids[3], status="failed", failure_code=2, ended=time.time() - UNRECORDED_AFTER_S - 1)
        assert settle_active(store) == ids[2:]
        assert [store.run(run_id)["exit_code"] for run_id in ids] == [None, None, 143, 2]
        # the trainer's record stands
        assert [store.run(run_id)["status"] for run_id in ids] == ["stopped"] * 3 + ["failed"]


def test_a_group_whose_only_process_is_a_zombie_is_gone():
    """Dead, its exit not collected by its parent (a console that started it, an init that does not
    reap): the kernel still answers for the group, but nothing of the run is alive."""
    from engine.procs import group_alive, process_alive, run_processes_gone, same_group

    zombie = subprocess.Popen(["sleep", "600"], start_new_session=True)
    started = process_start(zombie.pid)
    try:
        assert group_alive(zombie.pid) and same_group(zombie.pid, started)
        os.kill(zombie.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _state(zombie.pid) != "Z":
            time.sleep(0.05)
        assert _state(zombie.pid) == "Z"
        assert not group_alive(zombie.pid) and not same_group(zombie.pid, started)
        assert not process_alive(zombie.pid, started)
        assert run_processes_gone({"pgid": zombie.pid, "pgid_started": started})
    finally:
        zombie.kill()
        zombie.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0].decode()


def test_rlhf_stop_wait_on_a_run_that_recorded_its_end_waits_for_its_processes(workdir):
    """Its trainer recorded `stopped` but its processes are still there (still writing, or hung): `nothing to
    stop`, and --wait returns only once its record is final (here: killed after the grace period, its
    supervisor long gone). A failed run: nothing to stop, and --wait says how it failed (exit 1)."""
    import threading

    lingering = subprocess.Popen(["sleep", "600"], start_new_session=True)
    threading.Thread(target=lingering.wait, daemon=True).start()  # reaped as its shell would
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_started = process_start(dead.pid)
    dead.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        stopped = store.create_run(stage="sft", name="stopped", recipe="", config="{}")
        store.update_run(stopped, status="stopped", launch="{}", ended=time.time(), pgid=lingering.pid,
                         pgid_started=process_start(lingering.pid), supervisor_pid=dead.pid,
                         supervisor_started=dead_started)
        failed = store.create_run(stage="sft", name="failed", recipe="", config="{}")
        store.update_run(failed, status="failed", error="Traceback\n  ...\nValueError: bad batch\n")
    env = {**os.environ, "RLHF_STOP_GRACE_S": "1"}
    try:
        waited = subprocess.run([*RLHF, "stop", str(stopped), "--wait"], capture_output=True, text=True,
                                timeout=120, env=env)
    finally:
        lingering.kill()
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert waited.stdout.splitlines() == [f"run {stopped} is stopped: nothing to stop",
                                          f"run {stopped}: still running 1 s after the stop: killed",
                                          f"run {stopped}: stopped"]
    row = run_row(stopped)
    assert row["status"] == "stopped" and row["exit_code"] == 143  # final: a resume may take it

    plain = subprocess.run([*RLHF, "stop", str(failed)], capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout) == (0, f"run {failed} is failed: nothing to stop\n")
    waited = subprocess.run([*RLHF, "stop", str(failed), "--wait"], capture_output=True, text=True, timeout=60)
    assert waited.returncode == 1 and waited.stdout.splitlines()[-1] == f"run {failed}: failed (ValueError: bad batch)"


def test_a_run_in_a_terminal_that_goes_away_keeps_training_or_stops_with_its_checkpoint(workdir):
    """`rlhf train ... | head -1` has read all it wanted: the run goes on to its end, its log whole. A hang-up
    (the SSH connection dropped) stops it as Ctrl-C does: a checkpoint, then `stopped`, not killed unsaved."""
    piped = subprocess.Popen([*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=4", "--set",
                              "train.logging_steps=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piped.stdout.readline()
    piped.stdout.close()  # as `head -1` exits
    piped.stderr.close()
    assert piped.wait(timeout=300) == 0
    row = run_row(1)
    assert row["status"] == "done" and row["step"] == 4
    assert (Path(row["output_dir"]) / "train.log").read_text(encoding="utf-8").count("'loss'") == 4  # all of it

    assert _hung_up(2, [], ["train.max_steps=400", "train.save_steps=1000"]) == 143
    row = run_row(2)
    assert row["status"] == "stopped" and row["exit_code"] == 143
    with Store(os.environ["RLHF_DB"]) as store:
        assert store.checkpoints(2)[-1]["step"] == row["step"] < 400

    # Under nohup the hang-up was meant to be outlived: the run goes on to its end.
    assert _hung_up(3, ["nohup"], ["train.max_steps=40"]) == 0
    assert run_row(3)["status"] == "done" and run_row(3)["step"] == 40


def _hung_up(run_id: int, before: list[str], overrides: list[str]) -> int:
    """`rlhf train sft` (after `before`, e.g. nohup) sent a hang-up once it has logged two steps; its exit code."""
    sets = [arg for item in ["train.logging_steps=1", *overrides] for arg in ("--set", item)]
    # As from a login shell: a hang-up's default action, whatever this suite inherited (under nohup, the
    # run would take an ignored hang-up as meant to be outlived, and train to its end).
    proc = subprocess.Popen([*before, *RLHF, "train", "sft", str(TINY), *sets], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        wait(lambda: len(metric(run_id, "loss")) >= 2)
        proc.send_signal(signal.SIGHUP)
        return proc.wait(timeout=300)
    finally:
        proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be another user for a moment")
def test_a_resume_of_a_run_whose_folder_this_user_cannot_read_says_so():
    """A teammate's run on a shared runs.db: its checkpoint is there, in a folder only its owner reads
    ("has no checkpoint" sent the teammate looking for a save that exists)."""
    from tests.helpers import as_user, shared_folder

    with shared_folder() as shared:
        db = shared / "runs.db"
        folder = shared / "runs" / "1"
        (folder / "checkpoint-4").mkdir(parents=True)
        (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
        folder.chmod(0o700)
        with Store(db) as store:
            run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                      output_root=str(shared / "registered"))
            store.update_run(run_id, status="stopped", exit_code=143, output_dir=str(folder))
        for file in shared.glob("runs.db*"):
            file.chmod(0o666)
        check_resumable(db, run_id, "sft")  # its owner may
        with as_user(65534), pytest.raises(RecipeError) as raised:
            check_resumable(db, run_id, "sft")
        assert str(raised.value) == (f"run {run_id}: its folder {folder} cannot be read by this user (permission "
                                     "denied): resume it as its owner")


def test_a_detached_process_leaves_no_zombie_in_the_process_that_started_it(tmp_path):
    """The console starts runs, pipelines and evaluation resumes detached and lives on for days: each one
    that ended stayed in its process table as <defunct> until the next start."""
    from engine.procs import spawn_detached

    with open(tmp_path / "out.log", "ab") as log:
        pid, started = spawn_detached([sys.executable, "-c", "import time; time.sleep(0.5); print('done')"], log)
    assert started is not None and os.getsid(pid) == pid  # a session of its own
    wait(lambda: process_start(pid) != started, 60)  # reaped, not <defunct> (nor its pid taken by another)
    assert (tmp_path / "out.log").read_text() == "done\n"


def test_why_a_run_cannot_resume_is_said_as_it_is(tmp_path):
    """Each refusal names its own cause: a run stopped after steps but before its first checkpoint (its save
    cut short) is not offered a resume, one stopped before its first step starts over, a folder that is
    gone says so (not "no checkpoint in" it), and a run another command has just claimed is being resumed,
    not "pending (pid None)"."""
    from engine.config import load_recipe
    from engine.run import after_stop, check_resumable, resume_recipe

    db = tmp_path / "runs.db"
    with Store(db) as store:
        early = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                 output_root=str(tmp_path / "runs"))
        store.update_run(early, status="stopped", ended=1.0, step=3)
        moved = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                 output_root=str(tmp_path / "runs"))
        store.update_run(moved, status="failed", ended=1.0, step=1)
        claimed = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                   output_root=str(tmp_path / "runs"))
        config = load_recipe(TINY).model_dump_json()
        unstarted = store.create_run(stage="sft", name="t", recipe=str(TINY), config=config,
                                     output_root=str(tmp_path / "runs"))
        store.update_run(unstarted, status="stopped", ended=1.0)
    said = after_stop("sft", early, db)
    assert "before its first checkpoint" in said and "--resume-run" not in said
    with pytest.raises(RecipeError, match=f"run {early} has no checkpoint in .* to resume from"):
        check_resumable(db, early, "sft")
    with Store(db) as store:  # a start over decided before it trained: its claim then fails
        assert not store.claim_for_resume(early, untrained=True) and store.run(early)["status"] == "stopped"
    # Nothing trained: started over from its recorded recipe, in its own row.
    said = after_stop("sft", unstarted, db)
    assert said == f"it stopped before its first step: nothing was trained; start it over with: rlhf train sft " \
                   f"--resume-run {unstarted} --db {db}"
    shutil.rmtree(tmp_path / "runs" / str(unstarted))  # nothing in it to lose: made again
    _, overrides, change = resume_recipe(db, unstarted, "sft", [])
    assert overrides == ["sft.resume_from_checkpoint=false"] and change is None
    with pytest.raises(RecipeError, match="add --allow-change to start it over with the change"):
        resume_recipe(db, unstarted, "sft", ["sft.train.lr=0.5"])
    with pytest.raises(RecipeError, match="has no checkpoint \\(it ended before its first step\\); leave the item"):
        resume_recipe(db, unstarted, "sft", [f"sft.resume_from_checkpoint={tmp_path}/runs/{unstarted}/checkpoint-1"])
    (tmp_path / "runs" / str(early) / "checkpoint-2").mkdir()
    (tmp_path / "runs" / str(early) / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert after_stop("sft", early, db, "launch") == f"continue it with: rlhf launch sft --resume-run {early} --db {db}"

    shutil.rmtree(tmp_path / "runs" / str(moved))
    gone = rf"run {moved}: its folder .*/runs/{moved} does not exist \(moved or deleted\?\)"
    with pytest.raises(RecipeError, match=gone):
        check_resumable(db, moved, "sft")
    with pytest.raises(RecipeError, match=f"run {claimed} is being started or resumed by another command"):
        check_resumable(db, claimed, "sft")  # pending, no process yet: as a registration leaves it
    # A resume's claim names the claiming command until it starts the run: one that died before then (a
    # ctrl+c while the model loads) leaves a row the next look closes, not one pending for good.
    from engine.run import settle_active

    claim = f"from engine.store import Store; assert Store({str(db)!r}).claim_for_resume({early})"
    subprocess.run([sys.executable, "-c", claim], cwd=REPO, check=True, timeout=60)
    with Store(db) as store:
        assert store.run(early)["status"] == "pending"
        assert settle_active(store) == [early] and store.run(early)["status"] == "failed"
    assert check_resumable(db, early, "sft")["id"] == early


def test_a_launched_run_stopped_in_its_set_up_starts_over_in_its_own_row(workdir):
    """Registered and stopped before its processes trained a step (as a stop during set-up leaves it): the
    resume runs it from its first step, under its id, from its recorded recipe, and says so."""
    run = prepare("sft", str(TINY), ["train.max_steps=2", "train.logging_steps=1"], str(ACCEL / "cpu.yaml"))
    with Store(os.environ["RLHF_DB"]) as store:
        store.update_run(run.run_id, status="stopped", exit_code=143, ended=time.time())
    resumed = subprocess.run([*RLHF, "launch", "sft", "--resume-run", str(run.run_id), "--detach"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.startswith(f"run {run.run_id} started over; its log: ")
    wait(lambda: run_row(run.run_id)["status"] not in ("pending", "running"), 300)
    row = run_row(run.run_id)
    assert (row["status"], row["step"]) == ("done", 2) and [s for s, _ in metric(run.run_id, "loss")] == [1, 2]
    with Store(os.environ["RLHF_DB"]) as store:
        assert [r["id"] for r in store.runs()] == [run.run_id]


def test_a_resume_from_a_checkpoint_runs_db_never_recorded_says_the_history_has_a_gap(tmp_path, caplog):
    """A copy of runs.db resumed the run into the same folder (or the writes were lost): the newest
    checkpoint is past everything this runs.db recorded. Continuing from it is right; the gap is said."""
    from engine.run import RunHandle, warn_if_unrecorded

    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                  output_root=str(tmp_path / "runs"))
        folder = Path(store.run(run_id)["output_dir"])
        store.update_run(run_id, status="stopped", step=85)
        store.add_checkpoint(run_id, 85, str(folder / "checkpoint-85"))
        handle = RunHandle(run_id, folder, store)
        with caplog.at_level("WARNING", logger="engine.run"):
            warn_if_unrecorded(handle, folder / "checkpoint-85", 85)  # recorded
            warn_if_unrecorded(handle, folder / "checkpoint-80", 80)  # older than the record: nothing lost
            assert not caplog.records
            warn_if_unrecorded(handle, folder / "checkpoint-333", 333)
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder}/checkpoint-333 (step 333) is not in runs.db's record of run {run_id}, whose newest recorded step "
        "is 85: steps 86-333 were trained without this runs.db recording them (another copy of runs.db resumed "
        "the run, or its writes were lost); its history will have a gap there. To continue from a recorded "
        "checkpoint instead: --set resume_from_checkpoint=DIR"]


def test_a_change_takes_the_step_its_resume_goes_on_from(tmp_path):
    """A change recorded at step 14, then a resume from checkpoint-10 (a damaged newest one passed over):
    steps 11-14 train again with the changed settings, so the change is from step 10 (it said 14)."""
    from engine.run import RunHandle, continue_from

    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                  output_root=str(tmp_path / "runs"))
        folder = Path(store.run(run_id)["output_dir"])
        store.update_run(run_id, status="stopped", step=14, changes=json.dumps([
            {"step": 14, "at": 1.0, "set": ["train.lr=5e-4"], "fields": ["sft.train.lr (0.001 -> 0.0005)"]},
            {"step": None, "at": 2.0, "set": ["train.epochs=4"], "fields": ["sft.train.epochs (2 -> 4)"]}]))
        continue_from(RunHandle(run_id, folder, store), folder / "checkpoint-10", 10)
        assert [c["step"] for c in json.loads(store.run(run_id)["changes"])] == [10, 10]
        continue_from(RunHandle(run_id, folder, store), folder / "checkpoint-12", 12)  # later: left as it is
        assert [c["step"] for c in json.loads(store.run(run_id)["changes"])] == [10, 10]


def test_a_rank_whose_launcher_died_while_it_started_ends_itself(tmp_path):
    """The launcher killed while its ranks import (seconds on a shared filesystem): a rank then has the
    reaper for a parent, and asking to end with it would never fire: it registered under pid 1, unseen by
    the supervisor, and trained on. It ends itself instead, before it registers."""
    from engine.procs import RANKS_ENV, SUPERVISOR_ENV

    rank = ("import os, pathlib, sys, time\n"
            "folder = pathlib.Path(sys.argv[1])\n"
            "while os.getppid() == int(sys.argv[2]):\n"  # its slow start: until the launcher is gone
            "    time.sleep(0.01)\n"
            "from engine.procs import register_rank\n"
            "register_rank()\n"
            "(folder / 'survived').touch()\n")
    launcher = ("import subprocess, sys, os\n"
                "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], str(os.getpid())],"
                " start_new_session=True)\n")  # and ends at once, as a launcher killed
    env = {**os.environ, RANKS_ENV: str(tmp_path / ".ranks"), SUPERVISOR_ENV: str(os.getpid()),
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", launcher, rank, str(tmp_path)], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / "survived").exists() and subprocess.run(
            ["pgrep", "-f", f"{tmp_path}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not (tmp_path / "survived").exists() and not (tmp_path / ".ranks").exists()
