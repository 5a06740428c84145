"""`accelerate launch` for a stage: argument list (never a shell), run registration, exit status.

The run is registered in runs.db before the processes start, so every rank knows its id. The child
gets its own session and process group: a stop signals the whole group (accelerate, torchrun and every
rank) at once, and a lost terminal does not reach it. It writes straight to `runs/<id>/train.log`; the
foreground launcher echoes that file, so the run never depends on the launcher's own output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from engine.config import RecipeError, Stage
from engine.run import DB_ENV, LAUNCHED_ENV, RUN_ID_ENV, register_run
from engine.store import Store, default_db_path
from engine.train import validate

LOG_NAME = "train.log"
# How long a stopped run may take to write its checkpoint before it is killed. torchrun kills its ranks
# 30 s after a SIGTERM unless told otherwise, far too soon for a 7B model's optimizer state.
STOP_GRACE_S = 600


def read_accelerate_config(path: str | os.PathLike) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: accelerate config not found") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: accelerate config is not valid YAML ({err})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise RecipeError(f"{path}: not an accelerate config (no distributed_type)")
    return data


def accelerate_argv(
    stage: Stage,
    recipe_path: str,
    overrides: list[str],
    accelerate_config: str,
    num_processes: int | None = None,
    db_path: str | None = None,
) -> list[str]:
    """`python -m accelerate.commands.launch … -m engine.train STAGE RECIPE --set …` as a list."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    argv += ["-m", "engine.train", stage, str(recipe_path)]
    for item in overrides:
        argv += ["--set", item]
    if db_path is not None:
        argv += ["--db", str(db_path)]
    return argv


def launch_env(accelerate: dict, run_id: int, db_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[RUN_ID_ENV] = str(run_id)
    env[DB_ENV] = str(db_path)
    env[LAUNCHED_ENV] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_S))
    if accelerate.get("use_cpu"):
        # accelerate only starts several CPU ranks (gloo, through torchrun) for MULTI_GPU with this set.
        env["ACCELERATE_USE_CPU"] = "true"
    return env


@dataclass(frozen=True)
class Prepared:
    run_id: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    registered: bool  # False on the other machines of a multi-node run: the first machine's runs.db has it


def prepare(
    stage: Stage,
    recipe_path: str,
    overrides: list[str],
    accelerate_config: str,
    num_processes: int | None = None,
    db_path: str | os.PathLike | None = None,
    run_id: int | None = None,
) -> Prepared:
    """Validate everything and register the run; nothing is started yet.

    On a machine with `machine_rank > 0` nothing is registered: pass the run id the first machine got,
    so every machine writes into the same runs/<id>.
    """
    recipe = validate(stage, recipe_path, overrides)
    accelerate = read_accelerate_config(accelerate_config)
    if num_processes is not None and num_processes < 1:
        raise RecipeError(f"--num-processes must be at least 1, got {num_processes}")
    zero_stage = (accelerate.get("deepspeed_config") or {}).get("zero_stage")
    kind = accelerate["distributed_type"]
    sharded = kind == "FSDP" or (kind == "DEEPSPEED" and zero_stage == 3)
    if stage == "sft" and recipe.sft.lora is not None and sharded:
        raise RecipeError(
            f"{recipe.where('sft.lora')}: sft.lora: merging adapters is not supported with parameter sharding "
            f"({accelerate_config}); use zero2.yaml or ddp.yaml"
        )
    db = Path(db_path or default_db_path()).resolve()
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
        with Store(db) as store:
            run_id = register_run(store, stage, recipe, recipe_path, overrides)
            output_dir = Path(store.run(run_id)["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = accelerate_argv(stage, recipe_path, overrides, accelerate_config, num_processes, str(db))
    return Prepared(run_id, argv, launch_env(accelerate, run_id, db), output_dir / LOG_NAME, machine_rank == 0)


def record_exit(db_path: str | os.PathLike, run_id: int, exit_code: int, stop_requested: bool = False) -> str:
    """Final status from the exit code, unless the trainer already recorded how it ended.

    A run killed without being asked to stop (the OOM killer's SIGKILL, say) has failed.
    """
    with Store(db_path) as store:
        run = store.run(run_id)
        status = run["status"]
        if status in ("pending", "running"):
            if exit_code == 0:
                status = "done"
            else:
                status = "stopped" if stop_requested else "failed"
        elif status == "done" and exit_code != 0:
            status = "failed"  # a rank other than 0 failed after rank 0 finished
        store.update_run(run_id, status=status, exit_code=exit_code, ended=run["ended"] or time.time())
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
    recipe_path: str,
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
    db = run.env[DB_ENV]
    if echo:
        print(f"run {run.run_id}: logging to {run.log_path}", file=sys.stderr, flush=True)
    with open(run.log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            run.argv, env=run.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if run.registered:
        with Store(db) as store:
            store.update_run(run.run_id, pid=proc.pid, pgid=proc.pid)

    asked = 0

    def forward(signum: int, frame: object) -> None:
        nonlocal asked
        asked += 1
        try:
            os.killpg(proc.pid, signal.SIGTERM if asked == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward if s != signal.SIGHUP else signal.SIG_IGN) for s in handled}
    try:
        exit_code = _echo_until_exit(proc, run.log_path, offset, sys.stdout.buffer if echo else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if run.registered:
        record_exit(db, run.run_id, exit_code, stop_requested=asked > 0)
    return run.run_id, exit_code
