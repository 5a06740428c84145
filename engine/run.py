"""A run's life in runs.db: registered, running, then done, stopped or failed (with the reason).

A launcher registers the run and hands its id to every rank through `RLHF_RUN_ID`; a run started
in-process registers itself, or continues an earlier run (`rlhf train --resume-run`). Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.config import Recipe, RecipeError, Stage, a_run_of, recipe_to_json, with_absolute_paths
from engine.data.records import DataError
from engine.procs import may_access, process_alive, process_start, run_processes_gone
from engine.store import ResilientStore, Store, StoreError, default_db_path

log = logging.getLogger(__name__)

RUN_ID_ENV = "RLHF_RUN_ID"
PIPELINE_ENV = "RLHF_PIPELINE_ID"  # set by `rlhf pipeline`: the runs its stages register belong to it
DB_ENV = "RLHF_DB"
LOG_NAME = "train.log"  # a run's log, in its folder (the console tails it)
LAUNCHED_ENV = "RLHF_LAUNCHED"  # set by the launcher, which records the process group it started
EXIT_STOPPED = 143  # 128 + SIGTERM: a stopped run is not a success a script should chain on from
EXIT_BAD_INPUT = 2  # a recipe, data or runs.db the run could not use: fixing the input, not a retry, helps
BAD_INPUT = (RecipeError, DataError, StoreError)  # said as one line, `error: ...`, and ended with EXIT_BAD_INPUT


class RunFailed(RuntimeError):
    """A run that ends failed for a reason its message says whole (a judge that refuses its calls, calls
    that failed): recorded as that line, as bad input is, not as a traceback with nothing in the code to see."""


def exit_code_of(status: str) -> int:
    """A run's process exit code, by its end: done 0, stopped 143, anything else (failed, diverged) 1."""
    return {"done": 0, "stopped": EXIT_STOPPED}.get(status, 1)


class StopRequested(Exception):
    """SIGTERM before training started: nothing to checkpoint yet, the run just ends as stopped."""


@dataclass
class RunHandle:
    run_id: int
    output_dir: Path
    store: Store | None  # None on ranks other than 0
    status: str = "done"  # what the run ends as when its body returns normally


def continue_from(handle: RunHandle, checkpoint: Path, step: int) -> None:
    """What a resume does to the run's record and folder before it trains from `checkpoint` (at `step`):
    a gap in runs.db's history is said (`warn_if_unrecorded`), checkpoint folders past it are set aside
    (`set_aside_after`), and the metrics logged after it are dropped: that stretch is trained again, and
    keeping both would show each of its steps twice."""
    if os.environ.get("RANK", "0") == "0":
        set_aside_after(handle.output_dir, checkpoint, step)
        log.info("resumed from %s at step %d", checkpoint, step)  # which checkpoint a resume took, once
    if handle.store is not None:
        warn_if_unrecorded(handle, checkpoint, step)
        handle.store.drop_history_after(handle.run_id, step)
        changes = json.loads(handle.store.run(handle.run_id).get("changes") or "[]")
        # The change this resume brings, one whose resume never trained, and one recorded later than the
        # checkpoint it now goes on from (its settings train those steps again): in effect from this step on
        new = [change for change in changes if change.get("step") is None or change["step"] > step]
        for change in new:
            change["step"] = step
            log.info("changed from step %d on: %s", step, ", ".join(change["fields"]))
        if new:
            handle.store.update_run(handle.run_id, changes=json.dumps(changes))


ABANDONED_PREFIX = "abandoned-"


def set_aside_after(folder: Path, checkpoint: Path, step: int) -> list[Path]:
    """Rename the run's `checkpoint-N` folders with N past `step` (damaged ones a resume passed over, a save
    cut short, newer ones the user chose not to continue from) to `abandoned-checkpoint-N`: kept, but out
    of the way. Left as they were, a later resume would go back to them (the newest by number) from the
    stretch that continues here, and the trainer's rotation would count them among the checkpoints it
    keeps (transformers, where file times cannot be trusted, by number: ahead of the ones this stretch
    saves). Returns the new names."""
    moved = []
    for old in sorted(folder.glob("checkpoint-*")):
        number = old.name.split("-", 1)[1]
        if not number.isdigit() or int(number) <= step or old.resolve() == checkpoint.resolve():
            continue
        new, n = folder / f"{ABANDONED_PREFIX}{old.name}", 1
        while new.exists():
            n += 1
            new = folder / f"{ABANDONED_PREFIX}{old.name}.{n}"
        os.replace(old, new)
        moved.append(new)
        log.warning("%s is past %s, which this resume continues from: set aside as %s (delete it once you no "
                    "longer need it)", old, checkpoint.name, new.name)
    return moved


def warn_if_unrecorded(handle: RunHandle, checkpoint: Path, step: int) -> None:
    """Say so when the checkpoint a resume starts from is past everything runs.db recorded of the run: its
    later steps were trained without this runs.db writing them (a copy of the file resumed the run into
    the same folder, or the writes were lost with a full disk). Continuing from it is still right, but the
    run's history will have a gap there, and the user should know why."""
    if handle.store is None:
        return
    recorded = {Path(c["path"]).resolve() for c in handle.store.checkpoints(handle.run_id)}
    newest = handle.store.run(handle.run_id).get("step") or 0
    if checkpoint.resolve() in recorded or step <= newest:
        return
    log.warning("%s (step %d) is not in runs.db's record of run %d, whose newest recorded step is %d: steps %d-%d "
                "were trained without this runs.db recording them (another copy of runs.db resumed the run, or "
                "its writes were lost); its history will have a gap there. To continue from a recorded "
                "checkpoint instead: --set resume_from_checkpoint=DIR", checkpoint, step, handle.run_id, newest,
                newest + 1, step)


def register_run(store: Store, stage: Stage, recipe: Recipe, recipe_path: str, overrides: list[str],
                 launch: str | None = None) -> int:
    """A new run in runs.db, its recipe recorded resolved (overrides applied, local paths absolute).
    `launch`: how a launched run starts (JSON), recorded with it."""
    if isinstance(recipe, Recipe):
        recipe = with_absolute_paths(recipe)
    return store.create_run(
        stage=stage,
        name=recipe.name,
        recipe=str(Path(recipe_path).resolve()) if recipe_path else "",
        config=recipe_to_json(recipe),
        overrides=overrides,
        output_root=recipe.output_root,
        pipeline_id=int(os.environ[PIPELINE_ENV]) if os.environ.get(PIPELINE_ENV) else None,
        launch=launch,
        registrar=os.getpid(),
    )


RECORDED_RECIPE = "recipe.resolved.yaml"


def recorded_recipe(run: dict[str, Any]) -> str:
    """The run's recipe as runs.db recorded it, written into its folder: what a resume reads (the file it
    was launched from may have changed, or be relative to another directory)."""
    path = Path(run["output_dir"]) / RECORDED_RECIPE
    path.parent.mkdir(parents=True, exist_ok=True)  # gone with nothing in it: a run started over makes it again
    text = recipe_text(run)
    try:
        if path.read_text(encoding="utf-8") == text:
            return str(path)
    except (OSError, UnicodeDecodeError):
        pass
    # Whole or not at all: the ranks of a launched resume read this file while rank 0 writes it at its start
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def recipe_text(run: dict[str, Any]) -> str:
    """The run's recorded recipe (or an evaluation's settings) as a YAML file holds it (JSON is YAML)."""
    return json.dumps(json.loads(run["config"]), indent=2, ensure_ascii=False)


def settled(store: Store, run_id: int) -> dict[str, Any]:
    """The run's row, closed as failed first if it claims to be pending or running but its processes
    died without recording how (a kill -9, an OOM, a reboot): such a run can then be resumed."""
    run = store.run(run_id)
    if _orphaned(run) and store.close_orphan(run_id, run, last_alive(store, run)):
        run = store.run(run_id)
    elif _exit_unrecorded(run) and store.close_unrecorded_exit(run_id, run):
        run = store.run(run_id)
    return run


def settle_active(store: Store, runs: list[dict[str, Any]] | None = None) -> list[int]:
    """`settled` for every pending or running run (of `runs`, rows just read, or else runs.db's): what a look
    at the run table does, so that no row says running for processes that are gone. Returns the runs it
    closed."""
    rows = store.runs() if runs is None else runs
    closed = [run["id"] for run in rows
              if _orphaned(run) and store.close_orphan(run["id"], run, last_alive(store, run))]
    return closed + [run["id"] for run in rows
                     if _exit_unrecorded(run) and store.close_unrecorded_exit(run["id"], run)]


def last_alive(store: Store, run: dict[str, Any]) -> float:
    """When a run whose processes died unrecorded last showed life: its newest metric or log line, or the
    start of its stretch. Its end, rather than the moment a look noticed (maybe days later): its time
    column and its ETA's rate would count the gap as work."""
    segments = json.loads(run.get("segments") or "[]")
    times = [segments[-1][0] if segments else run.get("started") or run["created"],
             store.last_metric_time(run["id"]) or 0.0]
    if run.get("output_dir"):
        try:
            times.append((Path(run["output_dir"]) / LOG_NAME).stat().st_mtime)
        except OSError:
            pass
    return min(time.time(), max(times))


# A row from before supervisors were recorded: its exit counts as never to be recorded this long after its
# trainer's end with its processes gone (a supervisor records within a second of the group's end).
UNRECORDED_AFTER_S = 120.0


def _exit_unrecorded(run: dict[str, Any]) -> bool:
    """A launched run ended by its trainer (stopped, done, failed) whose exit nobody will record: its
    processes and its supervisor are gone (a kill -9 of the supervisor, a pipeline's process killed)."""
    if (run["status"] in ("pending", "running") or not run.get("launch") or run["exit_code"] is not None
            or run.get("orphaned") is not None or run.get("host") not in (None, "", socket.gethostname())
            or not run_processes_gone(run)):
        return False
    if run.get("supervisor_pid"):
        return not process_alive(run["supervisor_pid"], run.get("supervisor_started"))
    return time.time() - (run.get("ended") or 0.0) > UNRECORDED_AFTER_S


def _orphaned(run: dict[str, Any]) -> bool:
    # Only this machine's processes can be looked at: a run of another node of a shared runs.db is not ours.
    if not (run["status"] in ("pending", "running") and run.get("host") in (None, "", socket.gethostname())
            and run_processes_gone(run)):
        return False
    # A supervisor alive records the exit itself once it has seen the group end: a look's guess before that
    # (a stage stopped during its set-up) said failed, and `rlhf stop --wait` printed it, of a run about to
    # be recorded stopped.
    return not supervisor_alive(run)


def supervisor_alive(run: dict[str, Any]) -> bool:
    """The run's recorded supervisor is alive (it will record the run's exit)."""
    supervisor = run.get("supervisor_pid")
    return bool(supervisor) and process_alive(supervisor, run.get("supervisor_started"))


def resume_hint(stage: str, run_id: int, db: str | os.PathLike | None, command: str = "train") -> str:
    """The command that continues a stopped run (`command`: train or launch; an evaluation has its own): its
    recorded recipe is read back, so no file and no --set; the runs database always, absolute, so it works
    from any directory."""
    how = "rlhf eval belle" if stage == "eval" else f"rlhf {command} {stage}"
    return f"{how} --resume-run {run_id} --db {os.path.abspath(db or default_db_path())}"


def write_run_card(handle: RunHandle, stage: str, start: str, final_line: str, checkpoint_line: str) -> None:
    """The run folder's README.md: what the run is, from what it trained, where its weights lie and the
    command that resumes it (as it was started: a launched run through `rlhf launch`)."""
    start = str(Path(start).resolve()) if Path(start).is_dir() else start  # a Hub name stays one
    command = "launch" if os.environ.get(LAUNCHED_ENV) == "1" else "train"
    resume = resume_hint(stage, handle.run_id, handle.store.path if handle.store is not None else None, command)
    text = (f"# rlhf-console run {handle.run_id}: {stage}\n\n"
            f"Trained ({stage}) from `{start}` by rlhf-console, run {handle.run_id} of its runs.db.\n\n"
            f"- `final/`: {final_line}\n"
            f"- `checkpoint-N/`: {checkpoint_line} (`{resume}`).\n"
            f"- `recipe.resolved.yaml`: the recipe the run last started on, as runs.db records it.\n"
            f"- `train.log`: what the run printed.\n")
    (handle.output_dir / "README.md").write_text(text, encoding="utf-8")


def after_stop(stage: str, run_id: int, db: str | os.PathLike | None, command: str = "train") -> str:
    """What a stopped run's command says to do next: the resume, or, stopped before its first checkpoint,
    that there is nothing to resume (a resume would be refused)."""
    with Store(db or default_db_path()) as store:
        run = store.run(run_id)
    if stage == "eval" or has_checkpoint(run):
        return f"continue it with: {resume_hint(stage, run_id, db, command)}"
    if never_trained(run):
        return f"it stopped before its first step: nothing was trained; start it over with: " \
               f"{resume_hint(stage, run_id, db, command)}"
    return (f"it stopped before its first checkpoint: nothing trained is kept and nothing can be resumed; "
            f"start it again with rlhf {command} {stage} RECIPE")


def never_trained(run: dict[str, Any]) -> bool:
    """A training run that ended before its first step (stopped or failed in its set-up): with nothing
    trained to lose, a resume starts it over, in its own row and folder, from its recorded recipe."""
    return run["stage"] != "eval" and not run.get("step") and not has_checkpoint(run)


def check_resumable(db_path: str | os.PathLike, run_id: int, stage: Stage) -> dict[str, Any]:
    """The run to continue, or a RecipeError saying why it cannot be."""
    try:
        with Store(db_path, create=False) as store:
            run = settled(store, run_id)
            foreign = store.foreign_folder(run)
    except StoreError as err:
        raise RecipeError(str(err)) from None
    if foreign:
        raise RecipeError(f"run {run_id}: {foreign}; not resuming from its checkpoints")
    if run["stage"] != stage:
        raise RecipeError(f"run {run_id} is {a_run_of(run['stage'])}, not {a_run_of(stage)}")
    if run["status"] == "pending" and run["pgid"] is None:  # registered or claimed: a command is starting it
        by = f" (pid {run['pid']})" if run["pid"] else ""
        raise RecipeError(f"run {run_id} is being started or resumed by another command{by}")
    if run["status"] in ("pending", "running"):
        raise RecipeError(f"run {run_id} is {run['status']} (pid {run['pid']}); stop it before resuming")
    if not ended_for_good(run):
        raise RecipeError(f"run {run_id} is still shutting down (its exit is not recorded yet); try again shortly")
    if not has_checkpoint(run):
        folder = Path(run["output_dir"] or ".")
        if never_trained(run) and (not folder.exists() or may_access(folder, os.R_OK | os.W_OK | os.X_OK)):
            return run  # started over (resume_recipe)
        if not folder.is_dir():
            raise RecipeError(f"run {run_id}: its folder {folder} does not exist (moved or deleted?): a run "
                              "resumes only from the checkpoints in its own folder")
        if not may_access(folder, os.R_OK | os.X_OK):
            raise RecipeError(f"run {run_id}: its folder {folder} cannot be read by this user (permission denied): "
                              "resume it as its owner")
        raise RecipeError(f"run {run_id} has no checkpoint in {run['output_dir']} to resume from")
    return run


def ended_for_good(run: dict[str, Any]) -> bool:
    """A run whose record is final: ended, and for a launched run its exit recorded by its supervisor (its
    trainer writes "stopped" before its processes are gone) or its processes found gone."""
    return (run["status"] not in ("pending", "running")
            and (not run.get("launch") or run["exit_code"] is not None or run.get("orphaned") is not None))


CHECKPOINT_MARKERS = ("trainer_state.json", "ppo_state.json")  # the trainer's (SFT, RM) and PPO's, written last
STATE_MARKERS = {"sft": CHECKPOINT_MARKERS[0], "rm": CHECKPOINT_MARKERS[0], "ppo": CHECKPOINT_MARKERS[1]}
# A PPO checkpoint's state beside its policy folder: the value and reference branches, the optimizer (with
# its scheduler and grad scaler), and rank 0's RNG states and score cache (each rank writes its own).
PPO_BRANCHES_FILE, PPO_OPTIMIZER_FILE = "branches.pt", "optimizer.pt"
PPO_NEEDS = (PPO_BRANCHES_FILE, PPO_OPTIMIZER_FILE, "rank_0.pt", "policy")


def has_checkpoint(run: dict[str, Any]) -> bool:
    """A complete checkpoint in the run's folder (a save in progress is not one)."""
    return bool(run.get("output_dir")) and any(checkpoints_in(Path(run["output_dir"]), marker)
                                               for marker in CHECKPOINT_MARKERS)


def resume_recipe(db_path: str | os.PathLike, run_id: int, stage: Stage, overrides: list[str],
                  allow_change: bool = False) -> tuple[str, list[str], dict[str, str] | None]:
    """(recipe file, overrides, the change to record) that continue `run_id` exactly as it was configured
    (`change`: the run's new config and overrides where allowed --set items change it): its recorded recipe
    (its own --set items applied, paths absolute), whatever file or directory the resume is started from.

    New --set items change a run in the middle of its curve, so they are refused unless `allow_change`;
    allowed, they are recorded with the run. A finished run continues only to more steps than it has. A run
    that ended before its first step starts over (`never_trained`)."""
    from engine.config import load_recipe, parse_override

    run = check_resumable(db_path, run_id, stage)
    path = recorded_recipe(run)
    # Which checkpoint to continue from is not a change to the run: an older one, past a damaged newest
    # one, is taken as given, without --allow-change and without entering the run's recipe.
    field = f"{stage}.resume_from_checkpoint"
    chosen = [item for item in overrides if parse_override(item, stage)[0] == field]
    overrides = [item for item in overrides if item not in chosen]
    picked = parse_override(chosen[-1], stage)[1] if chosen else True
    over = never_trained(run)  # started over: no checkpoint to load, nothing trained to reshape or go past
    if over and picked is not True:
        raise RecipeError(f"--set {chosen[-1]!r}: run {run_id} has no checkpoint (it ended before its first "
                          "step); leave the item out to start it over")
    if picked is not True:
        if not isinstance(picked, str) or not picked:
            raise RecipeError(f"--set {chosen[-1]!r}: a resume continues from a checkpoint: give its folder, "
                              "or leave the item out for the newest whole one")
        picked = str(Path(picked).expanduser().resolve())
        if Path(picked).parent != Path(run["output_dir"]).resolve():
            raise RecipeError(f"--set {chosen[-1]!r}: run {run_id} resumes only from the checkpoints in its own "
                              f"folder {run['output_dir']}; to train on from other weights, start a new run")
    # Before the run is claimed: a checkpoint that cannot be loaded fails here, not as the run's failure.
    target = None if over else resume_from(picked, Path(run["output_dir"]), STATE_MARKERS[stage], say=False)
    recorded = load_recipe(path, [], stage)
    changed = load_recipe(path, overrides, stage)
    differ = _differences(recorded.model_dump(), changed.model_dump())
    if differ and not allow_change:
        how = "start it over" if over else "continue"
        raise RecipeError(
            f"run {run_id}: a resume {'runs' if over else 'continues'} the run's recorded recipe; the --set items "
            f"given change {', '.join(differ)}{'' if over else ' mid-run'}: add --allow-change to {how} with the "
            "change")
    reshaped = None if over else _reshaped(stage, recorded, changed)
    if reshaped:  # refused before the claim records it: a recorded change every later resume would fail on
        raise RecipeError(f"run {run_id}: {reshaped}: its checkpoints hold what was trained as it was (which "
                          "layers, which adapters, of which model), and a resume loads them as they are; "
                          "start a new run for that")
    if target is not None:
        _check_steps(run, stage, recorded, changed, target)
    change = None
    if differ:  # recorded by the claim (`Store.claim_for_resume`): only a resume that starts changes the run
        # Which step it applies from: the checkpoint's, filled in when the trainer takes it (continue_from)
        made = {"step": 0 if over else None, "at": time.time(), "set": overrides, "fields": differ}
        change = {"config": recipe_to_json(with_absolute_paths(changed)),
                  "overrides": json.dumps([*json.loads(run.get("overrides") or "[]"), *overrides]),
                  "changes": json.dumps([*json.loads(run.get("changes") or "[]"), made])}
    where = "false" if over else "true" if picked is True else json.dumps(picked)
    return path, [*overrides, f"{field}={where}"], change


def started_over(overrides: list[str], stage: Stage) -> bool:
    """Whether the overrides resume_recipe gave start the run over (its decision, read back where the run
    is claimed: the row may read otherwise by then)."""
    return bool(overrides) and overrides[-1] == f"{stage}.resume_from_checkpoint=false"


def _check_steps(run: dict[str, Any], stage: Stage, recorded: Recipe, changed: Recipe, target: Path) -> None:
    """The steps asked for go on from checkpoint `target`: more than a finished run has, not fewer than the
    checkpoint has trained."""
    if run["status"] == "done":
        _check_more_to_train(run, stage, recorded, changed)
    elif stage != "ppo":
        _check_not_past_the_end(run, stage, recorded, changed, target)
    else:
        trained = json.loads((target / STATE_MARKERS["ppo"]).read_text(encoding="utf-8")).get("step", 0)
        if changed.ppo.steps < trained:
            raise RecipeError(f"run {run['id']}: ppo.steps {changed.ppo.steps}: its checkpoint {target.name} has "
                              f"trained {trained} steps; a resume goes on to more steps, not back to fewer")


def _reshaped(stage: Stage, recorded: Recipe, changed: Recipe) -> str | None:
    """What of a change alters what the stage's checkpoints hold, so that loading them fails (adapters of
    another rank or on other modules, another set of trained layers and their optimizer state, another
    model), or None. A model folder that moved, holding the same model (its config.json), is the same."""
    old, new = recorded.stage_model(stage), changed.stage_model(stage)
    if old.path != new.path and not _same_model(old.path, new.path):
        return f"the model {old.path} -> {new.path}"
    before, after = recorded.stage(stage), changed.stage(stage)
    lora = (getattr(before, "lora", None), getattr(after, "lora", None))
    if (lora[0] is None) != (lora[1] is None):
        return f"{stage}.lora {'on' if lora[1] is not None else 'off'}"
    if lora[0] is not None and lora[1] is not None:
        for field in ("r", "target_modules"):
            if getattr(lora[0], field) != getattr(lora[1], field):
                return f"{stage}.lora.{field} {getattr(lora[0], field)!r} -> {getattr(lora[1], field)!r}"
    fields = ["num_layers_unfrozen", *(("value_layers", "train_head") if stage == "ppo" else ())]
    for field in fields:
        if getattr(before, field) != getattr(after, field):
            return f"{stage}.{field} {getattr(before, field)!r} -> {getattr(after, field)!r}"
    return None


def _same_model(a: str, b: str) -> bool:
    """Two local model folders holding one model (the same config.json): a folder moved or linked."""
    try:
        return (Path(a) / "config.json").read_bytes() == (Path(b) / "config.json").read_bytes()
    except OSError:
        return False


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two dumped recipes."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".") + f" ({a!r} -> {b!r})"] if a != b else []


def _check_more_to_train(run: dict[str, Any], stage: Stage, recorded: Recipe, changed: Recipe) -> None:
    """A finished run resumed to no more steps would train nothing and export a second `final`."""
    step = run["step"] or 0
    if stage == "ppo":
        more, how = changed.ppo.steps > step, f"--set ppo.steps=N with N > {step}"
    else:
        old, new = recorded.stage(stage).train, changed.stage(stage).train
        if new.max_steps > 0:
            more = new.max_steps > step
        else:
            more = old.max_steps <= 0 and new.epochs > old.epochs
        how = f"--set {stage}.train.max_steps=N with N > {step} (or more {stage}.train.epochs)"
    if not more:
        raise RecipeError(f"run {run['id']} is done at step {step}: resuming it would train nothing; to train it "
                          f"further give {how} --allow-change")


def _check_not_past_the_end(run: dict[str, Any], stage: Stage, recorded: Recipe, changed: Recipe,
                            newest: Path) -> None:
    """A run whose checkpoint to resume from (`newest`) is past the steps asked for has trained more than
    that already. One at its last step (stopped there, or failed while it exported) resumes to its export
    alone (engine.hf_trainer.at_the_end)."""
    state = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))
    old, new = recorded.stage(stage).train, changed.stage(stage).train
    if new.max_steps <= 0 and new.epochs > old.epochs:
        return  # more epochs asked for: the trainer's own count of steps grows with them
    if new.max_steps <= 0 and new.epochs < state.get("epoch", 0) - 1e-6:
        raise RecipeError(f"run {run['id']}: {stage}.train.epochs {new.epochs:g}: its checkpoint {newest.name} has "
                          f"trained {state['epoch']:.3g} epochs; a resume goes on to more, not back to fewer")
    end = new.max_steps if new.max_steps > 0 else state.get("max_steps", 0)
    if end > 0 and state.get("global_step", 0) > end:
        raise RecipeError(f"run {run['id']}: {stage}.train.max_steps {end}: its checkpoint {newest.name} has trained "
                          f"{state['global_step']} steps; a resume goes on to more steps, not back to fewer")


def at_last_step(checkpoint: Path, max_steps: int, epochs: float) -> bool:
    """Whether an SFT or RM checkpoint (`trainer_state.json`) is at the run's last step, by the run's
    `max_steps` (> 0) or else its `epochs`: a resume from it has nothing left to train, only its export."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if max_steps > 0:
        end = max_steps
    elif epochs > state.get("epoch", 0) + 1e-6:
        return False  # more epochs asked for than it has trained (fractional ones too): steps are left
    else:
        end = state.get("max_steps", 0)
    return end > 0 and state.get("global_step", 0) >= end


def no_sharded_export(checkpoint: Path, sharding: str) -> RecipeError:
    """The refusal of an export from a checkpoint at the last step under DeepSpeed or FSDP: the trainer
    loads such a checkpoint only as part of training (its engine's own loader), and there is no step left."""
    return RecipeError(f"{checkpoint} is at the run's last step, and a run sharded with {sharding} is not exported "
                       "from a checkpoint without training: load that folder, or resume with more steps "
                       "(--allow-change --set train.max_steps=N)")


def checkpoints_in(folder: Path, marker: str) -> list[Path]:
    """The `checkpoint-N` folders in `folder` that hold `marker` (saves that completed), oldest first;
    staging folders of a save in progress (`checkpoint-N.partial`) are not among them."""
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-", 1)[1].isdigit() and (p / marker).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-", 1)[1]))


def damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be loaded, read from its files' framing without loading them (None if it
    looks whole): a save cut by a power loss can leave its marker written and a weight file short or
    missing (see engine.framing)."""
    from engine.framing import ADAPTER_FILES, INDEX_SUFFIX, WEIGHT_FILES, file_damage, missing_shards

    def has_weights(folder: Path) -> bool:
        # DeepSpeed ZeRO-3 without a gathered 16-bit copy, and FSDP's sharded state, keep theirs in folders.
        return any((folder / name).is_file() for name in (*WEIGHT_FILES, *ADAPTER_FILES)) or any(
            folder.glob("global_step*")) or any(folder.glob("pytorch_model_fsdp_*"))

    if not checkpoint.is_dir():
        return "it is not there (moved aside meanwhile?)"
    if (checkpoint / STATE_MARKERS["ppo"]).is_file():
        lacking = [name for name in PPO_NEEDS if not (checkpoint / name).exists()]
        if not lacking and not has_weights(checkpoint / "policy"):
            lacking = ["policy's weights"]
    else:
        lacking = [] if has_weights(checkpoint) else ["its weights"]
    if lacking:
        return f"{lacking[0]} is missing"
    for path in sorted(checkpoint.rglob("*")):
        why = (missing_shards(path) if path.name.endswith(INDEX_SUFFIX) else file_damage(path)) \
            if path.is_file() else None
        if why is not None:
            return why
    # Another rank's resume may set it aside while this one reads it (`set_aside_after`): a folder gone
    # under the scan is not whole.
    return None if checkpoint.is_dir() else "it is not there (moved aside meanwhile?)"


def resume_from(value: str | bool | None, folder: Path, marker: str, say: bool = True) -> Path | None:
    """The checkpoint a stage's `resume_from_checkpoint` names: `True` is the newest whole one in the run's
    folder (a newer damaged one is passed over and said in the log; `say` False: a check before the
    trainer, which says it; the resume sets it aside, see `set_aside_after`); a path must hold `marker` and
    whole files. Raises RecipeError naming the file."""
    if value is None or value is False:
        return None
    if value is not True:
        path = Path(value)
        if not (path / marker).is_file():
            raise RecipeError(f"resume_from_checkpoint: {value} is not a checkpoint folder (no {marker})")
        why = damage(path)
        if why is not None:
            raise RecipeError(f"resume_from_checkpoint: {value} is damaged: {why}")
        return path
    saved = checkpoints_in(folder, marker)
    if not saved:
        # Starting over under the same run id would write every step twice into its history.
        raise RecipeError(f"resume_from_checkpoint: {folder} has no checkpoint to resume from")
    for checkpoint in reversed(saved):
        why = damage(checkpoint)
        if why is None:
            return checkpoint
        if say and os.environ.get("RANK", "0") == "0":
            log.warning("%s is damaged (%s): resuming from the checkpoint before it", checkpoint, why)
    raise RecipeError(f"resume_from_checkpoint: every checkpoint in {folder} is damaged (the newest, "
                      f"{saved[-1].name}: {damage(saved[-1])})")


def _caused_by_stop(err: BaseException | None) -> bool:
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, StopRequested):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


# Set by the first SIGTERM, for good: the exception below can be lost. Python runs a signal handler at the
# next bytecode boundary, and when that is inside a weakref callback (importlib's module locks fire one on
# every import, and the set-up is mostly imports) the exception is printed as "Exception ignored" and
# dropped. Seen in a suite run: a stage stopped while trl was importing trained all its 2,800 steps.
_stop_seen = False


def stop_seen() -> bool:
    """Whether this process has had a SIGTERM (a stop requested before its trainer could take it)."""
    return _stop_seen


def _raise_stop() -> None:
    global _stop_seen
    if _stop_seen:  # the same stop again (a supervisor passing on its launcher's death): already under way
        return
    _stop_seen = True
    raise StopRequested()


_clock = time.monotonic  # the clock Presses read (a test sets its own)


class Presses:
    """A user's stop signals, counted: the second one means "now". One press can arrive twice, though: a
    wrapper that passes its own Ctrl-C on (`timeout --foreground`) delivers it right after the terminal did,
    and a second press taken from that would end a run unsaved. A signal within `SAME_S` of the first is
    that first one again."""

    SAME_S = 0.2

    def __init__(self) -> None:
        self.clock = _clock
        self.count = 0
        self.first = 0.0

    def press(self) -> bool:
        """Count a signal; False when it was the first one delivered again (nothing to do)."""
        now = self.clock()
        if self.count and now - self.first < self.SAME_S:
            return False
        self.count += 1
        self.first = self.first or now
        return True

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what a run of this process takes as its stop


def catch_stops(on_stop: Callable[[], None], what: str) -> None:
    """Route a stop to `on_stop`: SIGTERM always, and Ctrl-C in a run that is this process's own (`rlhf
    train`, `rlhf eval` in a terminal; a launched run's Ctrl-C goes to its launcher). The first Ctrl-C asks
    for the graceful stop (`what` says what it does); a second one interrupts at once, as under `rlhf
    launch`. Python only lets the main thread set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    told: list[int] = []

    def terminate(signum: int, frame: object) -> None:
        if not told:  # in the run's log: a launched run's stop said nothing there of why it ended
            told.append(signum)
            _say_now(f"\nSIGTERM: {what}\n")
        on_stop()

    signal.signal(signal.SIGTERM, terminate)
    if os.environ.get(LAUNCHED_ENV) == "1":
        return
    # Its terminal closed (a dropped SSH): stopped as by Ctrl-C, with its checkpoint, rather than killed by
    # the hang-up with nothing saved; `rlhf launch` or the console make a run that outlives its terminal.
    # A hang-up already ignored (`nohup rlhf train ... &`) was meant to be outlived: it stays ignored.
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda signum, frame: on_stop())

    presses = Presses()

    def interrupt(signum: int, frame: object) -> None:
        if not presses.press():
            return
        if presses.count > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _say_now(f"\nCtrl-C: {what}; Ctrl-C again to end it at once, unsaved\n")
        on_stop()

    signal.signal(signal.SIGINT, interrupt)


def _say_now(line: str) -> None:
    """`line` to standard error from a signal handler."""
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except RuntimeError:  # the signal came in the middle of a write to stderr: past its buffer, then
        try:
            os.write(2, line.encode())
        except OSError:
            pass
    except OSError:  # no terminal any more (a closed pipe): the stop is what matters
        pass


class _Tee:
    """A stream that also writes to the run's log (what a terminal shows, the log keeps)."""

    def __init__(self, stream: Any, log: Any):
        self._stream, self._log = stream, log
        self._gone = False  # the terminal went away (a closed pipe, a dropped SSH): the log alone goes on

    def write(self, text: str) -> int:
        try:
            self._log.write(text)
        except (OSError, ValueError):  # a full disk or a closed log must not stop the run
            pass
        if not self._gone:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # `| head` has read enough; a hung-up terminal gives EIO
                self._gone = True
        return len(text)

    def flush(self) -> None:
        try:
            self._log.flush()
        except (OSError, ValueError):
            pass
        if not self._gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._gone = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the terminal's
        return getattr(self._stream, name)


def say(text: str) -> None:
    """A line for the terminal after a run's end (how it ended, how to continue it): the run's record is
    written already, and a terminal that went away meanwhile (`| head`, a dropped SSH) must not turn that
    into a failure."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        pass


def _same_file(stream: Any, log: Any) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.fstat(log.fileno()))
    except (AttributeError, OSError, ValueError):  # a stream with no file (a test's capture)
        return False


@contextmanager
def _log_copy(path: Path) -> Iterator[None]:
    """What this process prints goes to `path` too: a run of `rlhf train` or `rlhf eval` (a pipeline's
    evaluation too) has its train.log in its folder, as a launched run does, for the console's log pane."""
    try:
        log = open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    except OSError:
        yield
        return
    if _same_file(sys.stdout, log) or _same_file(sys.stderr, log):  # started with its output there already
        log.close()
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    # The root's handlers and a library's own (transformers logs through a handler of its own, made on its
    # import with the stderr of that moment, and does not propagate): their warnings belong in the log too.
    loggers = [logging.getLogger(), *(logger for logger in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(logger, logging.Logger))]
    handlers = list({id(h): h for logger in loggers for h in logger.handlers
                     if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (out, err)}.values())
    streams = [h.setStream(_Tee(h.stream, log)) for h in handlers]
    try:
        yield
    except BaseException as failure:
        if not isinstance(failure, (KeyboardInterrupt, SystemExit)) and not _caused_by_stop(failure):
            # What the terminal gets once this propagates: the log's reader must see why the run died too
            # (bad input as the one line the terminal shows, anything else as its traceback).
            said = (f"error: {failure}\n" if isinstance(failure, BAD_INPUT)
                    else "".join(traceback.format_exception(failure)))
            try:
                log.write(said)
            except (OSError, ValueError):
                pass
        raise
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
        sys.stdout, sys.stderr = out, err
        log.close()


@contextmanager
def tracked_run(
    db_path: str | os.PathLike, stage: Stage, recipe: Recipe, recipe_path: str, overrides: list[str]
) -> Iterator[RunHandle]:
    """The run registered (or continued), its status kept in runs.db to its end. While it lasts, SIGTERM
    and Ctrl-C are its stops; the handlers found before are put back however it ends."""
    main_thread = threading.current_thread() is threading.main_thread()
    before = [(s, signal.getsignal(s)) for s in STOPS] if main_thread else []
    try:
        with _tracked_run(db_path, stage, recipe, recipe_path, overrides) as handle:
            yield handle
    finally:
        for signum, handler in before:
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)


def _hold_stops() -> dict[int, Any] | None:
    """Hold SIGTERM and Ctrl-C back: noted now, handled by `_release_stops` (main thread only, where Python
    runs handlers). Noted in Python rather than masked: a signal masked in one thread goes to another."""
    if threading.current_thread() is not threading.main_thread():
        return None
    held: dict[int, Any] = {"seen": []}
    for signum in STOPS:
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            continue  # not this run's stop (a launched rank's Ctrl-C and hang-up): as ever
        held[signum] = signal.signal(signum, lambda number, frame: held["seen"].append(number))
    return held


def _release_stops(held: dict[int, Any] | None) -> None:
    """The handlers back, and the stops that came meanwhile handled by them, here."""
    if held is None:
        return
    for signum in STOPS:
        if signum in held:
            signal.signal(signum, held[signum])
    for signum in held["seen"]:
        if callable(held[signum]):
            held[signum](signum, None)


def _start_stretch(store: Store | None, run_id: int, handle: RunHandle, world: int) -> None:
    """Mark the run running, on a new stretch of its segments, with the processes it runs in."""
    if store is None:
        return
    handle.output_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run keeps the time it first started; each stretch goes on its list of segments.
    row, now = store.run(run_id), time.time()
    segments = json.loads(row.get("segments") or "[]")
    if segments and segments[-1][1] is None:  # a stretch a kill cut short: it lasted to the row's end
        segments[-1][1] = max(segments[-1][0], row["ended"] or segments[-1][0])
    segments.append([now, None])
    fields: dict[str, Any] = {"status": "running", "started": row["started"] or now,
                              "segments": json.dumps(segments),
                              "world_size": world, "ended": None, "exit_code": None, "failure_code": None,
                              "error": None}
    if os.environ.get(LAUNCHED_ENV) != "1":
        fields["launch"] = None  # this stretch runs in this process, whatever started the run before
        fields["pid"] = os.getpid()
        # Only a group leader may be signalled as a group: anything else would hit our parent too.
        fields["pgid"] = os.getpgid(0) if os.getpgid(0) == os.getpid() else None
        # When this process started: a later program given the same pid is never taken for the run.
        fields["pgid_started"] = process_start(os.getpid())
        fields["host"] = socket.gethostname()  # where these processes are: a resume may run elsewhere
    store.update_run(run_id, **fields)


def _cut_short(handle: RunHandle, store: Any) -> str:
    """The error of a run a second Ctrl-C ended before its stop could save: what a resume will do with it."""
    said = "interrupted by a second Ctrl-C before the stop could save; "
    if has_checkpoint({"output_dir": str(handle.output_dir)}):
        return said + "resume from the last checkpoint"
    try:
        trained = store is None or bool(store.run(handle.run_id).get("step"))
    except Exception:  # runs.db unreadable now (what the resilient store rides out): not known, said so
        trained = True
    return said + ("no checkpoint was saved: launch it again (a resume starts over only a run that trained no "
                   "step)" if trained else "it trained no step: a resume starts it over")


@contextmanager
def _tracked_run(
    db_path: str | os.PathLike, stage: Stage, recipe: Recipe, recipe_path: str, overrides: list[str]
) -> Iterator[RunHandle]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    given = os.environ.get(RUN_ID_ENV)
    if given is None and world > 1:
        raise RuntimeError(f"a run with {world} processes needs {RUN_ID_ENV}: start it with `rlhf launch`")
    if threading.current_thread() is threading.main_thread():
        global _stop_seen
        _stop_seen = False  # this run's own stops only (tests run several in one process)
    # Until the trainer installs its own graceful handler, a stop has nothing to save: end now.
    catch_stops(_raise_stop, "stopping before training starts")
    # Rank 0 writes through a store whose failed writes wait and are retried: runs.db trouble never stops
    # a run (registration above, and the final status, still say so if they fail).
    store = ResilientStore(Store(db_path)) if rank == 0 else None
    # A stop in the middle of registering would leave a pending row no look can close (no process on it
    # yet): held until the row is complete, then taken as a stop during set-up (stopped, nothing loaded).
    held = _hold_stops()
    try:
        run_id = int(given) if given is not None else register_run(store, stage, recipe, recipe_path, overrides)
        # Absolute, as the row's: checkpoint paths recorded from it must hold from any directory.
        handle = RunHandle(run_id, Path(recipe.output_root).resolve() / str(run_id), store)
        if given is not None and stage != "eval" and recipe.stage(stage).resume_from_checkpoint is False \
                and has_checkpoint({"output_dir": str(handle.output_dir)}):
            # Started over as never trained, yet it holds a checkpoint now (resumed and trained meanwhile):
            # training from the first step would write over it.
            raise RecipeError(f"run {run_id} holds a checkpoint in {handle.output_dir}: it trained since it was "
                              "started over; resume it instead")
        _start_stretch(store, run_id, handle, world)
        if store is not None:
            # The recipe this stretch runs on (a change a resume allowed applied): a run folder copied or
            # handed on carries its settings, not those of its first start or none at all.
            with suppress(OSError, sqlite3.Error, StoreError):  # a note for the folder, never the run's end
                recorded_recipe(store.run(run_id))
    except BaseException:
        with suppress(StopRequested):  # the registration's own failure is the one to tell
            _release_stops(held)
        raise
    # Launched, the supervisor records the exit code; in this process, it is this process's own, by the
    # one rule: done 0, stopped 143, failed 1 (2 on bad input, 130 on a second Ctrl-C).
    own = os.environ.get(LAUNCHED_ENV) != "1"

    def end(status: str, exit_code: int = 1, **extra: Any) -> None:
        if store is not None:
            code = exit_code if status == "failed" else exit_code_of(status)
            now = time.time()
            segments = json.loads(store.run(run_id).get("segments") or "[]")
            if segments and segments[-1][1] is None:
                segments[-1][1] = now
            # Launched, the exit code is the supervisor's to record (it says the processes are gone); the
            # code this process meant goes beside it, for the supervisor to take over its launcher's 1.
            store.update_run(run_id, status=status, ended=now, segments=json.dumps(segments),
                             **({"exit_code": code} if own else {"failure_code": code} if code == EXIT_BAD_INPUT
                                else {}), **extra)

    try:
        try:
            _release_stops(held)
        except StopRequested:  # remembered (stop_seen): the run's body ends it before anything loads
            pass
        with _log_copy(handle.output_dir / LOG_NAME) if store is not None and own else nullcontext():
            yield handle
    except StopRequested:
        end("stopped")
        handle.status = "stopped"
    except BaseException as err:
        if _caused_by_stop(err):  # the stop landed inside an import that wrapped it (trl's lazy modules)
            end("stopped")
            handle.status = "stopped"
            return
        # A second Ctrl-C (or one in a run started without a handler) cut the run short, unsaved: as a kill.
        # Input the run could not use (data found bad once read whole) is said as the command line says it,
        # without a traceback through the trainer: the fix is in the input.
        bad_input = isinstance(err, BAD_INPUT)
        error = (_cut_short(handle, store) if isinstance(err, KeyboardInterrupt)
                 else f"error: {err}" if isinstance(err, (*BAD_INPUT, RunFailed))
                 else "".join(traceback.format_exception(err))[-4000:])
        # A second Ctrl-C ends the process as the shell reports it: 130, the same in runs.db.
        end("failed", exit_code=130 if isinstance(err, KeyboardInterrupt) else EXIT_BAD_INPUT if bad_input else 1,
            error=error)
        raise
    else:
        end(handle.status)
    finally:
        if store is not None:
            store.close()
