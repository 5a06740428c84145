"""`rlhf eval belle`: answer the BELLE questions with a checkpoint, judge every answer, store it all.

An evaluation is a run in runs.db (stage `eval`): visible, stoppable and resumable like a training run.

    validate (checkpoint, eval folder, judge) ─ nothing registered until all of it holds
    register the run and its items
    answer: length-sorted batches through the generation engine, greedy by default; each batch's answers
            are stored before the next batch starts
    plan:   calls, tokens (and cost) still to spend; the judge cache already answers unchanged calls
    judge:  concurrently; each verdict stored as it arrives

A stop (SIGTERM, the console's `x`) ends the run after the batch in hand, waiting up to a minute for the
judge calls in flight (paid for: their verdicts are kept) without retrying them;
`--resume-run ID` continues it: stored answers are not generated again, stored verdicts not judged again.
`--answers-from ID` judges another run's answers again (a second judge) without generating.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.belle import SET_FILE, BelleError, Item, coverage, judge_prompt, load_items
from engine.config import RecipeError, a_run_of
from engine.judge import REFUSED, estimate_tokens
from engine.run import RunFailed

log = logging.getLogger(__name__)
COMPLETION_TOKENS_PER_CALL = 150  # for the plan: BELLE judges answer with a score and a short reason


class JudgingFailed(RunFailed):
    """Judging ended without every answer's verdict (calls that failed, replies without a score)."""


# The settings that make the answers, and the questions' subset: an --answers-from run takes its source's.
ANSWERED_BY = ("max_new_tokens", "batch_size", "temperature", "top_p", "top_k", "seed")
SUBSET = ("limit", "per_class")
# How an endpoint judge is reached and paid: nothing a reward model judging offline uses.
ENDPOINT_ONLY = ("judge_url", "judge_model", "judge_key_env", "concurrency", "judge_retries", "judge_timeout",
                 "price_per_1k")


class EvalConfig(BaseModel):
    """What an evaluation run does; stored resolved in runs.db (never the judge's key, only its variable)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Label of the checkpoint in the score table.")
    checkpoint: str = Field(description="Model folder that answers (absolute).")
    eval_dir: str = Field(description="Folder with eval_set.json and eval_prompt.json (absolute).")
    output_root: str = Field("runs", description="Folder under which the run gets runs/<id>/.")
    judge: Literal["openai", "rm"] = Field("openai", description="Who scores the answers.")
    judge_url: str | None = Field(None, description="Base URL of an OpenAI-compatible endpoint.")
    judge_model: str | None = Field("gpt-3.5-turbo", description="Judge model name at that endpoint (BELLE's).")
    judge_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")
    reward_model: str | None = Field(None, description="Reward model folder for the rm judge (absolute).")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N questions.")
    per_class: int | None = Field(None, gt=0, description="Evaluate only the first N questions of each class.")
    max_new_tokens: int = Field(512, gt=0, description="Answer length limit.")
    batch_size: int = Field(16, gt=0, description="Questions answered per decode batch.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when temperature > 0.")
    top_k: int = Field(0, ge=0, description="Top-k sampling when temperature > 0 (0 = off).")
    seed: int = Field(0, description="Sampling seed (each question's noise is its own).")
    concurrency: int = Field(8, gt=0, description="Judge calls in flight.")
    judge_retries: int = Field(5, ge=0, description="Tries after a judge call's first failure.")
    judge_timeout: float = Field(120.0, gt=0, description="Seconds one judge call may take before it fails (and "
                                 "is retried).")
    price_per_1k: float | None = Field(None, ge=0, description="Judge price per 1,000 tokens, for the estimate.")
    rewrite_reference: bool = Field(False, description="Give the judge the reference of the 39 rewrite items.")
    answers_from: int | None = Field(None, description="Judge this run's answers instead of generating.")
    # Set when the run starts, from the checkpoint's rlhf_lineage.json: a later export into the folder (a run
    # extended since) is told from the model that answered
    checkpoint_written: float | None = Field(None, description="When the checkpoint evaluated was exported.")

    def variant(self, size: int | None = None, judge: bool = True, rm_trained_against: bool = False) -> str:
        """What sets this run's answers and scores apart from the defaults, in a few words ('' for none):
        two evaluations of one checkpoint, told apart in the score table and the pairwise report. `size`:
        how many questions the run holds (a --limit past the end of the set took them all); `judge`: whether
        its judge is named (not where another judge compares its answers); `rm_trained_against`: its reward
        model judge is the one the checkpoint was trained to please (engine.lineage.trained_against)."""
        default = {name: field.default for name, field in type(self).model_fields.items()}
        parts = []
        if self.temperature > 0:
            parts.append(f"temperature {self.temperature:g}"
                         + (f" top_p {self.top_p:g}" if self.top_p != default["top_p"] else "")
                         + (f" top_k {self.top_k}" if self.top_k != default["top_k"] else "") + f" seed {self.seed}")
        if self.max_new_tokens != default["max_new_tokens"]:
            parts.append(f"max {self.max_new_tokens} tokens")
        if self.limit and (size is None or size >= self.limit):
            parts.append(f"first {self.limit}")
        if self.per_class:
            parts.append(f"{self.per_class} per class")
        if self.rewrite_reference:
            parts.append("rewrite references")
        if self.answers_from is not None:
            parts.append(f"answers of run {self.answers_from}")
        if judge and self.judge == "rm":
            parts.append("judged by the reward model it was trained against" if rm_trained_against
                         else "judged by the reward model")
        elif judge and self.judge_model != default["judge_model"]:
            parts.append(f"judged by {self.judge_model}")
        return ", ".join(parts)

    def rm_trained_against(self, lineage: dict[str, Any] | None = None) -> bool:
        """Whether its judge is the reward model its checkpoint was trained to please (from the checkpoint's
        lineage: `lineage`, where read already)."""
        from engine.lineage import read_lineage, trained_against

        if self.judge != "rm" or self.reward_model is None:
            return False
        return trained_against(lineage if lineage is not None else read_lineage(self.checkpoint), self.reward_model)

    def shown_name(self, size: int | None = None, judge: bool = True, rm_trained_against: bool = False) -> str:
        variant = self.variant(size, judge, rm_trained_against)
        return f"{self.name} [{variant}]" if variant else self.name


def resolve_checkpoint(spec: str, db_path: str | Path, kind: str = "answering model",
                       what: str = "checkpoint") -> str:
    """A run id (its export, else its newest checkpoint's model; an evaluation run's: the model it evaluated)
    or a local model folder, as an absolute path; `kind`: the model it must be
    (engine.train.model_folder_problem), `what`: its name in errors."""
    from engine.run import CHECKPOINT_MARKERS, checkpoints_in
    from engine.store import Store, StoreError
    from engine.train import model_folder_problem

    if spec.isdigit():
        try:
            with Store(db_path, create=False) as store:
                run = store.run(int(spec))
                foreign = store.foreign_folder(run) if run["stage"] != "eval" else None
        except StoreError as err:
            raise RecipeError(f"{what} {spec}: {err}") from None
        if foreign:  # its model may be another than the one this record describes (trained on since, there)
            raise RecipeError(f"{what} {spec}: {foreign}; give the model's folder itself to use it")
        if run["stage"] == "eval":
            evaluated = json.loads(run["config"] or "{}").get("checkpoint")
            if not evaluated:
                raise RecipeError(f"{what} {spec}: run {spec} is an evaluation that names no checkpoint")
            problem = model_folder_problem(evaluated, kind)
            if problem is not None:
                raise RecipeError(f"{what} {spec}: run {spec} evaluated {evaluated}, which {problem}")
            return evaluated
        folder = Path(run["output_dir"])
        saved = [c for marker in CHECKPOINT_MARKERS for c in checkpoints_in(folder, marker)]
        newest_first = sorted(saved, key=lambda p: -int(p.name.split("-", 1)[1]))
        candidates = [folder / "final"] + [c / "policy" if (c / "policy").is_dir() else c for c in newest_first]
        found = next((c for c in candidates if model_folder_problem(str(c)) is None), None)
        if found is None:
            raise RecipeError(f"{what} {spec}: run {spec} ({run['stage']}) has no model in {folder}")
        problem = model_folder_problem(str(found), kind)
        if problem is not None:
            raise RecipeError(f"{what} {spec}: run {spec} ({run['stage']}): {found} {problem}")
        return str(found.resolve())
    problem = model_folder_problem(spec, kind)
    if problem is not None:
        raise RecipeError(f"{what} {spec!r} {problem}")
    return str(Path(spec).expanduser().resolve())


def validate(config: EvalConfig, preflight: bool = True, warnings: list[str] | None = None) -> list[Item]:
    """Everything checkable before a model loads or a run is registered; returns the items. `preflight`:
    look at the judge's endpoint too (once per command: a resume looked before its claim). `warnings`: where
    what is worth saying but no error goes (else standard error): a console has no terminal to print to."""
    from engine.knobs import decode_path
    from engine.train import model_folder_problem

    decode_path()  # the answers' decode path: a mistyped switch is an error, never ignored

    try:
        items = load_items(config.eval_dir, config.limit, config.per_class)
    except BelleError as err:
        raise RecipeError(f"--eval-dir: {err}") from None
    if config.judge == "openai":
        from engine.judge.endpoint import EndpointJudge, JudgeSetupError

        try:
            judge = EndpointJudge(config.judge_url or "", config.judge_model or "", config.judge_key_env)
            warning = judge.preflight() if preflight else None
        except JudgeSetupError as err:
            raise RecipeError(str(err)) from None
        if warning and warnings is not None:
            warnings.append(f"judge: {warning}; its calls may fail")
        elif warning:
            print(f"judge: {warning}; its calls may fail", file=sys.stderr, flush=True)
    elif config.reward_model is None:
        raise RecipeError("--reward-model: the rm judge needs the reward model's folder (an rm run's export)")
    else:
        problem = model_folder_problem(config.reward_model, "reward model")
        if problem is not None:
            raise RecipeError(f"--reward-model: {config.reward_model!r} {problem}")
        if preflight and config.rm_trained_against():  # once per command, as the endpoint's look
            # Not refused (how far PPO pushed its own reward is worth a look), but no measure of quality: a
            # policy that learnt the reward model's blind spots scores high on them.
            warning = (f"--reward-model {config.reward_model}: {config.checkpoint} is a PPO policy trained "
                       "against this reward model (its rlhf_lineage.json): its scores say how well it learnt to "
                       "please it, not how good its answers are; judge it with another reward model or an LLM")
            if warnings is not None:
                warnings.append(warning)
            else:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    return items


def validate_resume(config: EvalConfig, db_path: str | Path, run_id: int,
                    warnings: list[str] | None = None) -> list[Item]:
    """`validate` for a resume, and the eval set still the one the run began on: its items are numbered by
    line, so a question inserted or edited since would pair answers and scores with other questions."""
    from engine.scores import DifferentItems, shared_items
    from engine.store import EvalStore, Store
    from engine.train import model_folder_problem

    items = validate(config, warnings=warnings)
    with Store(db_path) as store:
        stored = EvalStore(store).scored_items(run_id)  # each question with its answer and verdict
    if config.answers_from is None and (not stored or any(row["answer"] is None for row in stored)):
        problem = model_folder_problem(config.checkpoint, "answering model")
        if problem is not None:  # found before the claim, not as a hub error from the loader after it
            raise RecipeError(f"checkpoint {config.checkpoint!r} {problem}: run {run_id} has questions still to "
                              "answer with it (its answers so far are kept: rlhf eval belle --answers-from "
                              f"{run_id} judges them alone)")
    if not stored:  # stopped before it registered its questions
        return items
    where = Path(config.eval_dir) / SET_FILE
    now = [{"item_id": i.id, "question": i.question, "category": i.category} for i in items]
    try:
        shared = set(shared_items(stored, now, f"run {run_id}", str(where)))
    except DifferentItems as err:
        raise RecipeError(f"{where} changed since run {run_id} began: {err}; start a new evaluation") from None
    # The judge's prompt is built from the file as it is now: its reference and class rubric must be the
    # ones the run's first verdicts were given too.
    by_id = {i.id: i for i in items}
    for row in stored:
        item = by_id.get(row["item_id"])
        if item is not None and (row.get("reference"), row.get("class")) != (item.reference, item.cls):
            field = "std_answer" if row.get("reference") != item.reference else "class"
            raise RecipeError(f"{where}:{item.id}: its {field} changed since run {run_id} began (its verdicts so far "
                              "were given against the old one); start a new evaluation")
    if config.judge == "rm" and config.reward_model is not None:
        from engine.judge.reward import rm_judge_label

        given = next((row["judge"] for row in stored if row.get("judge")), None)
        now_label = rm_judge_label(config.reward_model)
        # A name without the export's time: recorded before it was kept; nothing tells whether it changed
        if given is not None and given != now_label and given != f"rm:{config.reward_model}":
            raise RecipeError(f"--reward-model {config.reward_model}: run {run_id}'s verdicts so far are of "
                              f"{given}, the folder holds another export now ({now_label}): one run is one "
                              f"judge's; start a new evaluation (rlhf eval belle --answers-from {run_id} judges its "
                              "answers with the new one)")
    if config.judge != "rm":  # an LLM judge reads the class prompt: the run's verdicts were given with it
        from engine.belle import PROMPT_FILE, load_rubrics
        from engine.scores import rubric

        for row in stored:
            item = by_id.get(row["item_id"])
            if item is not None and rubric(row) is not None and \
                    not row["judge_prompt"].startswith(f"{item.rubric} {item.question}"):
                lines: dict[str, int] = {}
                load_rubrics(config.eval_dir, lines)
                raise RecipeError(f"{Path(config.eval_dir) / PROMPT_FILE}:{lines.get(item.cls, '?')}: the prompt of "
                                  f"class {item.cls!r} changed since run {run_id} began (its verdicts so far were "
                                  "given with the old one, and one run is on one scale); start a new evaluation "
                                  f"(rlhf eval belle --answers-from {run_id} judges its answers with the new prompts)")
    added = [i for i in now if i["item_id"] not in shared]
    if len(shared) < len(stored) or (added and config.answers_from is None):
        raise RecipeError(f"{where} changed since run {run_id} began: it now holds {len(now)} of the questions "
                          f"the run's settings take, the run {len(stored)}; start a new evaluation")
    return items


def plan_line(config: EvalConfig, to_call: list[str], cached: int) -> str:
    """What judging will cost: calls, tokens, money (`to_call`: the prompts the cache cannot answer)."""
    calls = len(to_call)
    if config.judge == "rm":
        return f"judge: the reward model scores {calls} answers on this machine (no calls)"
    prompt_tokens = sum(estimate_tokens(p) for p in to_call)
    completion_tokens = calls * COMPLETION_TOKENS_PER_CALL
    line = (f"judge: {calls} call{'s' if calls != 1 else ''} to make ({cached} answered by the cache), about "
            f"{prompt_tokens:,} prompt + "
            f"{completion_tokens:,} completion tokens")
    if config.price_per_1k is not None:
        line += f", about ${(prompt_tokens + completion_tokens) / 1000 * config.price_per_1k:,.2f}"
    return line


class _Stop:
    """SIGTERM (a stop from the console) or Ctrl-C ends the run after the work in hand."""

    def __init__(self) -> None:
        from engine.run import catch_stops

        self.event = threading.Event()
        catch_stops(self.event.set, "stopping after the batch in hand (every stored answer and verdict stays)")

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def _answer(config: EvalConfig, items: list[Item], todo: list[dict], evals: Any, run_id: int, stop: _Stop,
            progress: Any) -> None:
    """Generate the missing answers in length-sorted batches; store each batch at once."""
    import torch

    from engine.generation import Engine, Sampling, row_seeds
    from engine.models import folder_tokenizer, inference_model
    from engine.template import Turn, render_prompt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = folder_tokenizer(config.checkpoint)
    engine = Engine(inference_model(config.checkpoint, device), tokenizer)
    sampling = Sampling(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                        top_p=config.top_p, seed=config.seed)
    by_id = {item.id: item for item in items}
    prompts = {row["item_id"]: render_prompt([Turn("user", by_id[row["item_id"]].question)]) for row in todo}
    # Length-sorted: a batch of similar prompts wastes little on padding.
    order = sorted(prompts, key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    for start in range(0, len(order), config.batch_size):
        if stop.requested:
            return
        ids_in_batch = order[start : start + config.batch_size]
        t0 = time.perf_counter()
        ids, mask = engine.encode([prompts[i] for i in ids_in_batch])
        out = engine.generate(ids, mask, sampling, row_seeds(config.seed, ids_in_batch, ids.device))
        texts = engine.decode(out)
        lengths = out.response_mask.sum(1).long().tolist()
        eos = tokenizer.eos_token_id
        finished = ["eos" if (out.response_ids[k] == eos).any() else "length" for k in range(len(ids_in_batch))]
        evals.set_answers(run_id, list(zip(ids_in_batch, texts, lengths, finished)))
        progress(answered=len(ids_in_batch), tokens=sum(lengths), seconds=time.perf_counter() - t0)


def _judge(config: EvalConfig, items: list[Item], evals: Any, run_id: int, stop: _Stop, progress: Any) -> None:
    by_id = {item.id: item for item in items}
    # A verdict without a score is asked for again (a judge fixed since, a resume): only scores are kept.
    done = {j["item_id"] for j in evals.judgments(run_id) if j["status"] == "scored"}
    todo = [row for row in evals.items(run_id) if row["answer"] is not None and row["item_id"] not in done]
    prompts = {row["item_id"]: judge_prompt(by_id[row["item_id"]], row["answer"], config.rewrite_reference)
               for row in todo}
    if config.judge == "rm":
        from engine.judge.reward import RewardJudge

        given = next((j["judge"] for j in evals.judgments(run_id) if j.get("judge")), None)
        judge = RewardJudge(config.reward_model, label=given)  # a resume's verdicts: the name its first ones have
        if any(not by_id[row["item_id"]].reference.strip() for row in todo):
            # The whole set's references, whatever part of it this run judges (--limit, --per-class, the
            # questions an --answers-from run answered): a subset's scores are the full run's.
            references = load_items(config.eval_dir)
            print(f"judge: the reward model scores the eval set's {sum(1 for i in references if i.reference.strip())}"
                  " reference answers first (what an answer without a reference is set against)", flush=True)
            if not judge.calibrate(references, lambda: stop.requested):
                return
        # else every answer is set against its own reference: the set's mean is not needed (minutes on a CPU)
        print(plan_line(config, list(prompts.values()), 0), flush=True)
        for start in range(0, len(todo), config.batch_size):
            if stop.requested:
                return
            batch = todo[start : start + config.batch_size]
            verdicts = judge.judge([by_id[r["item_id"]] for r in batch], [r["answer"] for r in batch])
            for row, verdict in zip(batch, verdicts):
                evals.set_judgment(run_id, row["item_id"], judge.label, verdict, None, prompts[row["item_id"]])
            progress(judged=[(by_id[row["item_id"]].category, verdict) for row, verdict in zip(batch, verdicts)])
        return
    from engine.judge.endpoint import EndpointJudge

    judge = EndpointJudge(config.judge_url or "", config.judge_model or "", config.judge_key_env, cache=evals,
                          concurrency=config.concurrency, retries=config.judge_retries,
                          timeout_s=config.judge_timeout)
    answers = {row["item_id"]: row["answer"] for row in todo}
    to_call = [p for item_id, p in prompts.items() if not judge.cached(p, answers[item_id])]
    print(plan_line(config, to_call, len(prompts) - len(to_call)), flush=True)
    jobs = ((item_id, prompt, answers[item_id]) for item_id, prompt in prompts.items())
    for item_id, key, verdict in judge.judge_many(jobs, stop.event):
        evals.set_judgment(run_id, item_id, judge.label, verdict, key, prompts[item_id])
        progress(judged=[(by_id[item_id].category, verdict)])


PROGRESS_EVERY_S = 30.0  # between two progress lines of an evaluation


def run_eval(config: EvalConfig, db_path: str | Path, resume_run: int | None = None) -> tuple[int, str]:
    """Validate, register (or reclaim), answer, judge. Returns (run id, final status)."""
    from engine.run import RUN_ID_ENV, StopRequested, stop_seen, tracked_run
    from engine.scores import macro
    from engine.store import EvalStore

    warnings: list[str] = []  # said once the run is registered: in its train.log too, not only on a terminal
    items = validate(config, preflight=resume_run is None, warnings=warnings)  # a resume looked before its claim
    if config.answers_from is not None:
        if resume_run is None:
            _check_answers_from(db_path, config.answers_from, items)
        # Its questions are the ones the source run answered: judging again never generates (another
        # model's settings, hours of it), whatever more the eval folder, --limit or --per-class would take.
        answered = _answered_items(db_path, config.answers_from)
        items = [item for item in items if item.id in answered]
    print(coverage(items, config.rewrite_reference), flush=True)
    if resume_run is not None:
        os.environ[RUN_ID_ENV] = str(resume_run)
    elif config.answers_from is None:
        from engine.lineage import read_lineage

        written = (read_lineage(config.checkpoint) or {}).get("written")
        config = config.model_copy(update={"checkpoint_written": written})
    with tracked_run(db_path, "eval", config, "", []) as handle:
        if stop_seen():  # a stop while the run registered: it ends here, before anything loads
            raise StopRequested()
        stop = _Stop()  # from here a stop ends the run after the work in hand (before: at once, as stopped)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        store = handle.store
        evals = EvalStore(store)
        run_id = handle.run_id
        evals.add_items(run_id, [{"item_id": i.id, "category": i.category, "class": i.cls, "question": i.question,
                                  "reference": i.reference} for i in items])
        copied = 0
        if config.answers_from is not None:
            copied = evals.copy_answers(config.answers_from, run_id)
            if copied or resume_run is None:
                print(f"answers: {copied} taken from run {config.answers_from}", flush=True)
        n = len(items)
        store.update_run(run_id, total_steps=2 * n)
        counts = {"answered": 0, "judged": 0, "unscored": 0, "failed": 0, "tokens": 0, "score_sum": 0.0, "scored": 0,
                  "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "no_usage": 0}  # the last four: spent here
        problems: list[str] = []  # of this stretch's failed calls
        rows = evals.items(run_id)
        counts["answered"] = sum(1 for r in rows if r["answer"] is not None)
        # Scores by category, for the macro average the score table heads with (the run table's figure)
        category_of = {r["item_id"]: r["category"] for r in rows}
        by_category: dict[str, list[float]] = {}
        for j in evals.judgments(run_id):
            if j["status"] == "scored":  # the others are judged again in this stretch
                counts["judged"] += 1
                counts["score_sum"] += j["score"]
                counts["scored"] += 1
                by_category.setdefault(category_of[j["item_id"]], []).append(j["score"])
        if copied:  # answered already: the run's progress says so before its first verdict
            store.log_metrics(run_id, counts["answered"] + counts["judged"], {"eval/answered": counts["answered"]})
        unscored_replies: list[tuple[str, str | None, int]] = []  # of this stretch: reply, why no score, calls
        said: dict[str, Any] = {"at": None, "line": None}  # when progress was last printed, and what it said

        def say_progress(done: bool) -> None:
            now = time.monotonic()
            if said["at"] is not None and now - said["at"] < PROGRESS_EVERY_S and not done:
                return
            judged = f", {counts['judged']} judged ({counts['scored']} scored)" if counts["judged"] else ""
            line = f"{counts['answered']} of {n} answered{judged}"
            if line == said["line"]:  # the last batch's line already said it
                return
            said["at"], said["line"] = now, line
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

        def progress(answered: int = 0, tokens: int = 0, seconds: float = 0.0, judged: list | None = None) -> None:
            metrics: dict[str, float] = {}
            if answered:
                counts["answered"] += answered
                metrics.update({"eval/answered": counts["answered"], "eval/tokens_per_s": tokens / max(seconds, 1e-9)})
            for category, verdict in judged or []:
                counts["calls"] += verdict.calls
                if verdict.calls and (verdict.prompt_tokens is None or verdict.completion_tokens is None):
                    counts["no_usage"] += 1
                else:
                    counts["prompt_tokens"] += verdict.prompt_tokens or 0
                    counts["completion_tokens"] += verdict.completion_tokens or 0
                if verdict.status == "failed":
                    counts["failed"] += 1
                    problems.append(verdict.problem or "no reply")
                    continue
                counts["judged"] += 1
                counts["unscored"] += verdict.status == "unscored"
                if verdict.status == "unscored":
                    unscored_replies.append((verdict.reply, verdict.problem, verdict.calls))
                if verdict.score is not None:
                    counts["score_sum"] += verdict.score
                    counts["scored"] += 1
                    by_category.setdefault(category, []).append(verdict.score)
            if judged:
                metrics.update({"eval/judged": counts["judged"], "eval/unscored": counts["unscored"],
                                "eval/failed": counts["failed"]})
                if counts["scored"]:  # not one score yet: no mean, not a mean of 0
                    metrics["eval/score_mean"] = counts["score_sum"] / counts["scored"]
                macro_so_far = macro({c: sum(v) / len(v) for c, v in by_category.items()})
                if macro_so_far is not None:  # once every category has a score, as the table's macro column
                    metrics["eval/score_macro"] = macro_so_far
            store.log_metrics(run_id, counts["answered"] + counts["judged"], metrics)
            # A terminal (and the run's log) hears how far it got, not only the console's progress bar.
            say_progress(counts["answered"] + counts["judged"] + counts["failed"] >= 2 * n)

        todo = [r for r in rows if r["answer"] is None]
        if todo and config.answers_from is None:
            print(f"answer: {len(todo)} question{'s' if len(todo) != 1 else ''} to answer with {config.checkpoint}",
                  flush=True)
            _answer(config, items, todo, evals, run_id, stop, progress)
            if not stop.requested:
                say_progress(True)  # "N of N answered" before the judge's lines, not the last 30 s mark
        try:
            if not stop.requested:
                from engine.judge.endpoint import JudgeRefused
                from engine.run import resume_hint

                try:
                    _judge(config, items, evals, run_id, stop, progress)
                except JudgeRefused as err:  # the run fails with the reason; every stored answer and verdict stays
                    raise JudgeRefused(f"{err}; then continue it: {resume_hint('eval', run_id, db_path)}") from None
                # counts: the run's, stored verdicts included (a done run asked again about one reply is not this)
                if unscored_replies and counts["scored"] == 0 and not stop.requested:
                    # Replies, not one score in them: the judge's model or prompt is wrong for this, not noise.
                    reply, why, _ = unscored_replies[0]
                    calls = sum(c for _, _, c in unscored_replies)
                    first = f"{why}; does the endpoint take --judge-model's requests?" \
                        if why and why.startswith(REFUSED) else \
                        f"{reply[:200]!r} ({why or 'no score'}); is --judge-model right for a 0-1 score?"
                    failed_too = f" {len(problems)} more calls failed, the first: {problems[0]};" if problems else ""
                    raise JudgingFailed(f"the judge gave no usable score for {len(unscored_replies)} answers "
                                       f"({calls} calls), the first: {first}{failed_too} every answer is kept: "
                                       f"continue it (the unscored are asked again): "
                                       f"{resume_hint('eval', run_id, db_path)}")
                if problems and counts["judged"] == 0 and not stop.requested:
                    # Not one verdict (an endpoint that is down, a wrong URL): a failed run, not a done one with
                    # nothing in it that a script would carry on from.
                    items_word = "item" if len(problems) == 1 else "items"
                    raise JudgingFailed(f"every judge call failed ({len(problems)} {items_word}), the first: "
                                       f"{problems[0]}; every answer is kept: once the judge answers, continue it: "
                                       f"{resume_hint('eval', run_id, db_path)}")
            if stop.requested:
                handle.status = "stopped"
                # In the run's log too (the line after the run's end reaches the terminal only).
                print(f"stopped: {counts['answered']} of {n} answered, {counts['judged']} judged; every answer and "
                      f"verdict so far is kept", flush=True)
            else:
                from engine.run import resume_hint

                failed = counts["failed"]
                # Refused items stay unscored with this judge (a resume asks them again, in vain): the user
                # hears why, not only a count.
                refused = [why for _, why, _ in unscored_replies if why and why.startswith(REFUSED)]
                refusals = f" ({len(refused)} refused by the judge, the first: {refused[0][len(REFUSED):]})" \
                    if refused else ""
                print(f"judged {counts['judged']} of {n}: {counts['scored']} scored, {counts['unscored']} unscored"
                      f"{refusals}, {failed} failed calls", flush=True)
                try:
                    written = write_results(evals, run_id, config, handle.output_dir)
                    print(f"results: {', '.join(str(p) for p in written)}", flush=True)
                except OSError as err:  # runs.db holds them all the same: a full disk here fails nothing
                    print(f"results: not written to {handle.output_dir} ({err}); rlhf eval table has them", flush=True)
                if failed:
                    # Done means every question has its verdict: means over the others are not this run's result
                    # (the score table shows them, unranked), and a script must not carry on from them.
                    raise JudgingFailed(f"{failed} of {n} judge calls failed, the first: {problems[0]}; the other "
                                       f"verdicts are kept; to ask those again: {resume_hint('eval', run_id, db_path)}")
        finally:  # every end says what was paid: a failed or stopped run's calls cost as much
            if counts["calls"]:
                print(spent_line(counts, config.price_per_1k), flush=True)
    return handle.run_id, handle.status


def spent_line(counts: dict[str, Any], price_per_1k: float | None) -> str:
    """What the judge's calls of this stretch cost, as its endpoint reported it (the estimate before it is
    a guess: the replies' length is not known until they come)."""
    tokens = counts["prompt_tokens"] + counts["completion_tokens"]
    calls, unreported = counts["calls"], counts["no_usage"]
    line = (f"judge spent: {calls} call{'s' if calls != 1 else ''}, {counts['prompt_tokens']:,} prompt + "
            f"{counts['completion_tokens']:,} completion tokens")
    if price_per_1k is not None:
        line += f", ${tokens / 1000 * price_per_1k:,.2f}"
    if unreported:
        line += (f" (and the calls of {unreported} answer{'s' if unreported != 1 else ''} whose usage the endpoint "
                 "did not report: not counted)")
    return line


RESULT_FILES = ("answers.jsonl", "scores.md")


def write_results(evals: Any, run_id: int, config: EvalConfig, folder: Path) -> list[Path]:
    """The run's answers and verdicts (one JSON line per question) and its score-table row, in its folder:
    what a user keeps, greps or hands on without opening runs.db. Rewritten whole at each end."""
    from engine.scores import reference_row, render, summarize

    rows = evals.scored_items(run_id)
    answers, table = folder / RESULT_FILES[0], folder / RESULT_FILES[1]
    with open(answers, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({key: row.get(key) for key in (
                "item_id", "category", "class", "question", "reference", "answer", "answer_tokens", "finished",
                "judge", "score", "status", "problem", "reply")}, ensure_ascii=False) + "\n")
    judge = next((r["judge"] for r in rows if r.get("judge")), "")
    row = summarize(config.shown_name(len(rows), rm_trained_against=config.rm_trained_against()), rows, run_id,
                    judge)
    row.settings = config.model_dump()
    table.write_text(render([reference_row(), row]), encoding="utf-8")
    return [answers, table]


def _answered_items(db_path: str | Path, source: int) -> set[int]:
    from engine.store import EvalStore, Store

    with Store(db_path) as store:
        return {row["item_id"] for row in EvalStore(store).items(source) if row["answer"] is not None}


def _check_answers_from(db_path: str | Path, source: int, items: list[Item]) -> None:
    """The source run answered these questions: an answer is copied by item id, and an id of another eval
    set is another question."""
    from engine.scores import DifferentItems, shared_items
    from engine.store import EvalStore, Store

    with Store(db_path) as store:
        theirs = EvalStore(store).items(source)
    mine = [{"item_id": i.id, "question": i.question, "category": i.category} for i in items]
    try:
        shared = shared_items(theirs, mine, f"run {source}", "--eval-dir")
    except DifferentItems as err:
        raise RecipeError(f"--answers-from {source}: {err}; leave out --eval-dir to use the run's own") from None
    if not any(t["answer"] is not None for t in theirs if t["item_id"] in set(shared)):
        raise RecipeError(f"--answers-from {source}: run {source} has no answer to any of these questions")


def start_detached_resume(run_id: int, db_path: str | Path) -> list[str]:
    """`rlhf eval belle --resume-run` in a session of its own (the console's `r`): it outlives the console,
    writes its runs/<id>/train.log, and is stopped through its own group. What would make it fail at once
    (the run is not an evaluation or is running; its eval folder, judge or reward model is gone) is raised
    here instead, where the caller can show it; what is only worth a warning is returned."""
    from engine.procs import spawn_detached
    from engine.run import LOG_NAME, settled
    from engine.store import Store

    config = config_from_run(db_path, run_id)
    with Store(db_path) as store:
        run = settled(store, run_id)
    if run["status"] in ("pending", "running"):
        raise RecipeError(f"run {run_id} is {run['status']}")
    if config.judge == "openai" and config.judge_key_env and not os.environ.get(config.judge_key_env):
        from engine.run import resume_hint

        # The resume inherits the console's environment, which a key set in another shell is not in.
        raise RecipeError(f"run {run_id}'s judge reads its key from ${config.judge_key_env}, which the console's "
                          f"environment lacks: start the console with it set, or resume from a shell that has "
                          f"it: {resume_hint('eval', run_id, db_path)}")
    warnings: list[str] = []
    validate_resume(config, db_path, run_id, warnings)
    folder = Path(run["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    # Into its log from its first line (what fails before the run takes its log over is seen there too).
    with open(folder / LOG_NAME, "ab") as log:
        spawn_detached([sys.executable, "-m", "engine.cli", "eval", "belle", "--resume-run", str(run_id), "--db",
                        str(Path(db_path).resolve())], log)
    return warnings


def config_from_run(db_path: str | Path, run_id: int) -> EvalConfig:
    """The resolved settings an evaluation run was started with (what a resume continues)."""
    from engine.store import Store

    with Store(db_path, create=False) as store:
        run = store.run(run_id)
    if run["stage"] != "eval":
        raise RecipeError(f"run {run_id} is {a_run_of(run['stage'])}, not an evaluation")
    return EvalConfig.model_validate(json.loads(run["config"]))

