"""The `rlhf eval` commands: `belle` (an evaluation run), `table` (the score table), `pairwise`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.config import RecipeError, a_run_of
from engine.run import EXIT_STOPPED, say


def _db(args: argparse.Namespace) -> Path:
    from engine.store import default_db_path

    return Path(args.db or default_db_path())


# How a resumed evaluation reaches its judge, and its label: not what its answers and scores are.
RESUME_MAY_CHANGE = ("judge_key_env", "concurrency", "judge_retries", "judge_timeout", "price_per_1k", "name")
JUDGE_FIELDS = ("judge_url", "judge_model")  # which judge: changed only while nothing is judged


def _given(args: argparse.Namespace, db: Path) -> dict:
    """EvalConfig's fields that options on the command line set, resolved as the config stores them."""
    from engine.evaluate import EvalConfig

    values = {field: getattr(args, field) for field in EvalConfig.model_fields
              if field != "checkpoint" and getattr(args, field, None) is not None}
    for field in ("eval_dir", "output_root"):
        if field in values:
            values[field] = str(Path(values[field]).expanduser().resolve())
    if "reward_model" in values:
        values["reward_model"] = _reward_model(values["reward_model"], db)
    return values


def _config(values: dict):
    """The evaluation's settings, or an error naming each bad one by its option."""
    from engine.evaluate import EvalConfig

    try:
        return EvalConfig(**values)
    except ValueError as err:  # pydantic's ValidationError: each field by its option's name
        problems = [f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in getattr(err, "errors", list)()]
        raise RecipeError("; ".join(problems) or f"invalid evaluation settings: {err}") from None


def _setting(value: object) -> str:
    return "not set" if value is None else str(value)


def _resumed_config(args: argparse.Namespace, db: Path) -> tuple:
    """(settings, the change to record or None): the run's recorded settings, with what a resume may
    change; any other option that differs is refused (it was ignored: the run went on as it was, the
    change that its own error message asked for, such as a new --judge-url, included)."""
    from engine.evaluate import config_from_run, resolve_checkpoint
    from engine.judge import SCORED
    from engine.store import EvalStore, Store

    run_id = args.resume_run
    recorded = config_from_run(db, run_id)
    given = _given(args, db)
    if args.checkpoint and resolve_checkpoint(args.checkpoint, db) != recorded.checkpoint:
        raise RecipeError(f"checkpoint {args.checkpoint}: run {run_id} evaluates {recorded.checkpoint}; a resume "
                          "continues it (drop the checkpoint, or start a new evaluation)")
    def same(field: str, value: object) -> bool:
        old = getattr(recorded, field)
        if field == "judge_url" and isinstance(value, str) and isinstance(old, str):
            return value.rstrip("/") == old.rstrip("/")  # as the judge's label has it: one endpoint
        return value == old

    differ = {field: value for field, value in given.items() if not same(field, value)}
    if recorded.judge == "rm" and "judge" not in differ:
        differ.pop("judge_model", None)  # a reward model judges: there is no judge model to change
    if "name" in differ:
        with Store(db) as store:
            pipeline = store.run(run_id).get("pipeline_id")
        if pipeline is not None:  # the pipeline finds its evaluation by its label
            raise RecipeError(f"--name: run {run_id} is pipeline {pipeline}'s evaluation, found by its name "
                              f"{recorded.name!r}; it keeps it")
    # The judge is its model at its endpoint (the label its scores carry): one run has one.
    changed = [f for f in JUDGE_FIELDS if f in differ and recorded.judge != "rm"]
    if changed:
        with Store(db) as store:
            items = EvalStore(store).scored_items(run_id)
        judged = sum(1 for item in items if item.get("status") == SCORED)  # the unscored are asked again
        if judged:
            option = f"--{changed[0].replace('_', '-')} {differ[changed[0]]}"
            raise RecipeError(f"{option}: run {run_id} has {judged} answers judged by {recorded.judge_model} at "
                              f"{recorded.judge_url}; one run has one judge, and its scores would be split between "
                              f"two (judge its answers anew: rlhf eval belle --answers-from {run_id} {option} …)")
    # The eval set's files moved: validate_resume holds the new folder to the run's questions, references and
    # class prompts, item by item.
    if "eval_dir" not in differ and not Path(recorded.eval_dir).is_dir():
        raise RecipeError(f"--eval-dir: run {run_id}'s eval folder {recorded.eval_dir} is no folder any more; if its "
                          "files moved, give their folder: --eval-dir NEW (they must hold the same questions)")
    refused = [f"--{field.replace('_', '-')} {value} (run {run_id}: {_setting(getattr(recorded, field))})"
               for field, value in differ.items() if field not in (*RESUME_MAY_CHANGE, *JUDGE_FIELDS, "eval_dir")]
    if refused:
        raise RecipeError(f"run {run_id}: a resume continues the evaluation as it was started, and "
                          f"{'; '.join(refused)} would change its answers or scores; start a new evaluation "
                          f"for that (--answers-from {run_id} judges the same answers anew); a resume may change "
                          f"{', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} (and --judge-url, "
                          "--judge-model while nothing is judged, --eval-dir to the same files moved)")
    if not differ:
        return recorded, None
    config = _config({**recorded.model_dump(), **differ})
    say(f"run {run_id} resumes with " + ", ".join(f"--{f.replace('_', '-')} {v}" for f, v in differ.items()))
    return config, {"config": config.model_dump_json(), "name": config.name}


def _no_contradiction(args: argparse.Namespace, given: dict) -> None:
    """Options a new evaluation would ignore, refused rather than recorded as if they had counted."""
    from engine.evaluate import ANSWERED_BY, ENDPOINT_ONLY

    def option(field: str) -> str:
        return "--" + field.replace("_", "-")

    if args.answers_from is not None:
        if args.checkpoint:
            raise RecipeError(f"checkpoint {args.checkpoint}: --answers-from {args.answers_from} judges that run's "
                              "answers, of the model it evaluated; give one or the other")
        made = [option(f) for f in ANSWERED_BY if f in given]
        if made:
            raise RecipeError(f"{', '.join(made)}: --answers-from {args.answers_from} generates nothing: its answers "
                              "are that run's, made with its settings (which the new run records)")
    if "limit" in given and "per_class" in given:
        raise RecipeError("--limit and --per-class: give one (the first N questions, or the first N of each class)")
    if given.get("judge") == "rm":
        ignored = [option(f) for f in ENDPOINT_ONLY if f in given]
        if ignored:
            raise RecipeError(f"{', '.join(ignored)}: --judge rm scores with the reward model, offline: no endpoint, "
                              "no judge model, nothing paid")
    elif "reward_model" in given:
        raise RecipeError(f"--reward-model: the judge is an endpoint (--judge {given.get('judge', 'openai')}); "
                          "add --judge rm to score with a reward model")


def _unscored(db: Path, run_id: int) -> int:
    """The run's answers whose verdict has no score (a reply without one): a resume asks them again."""
    from engine.judge import SCORED
    from engine.store import EvalStore, Store

    with Store(db) as store:
        items = EvalStore(store).scored_items(run_id)
    return sum(1 for item in items if item["answer"] is not None and item.get("status") != SCORED)


def _belle(args: argparse.Namespace) -> int:
    from engine.evaluate import ANSWERED_BY, SUBSET, config_from_run, resolve_checkpoint, run_eval
    from engine.store import Store

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under `accelerate launch`: each process would answer and judge the whole run
        raise RecipeError(f"an evaluation runs in one process ({world} were started): run `rlhf eval belle` "
                          "without accelerate launch (it decodes its answers in batches on one GPU)")
    db = _db(args)
    if args.resume_run is not None:
        with Store(db, create=False) as store:
            row = store.run(args.resume_run)
        status = row["status"] if row["stage"] == "eval" else None  # another stage: config_from_run says so
        if status == "done" and not _unscored(db, args.resume_run):  # said before the judge is looked at
            raise RecipeError(f"run {args.resume_run} is done: every question has its verdict (rlhf eval table shows "
                              f"it); to judge its answers anew: rlhf eval belle --answers-from {args.resume_run} …")
        config, change = _resumed_config(args, db)
        from engine.evaluate import validate_resume
        from engine.run import settled

        validate_resume(config, db, args.resume_run)  # before the claim: one that cannot start leaves the run as it was
        with Store(db) as store:
            run = settled(store, args.resume_run)
            if run["status"] in ("pending", "running"):
                raise RecipeError(f"run {args.resume_run} is {run['status']}; stop it before resuming")
            if not store.claim_for_resume(args.resume_run, change):
                raise RecipeError(f"run {args.resume_run} is being resumed elsewhere")
        run_id, status = run_eval(config, db, resume_run=args.resume_run)
    else:
        if not args.checkpoint and args.answers_from is None:
            raise RecipeError("checkpoint: give a model folder or a run id (or --answers-from ID)")
        given = _given(args, db)
        _no_contradiction(args, given)
        if args.answers_from is not None:
            source = config_from_run(db, args.answers_from)
            checkpoint, label = source.checkpoint, source.name  # the same model's answers, judged again
            given.setdefault("eval_dir", source.eval_dir)  # its answers belong to its questions
            # What made the answers is the source's, in the record and the label (the defaults said greedy
            # and 512 tokens of answers sampled to 32); its subset too, unless a smaller one is given.
            for field in (*ANSWERED_BY, *(() if "limit" in given or "per_class" in given else SUBSET)):
                given[field] = getattr(source, field)
            given["checkpoint_written"] = source.checkpoint_written  # the export that answered
        else:
            checkpoint = resolve_checkpoint(args.checkpoint, db)
            label = "/".join(Path(checkpoint).parts[-2:])
            if args.checkpoint.isdigit():  # the score table names what answered: "ppo run 3", not "run 3"
                with Store(db) as store:
                    named = store.run(int(args.checkpoint))
                label = (config_from_run(db, named["id"]).name if named["stage"] == "eval"  # the model it evaluated
                         else f"{named['stage']} run {args.checkpoint}")
        if not given.get("eval_dir"):
            raise RecipeError("--eval-dir: the folder with eval_set.json and eval_prompt.json is required")
        config = _config({"name": label, "checkpoint": checkpoint,
                          "output_root": str(Path("runs").resolve()), **given})
        run_id, status = run_eval(config, db)
    if status == "stopped":
        from engine.run import resume_hint

        say(f"evaluation run {run_id} stopped; continue it with: {resume_hint('eval', run_id, args.db)}")
        return EXIT_STOPPED
    say(f"evaluation run {run_id} {status}; the table: rlhf eval table" + (f" --db {args.db}" if args.db else ""))
    return 0


def eval_rows(db: Path, run_ids: list[int] | None = None) -> list:
    """A score-table row per evaluation run (every one that has a score or may yet, or those named), the
    published row first."""
    from engine.lineage import read_lineage
    from engine.scores import reference_row, summarize
    from engine.store import EvalStore, Store

    with Store(db) as store:
        runs = [r for r in store.runs() if r["stage"] == "eval" and (run_ids is None or r["id"] in run_ids)]
        evals = EvalStore(store)
        rows = [reference_row()]
        for run in runs:
            items = evals.scored_items(run["id"])
            if run_ids is None and run["status"] == "failed" and all(i.get("score") is None for i in items):
                continue  # a run that failed before any score (a bad checkpoint, a judge down): a row of dashes
            judge = next((i["judge"] for i in items if i.get("judge")), "")
            config = _recorded(run)
            lineage = (read_lineage(config.checkpoint) or {}) if config else {}  # once a row: two questions ask it
            row = summarize(config.shown_name(len(items) or None, rm_trained_against=config.rm_trained_against(lineage))
                            if config else run["name"], items, run["id"], judge)
            row.settings = config.model_dump() if config else {}
            if config and _rewritten_since(config, lineage):
                # A run extended since (its `final` exported again), weights copied over: the row's scores
                # are of the model that answered, no longer in that folder
                row.name += " [its checkpoint was written again after it answered]"
            rows.append(row)
    return rows


def _rewritten_since(config, lineage: dict) -> bool:
    """Whether the folder an evaluation's answers came from holds another export by now (its `lineage`'s
    `written` is not the one recorded when the evaluation began; a copy of the folder keeps it)."""
    if config.checkpoint_written is None:  # not the project's export, or recorded before it was kept
        return False
    return lineage.get("written") != config.checkpoint_written


def _settings(run: dict) -> dict:
    """The evaluation's recorded settings, for an export (none of a record that is not one)."""
    import json

    try:
        settings = json.loads(run["config"] or "{}")
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) and "checkpoint" in settings else {}


def _recorded(run: dict):
    """The evaluation's recorded settings (EvalConfig), read once for its label and its export; None of a
    record that predates a field (its label alone, no settings)."""
    from pydantic import ValidationError

    from engine.evaluate import EvalConfig

    try:
        return EvalConfig.model_validate_json(run["config"] or "{}")
    except ValidationError:
        return None


def _eval_run_ids(db: Path, wanted: list[int], option: str) -> None:
    """Each id names an evaluation run in `db`, or the command stops here, naming the option."""
    from engine.store import Store

    with Store(db, create=False) as store:
        stages = {r["id"]: r["stage"] for r in store.runs()}
    for run_id in wanted:
        if run_id not in stages:
            raise RecipeError(f"{option}: no run {run_id} in {db}")
        if stages[run_id] != "eval":
            raise RecipeError(f"{option}: run {run_id} is {a_run_of(stages[run_id])}, not an evaluation "
                              "(rlhf eval belle makes one)")


def _table(args: argparse.Namespace) -> int:
    from engine.scores import NotComparable, render
    from engine.store import Store

    db = _db(args)
    with Store(db, create=False):  # a look must not create an empty runs.db where there was none
        pass
    wanted = None
    if args.runs:
        try:
            wanted = [int(x) for x in args.runs.split(",") if x.strip()]
        except ValueError:
            raise RecipeError(f"--runs {args.runs!r}: give run ids separated by commas, e.g. 4,7") from None
        _eval_run_ids(db, wanted, "--runs")
    deltas = None
    if args.delta:
        from engine.scores import paired_deltas
        from engine.store import EvalStore, Store

        a, b = args.delta
        if a == b:  # as pairwise refuses it: a run against itself is no comparison
            raise RecipeError(f"--delta: run {a} against itself; give two evaluation runs")
        _eval_run_ids(db, [a, b], "--delta")
        with Store(db) as store:
            evals = EvalStore(store)
            try:
                deltas = paired_deltas(evals.scored_items(a), evals.scored_items(b), f"run {a}", f"run {b}")
            except NotComparable as err:
                raise RecipeError(f"--delta: {err}") from None
    print(render(eval_rows(db, wanted), args.format), end="")
    if deltas is not None:
        a, b = args.delta
        print(f"\npaired deltas, run {b} minus run {a} (same items, 95 % bootstrap interval):")
        for d in deltas:
            print(f"  {d.column}: {d.shown()}, n {d.n}")
    return 0


def chat_votes(store: object, a_checkpoint: str, b_checkpoint: str, questions: dict[int, str]) -> list[dict]:
    """Blind votes between two checkpoints, as B's result (win / tie / loss / both bad), each with the eval
    item it was asked on (`questions`: the compared runs' questions by item id), or None where it was none
    of them: another eval set's question of that number, or one edited before it was asked (matched by
    number alone, a vote was set against the judge's verdict on another question)."""
    from engine.store import EvalStore

    votes = []
    for chat in EvalStore(store).chats():  # type: ignore[arg-type]
        if not chat["vote"] or not chat["blind"]:
            continue
        sides = {chat["left_model"]: "left", chat["right_model"]: "right"}
        if set(sides) != {a_checkpoint, b_checkpoint}:
            continue
        winner = chat["vote"]  # left / right / tie / both bad (sides resolved when it was revealed)
        if winner in ("tie", "both bad"):
            result = winner
        else:
            result = "win" if sides.get(b_checkpoint) == winner else "loss"
        item_id = chat["item_id"]
        # as the chat sends a question: its spaces and line ends at either end left out
        on_item = item_id is not None and item_id in questions and questions[item_id].strip() == _asked(chat)
        votes.append({"result": result, "item_id": item_id if on_item else None})
    return votes


def _asked(chat: dict) -> str | None:
    """The first question of a saved chat, as it was sent."""
    import json

    try:
        turns = next(iter(json.loads(chat["transcript"]).values()), [])
    except (ValueError, AttributeError):
        return None
    asked = next((t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)
    return asked.strip() if isinstance(asked, str) else None


def _pairwise(args: argparse.Namespace) -> int:
    from engine.evaluate import config_from_run
    from engine.judge.endpoint import EndpointJudge, JudgeSetupError
    from engine.pairwise import IDENTICAL, TIE, cached_verdict, judge_pairs, pairwise_prompt, render, report
    from engine.scores import DifferentItems, shared_items
    from engine.store import EvalStore, Store

    db = _db(args)
    if args.a == args.b:
        raise RecipeError(f"pairwise: run {args.a} against itself; give two evaluation runs")
    _eval_run_ids(db, [args.a, args.b], "pairwise")
    a_config, b_config = config_from_run(db, args.a), config_from_run(db, args.b)
    with Store(db) as store:
        evals = EvalStore(store)
        a_items = {i["item_id"]: i for i in evals.items(args.a) if i["answer"] is not None}
        b_items = {i["item_id"]: i for i in evals.items(args.b) if i["answer"] is not None}
        try:  # before a call is paid for
            shared = sorted(shared_items(list(a_items.values()), list(b_items.values()), f"run {args.a}",
                                         f"run {args.b}"))
        except DifferentItems as err:
            raise RecipeError(str(err)) from None
        if not shared:
            raise RecipeError(f"runs {args.a} and {args.b} have no answered question in common")
        try:
            if args.judge_retries < 0:
                raise RecipeError("--judge-retries: must be 0 or more")
            if args.concurrency < 1:  # as rlhf eval belle says it
                raise RecipeError("--concurrency: must be 1 or more")
            if not args.judge_timeout > 0:
                raise RecipeError("--judge-timeout: must be more than 0 seconds")
            judge = EndpointJudge(args.judge_url or "", args.judge_model or "", args.judge_key_env, cache=evals,
                                  concurrency=args.concurrency, retries=args.judge_retries,
                                  timeout_s=args.judge_timeout)
        except JudgeSetupError as err:
            raise RecipeError(str(err)) from None
        done = {(r["item_id"], r["first"]) for r in evals.pairwise(args.a, args.b, judge.label)
                if r["verdict"] is not None}
        jobs, identical = [], 0
        for item_id in shared:
            a, b = a_items[item_id], b_items[item_id]
            if a["answer"] == b["answer"]:  # a tie whatever a judge says (a flip between orders is one): no call
                identical += 1
                for first in ("a", "b"):
                    if (item_id, first) not in done:
                        evals.add_pairwise(args.a, args.b, item_id, first, judge.label, TIE, IDENTICAL, None)
                continue
            for first, (x, y) in (("a", (a["answer"], b["answer"])), ("b", (b["answer"], a["answer"]))):
                if (item_id, first) not in done:
                    jobs.append(((item_id, first), pairwise_prompt(a["question"], a["reference"], x, y)))
        calls = sum(1 for _, p in jobs if cached_verdict(judge, p) is None)
        if calls:  # an endpoint that cannot be reached: said now, not after every call's retries
            try:
                warning = judge.preflight()
            except JudgeSetupError as err:
                raise RecipeError(str(err)) from None
            if warning:
                print(f"judge: {warning}; its calls may fail", file=sys.stderr, flush=True)
        same = f"{identical} with identical answers are ties without a call; " if identical else ""
        print(f"pairwise: {len(shared)} questions in both orders; {same}{calls} call{'s' if calls != 1 else ''} to "
              f"make ({len(jobs) - calls} answered by the cache)", flush=True)
        failures, silent = [], []  # of this command's calls: failed ones, and replies without a conclusion
        for (item_id, first), key, verdict, reply in judge_pairs(judge, jobs):
            evals.add_pairwise(args.a, args.b, item_id, first, judge.label, verdict, reply, key or None)
            if not key:
                failures.append(reply)
            elif verdict is None:
                silent.append(reply)
        rows = evals.pairwise(args.a, args.b, judge.label)
        votes = chat_votes(store, a_config.checkpoint, b_config.checkpoint,
                           {item_id: item["question"] for item_id, item in a_items.items()})
    # Each side by what answered and how; its own evaluation's judge is not the one comparing them here.
    rep = report(f"{a_config.shown_name(judge=False)} (run {args.a})",
                 f"{b_config.shown_name(judge=False)} (run {args.b})", list(a_items.values()),
                 list(b_items.values()), rows, votes)
    print(f"pairwise judge: {judge.label}")
    print(render(rep), end="")
    if failures:
        print(f"{len(failures)} judge calls failed, the first: {failures[0]}; the same command asks again",
              file=sys.stderr)
    if silent:
        print(f"{len(silent)} replies named no winner, the first: {silent[0][:200]!r}; the same command asks again",
              file=sys.stderr)
    # Not one item judged in both orders: nothing in the table is a result (a judge down, or the wrong model).
    return 1 if rep.items == 0 else 0


def _reward_model(spec: str | None, db: str) -> str | None:
    """--reward-model: an rm run's id (its export) or a folder (checked with the other settings)."""
    from engine.evaluate import resolve_checkpoint

    if spec is None or not spec.isdigit():
        return str(Path(spec).expanduser().resolve()) if spec else None
    return resolve_checkpoint(spec, db, "reward model", "--reward-model")


def run_eval_command(args: argparse.Namespace) -> int:
    from engine.train import configure_logging

    configure_logging()
    from engine.run import RunFailed

    commands = {"belle": _belle, "table": _table, "pairwise": _pairwise}
    try:
        return commands[args.eval_command](args)
    except RunFailed as err:  # recorded on the run (failed) already; the shell gets the reason, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop("RLHF_RUN_ID", None)  # a resumed run's id must not reach the next call in this process

