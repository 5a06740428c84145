"""Runs through the real `accelerate launch`: one CPU process, and two gloo ranks through torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from engine.launch import accelerate_argv, prepare, run_foreground
from engine.store import Store
from tests.conftest import REPO, RLHF, TINY
from tests.helpers import metric, run_row

ACCEL = REPO / "configs" / "accelerate"


def follow(db: str, stop: threading.Event, seen: list) -> None:
    """A console-style reader: poll seq > last until told to stop, then once more."""
    with Store(db) as reader:
        last = 0
        while True:
            finished = stop.is_set()
            for row in reader.metrics_since(last):
                seen.append(row)
                last = row["seq"]
            if finished:
                return
            time.sleep(0.05)


@pytest.mark.parametrize("config, world", [("cpu.yaml", 1), ("cpu_ddp.yaml", 2)])
def test_accelerate_launch_writes_every_metric_once(workdir, config, world):
    db = os.environ["RLHF_DB"]
    seen: list = []
    stop = threading.Event()
    reader = threading.Thread(target=follow, args=(db, stop, seen))
    reader.start()
    try:
        run_id, code = run_foreground("sft", str(TINY), ["train.max_steps=6", "train.logging_steps=1"],
                                      str(ACCEL / config), echo=False)
    finally:
        stop.set()
        reader.join()
    assert code == 0
    run = run_row(run_id)
    assert run["status"] == "done" and run["exit_code"] == 0 and run["world_size"] == world
    assert run["pgid"] == run["pid"]
    log = (Path(run["output_dir"]) / "train.log").read_text()
    assert "sft data:" in log

    with Store(db) as store:
        rows = store.metrics_since(0, run_id=run_id)
    assert [r["run_seq"] for r in rows] == list(range(1, len(rows) + 1))  # no gap, no duplicate
    assert [r["seq"] for r in seen if r["run_id"] == run_id] == [r["seq"] for r in rows]  # the reader saw each once
    assert [s for s, _ in metric(run_id, "loss")] == [1, 2, 3, 4, 5, 6]  # rank 0 only: one row per step


def test_two_ranks_split_the_data(workdir):
    """One epoch of 60 conversations at 16 per rank: 4 steps on one rank, 2 on two (the last of them
    filled up with 4 repeats, which the log says)."""
    data = ["sft.data=[{path: demo/data/sft_alpaca.jsonl, limit: 30, weight: 2}]",
            "train.eval_ratio=0", "train.epochs=1"]
    one, _ = run_foreground("sft", str(TINY), data, str(ACCEL / "cpu.yaml"), echo=False)
    two, _ = run_foreground("sft", str(TINY), data, str(ACCEL / "cpu_ddp.yaml"), echo=False)
    assert (run_row(one)["total_steps"], run_row(two)["total_steps"]) == (4, 2)
    assert (run_row(one)["world_size"], run_row(two)["world_size"]) == (1, 2)
    logs = [(Path(run_row(r)["output_dir"]) / "train.log").read_text(encoding="utf-8") for r in (one, two)]
    said = ("sft: 60 training rows in batches of 32 (2 processes x 16): the last batch of each epoch repeats 4 "
            "of them (accelerate gives every process a whole batch), 7 % more rows an epoch")
    assert said not in logs[0] and logs[1].count(said) == 1  # rank 0's
    # The global batch a learning rate goes with, said once
    assert logs[0].count("sft: 60 training rows; an optimiser step takes 16 (1 process x train.batch_size 16 x "
                         "train.grad_accum 1)") == 1
    assert logs[1].count("sft: 60 training rows; an optimiser step takes 32 (2 processes x train.batch_size 16 x "
                         "train.grad_accum 1)") == 1
    # The other rank's lines say which they are (both wrote the same lines, unprefixed, into one log)
    assert "[rank 1] INFO engine.hf_trainer: sft data: " in logs[1] and "[rank 1]" not in logs[0]
    # Its card says how to resume it as it was started (`rlhf train` refuses a run of two processes)
    card = (Path(run_row(two)["output_dir"]) / "README.md").read_text(encoding="utf-8")
    assert f"`rlhf launch sft --resume-run {two} --db {Path(os.environ['RLHF_DB']).resolve()}`" in card


def test_the_process_count_takes_accelerates_spelling_too():
    from engine.cli import build_parser

    for spelling in ("--num-processes", "--num_processes"):
        for command in (["launch", "sft", "r.yaml"], ["pipeline", "r.yaml"]):
            assert build_parser().parse_args([*command, spelling, "3"]).num_processes == 3


def test_argv_has_no_shell_and_carries_overrides():
    argv = accelerate_argv("rm", "r.yaml", ["train.lr=1e-5", "name=a b"], "c.yaml", 2, "x.db")
    assert argv[:3] == [sys.executable, "-m", "engine.accelerate_launcher"]
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("-m", 3):][:4] == ["-m", "engine.train", "rm", "r.yaml"]
    assert "name=a b" in argv and argv[-2:] == ["--db", "x.db"]


def test_a_crashing_run_is_recorded_as_failed_with_its_exit_code(workdir):
    (workdir / "broken").mkdir()
    # Looks like a model to validation; is not one that transformers can load.
    (workdir / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (workdir / "broken" / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # whole, and empty
    shutil.copy(workdir / "demo" / "model" / "tokenizer.json", workdir / "broken")
    run_id, code = run_foreground("sft", str(TINY), ["model.path=broken"], str(ACCEL / "cpu.yaml"), echo=False)
    assert code != 0
    run = run_row(run_id)
    assert run["status"] == "failed" and run["exit_code"] == code
    assert "Traceback" in (Path(run["output_dir"]) / "train.log").read_text()


def test_bad_input_found_after_registering_is_exit_2_in_the_record_and_on_the_command_line(workdir):
    """A malformed row past what the check before registering reads (its first 200 records), under
    --strict-data: `accelerate launch` ends 1 whatever its child's code; the trainer meant 2 (bad input), and
    its one-line error, not a traceback through the trainer, is what runs.db and the log's jump give."""
    from console.logtail import last_traceback

    rows = [f'{{"prompt": "q{i}", "chosen": "a", "rejected": "b"}}' for i in range(300)]
    (workdir / "pairs.jsonl").write_text("\n".join([*rows, '{"prompt": "x", "chosen": "a" "rejected": "b"}']) + "\n")
    result = subprocess.run([*RLHF, "launch", "rm", str(TINY), "--accelerate-config", str(ACCEL / "cpu.yaml"),
                             "--strict-data", "--set", "rm.data=[{path: pairs.jsonl}]", "--set", "train.max_steps=1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    run = run_row(1)
    assert run["status"] == "failed" and run["exit_code"] == 2, run
    assert run["error"].startswith("error: pairs.jsonl:301: not valid JSON") and "Traceback" not in run["error"]
    lines = (Path(run["output_dir"]) / "train.log").read_text().splitlines()
    assert lines[last_traceback(lines)].startswith("error: pairs.jsonl:301"), lines[-12:]


def test_sigterm_saves_a_checkpoint_and_resume_continues(workdir):
    args = [*RLHF, "train", "sft", str(TINY), "--set", "train.max_steps=2000", "--set", "train.logging_steps=1",
            "--set", "train.save_steps=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists("runs.db") and _logged_steps(1) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: stopped, not finished
    run = run_row(1)
    assert run["status"] == "stopped"
    stopped_at = run["step"]
    with Store(os.environ["RLHF_DB"]) as store:
        (checkpoint,) = store.checkpoints(1)
    assert checkpoint["step"] == stopped_at and Path(checkpoint["path"]).is_dir()

    resumed = subprocess.run([*RLHF, "train", "sft", str(TINY), "--resume-run", "1", "--allow-change", "--set",
                              f"train.max_steps={stopped_at + 2}", "--set", "train.logging_steps=1"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [s for s, _ in metric(1, "loss")]
    assert steps == list(range(1, stopped_at + 3))  # continues without a gap or a repeated step
    assert run_row(1)["status"] == "done"


def test_sigterm_through_launch_stops_both_ranks_at_the_same_step(workdir):
    """The stop reaches every rank; they agree on the step (an all-reduce) and save one checkpoint."""
    # A config that says 4 processes, launched with 2: what the run trained with is what --num-processes said.
    four = Path("ddp4.yaml")
    four.write_text((ACCEL / "cpu_ddp.yaml").read_text().replace("num_processes: 2", "num_processes: 4"))
    args = [*RLHF, "launch", "sft", str(TINY), "--accelerate-config", str(four), "--num-processes", "2",
            "--set", "train.max_steps=2000", "--set", "train.logging_steps=1", "--set", "train.save_steps=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists("runs.db") and _logged_steps(1) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to the run's process group
    proc.wait(timeout=180)
    run = run_row(1)
    assert run["status"] == "stopped" and run["world_size"] == 2 and run["exit_code"] is not None
    with Store(os.environ["RLHF_DB"]) as store:
        (checkpoint,) = store.checkpoints(1)
    assert checkpoint["step"] == run["step"] < 2000
    saved = Path(checkpoint["path"])
    assert (saved / "model.safetensors").is_file() and (saved / "trainer_state.json").is_file()
    # torchrun reports the signal it got with a traceback of its own; none may come from our code.
    log = (Path(run["output_dir"]) / "train.log").read_text()
    frames = [line for line in log.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "/engine/" in f]

    # A resume on one process would halve its global batch mid-run: refused, the run left as it was.
    refused = subprocess.run([*RLHF, "launch", "sft", "--resume-run", "1", "--accelerate-config",
                              str(ACCEL / "cpu.yaml")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "run 1 trained with 2 processes; " in refused.stderr, refused.stderr[-2000:]
    assert "--allow-change" in refused.stderr and run_row(1)["status"] == "stopped"
    assert "Resume it without --accelerate-config (it takes the run's own)" in refused.stderr
    # Only --num-processes given: the advice names that option (it named --accelerate-config, not given)
    from engine.config import RecipeError

    with pytest.raises(RecipeError, match=r"Resume it without --num-processes \(it takes the run's own\)"):
        prepare("sft", None, [], None, num_processes=1, resume_run=1)
    assert run_row(1)["status"] == "stopped"
    alone = subprocess.run([*RLHF, "train", "sft", "--resume-run", "1"], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "trained with 2 processes; rlhf train runs one" in alone.stderr, alone.stderr
    # Without --accelerate-config, the run's own, with as many processes as it trained with (the console's r
    # does the same), whatever its config file says by now.
    again = prepare("sft", None, [], None, resume_run=1)
    assert str(four.resolve()) in again.argv and run_row(1)["status"] == "pending"
    assert again.argv[again.argv.index("--num_processes") + 1] == "2"
    with Store(os.environ["RLHF_DB"]) as store:  # as if that resume had ended at once
        store.update_run(1, status="stopped", exit_code=0)
    # Its own config given again: with the process count it was launched with too, not the file's 4.
    same = prepare("sft", None, [], str(four), resume_run=1)
    assert same.argv[same.argv.index("--num_processes") + 1] == "2"
    # On one process, allowed: recorded as a change of the run, with the launch it started with (its row's
    # launch becomes the resume's), which y's command keeps
    with Store(os.environ["RLHF_DB"]) as store:
        store.update_run(1, status="stopped", exit_code=0)
    prepare("sft", None, [], None, num_processes=1, resume_run=1, allow_change=True)
    row = run_row(1)
    (entry,) = json.loads(row["changes"])
    assert entry["fields"] == ["processes (2 -> 1)"] and json.loads(entry["launch"])["num_processes"] == 2
    assert json.loads(row["launch"])["num_processes"] == 1
    from console.screens.runs import command_line

    line = command_line(row, os.environ["RLHF_DB"])
    assert "--num-processes 2 --db " in line and line.endswith("# then resumed with --allow-change next: processes "
                                                               "(2 -> 1)")


def test_resume_refuses_what_cannot_be_resumed(workdir):
    def resume(stage: str, run_id: int) -> subprocess.CompletedProcess:
        return subprocess.run([*RLHF, "train", stage, str(TINY), "--resume-run", str(run_id)],
                              capture_output=True, text=True, timeout=120)

    Store(os.environ["RLHF_DB"]).close()  # a runs.db without that run (none at all is said as that)
    result = resume("sft", 7)
    assert result.returncode == 2 and "no run 7" in result.stderr
    run_id, _ = run_foreground("sft", str(TINY), ["train.max_steps=1", "train.save_steps=1000"],
                               str(ACCEL / "cpu.yaml"), echo=False)
    result = resume("rm", run_id)
    assert result.returncode == 2 and f"run {run_id} is an SFT run, not an RM run" in result.stderr
    for folder in Path(run_row(run_id)["output_dir"]).glob("checkpoint-*"):
        import shutil

        shutil.rmtree(folder)
    result = resume("sft", run_id)
    assert result.returncode == 2 and "has no checkpoint" in result.stderr
    # The recipe given beside --resume-run is not what resumes: said, so that an edit to it is not believed applied
    assert f"note: {TINY} is not read: a resume continues run {run_id}'s recorded recipe" in result.stderr
    assert run_row(run_id)["status"] == "done"  # a refused resume leaves the run as it was


def test_lora_with_parameter_sharding_is_refused_before_launch(workdir):
    from engine.config import RecipeError
    from engine.launch import prepare

    with pytest.raises(RecipeError, match="sft.lora: merging adapters is not supported"):
        prepare("sft", str(TINY), ["sft.lora={r: 4}"], str(ACCEL / "zero3.yaml"))
    assert not (workdir / "runs.db").exists()


def test_launches_that_would_not_run_as_asked_are_refused_before_anything_is_registered(workdir, monkeypatch):
    from engine.config import RecipeError, load_recipe
    from engine.launch import check_launch, prepare

    if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/kfd").exists():
        # No GPU here: a GPU config would start its (8) processes on the CPU
        for config in ("gpu.yaml", "ddp.yaml", "zero2.yaml", "multinode.yaml"):
            with pytest.raises(RecipeError, match=rf"{config} runs on GPUs and this machine has none \(.+\): .*"
                                                  r"cpu.yaml or cpu_ddp.yaml \(RLHF_GPU_CHECK=0 skips"):
                prepare("sft", str(TINY), [], str(ACCEL / config))
        monkeypatch.setenv("RLHF_GPU_CHECK", "0")  # the way past the question, for a machine it misjudges
        check_launch("sft", load_recipe(str(TINY), [], "sft"), str(ACCEL / "ddp.yaml"))
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:  # a ZeRO launch died of its ImportError, registered
            with pytest.raises(RecipeError, match=r"zero2.yaml: distributed_type DEEPSPEED, and DeepSpeed is not "
                                                  r"installed here"):
                prepare("sft", str(TINY), [], str(ACCEL / "zero2.yaml"))
        monkeypatch.delenv("RLHF_GPU_CHECK")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # whatever the machine has, none is to be used
    with pytest.raises(RecipeError, match=r"ddp.yaml runs on GPUs and this machine has none \(CUDA_VISIBLE_DEVICES"):
        prepare("sft", str(TINY), [], str(ACCEL / "ddp.yaml"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")

    with pytest.raises(RecipeError, match=r"--num-processes 12: .*cpu.yaml runs one process .*cpu_ddp.yaml"):
        prepare("sft", str(TINY), [], str(ACCEL / "cpu.yaml"), num_processes=12)
    for config in ("zero2.yaml", "zero3.yaml", "fsdp.yaml"):
        with pytest.raises(RecipeError, match=rf"{config}: PPO runs under plain data parallelism only"):
            prepare("ppo", str(TINY), [], str(ACCEL / config))
    empty = workdir / "nomodel"
    empty.mkdir()
    with pytest.raises(RecipeError, match=r"model.path: '.*nomodel' holds no model \(no config.json\)"):
        prepare("sft", str(TINY), [f"model.path={empty}"], str(ACCEL / "cpu.yaml"))
    (empty / "policy").mkdir()  # a PPO checkpoint given whole: where its policy is
    (empty / "policy" / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"holds no model itself \(no config.json\): a PPO checkpoint's policy "
                                          r"is in .*nomodel/policy"):
        prepare("sft", str(TINY), [f"model.path={empty}"], str(ACCEL / "cpu.yaml"))
    adapters = workdir / "adapters"  # a LoRA run's checkpoint: adapters alone ("holds no model" said no more)
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"holds LoRA adapters, not a model \(no config.json\): .* its final folder "
                                          r"is the merged model"):
        prepare("sft", str(TINY), [f"model.path={adapters}"], str(ACCEL / "cpu.yaml"))
    (empty / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"holds no weights"):
        prepare("sft", str(TINY), [f"model.path={empty}"], str(ACCEL / "cpu.yaml"))
    # A model folder copied without its tokenizer, and one whose weights were cut short (a copy or save
    # that did not finish): said before anything loads, not as a tokenizer library's or a header's error.
    import shutil

    untokenized, cut = workdir / "untokenized", workdir / "cut"
    shutil.copytree(workdir / "demo" / "model", untokenized)
    for tokenizer_file in untokenized.glob("tokenizer*"):
        tokenizer_file.unlink()
    with pytest.raises(RecipeError, match=r"'.*untokenized' holds no tokenizer"):
        prepare("sft", str(TINY), [f"model.path={untokenized}"], str(ACCEL / "cpu.yaml"))
    shutil.copytree(workdir / "demo" / "model", cut)
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(RecipeError,
                       match=r"'.*cut' has a damaged weights file \(model.safetensors holds .* bytes, its header says"):
        prepare("sft", str(TINY), [f"model.path={cut}"], str(ACCEL / "cpu.yaml"))
    with pytest.raises(RecipeError, match=r"ppo.reward_model: 'demo/model' is not a reward model"):
        prepare("ppo", str(TINY), ["reward_model=demo/model", "reward_fn=null"], str(ACCEL / "cpu.yaml"))
    assert not (workdir / "runs.db").exists()


def test_other_machines_of_a_multi_node_run_join_without_registering(workdir, monkeypatch):
    from engine.config import RecipeError
    from engine.launch import prepare

    monkeypatch.setenv("RLHF_GPU_CHECK", "0")  # GPU configs on whatever machine runs this: the GPU question aside

    second = workdir / "machine1.yaml"
    second.write_text((ACCEL / "multinode.yaml").read_text().replace("machine_rank: 0", "machine_rank: 1"))
    with pytest.raises(RecipeError, match="machine_rank is 1: pass --run-id"):
        prepare("sft", str(TINY), [], str(second))
    run = prepare("sft", str(TINY), [], str(second), run_id=12)
    assert not run.registered and run.env["RLHF_RUN_ID"] == "12" and run.log_path == Path("runs/12/train.log")
    assert not (workdir / "runs.db").exists() or not Store(workdir / "runs.db").runs()
    with pytest.raises(RecipeError, match="--run-id is for the other machines"):
        prepare("sft", str(TINY), [], str(ACCEL / "multinode.yaml"), run_id=12)


def _logged_steps(run_id: int) -> int:
    try:
        return len(metric(run_id, "loss"))
    except Exception:
        return 0


def test_a_run_that_dies_before_python_gets_its_log_as_the_error(workdir):
    from engine.launch import record_exit

    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
    log = workdir / "train.log"
    log.write_text("x" * 10_000 + "\n/usr/bin/python: No module named engine.train\n")
    assert record_exit(os.environ["RLHF_DB"], run_id, 1, log_path=log) == "failed"
    run = run_row(run_id)
    assert run["exit_code"] == 1 and run["error"].endswith("No module named engine.train\n")
    assert len(run["error"]) <= 4000


def test_stop_is_recorded_before_the_signal_and_refused_for_an_ended_run(workdir):
    from engine.config import RecipeError
    from engine.launch import record_exit, request_stop

    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(run_id, status="running")  # no process group: nothing to signal, still recorded
    assert request_stop(os.environ["RLHF_DB"], run_id) is None
    assert run_row(run_id)["stop_requested"] is not None
    # killed after its grace period before the trainer recorded its checkpoint: the stop did not keep a
    # save, and the record says so instead of "stopped"
    assert record_exit(os.environ["RLHF_DB"], run_id, -9, killed=True) == "failed"
    run = run_row(run_id)
    assert run["exit_code"] == -9 and "before the trainer recorded its checkpoint" in run["error"]
    with pytest.raises(RecipeError, match="is failed: nothing to stop"):
        request_stop(os.environ["RLHF_DB"], run_id)
    with Store(os.environ["RLHF_DB"]) as store:  # the trainer saved and recorded its stop; the launcher
        other = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")  # died of the SIGTERM
        store.update_run(other, status="stopped")
    assert record_exit(os.environ["RLHF_DB"], other, -15, stop_requested=True) == "stopped"
    assert run_row(other)["exit_code"] == 143  # as the README promises, not the launcher's -15
    with Store(os.environ["RLHF_DB"]) as store:  # the stop landed after the trainer recorded its end
        finished = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(finished, status="done")
    assert record_exit(os.environ["RLHF_DB"], finished, -15, stop_requested=True) == "done"
    assert run_row(finished)["exit_code"] == 0 and not run_row(finished)["error"]
    with Store(os.environ["RLHF_DB"]) as store:  # unasked, a non-zero exit after "done" is a rank's failure
        crashed = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(crashed, status="done")
    assert record_exit(os.environ["RLHF_DB"], crashed, 1) == "failed"
    with Store(os.environ["RLHF_DB"]) as store:  # unasked, `accelerate launch` alone killed after "done"
        survived = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(survived, status="done")
    assert record_exit(os.environ["RLHF_DB"], survived, -9) == "done"  # its code says nothing of the ranks
    assert run_row(survived)["exit_code"] == 0


def test_a_stop_reaches_the_run_when_runs_db_cannot_take_the_write(tmp_path):
    """runs.db on a full disk: the moment a clean stop matters most. `rlhf stop` still signals the group the
    row recorded, and says the stop could not be written down. The disk is made full for the stopper alone:
    no file of its may grow (RLIMIT_FSIZE 0), so every SQLite write fails as it does on a full disk."""
    import resource

    from engine.procs import process_start

    db = tmp_path / "runs.db"
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        with Store(db) as store:
            run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                      output_root=str(tmp_path / "runs"))
            store.update_run(run_id, status="running", pid=sleeper.pid, pgid=sleeper.pid,
                             pgid_started=process_start(sleeper.pid))

        def full_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        with Store(db):  # open meanwhile, as a console would be: the stopper need not create the WAL index
            stop = subprocess.run([sys.executable, "-m", "engine.cli", "stop", str(run_id), "--db", str(db)],
                                  cwd=REPO, preexec_fn=full_disk, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert "the stop was signalled, but runs.db could not record it" in stop.stderr
        assert sleeper.wait(60) == -signal.SIGTERM
        assert run_row(run_id, str(db))["stop_requested"] is None  # nothing claims a write that did not happen
    finally:
        sleeper.kill()


# A one-process launcher over a trainer, as `accelerate launch` is: the launcher dies at once on the group's
# SIGTERM; the trainer records its stop in runs.db (where it can) and saves, and ends only when the test
# lets it (the file `release`), so a kill before then is seen.
FAKE_TRAINER = """
import pathlib, signal, sqlite3, sys, time
folder, db, run_id = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def stop(*_):
    (folder / "saving").touch()
    while not (folder / "release").exists():
        time.sleep(0.05)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'stopped' WHERE id = ?", [run_id])
    (folder / "saved").touch()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(folder / "ready").touch()
while True:
    signal.pause()
"""
FAKE_LAUNCHER = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]])"
# As torchrun's agent in a multi-process `accelerate launch`: it catches the SIGTERM and exits 1.
FAKE_AGENT = ("import os, signal, subprocess, sys; signal.signal(signal.SIGTERM, lambda *_: os._exit(1)); "
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]).wait()")


def _supervised_fake_run(tmp_path: Path, launcher: str = FAKE_LAUNCHER) -> tuple[Path, int, subprocess.Popen]:
    """A registered run of FAKE_TRAINER under FAKE_LAUNCHER, its supervisor started as `rlhf launch` starts it
    (engine.launch supervise), once the trainer is ready and its group recorded."""
    from engine.launch import Prepared

    db = tmp_path / "runs.db"
    with Store(db) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                  output_root=str(tmp_path / "runs"))
        store.update_run(run_id, status="running", output_dir=str(tmp_path), launch="{}")  # a launched run
    run = Prepared(run_id, [sys.executable, "-c", launcher, FAKE_TRAINER, str(tmp_path), str(db), str(run_id)],
                   {}, tmp_path / "train.log", True, db)
    supervisor = subprocess.Popen([sys.executable, "-m", "engine.launch", "supervise", str(run.save())], cwd=REPO,
                                  env={**os.environ, "RLHF_LINGER_S": "0"})  # a stray process gets no time at all
    deadline = time.monotonic() + 120
    while not ((tmp_path / "ready").exists() and run_row(run_id, str(db))["pgid"]):
        assert time.monotonic() < deadline and supervisor.poll() is None
        time.sleep(0.05)
    return db, run_id, supervisor


def _kill_group_of(run_id: int, db: Path) -> None:
    """A failed test leaves no fake run behind: its group has a session of its own."""
    from engine.procs import same_group

    row = run_row(run_id, str(db))
    if row["pgid"] and same_group(row["pgid"], row["pgid_started"]):  # never a number since given to another
        with suppress(ProcessLookupError):
            os.killpg(row["pgid"], signal.SIGKILL)


@pytest.mark.parametrize("launcher", [FAKE_LAUNCHER, FAKE_AGENT], ids=["launcher dies of it", "agent exits 1"])
def test_a_stop_runs_db_cannot_record_still_gets_the_grace_period_for_the_save(tmp_path, launcher):
    """The stop was not written down (a full disk), and the launcher ended on it at once (one process: it
    dies of the SIGTERM; torchrun's agent: it exits 1): the stopper tells the supervisor (SIGUSR1), which
    then waits for the trainer's save instead of killing the group as it would stray processes."""
    import resource

    db, run_id, supervisor = _supervised_fake_run(tmp_path, launcher)
    try:
        def full_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        with Store(db):  # open meanwhile, as a console would be: the stopper need not create the WAL index
            stop = subprocess.run([sys.executable, "-m", "engine.cli", "stop", str(run_id), "--db", str(db)],
                                  cwd=REPO, preexec_fn=full_disk, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and "runs.db could not record it" in stop.stderr, stop.stderr
        deadline = time.monotonic() + 120
        while not (tmp_path / "saving").exists():  # killed instead, it never gets here
            assert time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.05)
        (tmp_path / "release").touch()
        supervisor.wait(120)
        assert (tmp_path / "saved").exists()
        assert run_row(run_id, str(db))["status"] == "stopped"
    finally:
        supervisor.kill()
        _kill_group_of(run_id, db)


def test_a_stop_continues_the_supervisor_of_a_launch_paused_with_ctrl_z(tmp_path):
    """ctrl+z on `rlhf launch` stops its supervisor; the run trains on in its own session. A stop ends the
    run, and continues the supervisor too, so that the exit is recorded and `rlhf stop --wait` returns."""
    db, run_id, supervisor = _supervised_fake_run(tmp_path)
    try:
        (tmp_path / "release").touch()  # the save is quick
        os.kill(supervisor.pid, signal.SIGSTOP)
        stop = subprocess.run([sys.executable, "-m", "engine.cli", "stop", str(run_id), "--db", str(db), "--wait"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"run {run_id}: stopped" in stop.stdout
        row = run_row(run_id, str(db))
        assert row["status"] == "stopped" and row["exit_code"] is not None  # the supervisor's record
        assert supervisor.wait(60) is not None
    finally:
        supervisor.kill()
        _kill_group_of(run_id, db)


def test_stop_wait_on_a_full_disk_says_the_run_ended_unrecorded_instead_of_failing(tmp_path):
    """`rlhf stop --wait` with runs.db on a full disk: the run ends on the signal, and closing its row is a
    write the disk refuses. The command says so (exit 1), not a database error (exit 2) after a stop that
    worked."""
    import resource

    from engine.procs import process_start, spawn_detached

    db = tmp_path / "runs.db"
    with open(tmp_path / "out.log", "ab") as log:
        pid, started = spawn_detached(["sleep", "120"], log)  # reaped by its own thread: no zombie to wait for
    try:
        with Store(db) as store:
            run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                      output_root=str(tmp_path / "runs"))
            store.update_run(run_id, status="running", pid=pid, pgid=pid, pgid_started=started)

        def full_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        with Store(db):
            stop = subprocess.run([sys.executable, "-m", "engine.cli", "stop", str(run_id), "--db", str(db), "--wait"],
                                  cwd=REPO, preexec_fn=full_disk, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 1, stop.stdout + stop.stderr
        assert f"run {run_id}: its processes have ended, but runs.db cannot record how" in stop.stdout
        assert process_start(pid) != started  # it did end on the stop
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_stop_reaches_a_run_paused_with_sigstop(tmp_path):
    """A paused process holds a SIGTERM until it is continued: the stop continues it, as a shell's kill does
    for a stopped job, so that it saves and ends instead of waiting out the grace period to be killed."""
    from engine.launch import request_stop
    from engine.procs import process_start

    db = tmp_path / "runs.db"
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        with Store(db) as store:
            run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                      output_root=str(tmp_path / "runs"))
            store.update_run(run_id, status="running", pid=sleeper.pid, pgid=sleeper.pid,
                             pgid_started=process_start(sleeper.pid))
        os.killpg(sleeper.pid, signal.SIGSTOP)
        assert request_stop(db, run_id) == (sleeper.pid, process_start(sleeper.pid))
        assert sleeper.wait(60) == -signal.SIGTERM
    finally:
        sleeper.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a process as another user")
def test_a_stop_of_another_users_run_is_refused_before_it_is_written_down(tmp_path):
    """A shared runs.db: user B's stop of user A's run can reach none of its processes. Written down, it
    would show the run as stopping in every console while it trains on; it is refused, naming the owner."""
    import pwd

    from engine.config import RecipeError
    from engine.launch import request_stop
    from engine.procs import process_start
    from tests.helpers import as_user, shared_folder

    owner, stopper = 65534, 65533  # nobody, and a user with no name
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True, user=owner)
    try:
        with shared_folder() as shared:
            db = shared / "runs.db"
            with Store(db) as store:
                run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                          output_root=str(shared / "runs"))
                store.update_run(run_id, status="running", pid=sleeper.pid, pgid=sleeper.pid,
                                 pgid_started=process_start(sleeper.pid))
            db.chmod(0o666)
            with as_user(stopper), pytest.raises(RecipeError,
                                                 match=f"run {run_id} is {pwd.getpwuid(owner).pw_name}'s: only they"):
                request_stop(db, run_id)
            assert sleeper.poll() is None
            with Store(db) as store:
                assert store.run(run_id)["stop_requested"] is None
            assert request_stop(db, run_id) == (sleeper.pid, process_start(sleeper.pid))  # root may
            assert sleeper.wait(30) == -signal.SIGTERM
    finally:
        sleeper.kill()


def test_a_launcher_killed_by_a_signal_is_told_from_one_that_ended_on_it():
    """torchrun passes a stop's SIGTERM on to the ranks and then exits 143 itself: not killed by it."""
    from engine.launch import killed_by

    assert killed_by(-signal.SIGKILL, "") == "its launcher was killed by SIGKILL (the kernel's OOM killer, or kill -9)"
    assert killed_by(-signal.SIGTERM, "") == "its launcher was killed by SIGTERM"
    assert killed_by(143, "") == "its launcher ended on SIGTERM (exit 143)"
    assert killed_by(1, "") is None


def test_a_run_killed_by_sigkill_says_so_on_the_last_line_of_its_error(workdir):
    """The OOM killer leaves no traceback: the recorded error's last line (what the console pins and
    `rlhf runs` prints) names the signal, whether it hit the launcher or a rank under it."""
    from engine.launch import record_exit

    with Store(os.environ["RLHF_DB"]) as store:
        launcher, rank, plain, peer = (store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
                                       for _ in range(4))
        for run_id in (launcher, rank, plain):
            store.update_run(run_id, status="running")
        # Rank 1 killed: rank 0's trainer recorded the broken collective it saw, as its own failure.
        store.update_run(peer, status="failed", error="RuntimeError: [gloo] Connection closed by peer\n")
    log = workdir / "train.log"
    log.write_text("step 40\n")
    assert record_exit(os.environ["RLHF_DB"], launcher, -9, log_path=log) == "failed"
    assert run_row(launcher)["error"] == ("step 40\nits launcher was killed by SIGKILL (the kernel's OOM killer, "
                                          "or kill -9)")
    log.write_text("step 41\nsubprocess.CalledProcessError: Command '['python', '-m', 'engine.train']' died "
                   "with <Signals.SIGKILL: 9>.")
    assert record_exit(os.environ["RLHF_DB"], rank, 1, log_path=log) == "failed"
    assert run_row(rank)["error"].splitlines()[-1] == ("a process of the run was killed by SIGKILL (the kernel's "
                                                       "OOM killer, or kill -9)")
    # An error of its own: nothing added, though an earlier stretch in the same log was killed.
    earlier = "step 3\nsubprocess.CalledProcessError: ... died with <Signals.SIGKILL: 9>.\n"
    log.write_text(earlier + "ValueError: bad\n")
    assert record_exit(os.environ["RLHF_DB"], plain, 1, log_path=log, log_start=len(earlier)) == "failed"
    assert run_row(plain)["error"] == "ValueError: bad\n"
    log.write_text("step 7\n[rank1]: ...\n  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n")
    assert record_exit(os.environ["RLHF_DB"], peer, 1, log_path=log) == "failed"
    assert run_row(peer)["error"] == ("RuntimeError: [gloo] Connection closed by peer\na process of the run was "
                                      "killed by SIGKILL (the kernel's OOM killer, or kill -9)")


def test_a_stop_through_the_consoles_path_waits_for_a_slow_save(workdir, monkeypatch):
    """One-process launch: accelerate's launcher dies at once on the group's SIGTERM while the trainer
    under it still has seconds of work before its checkpoint. The supervisor learns of the stop from
    runs.db and waits the stop's grace, not the short linger for stray processes."""
    from engine.launch import prepare, request_stop, start_detached

    monkeypatch.setenv("RLHF_LINGER_S", "0.5")  # what a stray process may take; a save takes longer
    run = prepare("ppo", str(TINY), ["reward_fn=tests.ppo_rewards:slow_share_of_letter_a", "steps=50",
                                     "rollout_batch_size=4", "minibatch_size=4", "max_new_tokens=4",
                                     "save_steps=1000"],
                  str(ACCEL / "cpu.yaml"))
    start_detached(run)
    deadline = time.time() + 180
    while time.time() < deadline and len(metric(run.run_id, "kl_ctl_value")) < 1:
        time.sleep(0.2)
    assert request_stop(os.environ["RLHF_DB"], run.run_id) is not None  # as the console's `x` does
    while time.time() < deadline and run_row(run.run_id)["exit_code"] is None:
        time.sleep(0.2)
    row = run_row(run.run_id)
    assert row["status"] == "stopped" and row["exit_code"] == 143, row
    step = row["step"]
    assert (Path(row["output_dir"]) / f"checkpoint-{step}" / "ppo_state.json").is_file()


def test_detached_launch_returns_at_once_and_the_supervisor_records_the_exit(workdir):
    result = subprocess.run([*RLHF, "launch", "sft", str(TINY), "--accelerate-config", str(ACCEL / "cpu.yaml"),
                             "--detach", "--set", "train.max_steps=5000", "--set", "train.logging_steps=1"],
                            capture_output=True, text=True, check=True)
    assert "run 1 started" in result.stdout
    assert run_row(1)["exit_code"] is None  # returned with minutes of training ahead: it did not wait for them
    launch_file = Path("runs/1/launch.json").read_text()
    assert "RLHF_RUN_ID" in launch_file and "PATH" not in launch_file  # only the run's own variables
    deadline = time.monotonic() + 180
    while _logged_steps(1) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    stopped = subprocess.run([*RLHF, "stop", "1", "--wait"], capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    run = run_row(1)
    assert run["status"] == "stopped" and run["exit_code"] == 143  # the supervisor's record
    assert "[rlhf] run 1 exited with code 143" in Path("runs/1/train.log").read_text()

    resumed = subprocess.run([*RLHF, "launch", "sft", "--resume-run", "1", "--detach", "--allow-change", "--set",
                              f"train.max_steps={run['step'] + 2}"], capture_output=True, text=True, check=True)
    assert "run 1 resumed" in resumed.stdout  # it said "started"
    deadline = time.monotonic() + 180
    while run_row(1)["exit_code"] in (None, 143) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert run_row(1)["status"] == "done" and run_row(1)["exit_code"] == 0 and run_row(1)["step"] == run["step"] + 2


@pytest.mark.parametrize("to, sig", [(os.kill, signal.SIGTERM), (os.kill, signal.SIGKILL), (os.killpg, signal.SIGTERM)],
                         ids=["sigterm", "sigkill", "sigterm-to-the-group"])
def test_a_signal_to_the_launcher_alone_stops_the_run_with_its_checkpoint(workdir, monkeypatch, to, sig):
    """`kill PID` of the pid runs.db names (a one-process launch: accelerate's launcher, the trainer its
    child): the launcher died at once, and its trainer trained on under nobody until the grace period (or,
    after a kill -9, the linger) ran out and it was killed unsaved: a failed run without a checkpoint. The
    supervisor passes the stop on to the group (where the group had it already, its trainer takes the
    second as the same stop)."""
    from engine.procs import group_alive

    monkeypatch.setenv("RLHF_STOP_GRACE_S", "120")  # a save takes seconds
    monkeypatch.setenv("RLHF_LINGER_S", "5")  # what a stray process may take: far less than a save
    subprocess.run([*RLHF, "launch", "sft", str(TINY), "--accelerate-config", str(ACCEL / "cpu.yaml"), "--detach",
                    "--set", "train.max_steps=5000", "--set", "train.logging_steps=1", "--set",
                    "train.save_steps=1000"], capture_output=True, text=True, check=True)
    deadline = time.monotonic() + 180
    while _logged_steps(1) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    launcher = run_row(1)
    assert launcher["pid"] == launcher["pgid"] and launcher["status"] == "running"
    to(launcher["pid"], sig)  # os.kill: the launcher alone, not its group
    deadline = time.monotonic() + 300
    while run_row(1)["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.3)
    run = run_row(1)
    assert (run["status"], run["exit_code"]) == ("stopped", 143), run["error"]
    with Store(os.environ["RLHF_DB"]) as store:
        (checkpoint,) = store.checkpoints(1)
    assert checkpoint["step"] == run["step"] < 5000 and Path(checkpoint["path"]).is_dir()
    assert not group_alive(launcher["pgid"])
    # Why it ended, in its log: the trainer says what the stop does
    log = Path("runs/1/train.log").read_text()
    assert "SIGTERM: stopping after this step, with a checkpoint" in log
    if to is os.kill:  # said where it ended: not a stop through rlhf, which a pipeline would read as one
        said = f"its launcher was killed by {signal.Signals(sig).name} (kill of its pid, or the OOM killer)"
        assert said in log and run["error"].startswith(said), run["error"]


def test_stopping_a_run_whose_processes_vanished_closes_it_as_failed(workdir):
    from engine.launch import request_stop

    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(run_id, status="running", pgid=gone.pid)
    assert request_stop(os.environ["RLHF_DB"], run_id) is None
    run = run_row(run_id)
    assert run["status"] == "failed" and "processes are gone" in run["error"]


def test_a_run_whose_group_ended_is_left_to_its_live_supervisor_to_record(workdir):
    """Its group gone, a run whose supervisor lives is about to be recorded by it (stopped, say): a look
    closing it as failed first made `rlhf stop --wait` print that guess. Once the supervisor is gone too, a
    look closes it."""
    from engine.procs import process_start
    from engine.run import settled

    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    supervisor = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
        store.update_run(run_id, status="running", launch="{}")
        store.set_process(run_id, gone.pid, gone.pid, None,
                          supervisor=(supervisor.pid, process_start(supervisor.pid)))
        assert settled(store, run_id)["status"] == "running"
    from engine.launch import request_stop  # a stop then: written down for the supervisor's record, no guess

    assert request_stop(os.environ["RLHF_DB"], run_id) is None
    assert (run_row(run_id)["status"], run_row(run_id)["orphaned"]) == ("running", None)
    assert run_row(run_id)["stop_requested"] is not None
    with Store(os.environ["RLHF_DB"]) as store:
        supervisor.communicate(b"", timeout=60)  # it ends without recording anything
        assert settled(store, run_id)["status"] == "failed"


def test_a_group_number_taken_by_another_program_is_never_signalled(workdir):
    from engine.launch import request_stop
    from engine.procs import process_start, same_group

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        started = process_start(other.pid)
        assert started is not None and same_group(other.pid, started)
        assert not same_group(other.pid, started - 1)  # the same number, another process
        with Store(os.environ["RLHF_DB"]) as store:
            run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}")
            store.update_run(run_id, status="running", pgid=other.pid, pgid_started=started - 1)
        assert request_stop(os.environ["RLHF_DB"], run_id) is None
        assert run_row(run_id)["status"] == "failed"  # closed as vanished…
        assert other.poll() is None  # …and the program that now has its number was left alone
    finally:
        other.kill()
        other.wait()


def test_a_run_whose_processes_never_started_is_not_left_pending(workdir):
    """A command killed between registering a run and starting it leaves a row the next look closes; a start
    that fails (here: the log cannot be opened) fails the run at once, with why. Either way its row said
    pending for as long as the registering process lived: for a console, days."""
    import dataclasses

    from engine.launch import start_detached, stop_run, supervise
    from engine.run import settle_active

    cpu = str(ACCEL / "cpu.yaml")
    code = (f"import os, signal\nfrom engine.launch import prepare\nprepare('rm', {str(TINY)!r}, [], {cpu!r})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -signal.SIGKILL
    with Store(os.environ["RLHF_DB"]) as store:
        assert store.run(1)["status"] == "pending"
        assert settle_active(store) == [1] and store.run(1)["status"] == "failed"

    # A stop in between is written down for the supervisor to pass on; the registering process (a console)
    # is the row's pid meanwhile and must not be what the stop signals.
    run = prepare("rm", str(TINY), [], cpu)
    heard: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        asked = stop_run(os.environ["RLHF_DB"], run.run_id)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert asked.group is None and not asked.was_dead and not heard
    assert run_row(run.run_id)["stop_requested"] is not None

    for start in (start_detached, supervise):
        run = prepare("rm", str(TINY), [], cpu)
        with pytest.raises(FileNotFoundError):
            start(dataclasses.replace(run, log_path=workdir / "gone" / "train.log"))
        row = run_row(run.run_id)
        assert row["status"] == "failed" and row["exit_code"] == 1 and row["ended"] is not None
        assert row["error"].startswith("its processes could not be started: FileNotFoundError: "), row["error"]


def test_a_second_sigterm_during_set_up_is_the_same_stop():
    """A supervisor passes a stop on when its launcher dies of a signal; the group may have had it already.
    During set-up the first SIGTERM raises StopRequested; a second one raised again inside its handling
    would cut the stop's own record short."""
    import engine.run as run_module
    from engine.run import StopRequested

    before = run_module._stop_seen
    run_module._stop_seen = False
    try:
        with pytest.raises(StopRequested):
            run_module._raise_stop()
        run_module._raise_stop()  # the same stop again: nothing raised
        assert run_module.stop_seen()
    finally:
        run_module._stop_seen = before
