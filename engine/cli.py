"""`rlhf`: every stage as a plain command. Imports stay light until a command needs torch."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

DB_HELP = "runs database (default: $RLHF_DB or ./runs.db)"


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    from engine.config import STAGES

    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("recipe", nargs="?", help="recipe YAML, e.g. configs/tiny.yaml (not with --resume-run: "
                        "a resume reads the run's recorded recipe)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set sft.train.lr=1e-5 (or train.lr=1e-5 for this stage)",
    )
    parser.add_argument("--db", default=None, help=DB_HELP)
    parser.add_argument("--strict-data", action="store_true",
                        help="a malformed data record is an error instead of being skipped (strict_data=true)")
    parser.add_argument("--allow-change", action="store_true",
                        help="with --resume-run: continue the run with the given --set items changed")


def _recipe_or_resume(args: argparse.Namespace) -> None:
    from engine.config import RecipeError

    if args.resume_run is None and args.recipe is None:
        raise RecipeError(f"rlhf {args.command} {args.stage}: give a recipe file (or --resume-run ID)")
    if args.resume_run is None and args.allow_change:
        raise RecipeError("--allow-change is for --resume-run: a new run takes its --set items as they are")
    if args.resume_run is not None and args.recipe is not None:
        # Not refused (scripts pass the recipe they started with); said, so that an edit to the file is not
        # believed applied.
        print(f"note: {args.recipe} is not read: a resume continues run {args.resume_run}'s recorded recipe "
              "(--allow-change --set KEY=VALUE changes it)", file=sys.stderr)
    if args.strict_data:
        args.overrides.append("strict_data=true")


def build_parser() -> argparse.ArgumentParser:
    from engine.config import STAGES

    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline: SFT, reward model, PPO.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded tiny demo")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    init = demo_sub.add_parser("init", help="write the tiny model, tokenizer and data sets")
    init.add_argument("folder", nargs="?", default="demo")

    train = sub.add_parser("train", help="run a stage in this process")
    _add_recipe_args(train)
    train.add_argument("--resume-run", type=int, default=None, metavar="ID",
                       help="continue run ID from its newest checkpoint (same run, same metric history)")

    launch = sub.add_parser("launch", help="run a stage through `accelerate launch`")
    _add_recipe_args(launch)
    launch.add_argument("--accelerate-config",
                        help="required for a new run, e.g. configs/accelerate/cpu.yaml (with --resume-run: the run's "
                             "own by default)")
    # accelerate's own spelling too: habits carried over from `accelerate launch --num_processes`
    launch.add_argument("--num-processes", "--num_processes", type=int, default=None, dest="num_processes",
                        help="processes to start (default: the accelerate config's num_processes)")
    launch.add_argument("--run-id", type=int, default=None,
                        help="multi-node: on machines with machine_rank > 0, the run id machine 0 printed")
    launch.add_argument("--resume-run", type=int, default=None, metavar="ID",
                        help="continue run ID from its newest full-state checkpoint")
    launch.add_argument("--detach", action="store_true",
                        help="print the run id and return; the run goes on in its own session")

    pipe = sub.add_parser("pipeline", help="SFT, RM, PPO and the BELLE evaluation from one recipe, each stage a run")
    pipe.add_argument("recipe", nargs="?", help="recipe YAML (not with --resume)")
    pipe.add_argument("--through", choices=("sft", "rm", "ppo", "eval"), default=None,
                      help="the last stage to run (default: the recipe's last)")
    pipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe field for every stage, e.g. --set ppo.steps=50")
    pipe.add_argument("--accelerate-config", help="required for a new pipeline, e.g. configs/accelerate/cpu.yaml "
                                                  "(each stage's launch)")
    pipe.add_argument("--num-processes", "--num_processes", type=int, default=None, dest="num_processes",
                      help="processes each stage starts (default: the accelerate config's num_processes)")
    pipe.add_argument("--resume", type=int, metavar="ID", help="continue pipeline ID from its unfinished stage")
    pipe.add_argument("--detach", action="store_true", help="print the pipeline id and return; it goes on alone")
    pipe.add_argument("--db", default=None, help=DB_HELP)

    console = sub.add_parser("console", help="open the terminal console (the default with no command)")
    console.add_argument("--db", default=None, help=DB_HELP)
    # Listed for --help; main() opens the console on it before this parser is built (`rlhf chat --help` too).
    sub.add_parser("chat", help="chat with two checkpoints side by side: rlhf chat A [B] (folders, run ids or "
                                "openai:MODEL@URL)")

    check = sub.add_parser("check", help="validate a recipe (its model and data paths too) and print it resolved")
    check.add_argument("recipe")
    check.add_argument("--stage", choices=(*STAGES, "eval"), default=None,
                       help="check this stage only (its model, data and paths; eval: the pipeline's evaluation, its "
                            "judge and eval set; --set keys relative to it); default: every stage the recipe has, "
                            "each problem said. The whole resolved recipe is printed either way")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set sft.train.lr=1e-5, as a launch would take it")
    check.add_argument("--estimate", action="store_true",
                       help="print the memory per GPU of each stage instead (from the model config alone)")
    check.add_argument("--strict-data", action="store_true",
                       help="a malformed data record is an error instead of being skipped (strict_data=true)")
    check.add_argument("--accelerate-config", default=None,
                       help="whether it can launch each stage; with --estimate: ZeRO/FSDP sharding and GPU count")
    check.add_argument("--gpus", type=int, default=None, help="with --estimate: GPUs (default: the config's processes)")
    check.add_argument("--gpu-memory", default=None, help="with --estimate: memory per GPU (default 80GiB)")

    runs = sub.add_parser("runs", help="list the runs in runs.db")
    runs.add_argument("--db", default=None, help=DB_HELP)
    runs.add_argument("--pipeline", type=int, default=None, metavar="ID",
                      help="only this pipeline's runs, after a line on the pipeline itself")
    runs.add_argument("--json", action="store_true",
                      help="one JSON object per line (every column but the resolved recipe, plus elapsed_s), "
                           "for scripts")
    stop = sub.add_parser("stop", help="stop a run: it saves a checkpoint and ends (as x in the console)")
    stop.add_argument("run_id", type=int)
    stop.add_argument("--wait", action="store_true", help="return once the run has ended (its status printed)")
    stop.add_argument("--db", default=None, help=DB_HELP)

    delete = sub.add_parser("delete", help="forget ended runs and what they logged (as D in the console)")
    delete.add_argument("run_ids", type=int, nargs="+", metavar="ID")
    delete.add_argument("--files", action="store_true",
                        help="delete each run's folder too (checkpoints, exports, log): only a folder that carries "
                             "this runs.db's marker for the run")
    delete.add_argument("--force", action="store_true",
                        help="with --files: even where other runs use them (trained from its export, scored by "
                             "it, evaluating it)")
    delete.add_argument("--db", default=None, help=DB_HELP)

    evaluate = sub.add_parser("eval", help="judge checkpoints: BELLE evaluation, score table, pairwise")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    belle = eval_sub.add_parser("belle", help="answer the BELLE questions with a checkpoint and judge the answers")
    belle.add_argument("checkpoint", nargs="?", help="a model folder, or a run id (its export)")
    belle.add_argument("--eval-dir", help="folder with eval_set.json and eval_prompt.json (with --answers-from: that "
                       "run's by default)")
    # Defaults are EvalConfig's, filled in there: None here means "not given", which a resume needs to know.
    from engine.eval_cli import RESUME_MAY_CHANGE
    from engine.evaluate import EvalConfig

    belle.add_argument("--judge", choices=("openai", "rm"), help="who scores the answers")
    belle.add_argument("--judge-url", help="base URL of an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    belle.add_argument("--judge-model",
                       help="the judge model's name at that endpoint (BELLE's own scorer used the default)")
    belle.add_argument("--judge-key-env",
                       help="environment variable that holds the endpoint's key (never stored)")
    belle.add_argument("--reward-model", help="reward model for --judge rm: a folder, or an rm run's id")
    belle.add_argument("--limit", type=int, help="only the first N questions")
    belle.add_argument("--per-class", type=int, metavar="N",
                       help="only the first N questions of each class (every score-table column, on a budget)")
    belle.add_argument("--name", help="the checkpoint's label in the score table")
    belle.add_argument("--max-new-tokens", type=int, help="answer length limit")
    belle.add_argument("--batch-size", type=int, help="questions answered per decode batch")
    belle.add_argument("--temperature", type=float, help="0 = greedy")
    belle.add_argument("--top-p", type=float, help="nucleus sampling when temperature > 0")
    belle.add_argument("--top-k", type=int, help="top-k sampling when temperature > 0 (0 = off)")
    belle.add_argument("--seed", type=int, help="sampling seed")
    belle.add_argument("--concurrency", type=int, help="judge calls in flight")
    belle.add_argument("--judge-retries", type=int, metavar="N",
                       help="tries after a judge call's first failure (a timeout, a 429 or 5xx), with backoff")
    belle.add_argument("--judge-timeout", type=float, metavar="SECONDS",
                       help="how long one judge call may take before it counts as failed (a reasoning model's "
                       "replies take minutes)")
    belle.add_argument("--price-per-1k", type=float, help="judge price per 1,000 tokens, for the cost estimate")
    belle.add_argument("--rewrite-reference", action="store_true", default=None,
                       help="give the judge the reference answer of the 39 rewrite items that have one")
    belle.add_argument("--answers-from", type=int, metavar="ID", help="judge run ID's answers instead of generating")
    belle.add_argument("--resume-run", type=int, metavar="ID",
                       help="continue evaluation run ID where it stopped, as it was started; how it reaches its "
                       f"judge may change: {', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} (and "
                       "--judge-url, --judge-model while nothing is judged)")
    belle.add_argument("--output-root", metavar="DIR",
                       help="folder under which the run gets <id>/ (as a recipe's output_root)")
    belle.add_argument("--db", default=None, help=DB_HELP)
    for action in belle._actions:  # each option's default, said once: EvalConfig's
        field = EvalConfig.model_fields.get(action.dest)
        if field is not None and not field.is_required() and field.default is not None and field.default is not False \
                and action.help:
            action.help += f" (default: {field.default})"
    table = eval_sub.add_parser("table", help="the score table of every evaluation run")
    table.add_argument("--format", choices=("md", "csv", "json"), default="md",
                       help="Markdown (best in bold), CSV (a best flag per cell) or JSON (default: md)")
    table.add_argument("--runs", help="comma-separated run ids (default: every evaluation run)")
    table.add_argument("--delta", nargs=2, type=int, metavar=("A", "B"), help="paired deltas of run B against run A")
    table.add_argument("--db", default=None, help=DB_HELP)
    pair = eval_sub.add_parser("pairwise", help="a judge compares two evaluation runs' answers in both orders")
    pair.add_argument("a", type=int, help="evaluation run A")
    pair.add_argument("b", type=int, help="evaluation run B")
    pair.add_argument("--judge-url", help="base URL of an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    pair.add_argument("--judge-model", help="the judge model's name at that endpoint (required: no default "
                      "model is a fair referee of two others)")
    pair.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                      help="environment variable that holds the endpoint's key, never stored (default: OPENAI_API_KEY)")
    pair.add_argument("--concurrency", type=int, default=8, help="judge calls in flight (default: 8)")
    pair.add_argument("--judge-retries", type=int, default=5, metavar="N",
                      help="tries after a judge call's first failure (a timeout, a 429 or 5xx), with backoff "
                      "(default: 5)")
    pair.add_argument("--judge-timeout", type=float, default=120.0, metavar="SECONDS",
                      help="how long one judge call may take before it counts as failed (default: 120)")
    pair.add_argument("--db", default=None, help=DB_HELP)
    return parser


# After `rlhf stop --wait` killed a run's group, how long its record may take to become final (its supervisor
# records the exit within a second; a look closes a row whose processes are gone) before the command gives up.
KILLED_RECORD_S = 60.0


def _cmd_stop(run_id: int, db: str | None, wait: bool) -> int:
    """SIGTERM to the run's processes (its checkpoint, then `stopped`); a pipeline's stage ends its pipeline
    too. With --wait, as x in the console: once its record is final, or after the grace period its group is
    killed. Exit 0 once asked, or if it had ended already (with --wait: once it ended stopped or done), 1
    otherwise."""
    from engine.config import RecipeError
    from engine.launch import stop_grace_s, stop_run
    from engine.procs import kill_run_groups, process_alive, same_group
    from engine.run import ended_for_good, settled
    from engine.run_facts import error_summary, stop_outcome
    from engine.store import Store, default_db_path

    db_path = db or default_db_path()
    grace_s = stop_grace_s()  # a bad RLHF_STOP_GRACE_S is said before anything is signalled
    with Store(db_path, create=False) as store:
        run = store.run(run_id)
    asked = None
    if run["status"] in ("pending", "running"):
        try:
            asked = stop_run(db_path, run_id)
        except RecipeError:
            with Store(db_path) as store:
                run = store.run(run_id)
            if run["status"] in ("pending", "running"):
                raise
            # it ended between the look and the stop: as if it had ended before
    if asked is not None and asked.was_dead:
        print(f"run {run_id}: its processes were already gone; closed as failed (resume it from its checkpoint)")
        return 1
    if asked is None:  # what a stop wants holds already: a script's stop is no failure
        print(f"run {run_id} is {run['status']}: nothing to stop", flush=True)
        # Its processes may still be finishing (a trainer that recorded its stop, still writing): --wait
        # waits for them as for a stop of its own.
        group = (run["pgid"], run["pgid_started"]) if run.get("pgid") else None
    else:
        print(f"run {run_id}: stop asked; {stop_outcome(run)}", flush=True)
        if asked.unrecorded:
            print(f"run {run_id}: the stop was signalled, but runs.db could not record it ({asked.unrecorded}); "
                  "the run still saves and ends, but its record says so only if runs.db takes writes again "
                  "within about two minutes (free some space)", file=sys.stderr, flush=True)
        group = asked.group
    if not wait:
        return 0
    deadline, killed_at, gone_at = time.monotonic() + grace_s, None, None
    while True:
        try:
            with Store(db_path) as store:
                run = settled(store, run_id)
        except sqlite3.Error as err:  # its processes ended, and closing its row is a write a full disk refuses
            alive = same_group(*group) if group else process_alive(run["pid"], run["pgid_started"])
            if alive:
                raise
            print(f"run {run_id}: its processes have ended, but runs.db cannot record how ({err}); `rlhf runs` "
                  "closes it once runs.db takes writes again", flush=True)
            return 1
        if ended_for_good(run):
            why = error_summary(run["error"]) if run["status"] not in ("done", "stopped") else ""
            print(f"run {run_id}: {run['status']}" + (f" ({why})" if why else ""))
            return 0 if run["status"] in ("stopped", "done") else 1
        if killed_at is None and time.monotonic() > deadline and group and same_group(*group):
            kill_run_groups(group[0], run.get("output_dir"))
            killed_at = time.monotonic()
            print(f"run {run_id}: still running {grace_s} s after the stop: killed", flush=True)
            if not run.get("launch"):  # no supervisor to record the kill: the row says what happened
                killed = (f"killed by rlhf stop: still running {grace_s} s after its stop, before its "
                          "checkpoint was recorded; resume it from its newest complete checkpoint")
                with Store(db_path) as store:  # SIGKILL is not refused: nothing of the run writes again
                    store.close_orphan(run_id, run, why=killed)
        if killed_at is not None and time.monotonic() - killed_at > KILLED_RECORD_S:
            print(f"run {run_id}: killed, but its record is not final yet (`rlhf runs` shows it)", flush=True)
            return 1
        if group and gone_at is None and not same_group(*group):
            gone_at = time.monotonic()
        if gone_at is not None and killed_at is None and time.monotonic() - gone_at > KILLED_RECORD_S:
            # Its processes ended, and whatever records their exit (its supervisor) has not: a supervisor held
            # stopped, say. Waiting on would be waiting forever.
            print(f"run {run_id}: its processes have ended, but nothing has recorded their exit for "
                  f"{KILLED_RECORD_S:.0f} s (`rlhf runs` shows its record)", flush=True)
            return 1
        time.sleep(0.5)


def _cmd_delete(run_ids: list[int], files: bool, force: bool, db: str | None) -> int:
    """Every run is checked before any is deleted: one active, unknown or (with --files) used by a run kept
    is exit 2 with nothing deleted. Exit 1 where a folder asked for was kept."""
    from engine.delete import check_deletable, delete_folder, forget_runs
    from engine.run_facts import runs_using
    from engine.store import Store, StoreError, default_db_path

    db_path = db or default_db_path()
    ids = list(dict.fromkeys(run_ids))
    with Store(db_path, create=False) as store:
        runs = {run["id"]: run for run in store.runs()}
        for run_id in ids:
            if run_id not in runs:
                raise StoreError(f"{db_path}: no run {run_id}")
            check_deletable(store, runs[run_id])
            users = [i for i in runs_using(runs[run_id], runs.values()) if i not in ids]
            if files and users and not force:
                many = len(users) > 1
                raise StoreError(f"run{'s' if many else ''} {', '.join(map(str, users))} use{'' if many else 's'} "
                                 f"run {run_id}'s files (trained from its export, scored by it or evaluating "
                                 f"it): {'their' if many else 'its'} resumes and score rows would lose a model; "
                                 "add --force to delete them anyway, or leave out --files")
    forgotten = forget_runs(db_path, ids)  # all or none: a run resumed since the look above keeps them all
    code = 0
    for gone in forgotten:
        folder = gone.run.get("output_dir")
        existed = bool(folder) and Path(folder).exists()
        kept = delete_folder(gone) if files else None
        deleted = files and existed and not kept and not Path(folder).exists()
        print(f"run {gone.run['id']} deleted" + (f", and its folder {folder}" if deleted else ""), flush=True)
        if kept:
            print(f"warning: {kept}", file=sys.stderr, flush=True)
            code = 1
    return code


# Columns runs.db holds as JSON text: a script reads them as JSON values, not as strings to decode again.
JSON_COLUMNS = ("overrides", "launch", "segments", "data_fates")


def _decoded(row: dict) -> dict:
    return {k: json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v for k, v in row.items()}


def _cmd_runs(db: str | None, pipeline_id: int | None = None, as_json: bool = False) -> int:
    from engine.run_facts import (
        STALL_WINDOW,
        current_start,
        elapsed,
        error_summary,
        format_duration,
        pipeline_waits_for,
        shown_status,
        silent_for,
    )
    from engine.store import Store, default_db_path

    path = db or default_db_path()
    from engine.pipeline import settle_pipelines
    from engine.run import settle_active

    with Store(path, create=False) as store:  # a look must not create an empty runs.db where there was none
        try:  # a run (or pipeline) whose processes are gone is failed, not running
            settle_active(store)
            settle_pipelines(store, store.pipelines())
        except sqlite3.Error as err:  # a full disk, a runs.db this user may only read: the rows as they are
            print(f"warning: {path}: could not close the rows of ended runs ({err}): a run listed as running "
                  "may have ended", file=sys.stderr, flush=True)
        rows = store.runs()
        pipeline = store.pipeline(pipeline_id) if pipeline_id is not None else None
        if pipeline is not None:
            rows = [run for run in rows if run.get("pipeline_id") == pipeline_id]
        now = time.time()
        silent = {run["id"]: silent_for(store.logged_times(run["id"], current_start(run), STALL_WINDOW), now)
                  for run in rows if run["status"] == "running"}
    if as_json:
        if pipeline is not None:
            print(json.dumps({"pipeline": _decoded({k: v for k, v in pipeline.items() if k != "config"})},
                             ensure_ascii=False))
        for run in rows:
            shown = _decoded({k: v for k, v in run.items() if k != "config"})
            shown["elapsed_s"] = round(elapsed(run), 3) if run["started"] else None
            quiet = silent.get(run["id"])
            shown["silent_s"] = round(quiet, 3) if quiet is not None else None
            print(json.dumps(shown, ensure_ascii=False))
        return 0
    if pipeline is not None:
        ended = (" · ended " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pipeline["ended"]))
                 if pipeline["ended"] and pipeline["status"] not in ("pending", "running") else "")
        why = f" · {error_summary(pipeline['error'])}" if pipeline["error"] else ""
        if waits := pipeline_waits_for(pipeline, rows, db):  # its error says to resume: refused while that runs
            why += f" · {waits}"
        print(f"pipeline {pipeline['id']} {pipeline['name']} (through {pipeline['through']}): "
              f"{pipeline['status']}{ended}{why}")
    from rich.cells import cell_len, set_cell_size  # columns, not characters: a Chinese name takes two a character

    width = max([16, *(cell_len(run["name"]) for run in rows)])  # whole: "tiny sft (pipeline 1)" tells runs apart
    print(f"{'id':>4} {'stage':5} {'name':{width}} {'status':9} {'step':>14} {'time':>7} {'started':19} "
          f"{'pipeline':8} note · error")
    for run in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"])) if run["started"] else "-"
        step = f"{run['step'] or 0}/{run['total_steps'] or '?'}"
        if (run.get("world_size") or 1) > 1:
            step += f" ×{run['world_size']}"  # processes, as the console shows them
        took = format_duration(elapsed(run)) if run["started"] else "-"
        in_pipeline = "-" if run.get("pipeline_id") is None else str(run["pipeline_id"])
        # A stopped run's recorded error is the stop's own traceback: only a failure's says what went wrong.
        why = error_summary(run["error"]) if run["status"] in ("failed", "diverged") else ""
        if silent.get(run["id"]) is not None:  # running by its row, yet nothing arrives: a hung rank, a SIGSTOP
            why = f"silent {format_duration(silent[run['id']])}: nothing logged, far past its own pace"
        # The user's note first (the console shows it by the name), on one line.
        said = " · ".join(filter(None, (" ".join((run.get("note") or "").split()), why)))
        name = set_cell_size(run["name"], width)
        print(f"{run['id']:>4} {run['stage']:5} {name} {shown_status(run):9} {step:>14} {took:>7} "
              f"{started:19} {in_pipeline:8} {said}".rstrip())
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from engine import pipeline
    from engine.config import RecipeError
    from engine.run import RunFailed, say
    from engine.store import default_db_path

    db = os.path.abspath(args.db or default_db_path())
    if args.resume is not None:
        if args.recipe or args.overrides or args.through:
            raise RecipeError("--resume continues the pipeline as it was created: no recipe, --set or --through")
        if args.detach:  # said once its process has the pipeline: of two resumes at once, one wins
            try:
                log, taken = pipeline.resume_detached(args.resume, db)
            except RunFailed as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            state = "resumed" if taken else "resuming: its process is still starting"
            print(f"pipeline {args.resume} {state}; its log: {log}")
            return 0
        pipeline.resume(args.resume, db)
        pipeline_id = args.resume
    else:
        if not args.recipe:
            raise RecipeError("rlhf pipeline: give a recipe file (or --resume ID)")
        if not args.accelerate_config:
            raise RecipeError("--accelerate-config: each stage is launched with it (e.g. configs/accelerate/cpu.yaml)")
        pipeline_id, note = pipeline.create(args.recipe, args.overrides, args.through, args.accelerate_config,
                                            args.num_processes, db)
        if args.detach:  # attached, the pipeline's first lines say it
            if note:
                print(f"note: {note}", file=sys.stderr)
            log, _, _ = pipeline.start_detached(pipeline_id, db)
            print(f"pipeline {pipeline_id} started; its log: {log}")
            return 0
    status = pipeline.run(pipeline_id, db, echo=True)
    hint = f"; continue it with: rlhf pipeline --resume {pipeline_id} --db {db}" if status != "done" else ""
    say(f"pipeline {pipeline_id} {status}{hint}")
    return pipeline.exit_code(status)


def _how_started(resume_run: int | None, db: str | os.PathLike) -> str:
    """'started', 'resumed', or 'started over' (a resume of a run that never trained a step)."""
    if resume_run is None:
        return "started"
    from engine.run import never_trained
    from engine.store import Store

    with Store(db) as store:
        return "started over" if never_trained(store.run(resume_run)) else "resumed"


def _cmd_check(args: argparse.Namespace) -> int:
    """`rlhf check RECIPE`: as `train` checks before it starts (the stage's model, reward model and data
    paths), and as `launch` does with an accelerate config, each stage the recipe has (or the one --stage
    names; `eval`: the pipeline's evaluation); every stage's problem is said, not only the first one's."""
    from engine.config import load_recipe
    from engine.pipeline import ORDER, check_eval_section, reward_note
    from engine.run import BAD_INPUT
    from engine.train import validate

    if args.strict_data:
        args.overrides.append("strict_data=true")
    recipe = load_recipe(args.recipe, args.overrides, args.stage)  # a stage it has not: said there
    present = [s for s in ORDER if getattr(recipe, s, None) is not None]
    problems = []
    for stage in [args.stage] if args.stage else present:
        try:
            if stage == "eval":  # judged as the pipeline runs it: with the recipe's stages before it
                check_eval_section(recipe, present)
                continue
            checked = validate(stage, args.recipe, args.overrides, refs_ok=True)
            if args.accelerate_config:
                from engine.launch import check_launch

                check_launch(stage, checked, args.accelerate_config)
        except BAD_INPUT as err:
            problems.append((stage, err))
    if len(problems) == 1:
        raise problems[0][1]
    if problems:
        for stage, err in problems:
            print(f"error: {stage}: {err}", file=sys.stderr)
        return 2
    note = reward_note(recipe, present) if not args.stage else None
    if note:  # as the whole recipe would run: a pipeline
        print(f"note: {note}", file=sys.stderr)
    launched = [s for s in ([args.stage] if args.stage else present) if s != "eval"]
    if args.accelerate_config and launched:  # the launch's own checks passed too: said, not left to be inferred
        them = "it" if len(launched) == 1 else "them"
        print(f"ok: {', '.join(launched)} can launch as {args.accelerate_config} starts {them}", file=sys.stderr)
    # flushed here: a reader gone by now is met inside main, not in Python's flush at exit
    print(json.dumps(recipe.model_dump(), indent=2, ensure_ascii=False), flush=True)
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    """`rlhf check RECIPE --estimate`: memory per GPU of each stage and the disk its runs fill, before anything
    loads."""
    from engine.config import RecipeError, load_recipe
    from engine.disk_estimate import disk_lines, estimate_disk
    from engine.estimate import DEFAULT_GPU_MEMORY, estimate_recipe, parallel_from_config, parse_size, report

    if args.stage == "eval":
        raise RecipeError("--estimate --stage eval: the estimate covers the training stages (sft, rm, ppo), not "
                          "the evaluation")
    memory = parse_size(args.gpu_memory) if args.gpu_memory else DEFAULT_GPU_MEMORY
    parallel = parallel_from_config(args.accelerate_config, args.gpus)
    recipe = load_recipe(args.recipe, args.overrides, args.stage)
    stages = [args.stage] if args.stage else None
    estimates = estimate_recipe(recipe, stages, parallel, memory)
    print(report(estimates, args.recipe))
    try:
        disk = disk_lines(estimate_disk(recipe, stages, parallel), recipe.output_root)
    except OSError as err:  # the output root's file system cannot be looked at: the memory figures stand
        disk = [f"disk: not known ({err})"]
    print("\n" + "\n".join(disk))
    return 0


def _no_terminal(what: str) -> bool:
    """Say so where the console would open with no terminal to draw on or read keys from (a pipe, a script,
    a job's log): it ran on unseen, drawing escape codes into a file, until killed."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return False
    print(f"error: {what} needs a terminal (its input and output here are not one): run it in a terminal, or over "
          "ssh with -t; for scripts, `rlhf runs`, `rlhf eval table` and `rlhf eval belle` print what it shows",
          file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "console" or argv[0].split("=")[0] == "--db":  # `rlhf --db x` is `rlhf console --db x`
        # The console's start-up must stay fast: it needs none of the parser's imports.
        console = argparse.ArgumentParser(prog="rlhf console")
        console.add_argument("--db", default=None, help=DB_HELP)
        db = console.parse_args(argv[1:] if argv and argv[0] == "console" else argv).db
        if _no_terminal("the console"):
            return 2
        from console.app import run_console

        return run_console(db)
    if argv[0] == "chat":
        from console.app import run_console

        chat = argparse.ArgumentParser(prog="rlhf chat", description="two checkpoints side by side in the console")
        chat.add_argument("a", help="a model folder, a run id (its export), or openai:MODEL@BASE_URL")
        chat.add_argument("b", nargs="?", help="the second model, the same ways")
        chat.add_argument("--key-env", default="OPENAI_API_KEY", metavar="VAR",
                          help="environment variable with an endpoint's key ('' for an endpoint without one)")
        chat.add_argument("--db", default=None, help=DB_HELP)
        args = chat.parse_args(argv[1:])
        from console.chat_client import spec_problem
        from engine.store import Store, StoreError, default_db_path, no_database_here

        db = args.db or default_db_path()
        specs = [spec for spec in (args.a, args.b) if spec is not None]
        ids = [spec for spec in specs if spec.strip().isdigit()]
        if ids and not os.path.exists(db):  # the console would make an empty runs.db here, then find no run in it
            print(f"error: run {ids[0]}: {no_database_here(db)}", file=sys.stderr)
            return 2
        runs: dict[int, dict | None] = {}
        if ids:
            with Store(db, create=False) as store:
                for run_id in map(int, ids):
                    try:
                        runs[run_id] = store.run(run_id)
                    except StoreError:  # no such run: spec_problem says so
                        runs[run_id] = None
        for spec in specs:
            problem = spec_problem(spec, runs.get)
            if problem:  # before the console opens on two dead panes (or loads a model to fail in its pane)
                print(f"error: {problem}", file=sys.stderr)
                return 2
        if _no_terminal("rlhf chat"):
            return 2
        return run_console(args.db, chat=(args.a, args.b, args.key_env))
    from engine.config import RecipeError
    from engine.run import BAD_INPUT, EXIT_BAD_INPUT

    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from engine.demo import init_demo

            paths = init_demo(args.folder)
            print(f"demo written to {args.folder}/: " + ", ".join(sorted(paths)))
            return 0
        if args.command == "check":
            if args.estimate:
                return _cmd_estimate(args)
            if args.gpus is not None or args.gpu_memory:
                raise RecipeError("--gpus and --gpu-memory go with --estimate")
            return _cmd_check(args)
        if args.command == "runs":
            return _cmd_runs(args.db, args.pipeline, args.json)
        if args.command == "stop":
            return _cmd_stop(args.run_id, args.db, args.wait)
        if args.command == "delete":
            return _cmd_delete(args.run_ids, args.files, args.force, args.db)
        if args.command == "pipeline":
            return _cmd_pipeline(args)
        if args.command == "eval":
            from engine.eval_cli import run_eval_command

            return run_eval_command(args)
        if args.command == "train":
            from engine.run import EXIT_STOPPED, RUN_ID_ENV, after_stop, exit_code_of, resume_recipe, say, started_over
            from engine.store import Store, default_db_path
            from engine.train import configure_logging, run_stage, validate

            _recipe_or_resume(args)
            overrides = list(args.overrides)
            recipe = args.recipe
            checked = None
            if args.resume_run is not None:
                # The recipe runs.db recorded for the run (overrides applied, paths absolute), not the file
                # as it is now.
                db = args.db or default_db_path()
                recipe, overrides, change = resume_recipe(db, args.resume_run, args.stage, overrides,
                                                          args.allow_change)
                # Checked before the claim, as a launch does: a resume refused leaves the run as it was (a
                # claimed run that never starts would stay pending, with no process for any look to judge).
                checked = validate(args.stage, recipe, overrides)
                with Store(db) as store:  # as a launch does: one resume wins, the old stop and error are cleared
                    world = store.run(args.resume_run).get("world_size") or 1
                    if world > 1 and not args.allow_change:  # as a launch refuses another count: its global batch
                        raise RecipeError(f"run {args.resume_run} trained with {world} processes; rlhf train runs "
                                          f"one: resume it with rlhf launch {args.stage} --resume-run "
                                          f"{args.resume_run}, or add --allow-change to continue it on one")
                    over = started_over(overrides, args.stage)
                    if not store.claim_for_resume(args.resume_run, change, untrained=over):
                        raise RecipeError(f"run {args.resume_run} is being resumed or is still running (or trained "
                                          "since)")
                os.environ[RUN_ID_ENV] = str(args.resume_run)
                if over:  # a resume's own line is the trainer's
                    say(f"run {args.resume_run} started over: it ended before its first step")
            configure_logging()
            run_id, status = run_stage(args.stage, recipe, overrides, args.db, checked=checked)
            if status == "stopped":
                say(f"run {run_id} stopped; {after_stop(args.stage, run_id, args.db)}")
                return EXIT_STOPPED
            if status == "diverged":
                with Store(args.db or default_db_path()) as store:
                    kept = store.checkpoints(run_id)
                say(f"run {run_id} diverged (rlhf runs shows its error); " +
                    (f"its checkpoint of step {kept[-1]['step']} is from before" if kept else
                     "no checkpoint was saved before it"))
                return exit_code_of(status)
            say(f"run {run_id} finished")
            return 0
        assert args.command == "launch"
        from engine.launch import prepare, start_detached, supervise
        from engine.run import EXIT_STOPPED, after_stop, say

        _recipe_or_resume(args)
        run = prepare(args.stage, args.recipe, args.overrides, args.accelerate_config, args.num_processes,
                      args.db, args.run_id, resume_run=args.resume_run, allow_change=args.allow_change)
        if args.detach:
            how = _how_started(args.resume_run, run.db_path)  # before its trainer logs a step
            start_detached(run)
            print(f"run {run.run_id} {how}; its log: {run.log_path}")
            return 0
        print(f"run {run.run_id}: logging to {run.log_path}", file=sys.stderr, flush=True)
        code = supervise(run, echo=True)
        say(f"run {run.run_id} exited with code {code}")
        if code == EXIT_STOPPED:
            say(after_stop(args.stage, run.run_id, args.db, "launch"))
        return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except sqlite3.Error as err:  # a runs.db this user cannot write, a full disk, a damaged file
        from engine.store import default_db_path

        print(f"error: {getattr(args, 'db', None) or default_db_path()}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the run's record says so already
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if args.command not in ("runs", "check") and getattr(args, "eval_command", None) != "table":
            raise  # a pipe of a run's own (a subprocess, a socket): a failure to see
        # `rlhf runs | head`, `rlhf check ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too
        return 141


if __name__ == "__main__":
    sys.exit(main())
