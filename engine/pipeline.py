"""`rlhf pipeline`: SFT, then the reward model, then PPO, then the BELLE evaluation, from one recipe.

Each stage is a run of its own in runs.db (watched, stopped and resumed like any other) that names its
pipeline; the pipeline is a row of its own that says how far it got. Stage inputs are named by stage,
never by run number: in a pipeline the PPO policy is this pipeline's SFT export, the reward model its RM
export (a recipe's `@sft` / `@rm` say the same where a stage reads them, e.g. `rm.model.path: "@sft"`),
and the evaluation judges the SFT and PPO exports with that reward model, offline, unless the recipe names
an OpenAI-compatible judge.

A stopped or crashed pipeline continues with `rlhf pipeline --resume ID`: finished stages are kept, the
unfinished one resumes from its newest checkpoint (or over from its first step where it trained none), then
the rest run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.config import STAGE_REFS, STAGES, Recipe, RecipeError, load_recipe, recipe_to_json, with_absolute_paths
from engine.procs import process_alive, process_start
from engine.run import (
    BAD_INPUT,
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    PIPELINE_ENV,
    RunFailed,
    has_checkpoint,
    never_trained,
    say,
    settled,
)
from engine.store import Store, default_db_path

ORDER = (*STAGES, "eval")
# A pending pipeline with no process this long after its creation never started (its creator died first).
NEVER_STARTED_S = 120.0
LOG_NAME = "pipeline-{id}.{db}.log"  # `db`: the runs.db's identity, as a run folder's marker holds it


def plan(recipe: Recipe, through: str | None) -> list[str]:
    """The stages to run, in order, up to `through` (default: the last the recipe has)."""
    present = [s for s in ORDER if getattr(recipe, s, None) is not None]
    if not present:
        raise RecipeError(f"{recipe.where('')}: the recipe has no stage (sft, rm, ppo, eval)")
    through = through or present[-1]
    if through not in present:
        raise RecipeError(f"--through {through}: the recipe has no '{through}' section (it has {', '.join(present)})")
    stages = [s for s in present if ORDER.index(s) <= ORDER.index(through)]
    if "eval" in stages and not {"sft", "ppo"} & set(stages):
        raise RecipeError("the evaluation judges this pipeline's SFT or PPO export: the recipe needs one of them")
    return stages


def _check_wiring(recipe: Recipe, stages: list[str]) -> None:
    """Stage references point at stages this pipeline runs; the PPO inputs are the pipeline's own."""
    refs = [("rm.model.path", recipe.rm.model.path if recipe.rm and recipe.rm.model else None, "rm"),
            ("ppo.model.path", recipe.ppo.model.path if recipe.ppo and recipe.ppo.model else None, "ppo"),
            ("ppo.reward_model", recipe.ppo.reward_model if recipe.ppo else None, "ppo")]
    for field, value, reader in refs:
        if reader not in stages or value not in STAGE_REFS:
            continue
        if STAGE_REFS[value] not in stages:
            raise RecipeError(f"{recipe.where(field)}: {field}: {value!r}, but this pipeline runs no "
                              f"{STAGE_REFS[value]} stage ({', '.join(stages)})", {field: "no such stage here"})
    if "ppo" in stages and "sft" in stages and recipe.ppo.model is not None and recipe.ppo.model.path != "@sft":
        raise RecipeError(f"{recipe.where('ppo.model.path')}: ppo.model.path: in a pipeline the PPO policy is its "
                          "SFT export: remove ppo.model or write @sft", {"ppo.model.path": "not @sft"})
    if "ppo" in stages and "rm" in stages and recipe.ppo.reward_model not in (None, "@rm"):
        raise RecipeError(f"{recipe.where('ppo.reward_model')}: ppo.reward_model: in a pipeline the reward model is "
                          "its RM export: remove it or write @rm", {"ppo.reward_model": "not @rm"})


def reward_note(recipe: Recipe, stages: list[str]) -> str | None:
    """What a pipeline of `stages` does with the recipe's `ppo.reward_fn`: with an rm stage, PPO scores with
    that stage's export instead (the wiring sets reward_fn null), which the user is told rather than left to
    find in the PPO run's overrides."""
    if not {"rm", "ppo"} <= set(stages) or not recipe.ppo.reward_fn:
        return None
    return (f"ppo.reward_fn {recipe.ppo.reward_fn} is the reward of a PPO run alone: in this pipeline PPO scores "
            "with its rm stage's export (`rlhf train ppo` runs PPO with the function)")


def check_eval_section(recipe: Recipe, stages: list[str]) -> None:
    """The recipe's evaluation, as a pipeline of `stages` runs it: its judge and its eval set's folder."""
    if recipe.eval.judge == "rm" and "rm" not in stages:
        raise RecipeError(f"{recipe.where('eval.judge')}: eval.judge: rm judges with this pipeline's reward model, "
                          "and it runs no rm stage", {"eval.judge": "no rm stage"})
    from engine.belle import BelleError, load_items

    try:
        load_items(recipe.eval.eval_dir, limit=1)
    except (BelleError, OSError) as err:
        raise RecipeError(f"{recipe.where('eval.eval_dir')}: eval.eval_dir: {err}",
                          {"eval.eval_dir": str(err)}) from None


def wiring(stage: str, recipe: Recipe, exports: dict[str, str]) -> list[str]:
    """--set items that feed `stage` the exports of the stages before it."""
    items: list[str] = []
    if stage == "rm" and recipe.rm.model is not None and recipe.rm.model.path in STAGE_REFS:
        items.append(f"rm.model.path={exports[STAGE_REFS[recipe.rm.model.path]]}")
    if stage == "ppo":
        if "sft" in exports:
            spec = (recipe.ppo.model or recipe.model).model_dump()
            items.append("ppo.model=" + json.dumps({**spec, "path": exports["sft"]}))  # JSON is YAML
        if "rm" in exports:
            items += [f"ppo.reward_model={exports['rm']}", "ppo.reward_fn=null"]
    return items


def check(recipe_path: str, overrides: list[str], through: str | None, accelerate_config: str,
          num_processes: int | None = None) -> tuple[Recipe, list[str]]:
    """Everything that can be checked before the first stage (base models and data of every stage, the
    wiring between them, the evaluation's folder, whether the accelerate config can launch each stage),
    registering nothing; returns the recipe and its stages."""
    from engine.launch import check_launch
    from engine.train import validate

    recipe = load_recipe(recipe_path, overrides)
    stages = plan(recipe, through)
    _check_wiring(recipe, stages)
    for stage in stages:  # before hours go into the first one
        if stage != "eval":
            check_launch(stage, validate(stage, recipe_path, overrides, refs_ok=True), accelerate_config,
                         num_processes)
    if "eval" in stages:
        check_eval_section(recipe, stages)
    return recipe, stages


def create(recipe_path: str, overrides: list[str], through: str | None, accelerate_config: str,
           num_processes: int | None, db_path: str | os.PathLike) -> tuple[int, str | None]:
    """Check the pipeline (see check) and register it; its id, and what it does with the recipe's reward
    function (`reward_note`) for the one who started it."""
    recipe, stages = check(recipe_path, overrides, through, accelerate_config, num_processes)
    launch = {"accelerate_config": str(Path(accelerate_config).resolve()), "num_processes": num_processes}
    with Store(db_path) as store:
        pipeline_id = store.create_pipeline(name=recipe.name, recipe=str(Path(recipe_path).resolve()),
                                            config=recipe_to_json(with_absolute_paths(recipe)), overrides=overrides,
                                            through=stages[-1], launch=launch)
    return pipeline_id, reward_note(recipe, stages)


def db_tag(store: Store) -> str:
    """A runs.db's identity, short, for the names of its pipelines' files: two runs.db files with one
    output_root each have a pipeline 1, and never share (or overwrite) its recipe or its log."""
    return f"{store.db_id:016x}"[:8]


def _recorded(row: dict[str, Any], tag: str) -> str:
    """The recipe as the pipeline recorded it, written beside its runs: what every stage reads, so that a
    resumed pipeline runs its later stages as it would have, whatever became of the file since."""
    config = json.loads(row["config"])
    path = Path(config["output_root"]) / f"pipeline-{row['id']}.{tag}.recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return str(path)


class _Stop:
    """SIGTERM between stages: finish nothing new. (During a stage the stage's supervisor has it.)"""

    def __init__(self) -> None:
        self.asked = False
        signal.signal(signal.SIGTERM, self._ask)
        signal.signal(signal.SIGINT, self._ask)

    def _ask(self, signum: int, frame: object) -> None:
        self.asked = True


def _final(run: dict[str, Any]) -> str:
    return str(Path(run["output_dir"]) / "final")


def run(pipeline_id: int, db_path: str | os.PathLike, echo: bool = False) -> str:
    """Run (or continue) the pipeline's stages in order; returns its final status. Whatever stops it
    (a stage that cannot start, runs.db trouble) is recorded on the pipeline before it is raised."""
    db_path = str(Path(db_path).resolve())
    try:
        return _run(pipeline_id, db_path, echo)
    except BaseException as err:
        try:
            with Store(db_path) as store:
                row = store.pipeline(pipeline_id)
                # Not a row another process runs (two resumes at once: the one that lost must not fail it)
                if row["status"] in ("pending", "running") and row["pid"] in (None, os.getpid()):
                    store.update_pipeline(pipeline_id, status="failed", ended=time.time(),
                                          error=f"{type(err).__name__}: {err}"[:2000])
        except Exception:  # the store itself may be what failed: the original error is the one to see
            pass
        raise


def _run(pipeline_id: int, db_path: str, echo: bool) -> str:
    from engine.launch import prepare, supervise

    os.environ[PIPELINE_ENV] = str(pipeline_id)
    # Its stages run in sessions of their own and outlive a dropped terminal; so does the pipeline that
    # chains them (what it prints then is lost, each stage's train.log has it all).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = _Stop()
    with Store(db_path) as store:
        row = store.pipeline(pipeline_id)
        _no_stage_alive(store, pipeline_id)  # before the row says running: it stays as it was
        if not store.claim_pipeline(pipeline_id, os.getpid(), process_start(os.getpid())):
            raise RecipeError(f"pipeline {pipeline_id} is running in another process (pid "
                              f"{store.pipeline(pipeline_id)['pid']}): resumed twice at once")
        tag = db_tag(store)
    recipe_path = _recorded(row, tag)
    launch = json.loads(row["launch"])
    recipe = load_recipe(recipe_path)
    exports: dict[str, str] = {}

    def end(status: str, error: str | None = None) -> str:
        with Store(db_path) as store:
            store.update_pipeline(pipeline_id, status=status, ended=time.time(), error=error)
        if not echo:  # the detached pipeline's log says how it ended (a terminal gets the command's own line)
            say(f"pipeline {pipeline_id}: {status}" + (f" ({error})" if error else ""))
        return status

    stages = plan(recipe, row["through"])
    say(f"pipeline {pipeline_id}: {'resumed' if row['status'] != 'pending' else 'started'}, {' → '.join(stages)}")
    if note := reward_note(recipe, stages):
        say(f"pipeline {pipeline_id}: note: {note}")

    for stage in stages:
        with Store(db_path) as store:
            # A stage whose processes died without a word (a crash, a kill -9, a reboot) is closed as failed
            # here, so that it resumes from its checkpoint instead of being started again.
            mine = [settled(store, r["id"]) for r in store.pipeline_runs(pipeline_id) if r["stage"] == stage]
        if mine and mine[-1]["status"] in ("pending", "running"):
            raise RecipeError(f"pipeline {pipeline_id}: its {stage} stage, run {mine[-1]['id']}, is "
                              f"{mine[-1]['status']} in another process; stop it first")
        if stage == "eval":
            status = _evaluate(recipe, exports, mine, db_path, pipeline_id, stop)
            if status != "done":
                return end(status, f"evaluation {status}")
            continue
        last = mine[-1] if mine else None
        if last is not None and last["status"] == "done":
            exports[stage] = _final(last)
            continue
        if stop.asked:
            return end("stopped")
        # Its run goes on (from its checkpoint, or over from its first step where it trained none: one row,
        # not one more a resume); a run that trained steps and kept no checkpoint is started anew.
        if last is not None and last["status"] in ("stopped", "failed") and (has_checkpoint(last)
                                                                            or never_trained(last)):
            prepared = prepare(stage, None, [], launch["accelerate_config"], launch["num_processes"], db_path,
                               resume_run=last["id"])
        else:
            prepared = prepare(stage, recipe_path, wiring(stage, recipe, exports),
                               launch["accelerate_config"], launch["num_processes"], db_path)
        # In a terminal, or in the pipeline's own log when detached; the run's output goes to its train.log.
        say(f"pipeline {pipeline_id}: {stage} is run {prepared.run_id}")
        supervise(prepared, echo=echo)
        signal.signal(signal.SIGTERM, stop._ask)  # the supervisor put back what it found; make sure
        with Store(db_path) as store:
            done = store.run(prepared.run_id)
        if done["status"] != "done":
            return end("stopped" if done["status"] == "stopped" else "failed",
                       f"{stage} (run {prepared.run_id}) {done['status']}")
        exports[stage] = _final(done)
    return end("done")


def eval_options(recipe: Recipe, exports: dict[str, str], which: str, label: str) -> list[str]:
    """`rlhf eval belle`'s arguments for the evaluation of the `which` export, from the recipe's eval section."""
    settings = recipe.eval
    assert settings is not None
    argv = [exports[which], "--eval-dir", settings.eval_dir, "--name", label, "--judge", settings.judge,
            "--max-new-tokens", str(settings.max_new_tokens), "--batch-size", str(settings.batch_size),
            "--output-root", recipe.output_root]
    if settings.judge == "rm":  # offline: the endpoint's options are refused with it
        argv += ["--reward-model", exports["rm"]]
    else:
        argv += ["--judge-url", settings.judge_url or "", "--judge-model", settings.judge_model or "",
                 "--judge-key-env", settings.judge_key_env, "--concurrency", str(settings.concurrency),
                 "--judge-retries", str(settings.judge_retries), "--judge-timeout", str(settings.judge_timeout)]
    if settings.limit:
        argv += ["--limit", str(settings.limit)]
    if settings.per_class:
        argv += ["--per-class", str(settings.per_class)]
    return argv


def _evaluate(recipe: Recipe, exports: dict[str, str], mine: list[dict], db_path: str, pipeline_id: int,
              stop: _Stop) -> str:
    """Each checkpoint the recipe names answers the eval set, through `rlhf eval belle` in a process of its
    own (a run like the others: the console stops it through its own process group)."""
    say(f"pipeline {pipeline_id}: eval of {', '.join(w for w in recipe.eval.checkpoints if w in exports)}")
    settings = recipe.eval
    for which in settings.checkpoints:
        if which not in exports:
            continue
        label = f"{recipe.name} {which} (pipeline {pipeline_id})"
        earlier = [r for r in mine if r["name"] == label]
        if earlier and earlier[-1]["status"] == "done":
            continue
        if stop.asked:
            return "stopped"
        argv = [sys.executable, "-m", "engine.cli", "eval", "belle", "--db", db_path]
        if earlier:
            argv += ["--resume-run", str(earlier[-1]["id"])]
        else:
            argv += eval_options(recipe, exports, which, label)
        # Its output: the terminal, or the pipeline's log when detached; and its own train.log either way.
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)

        def forward(signum: int, frame: object) -> None:
            stop.asked = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, stop._ask)
            signal.signal(signal.SIGINT, stop._ask)
        if code != 0:
            return "stopped" if code == EXIT_STOPPED else "failed"
    return "done"


def _orphaned(row: dict[str, Any]) -> bool:
    # No pid yet: created and about to start (or start_detached's child not yet up): not judged. Another
    # machine's process (a shared runs.db) is not ours to judge.
    return (row["status"] in ("pending", "running") and bool(row["pid"])
            and row.get("host") in (None, "", socket.gethostname())
            and not process_alive(row["pid"], row["pid_started"]))


def settled_pipeline(store: Store, pipeline_id: int) -> dict[str, Any]:
    """The pipeline's row, closed as failed first if it says pending or running but its process died
    without recording how (a kill -9, a reboot): as `settled` does for a run."""
    row = store.pipeline(pipeline_id)
    if _orphaned(row) and store.close_orphan_pipeline(pipeline_id, row):
        row = store.pipeline(pipeline_id)
    return row


def settle_pipelines(store: Store, rows: list[dict[str, Any]]) -> bool:
    """`settled_pipeline` for each of `rows` (just read) that claims to be active; whether any was closed."""
    return any([store.close_orphan_pipeline(row["id"], row) for row in rows if _orphaned(row)])


def _no_stage_alive(store: Store, pipeline_id: int) -> None:
    """A stage still running in another process (the pipeline's own process was killed, the stage was
    resumed by hand) must end before the pipeline continues: else two processes would train one run."""
    for run in store.pipeline_runs(pipeline_id):
        run = settled(store, run["id"])
        if run["status"] in ("pending", "running"):
            raise RecipeError(f"pipeline {pipeline_id}: its {run['stage']} stage, run {run['id']}, is "
                              f"{run['status']} in another process; stop it first (rlhf stop {run['id']})")


def resume(pipeline_id: int, db_path: str | os.PathLike) -> None:
    """Check that the pipeline can continue: it exists, is not running now, nor is any of its stages (a
    detached resume must say so here, not in its log after it has returned)."""
    with Store(db_path, create=False) as store:
        row = settled_pipeline(store, pipeline_id)
        # Still active after the look: alive here, on another machine (not ours to judge), or a detached
        # start whose process has not recorded itself yet; a row that never got a process is let go.
        never_started = not row["pid"] and time.time() - row["created"] > NEVER_STARTED_S
        if row["status"] in ("pending", "running") and not never_started:
            where = f" on {row['host']}" if row.get("host") and row["host"] != socket.gethostname() else ""
            process = f"pid {row['pid']}{where}" if row["pid"] else "its process is starting"
            raise RecipeError(f"pipeline {pipeline_id} is {row['status']} ({process}); stop it first")
        if row["status"] == "done":
            raise RecipeError(f"pipeline {pipeline_id} is done: every stage through {row['through']} finished")
        _no_stage_alive(store, pipeline_id)


def start_detached(pipeline_id: int, db_path: str | os.PathLike) -> tuple[Path, int, int | None]:
    """The pipeline in a session of its own (it outlives the terminal); returns its log's path, in the
    pipeline's output root, and its process (pid, start time)."""
    with Store(db_path) as store:
        output_root = json.loads(store.pipeline(pipeline_id)["config"])["output_root"]
        tag = db_tag(store)
    log_path = Path(output_root).resolve() / LOG_NAME.format(id=pipeline_id, db=tag)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            from engine.procs import spawn_detached

            pid, started = spawn_detached([sys.executable, "-m", "engine.pipeline", str(pipeline_id), "--db",
                                           str(db_path)], log)
    except OSError as err:  # recorded, so that the pipeline's row says why it never ran (and resume can retry)
        with Store(db_path) as store:
            store.update_pipeline(pipeline_id, status="failed", ended=time.time(), error=f"could not start: {err}")
        raise
    return log_path, pid, started


def taken_by(pipeline_id: int, db_path: str | os.PathLike, pid: int, started: int | None,
             patience_s: float = 300.0) -> dict[str, Any]:
    """The pipeline's row once process `pid` has taken it (running in it) or has ended without (another
    process took it first, or it failed at once): what a detached resume says, rather than 'resumed' of a
    process that lost the race."""
    deadline = time.monotonic() + patience_s
    while True:
        with Store(db_path) as store:
            row = store.pipeline(pipeline_id)
        if (row["status"] == "running" and row["pid"] == pid) or not process_alive(pid, started) \
                or time.monotonic() > deadline:
            return row
        time.sleep(0.2)


def resume_detached(pipeline_id: int, db_path: str | os.PathLike) -> tuple[Path, bool]:
    """Resume the pipeline in a session of its own and learn whether its process took it: its log and True
    once it has, False while it is still starting after minutes. Raises RecipeError when it cannot resume
    or another command resumed it first, RunFailed when its process ended without it (the row's why)."""
    resume(pipeline_id, db_path)
    log, pid, started = start_detached(pipeline_id, db_path)
    row = taken_by(pipeline_id, db_path, pid, started)
    if row["pid"] == pid and row["status"] in ("running", "done", "stopped"):
        return log, True
    if row["pid"] != pid and process_alive(pid, started):
        return log, False
    if row["pid"] != pid and row["status"] in ("pending", "running"):
        raise RecipeError(f"pipeline {pipeline_id} was resumed by another command (pid {row['pid']}) first; "
                          "this resume ended")
    why = row["error"] if row["pid"] == pid and row["error"] else "its process ended at once"
    raise RunFailed(f"pipeline {pipeline_id} did not resume: {why}; its log: {log}")


def exit_code(status: str) -> int:
    return {"done": 0, "stopped": EXIT_STOPPED}.get(status, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.pipeline", description="run a registered pipeline")
    parser.add_argument("pipeline_id", type=int)
    parser.add_argument("--db", default=None)
    args = parser.parse_args(argv)
    try:
        return exit_code(run(args.pipeline_id, args.db or default_db_path()))
    except BAD_INPUT as err:  # in its log, one line (resumed twice at once, a stage that cannot start)
        say(f"error: {err}")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
