"""`accelerate launch` for a stage: argument list (never a shell), run registration, exit status.

The run is registered in runs.db before the processes start, so every rank knows its id. The child
gets its own session and process group: a stop signals the whole group (accelerate, torchrun and every
rank) at once, and a lost terminal does not reach it. It writes straight to `runs/<id>/train.log`; the
foreground launcher echoes that file, so the run never depends on the launcher's own output.

A detached start (the console's) puts a supervisor in between: `python -m engine.launch supervise`, in a
session of its own with stdin closed, waits for the run and records its exit code. It is not in the run's
process group, so even a SIGKILL of the run leaves it alive to record how the run ended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from engine.accelerate_file import read_accelerate_config
from engine.config import Recipe, RecipeError, Stage
from engine.procs import (
    RANKS_ENV,
    RANKS_FOLDER,
    SUPERVISOR_ENV,
    forget_ranks,
    group_alive,
    kill_group,
    kill_run_groups,
    not_ours,
    process_alive,
    process_start,
    rank_groups,
    run_processes_gone,
    same_group,
    spawn_detached,
)
from engine.run import (
    DB_ENV,
    EXIT_STOPPED,
    LAUNCHED_ENV,
    LOG_NAME,
    RUN_ID_ENV,
    STATE_MARKERS,
    Presses,
    at_last_step,
    last_alive,
    never_trained,
    no_sharded_export,
    register_run,
    resume_from,
    resume_recipe,
    started_over,
    supervisor_alive,
)
from engine.store import Store, default_db_path
from engine.train import validate

LAUNCH_NAME = "launch.json"
# How long a stopped run may take to write its checkpoint before it is killed. torchrun kills its ranks
# 30 s after a SIGTERM unless told otherwise, far too soon for a 7B model's optimizer state; slow shared
# storage may need more than the default (RLHF_STOP_GRACE_S, seconds).
def stop_grace_s() -> int:
    """RLHF_STOP_GRACE_S, or 600: read when a run starts or is stopped (importing this module never fails)."""
    text = os.environ.get("RLHF_STOP_GRACE_S", "600")
    try:
        return max(1, int(float(text)))  # whole seconds: torchrun reads its timeout as an int
    except (ValueError, OverflowError):
        raise RecipeError(f"RLHF_STOP_GRACE_S={text!r}: give the seconds a stopped run may take to save, "
                          "a whole number") from None
# How long a run's other processes may outlive its launcher when nobody asked it to stop.
LINGER_S = float(os.environ.get("RLHF_LINGER_S", 60))
STOP_TOLD = signal.SIGUSR1  # to a supervisor: its run's group was sent a stop that runs.db could not record


def accelerate_argv(
    stage: Stage,
    recipe_path: str | None,
    overrides: list[str],
    accelerate_config: str,
    num_processes: int | None = None,
    db_path: str | None = None,
) -> list[str]:
    """`python -m engine.accelerate_launcher … -m engine.train STAGE RECIPE --set …` (`accelerate launch`,
    see there) as a list."""
    argv = [sys.executable, "-m", "engine.accelerate_launcher", "--config_file", str(accelerate_config)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    argv += ["-m", "engine.train", stage, str(recipe_path)]
    for item in overrides:
        argv += ["--set", item]
    if db_path is not None:
        argv += ["--db", str(db_path)]
    return argv


def launch_env(accelerate: dict, run_id: int, db_path: Path) -> dict[str, str]:
    """The variables a run needs on top of the launcher's own environment (only these are written down)."""
    env: dict[str, str] = {}
    env[RUN_ID_ENV] = str(run_id)
    env[DB_ENV] = str(db_path)
    env[LAUNCHED_ENV] = "1"
    env["PYTHONUNBUFFERED"] = os.environ.get("PYTHONUNBUFFERED", "1")
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(stop_grace_s()))
    if accelerate.get("use_cpu"):
        # accelerate only starts several CPU ranks (gloo, through torchrun) for MULTI_GPU with this set.
        env["ACCELERATE_USE_CPU"] = "true"
    return env


@dataclass(frozen=True)
class Prepared:
    run_id: int
    argv: list[str]
    env: dict[str, str]  # added to the launcher's environment
    log_path: Path
    registered: bool  # False on the other machines of a multi-node run: the first machine's runs.db has it
    db_path: Path

    def save(self) -> Path:
        """Write down how the run starts (`runs/<id>/launch.json`): the supervisor reads it back."""
        path = self.log_path.parent / LAUNCH_NAME
        data = {**asdict(self), "log_path": str(self.log_path), "db_path": str(self.db_path)}
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Prepared:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{**data, "log_path": Path(data["log_path"]), "db_path": Path(data["db_path"])})


def prepare(
    stage: Stage,
    recipe_path: str | None,
    overrides: list[str],
    accelerate_config: str | None,
    num_processes: int | None = None,
    db_path: str | os.PathLike | None = None,
    run_id: int | None = None,
    resume_run: int | None = None,
    allow_change: bool = False,
) -> Prepared:
    """Validate everything and register the run; nothing is started yet.

    On a machine with `machine_rank > 0` nothing is registered: pass the run id the first machine got,
    so every machine writes into the same runs/<id>. `resume_run` continues that run from its newest
    full-state checkpoint, under its own id, with the accelerate config and process count it was launched
    with unless others are given (another process count only with `allow_change`).
    """
    db = Path(db_path or default_db_path()).resolve()
    change = None
    if resume_run is not None:
        # The recipe as runs.db recorded it (overrides applied, paths absolute), from any directory.
        recipe_path, overrides, change = resume_recipe(db, resume_run, stage, overrides, allow_change)
        with Store(db) as store:
            resumed = store.run(resume_run)
        given = [option for option, value in (("--accelerate-config", accelerate_config),
                                               ("--num-processes", num_processes)) if value]
        accelerate_config, num_processes = _resumed_launch(resumed, accelerate_config, num_processes)
    if not accelerate_config:
        raise RecipeError("--accelerate-config: the run is launched with it (e.g. configs/accelerate/cpu.yaml)")
    recipe = validate(stage, recipe_path, overrides)
    accelerate = check_launch(stage, recipe, accelerate_config, num_processes)
    if resume_run is not None and not allow_change:
        _check_same_world(resumed, accelerate_config, num_processes, accelerate, given)
    elif resume_run is not None and resumed.get("world_size") and \
            _world(accelerate, num_processes) != resumed["world_size"]:
        # Allowed, and recorded as a change of the run (from the step it goes on from), with the launch it had
        # before: the run's `launch` becomes this one, which it did not start with.
        entry = {"step": None, "at": time.time(), "set": [], "launch": resumed.get("launch"),
                 "fields": [f"processes ({resumed['world_size']} -> {_world(accelerate, num_processes)})"]}
        change = {**(change or {})}
        change["changes"] = json.dumps([*json.loads(change.get("changes") or resumed.get("changes") or "[]"), entry])
    if resume_run is not None and stage != "ppo" and accelerate["distributed_type"] in ("DEEPSPEED", "FSDP") \
            and not never_trained(resumed):
        # Refused before the claim: the trainer would refuse it only after loading the model.
        train = recipe.stage(stage).train
        target = resume_from(recipe.stage(stage).resume_from_checkpoint, Path(resumed["output_dir"]),
                             STATE_MARKERS[stage], say=False)
        if target is not None and at_last_step(target, train.max_steps, train.epochs):
            raise no_sharded_export(target, accelerate["distributed_type"].lower())
    machine_rank = int(accelerate.get("machine_rank") or 0)
    if machine_rank > 0:
        if run_id is None:
            raise RecipeError(
                f"{accelerate_config}: machine_rank is {machine_rank}: pass --run-id with the id that the launch "
                "on machine 0 printed"
            )
        output_dir = Path(recipe.output_root) / str(run_id)
    else:
        if run_id is not None:
            raise RecipeError(
                f"--run-id is for the other machines of a multi-node run; {accelerate_config} is machine 0"
            )
        # Absolute: a resume from another directory (a console started elsewhere with --db) must find it.
        launch = json.dumps({"accelerate_config": str(Path(accelerate_config).resolve()),
                             "num_processes": num_processes})
        with Store(db) as store:
            # How it starts goes in with the registration (or the claim): a stop of a pending row with a
            # pid and no launch signals that pid, which here is this command's (a console's) own.
            if resume_run is None:
                run_id = register_run(store, stage, recipe, recipe_path, overrides, launch)
            else:
                run_id = resume_run
                # As resume_recipe decided, not as the row reads now: another resume may have trained since
                if not store.claim_for_resume(run_id, {**(change or {}), "launch": launch},
                                              untrained=started_over(overrides, stage)):
                    raise RecipeError(f"run {run_id} is being resumed or is still running (or trained since)")
            output_dir = Path(store.run(run_id)["output_dir"])
    with _closed_if_not_started(db, run_id if machine_rank == 0 else None):
        output_dir.mkdir(parents=True, exist_ok=True)
        argv = accelerate_argv(stage, recipe_path, overrides, accelerate_config, num_processes, str(db))
        env = launch_env(accelerate, run_id, db)
    return Prepared(run_id, argv, env, output_dir / LOG_NAME, machine_rank == 0, db)


def check_launch(stage: Stage, recipe: Recipe, accelerate_config: str, num_processes: int | None = None
                 ) -> dict[str, Any]:
    """Whether `stage` of `recipe` can run as `accelerate_config` (and `num_processes`) would start it;
    raises RecipeError, registers nothing. Returns the accelerate config, read. A pipeline asks it of every
    stage before its first: a PPO that sharding would refuse must not wait for hours of SFT and RM."""
    accelerate = read_accelerate_config(accelerate_config)
    if num_processes is not None and num_processes < 1:
        raise RecipeError(f"--num-processes must be at least 1, got {num_processes}")
    zero_stage = (accelerate.get("deepspeed_config") or {}).get("zero_stage")
    kind = accelerate["distributed_type"]
    sharded = kind == "FSDP" or (kind == "DEEPSPEED" and zero_stage == 3)
    if num_processes is not None and num_processes > 1 and kind == "NO":
        raise RecipeError(
            f"--num-processes {num_processes}: {accelerate_config} runs one process (distributed_type: NO); "
            "for several use a data-parallel config (configs/accelerate/cpu_ddp.yaml on CPUs, ddp.yaml on GPUs)"
        )
    if stage == "ppo" and kind in ("DEEPSPEED", "FSDP"):
        raise RecipeError(
            f"{accelerate_config}: PPO runs under plain data parallelism only (distributed_type NO or MULTI_GPU), "
            f"not {kind}: the hydra copies whole layers and rank 0 saves the optimizer, which parameter or "
            "optimizer sharding would break; use configs/accelerate/gpu.yaml or ddp.yaml (the hydra's frozen "
            "trunk and shared layers already fit a 7B policy on one 80 GB GPU)"
        )
    if stage == "sft" and recipe.sft.lora is not None and sharded:
        raise RecipeError(
            f"{recipe.where('sft.lora')}: sft.lora: merging adapters is not supported with parameter sharding "
            f"({accelerate_config}); use zero2.yaml or ddp.yaml"
        )
    no_gpu = _no_gpu_for(accelerate)
    if no_gpu:
        raise RecipeError(
            f"{accelerate_config} runs on GPUs and this machine has none ({no_gpu}): its processes would train "
            "on the CPU; for CPU processes use configs/accelerate/cpu.yaml or cpu_ddp.yaml (RLHF_GPU_CHECK=0 skips "
            "this check where it misjudges the machine)")
    if _missing_package(accelerate):  # else every rank dies of the ImportError, after the run registered
        raise RecipeError(f"{accelerate_config}: distributed_type DEEPSPEED, and DeepSpeed is not installed "
                          "here (pip install deepspeed); without it: ddp.yaml, or fsdp.yaml to shard")
    return accelerate


def _missing_package(accelerate: dict) -> str | None:
    """The package the config's distributed type needs and this Python lacks (DeepSpeed), or None."""
    import importlib.util

    if accelerate["distributed_type"] == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed"
    return None


def _no_gpu_for(accelerate: dict) -> str | None:
    """Why a GPU config cannot have its GPUs here (None: a CPU config, or see `no_gpu_here`)."""
    kind = accelerate["distributed_type"]
    gpus = kind in ("MULTI_GPU", "FSDP", "DEEPSPEED") or (kind == "NO" and accelerate.get("gpu_ids"))
    if accelerate.get("use_cpu") or not gpus:
        return None
    from engine.gpu import no_gpu_here

    return no_gpu_here()


def _resumed_launch(run: dict[str, Any], accelerate_config: str | None,
                    num_processes: int | None) -> tuple[str | None, int | None]:
    """The accelerate config and process count a resume of `run` runs with: those given, else the run's own."""
    launch = json.loads(run.get("launch") or "null") or {}
    # As many processes as it trained with: the config file may have been edited since.
    world = run.get("world_size") or 0
    own = launch.get("num_processes") or (world if world > 1 else None)
    if accelerate_config:
        if num_processes is None and launch.get("accelerate_config") == str(Path(accelerate_config).resolve()):
            num_processes = own  # the config it was launched with, given again: so is its process count
        return accelerate_config, num_processes
    run_id = run["id"]
    if not launch.get("accelerate_config"):
        raise RecipeError(f"--accelerate-config: run {run_id} last ran in a terminal of its own (rlhf train), not "
                          "launched, so none is recorded: give the one to launch it with")
    if int(read_accelerate_config(launch["accelerate_config"]).get("num_machines") or 1) > 1:
        raise RecipeError(f"--accelerate-config: run {run_id} ran on several machines; each resumes with its own "
                          "config (its machine_rank), as it was launched")
    return launch["accelerate_config"], own if num_processes is None else num_processes


def _world(accelerate: dict, num_processes: int | None) -> int:
    """How many processes a launch with this accelerate config (and --num-processes) starts."""
    if accelerate["distributed_type"] == "NO":
        return 1
    return num_processes or int(accelerate.get("num_processes") or 1)


def _check_same_world(run: dict[str, Any], accelerate_config: str, num_processes: int | None,
                      accelerate: dict, given: list[str]) -> None:
    """Another number of processes changes a run mid-curve (its global batch, which records each rank
    reads): refused unless the resume allows changes, as another --set is. `given`: the options the resume
    was given that set it (the advice names them, not one it was not given)."""
    run_id, before, now = run["id"], run.get("world_size"), _world(accelerate, num_processes)
    if before and now != before:
        how = accelerate_config + (f" --num-processes {num_processes}" if num_processes else "")
        raise RecipeError(
            f"run {run_id} trained with {before} process{'es' if before != 1 else ''}; {how} runs {now}: its "
            f"global batch and the records each process reads would change mid-run. Resume it without "
            f"{' and '.join(given) or '--accelerate-config'} (it takes the run's own), or add --allow-change to "
            "continue it so")


def log_tail(path: Path, max_bytes: int = 4000, start: int = 0) -> str:
    """The end of a log, for a run that died before it could say why itself; none of it before `start`
    (where this stretch began: a resumed run appends to the log of its earlier ones)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(start, fh.seek(0, os.SEEK_END) - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def killed_by(exit_code: int, tail: str) -> str | None:
    """What killed the run, where its exit code or its launcher's last words say (the kernel's OOM killer
    sends SIGKILL and leaves no Python traceback): the last line of its recorded error, where the console
    and `rlhf runs` read what happened."""
    if exit_code < 0 or exit_code > 128:
        number = -exit_code if exit_code < 0 else exit_code - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        oom = " (the kernel's OOM killer, or kill -9)" if number == signal.SIGKILL else ""
        if exit_code > 128:  # it ended itself on the signal (torchrun, having passed it on to the ranks)
            return f"its launcher ended on {name} (exit {exit_code}){oom}"
        return f"its launcher was killed by {name}{oom}"
    if "SIGKILL" in tail or "exitcode  : -9" in tail:
        return "a process of the run was killed by SIGKILL (the kernel's OOM killer, or kill -9)"
    return None


def record_exit(
    db_path: str | os.PathLike, run_id: int, exit_code: int, stop_requested: bool = False,
    log_path: Path | None = None, pgid: int | None = None, killed: bool = False, log_start: int = 0,
) -> str:
    """Final status from the exit code, unless the trainer already recorded how it ended.

    A run killed without being asked to stop (the OOM killer's SIGKILL, say) has failed; a failure the
    trainer could not describe (it died before its first line of Python) gets the end of its log.
    `pgid`: the group this supervisor started; if the row names another one, a resume has taken the run
    over and this exit is not its to record. `log_start`: where this stretch's output begins in the log.
    """
    with Store(db_path) as store:
        run = store.run(run_id)
        if pgid is not None and run["pgid"] != pgid:
            return run["status"]
        status = run["status"]
        if run.get("orphaned") is not None and pgid is not None:
            # A look (the console, `rlhf runs`) saw the group gone before this supervisor recorded its exit
            # and closed the row: the exit code is the truth, not that guess. The row was running if its
            # stretch was still open, else pending.
            segments = json.loads(run.get("segments") or "[]")
            status = "running" if segments and segments[-1][1] is None else "pending"
            run = {**run, "error": None, "ended": None}
        stop_requested = stop_requested or run.get("stop_requested") is not None
        error = None
        if status == "pending":
            # Stopped before the trainer began: nothing was trained, nothing is lost.
            status = "done" if exit_code == 0 else "stopped" if stop_requested else "failed"
        elif status == "running":
            # The trainer records "stopped" itself once its checkpoint is written; a run still marked
            # running was cut short, whether or not a stop was asked for.
            if exit_code == 0:
                status = "done"
            else:
                status = "failed"
                if stop_requested:
                    error = (f"stopped, but its processes ended (exit {exit_code}{', killed' if killed else ''}) "
                             "before the trainer recorded its checkpoint: the newest complete checkpoint is the "
                             "last periodic one")
        elif status == "done" and exit_code > 0 and not stop_requested:
            status = "failed"  # a rank other than 0 failed after rank 0 finished
        # A launcher killed by a signal (kill -9 of `accelerate launch` alone) says nothing of the ranks: the
        # trainer recorded done after every rank reached the end, and its export is written.
        # Done stays done when a stop lands after the trainer recorded it (its export is written): the
        # signal ended the processes' teardown, not the work.
        # A trainer that failed on bad input meant 2; its launcher says 1 of any failure.
        code = {"stopped": EXIT_STOPPED, "done": 0}.get(status, run.get("failure_code") or exit_code)
        fields = {"status": status, "exit_code": code, "orphaned": None,
                  "ended": run["ended"] or time.time()}
        if error:
            fields["error"] = error
        elif status == "failed" and not run["error"] and log_path is not None:
            tail = log_tail(log_path, start=log_start)
            killer = killed_by(exit_code, tail)
            if killer and tail:
                tail = tail if tail.endswith("\n") else tail + "\n"
            fields["error"] = (tail + (killer or "")) or f"exited with code {exit_code} before writing to its log"
        elif status == "failed" and log_path is not None and not killed and \
                re.search(r"exitcode\s*:\s*-9\b", log_tail(log_path, start=log_start)):
            # Another rank killed (kill -9, the OOM killer: torchrun's report gives its exit code as -9) shows
            # in rank 0 as a broken collective, "connection closed by peer": its last line should say why.
            killer = "a process of the run was killed by SIGKILL (the kernel's OOM killer, or kill -9)"
            if killer not in run["error"]:
                fields["error"] = run["error"].rstrip("\n") + "\n" + killer
        elif status != "failed":
            fields["error"] = run["error"]  # none where a look's guess is replaced
        store.update_run(run_id, **fields)
    return status


def _echo_until_exit(proc: subprocess.Popen, log_path: Path, offset: int, out: IO[bytes] | None) -> int:
    """Copy what the run appends to its log to `out` until it exits; returns its exit code."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        while True:
            exit_code = proc.poll()
            chunk = log.read()
            if chunk and out is not None:
                try:
                    out.write(chunk)
                    out.flush()
                except OSError:  # the terminal went away: keep waiting, stop echoing
                    out = None
            if exit_code is not None and not chunk:
                return exit_code
            if not chunk:
                time.sleep(0.2)


def run_foreground(
    stage: Stage,
    recipe_path: str | None,
    overrides: list[str],
    accelerate_config: str,
    num_processes: int | None = None,
    db_path: str | os.PathLike | None = None,
    echo: bool = True,
    run_id: int | None = None,
) -> tuple[int, int]:
    """Launch and wait, echoing train.log. Returns (run id, exit code).

    Ctrl-C or SIGTERM asks the run to stop (it saves a checkpoint); a second one kills it. A hang-up
    leaves the run going.
    """
    run = prepare(stage, recipe_path, overrides, accelerate_config, num_processes, db_path, run_id)
    if echo:
        print(f"run {run.run_id}: logging to {run.log_path}", file=sys.stderr, flush=True)
    return run.run_id, supervise(run, echo)


def supervise(run: Prepared, echo: bool = False) -> int:
    """Start a prepared run in its own process group, wait for it, record its exit; returns the exit code.

    Ctrl-C or SIGTERM asks the run to stop (it saves a checkpoint); a second one kills it. A hang-up
    leaves the run going.
    """
    db = run.db_path
    ranks = run.log_path.parent / RANKS_FOLDER  # where torchrun's ranks, each in a session of its own, say so
    with _closed_if_not_started(db, run.run_id if run.registered else None), open(run.log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            run.argv, env={**os.environ, **run.env, RANKS_ENV: str(ranks), SUPERVISOR_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    stop_asked = False
    if run.registered:
        with Store(db) as store:
            stop_asked = store.set_process(run.run_id, proc.pid, proc.pid, process_start(proc.pid),
                                           supervisor=(os.getpid(), process_start(os.getpid())))

    presses = Presses()
    passed_on = False  # a stop this supervisor gave the group for its launcher, killed alone
    told: list[int] = []  # STOP_TOLD: a stop sent to the run's group that runs.db could not record

    def stop_told(signum: int, frame: object) -> None:
        told.append(signum)

    def forward(signum: int, frame: object) -> None:
        if not presses.press():
            return
        if presses.count > 1:  # a kill: of the ranks too, or they take their launcher's death for a stop
            kill_run_groups(proc.pid, run.log_path.parent)
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, STOP_TOLD)
    previous = {s: signal.signal(s, stop_told if s == STOP_TOLD else forward if s != signal.SIGHUP else signal.SIG_IGN)
                for s in handled}
    try:
        if stop_asked:  # a stop came while the run had no process group yet: pass it on now
            forward(signal.SIGTERM, None)
        # Detached, nobody reads the echo: just wait instead of re-reading the log as it grows.
        exit_code = _echo_until_exit(proc, run.log_path, offset, sys.stdout.buffer) if echo else proc.wait()
        # A stop sent to the run's group (the console's, `rlhf stop`) never reached this process, and a
        # one-process launcher dies at once on it while the trainer under it is still saving: ask runs.db,
        # and take the launcher's own death by SIGTERM for one (a stop runs.db could not write down).
        asked = bool(presses.count or stop_asked or told or (run.registered and _stop_requested(db, run.run_id)))
        # The launcher killed alone (kill PID, kill -9 of `accelerate launch`: the pid runs.db names): its
        # trainer trains on under nobody, to be killed unsaved once the patience below runs out. A stop
        # nobody recorded: the group is asked to save and end, as a stop asks it (a trainer that had the
        # signal already takes a second one as the same stop).
        # Its ranks (torchrun's, each in a session of its own) are the run's too: ended with their launcher,
        # they save and stop; the run ends when they have.
        groups = [proc.pid, *rank_groups(ranks, proc.pid)]
        passed_on = exit_code < 0 and not asked and any(group_alive(g) for g in groups)
        if passed_on:
            for group in groups:
                with suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGTERM)
            with suppress(OSError), open(run.log_path, "ab") as log:
                log.write(f"[rlhf] {_launcher_killed(exit_code)}\n".encode())
        stopping = asked or passed_on or exit_code == -signal.SIGTERM
        grace = stop_grace_s()
        killed = _wait_for_groups(groups, grace if stopping else LINGER_S, lambda: grace if told else None)
        forget_ranks(ranks, proc.pid)
    finally:
        for s, handler in previous.items():
            # A stopper that read the run as running may tell its supervisor just after the run ended: that
            # late SIGUSR1 must not kill the process that goes on (a pipeline, by default it would).
            signal.signal(s, signal.SIG_IGN if s == STOP_TOLD and handler in (signal.SIG_DFL, None) else handler)
    status = None
    if run.registered:
        status = record_exit(db, run.run_id, exit_code, stop_requested=presses.count > 0 or passed_on,
                             log_path=run.log_path,
                             pgid=proc.pid, killed=killed, log_start=offset)
    if passed_on and status == "stopped":  # why a run nobody stopped through rlhf ended stopped
        with suppress(Exception), Store(db) as store:
            store.update_run(run.run_id, error=_launcher_killed(exit_code))
    if status == "failed":
        with Store(db) as store:  # a trainer that failed on bad input meant 2; its launcher says 1
            row = store.run(run.run_id)
        if row["pgid"] == proc.pid and row.get("failure_code"):
            return row["failure_code"]
    return EXIT_STOPPED if status == "stopped" else exit_code


def _launcher_killed(exit_code: int) -> str:
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    return f"its launcher was killed by {name} (kill of its pid, or the OOM killer): the stop was passed on to the run"


def _stop_requested(db: Path, run_id: int) -> bool:
    try:
        with Store(db) as store:
            return store.run(run_id).get("stop_requested") is not None
    except Exception:  # an unreadable runs.db must not cost the run its grace period
        return True


def _wait_for_groups(groups: list[int], patience_s: float, longer: Callable[[], float | None] = lambda: None) -> bool:
    """A signalled `accelerate launch` may die before the trainer under it has saved its checkpoint: the
    run is over only when its whole group is (and its ranks' groups). A group that outlives `patience_s` (a
    rank hung in a collective, a stray helper) is killed, so the exit is always recorded. `longer`: a
    patience that replaces it once it says one (a stop learnt of while waiting). Returns whether one was
    killed."""
    def alive() -> list[int]:
        return [g for g in groups if group_alive(g)]

    start = time.monotonic()
    deadline = start + patience_s
    while alive():
        extended = longer()
        if extended is not None:
            deadline = max(deadline, start + extended)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    left = alive()
    if not left:
        return False
    for group in left:
        kill_group(group)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


@contextmanager
def _closed_if_not_started(db_path: Path, run_id: int | None) -> Iterator[None]:
    """A run registered (or claimed) in `db_path` whose processes could not be started is failed, with why:
    its row would otherwise say pending for as long as the process that registered it lives (a console: for
    days). None: a run another machine registered."""
    try:
        yield
    except BaseException as err:
        if run_id is not None:
            why = f"{type(err).__name__}: {err}" if str(err) else f"interrupted ({type(err).__name__})"
            with suppress(Exception), Store(db_path) as store:  # the first error is the one to report
                store.update_run(run_id, status="failed", ended=time.time(), exit_code=1,
                                 error=f"its processes could not be started: {why}")
        raise


def start_detached(run: Prepared) -> int:
    """Start the run's supervisor in a session of its own and return its pid at once.

    Nothing ties it to the caller: no shared process group, stdin closed, output to the run's log. The
    caller (the console) may exit or lose its terminal; the run and its bookkeeping carry on.
    """
    with _closed_if_not_started(run.db_path, run.run_id if run.registered else None):
        launch_file = run.save()
        argv = [sys.executable, "-m", "engine.launch", "supervise", str(launch_file)]
        with open(run.log_path, "ab") as log:
            pid, started = spawn_detached(argv, log)
    if run.registered:
        # Until the supervisor records the run's process group, the supervisor is what the row names: a
        # supervisor that dies before that leaves a run that is seen to be gone, not pending forever.
        with Store(run.db_path) as store:
            store.set_supervisor(run.run_id, pid, started)
    return pid


@dataclass
class StopAsked:
    """What a stop found: the group signalled (and its leader's start), or that the run was already dead."""

    group: tuple[int, int | None] | None
    was_dead: bool
    unrecorded: str | None = None  # why runs.db could not write the stop down (it was signalled anyway)


def stop_run(db_path: str | os.PathLike, run_id: int) -> StopAsked:
    """`request_stop`, and whether the run turned out dead (closed as failed, nothing to signal): what x
    in the console and `rlhf stop` both tell their user."""
    unrecorded: list[str] = []
    group = request_stop(db_path, run_id, unrecorded)
    with Store(db_path) as store:
        return StopAsked(group, store.run(run_id).get("orphaned") is not None, unrecorded[0] if unrecorded else None)


def request_stop(db_path: str | os.PathLike, run_id: int,
                 unrecorded: list[str] | None = None) -> tuple[int, int | None] | None:
    """SIGTERM to the run's process group (the trainer saves a checkpoint and exits); returns the group
    and its leader's start time (what a later SIGKILL must check), or None if there is no group yet.

    The request is written down first: a run that must then be killed still counts as stopped, and a
    run whose group does not exist yet gets the signal from its supervisor once it does. A run whose
    processes are gone without an exit on record (its machine rebooted) is closed as failed. A runs.db
    that cannot take the write (a full disk) does not keep the signal from the group it recorded: the
    reason goes into `unrecorded`, or is raised after the signal where no list is given.
    """
    with Store(db_path) as store:
        run = store.run(run_id)
        if run["status"] not in ("pending", "running"):
            raise RecipeError(f"run {run_id} is {run['status']}: nothing to stop")
        if run["host"] and run["host"] != socket.gethostname():
            raise RecipeError(f"run {run_id} runs on {run['host']}: stop it there")
        if run_processes_gone(run):
            if supervisor_alive(run):  # ending: its supervisor records how, a stop asked now counting as one
                store.mark_stop_requested(run_id)
            else:
                store.close_orphan(run_id, run, last_alive(store, run))
            return None
        foreign = store.foreign_folder(run)
        if foreign:  # a row of this file naming another file's run: its processes are not ours to signal
            raise RecipeError(f"run {run_id}: {foreign}; not signalling it")
        # Another user's run on a shared runs.db: a stop written down that no one can deliver would show
        # the run as stopping in every console while it trains on.
        owner = (not_ours(run["pgid"], group=True) if run["pgid"] else None) or \
            (not_ours(run["pid"], group=False) if run["pid"] else None)
        if owner:
            raise RecipeError(f"run {run_id} is {owner}'s: only they (or root) can stop it")
        failed: sqlite3.Error | None = None
        try:
            pgid, started = store.mark_stop_requested(run_id)
        except sqlite3.Error as err:  # the moment a clean stop matters most: the group still gets it
            pgid, started, failed = run["pgid"], run["pgid_started"], err
    if failed is not None:
        # Its supervisor learns of a stop from runs.db, which has none: told directly instead (before the
        # group hears it: a launcher that ends at once on it must not find the supervisor unaware), or it
        # would give the trainer's save the short linger for stray processes.
        _signal_supervisor(run, STOP_TOLD)
    group, signalled = _signal_stop(run, pgid, started)
    if failed is not None:
        if not signalled:  # nothing was reached and nothing written: the write's own error says it all
            raise failed
        problem = f"{db_path}: {failed}"
        if unrecorded is None:
            raise RecipeError(f"run {run_id}: stop signalled, but runs.db could not record it ({problem})")
        unrecorded.append(problem)
    return group


def _signal_supervisor(run: dict[str, Any], signum: int) -> None:
    """`signum` to the run's recorded supervisor, if it is still the process recorded."""
    supervisor = run.get("supervisor_pid")
    if supervisor and run.get("supervisor_started") is not None and \
            process_alive(supervisor, run["supervisor_started"]):
        with suppress(ProcessLookupError):
            os.kill(supervisor, signum)


def _signal_stop(run: dict[str, Any], pgid: int | None,
                 started: int | None) -> tuple[tuple[int, int | None] | None, bool]:
    """SIGTERM to the run's group (or to an in-process run's own process); returns the group signalled
    and whether anything was."""
    # Only processes whose start time was recorded and still matches: a number the kernel has since given
    # to another program is never signalled.
    # SIGCONT after it, as a shell's kill does for a stopped job: a trainer paused with SIGSTOP (or ctrl+z)
    # would hold the SIGTERM unhandled until the grace period ran out and the kill lost its checkpoint.
    # The supervisor of `rlhf launch` in a terminal is stopped by ctrl+z while the run's own session trains
    # on: continued too, or the run's exit would never be recorded.
    _signal_supervisor(run, signal.SIGCONT)
    if pgid and started is not None and same_group(pgid, started):
        os.killpg(pgid, signal.SIGTERM)
        with suppress(ProcessLookupError):  # a group that ended on the SIGTERM has nothing to continue
            os.killpg(pgid, signal.SIGCONT)
        if run.get("output_dir"):  # torchrun's ranks, each in a session of its own: their launcher passes
            for group in rank_groups(Path(run["output_dir"]) / RANKS_FOLDER, pgid):  # the SIGTERM on, not a SIGCONT
                with suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGCONT)
        return (pgid, started), True
    if not pgid and run["pid"] and started is not None and not run.get("launch") and \
            process_alive(run["pid"], started):
        os.kill(run["pid"], signal.SIGTERM)  # `rlhf train` or `rlhf eval` run from a script: not a group leader
        with suppress(ProcessLookupError):
            os.kill(run["pid"], signal.SIGCONT)
        return None, True
    return None, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.launch")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="run a prepared launch (runs/<id>/launch.json) and record its exit")
    sup.add_argument("launch_file")
    args = parser.parse_args(argv)
    run = Prepared.load(args.launch_file)
    code = supervise(run, echo=False)
    print(f"[rlhf] run {run.run_id} exited with code {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
