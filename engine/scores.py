"""The score table: per-category means, the macro averages, 95 % bootstrap intervals, paired deltas.

Columns are DESIGN.md's: the 9 categories (math + code = "others"), the macro average of the 9 category
means, and the macro average without "others". Only scored answers count toward a mean; unscored replies
and failed calls are counted in their own columns, never as 0. Intervals resample items within each
category (stratified), so a category's interval reflects its own size.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from engine.belle import CATEGORIES, REFERENCE_ROW

MACRO, MACRO_WO = "macro", "macro w/o others"
COLUMNS = (*CATEGORIES, MACRO, MACRO_WO)
BOOTSTRAP = 1000


@dataclass
class Cell:
    mean: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0  # scored items
    unscored: int = 0  # judged, no score in the reply
    not_judged: int = 0  # not judged (yet), or the call failed


@dataclass
class AnswerLengths:
    """What a run's answers were like beside their scores: a judge (a reward model above all) may favour
    long answers, and a policy learns to write them; answers the token limit cut were judged unfinished."""

    count: int = 0  # answered questions (with a token count)
    mean_tokens: float | None = None
    cut: int = 0  # stopped by max_new_tokens, not by the end-of-text token

    def shown(self) -> str:
        if not self.count or self.mean_tokens is None:
            return "no answer yet"
        return (f"answers {self.mean_tokens:.0f} tokens on average, {self.cut} of {self.count} cut at the token "
                "limit")


@dataclass
class Row:
    name: str
    run_id: int | None
    cells: dict[str, Cell] = field(default_factory=dict)
    judge: str = ""
    questions: str = ""  # which questions the run holds (a digest): only runs of the same ones are ranked
    size: int = 0  # how many
    rubrics: str = ""  # which class prompts an LLM judge was given (a digest): another prompt, another scale
    answers: str = ""  # what the run answered, every question (a digest; "" with a question unanswered)
    answer_lengths: AnswerLengths = field(default_factory=AnswerLengths)
    # The run's recorded settings (checkpoint, eval folder, sampling, judge): what made these numbers, in an
    # export, whatever its label says (a --name hides the checkpoint)
    settings: dict[str, Any] = field(default_factory=dict)


def _questions_key(items: Sequence[dict[str, Any]]) -> str:
    text = "\n".join(f"{i['item_id']}\t{i.get('question', '')}" for i in sorted(items, key=lambda i: i["item_id"]))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def rubric(item: dict[str, Any]) -> str | None:
    """The class prompt an LLM judge was given with this item's answer (engine.belle.judge_prompt: the
    prompt, then the question); None for a reward model's verdict (it reads no prompt) or no verdict."""
    prompt, question = item.get("judge_prompt"), item.get("question")
    if not prompt or not question or item.get("score") is None or str(item.get("judge", "")).startswith("rm:"):
        return None
    # What follows the question (engine.belle.judge_prompt): the reference, or the answer. The question alone
    # could also stand inside the prompt.
    for after in (f" {question} 标准回答:", f" {question}  模型回答：", f" {question}"):
        cut = prompt.find(after)
        if cut >= 0:
            return prompt[:cut]
    return prompt


def rubrics_of(items: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Class -> the prompt its scored items were judged with (a run judged under two has the later one)."""
    return {item["class"]: found for item in items if (found := rubric(item)) is not None}


def _rubrics_key(items: Sequence[dict[str, Any]]) -> str:
    rubrics = rubrics_of(items)
    if not rubrics:
        return ""
    text = "\n".join(f"{cls}\t{prompt}" for cls, prompt in sorted(rubrics.items()))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def macro(means: dict[str, float | None], with_others: bool = True) -> float | None:
    cats = [c for c in CATEGORIES if with_others or c != "others"]
    values = [means.get(c) for c in cats]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _by_category(items: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for item in items:
        if item.get("score") is not None:
            scores[item["category"]].append(float(item["score"]))
    return scores


def _bootstrap(scores: dict[str, list[float]], seed: int, reps: int = BOOTSTRAP) -> dict[str, "Any"]:
    """Resampled category means [reps] per category and both macro averages, stratified by category; None
    for a category of fewer than two scores, and for a macro average over such a category."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for cat in CATEGORIES:
        values = np.asarray(scores[cat], dtype=float)
        if len(values) < 2:  # one score resamples to itself: an interval of no width would claim certainty
            out[cat] = None
            continue
        picks = rng.integers(0, len(values), size=(reps, len(values)))
        out[cat] = values[picks].mean(axis=1)
    for column, with_others in ((MACRO, True), (MACRO_WO, False)):
        parts = [out[c] for c in CATEGORIES if with_others or c != "others"]
        out[column] = None if any(p is None for p in parts) else np.mean(parts, axis=0)
    return out


def _interval(samples: Any) -> tuple[float | None, float | None]:
    import numpy as np

    if samples is None:
        return None, None
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def summarize(name: str, items: Sequence[dict[str, Any]], run_id: int | None = None, judge: str = "",
              seed: int = 0) -> Row:
    """One table row from a run's items (category, score, status)."""
    scores = _by_category(items)
    means = {c: (sum(v) / len(v) if v else None) for c, v in scores.items()}
    means[MACRO], means[MACRO_WO] = macro(means), macro(means, with_others=False)
    boot = _bootstrap(scores, seed)
    row = Row(name, run_id, judge=judge, questions=_questions_key(items) if items else "", size=len(items),
              rubrics=_rubrics_key(items), answers=_answers_key(items))
    for column in COLUMNS:
        members = [i for i in items if column in (MACRO, MACRO_WO) or i["category"] == column]
        if column == MACRO_WO:
            members = [i for i in members if i["category"] != "others"]
        low, high = _interval(boot[column])
        row.cells[column] = Cell(
            means[column], low, high,
            n=sum(1 for i in members if i.get("score") is not None),
            unscored=sum(1 for i in members if i.get("status") == "unscored"),
            not_judged=sum(1 for i in members if i.get("status") in (None, "failed")),
        )
    counted = [i for i in items if i.get("answer_tokens") is not None]
    if counted:
        row.answer_lengths = AnswerLengths(len(counted), sum(i["answer_tokens"] for i in counted) / len(counted),
                                           sum(1 for i in counted if i.get("finished") == "length"))
    return row


def _answers_key(items: Sequence[dict[str, Any]]) -> str:
    if not items or any(i.get("answer") is None for i in items):
        return ""
    text = "\n".join(f"{i['item_id']}\t{i['answer']}" for i in sorted(items, key=lambda i: i["item_id"]))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def same_answers_note(rows: Sequence[Row]) -> str | None:
    """Runs that answered every question word for word alike (two checkpoints one PPO run did not move, a
    model that repeats itself): their scores differ by the judge alone, not by the models."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        if r.run_id is not None and r.answers:
            groups.setdefault((r.questions, r.answers), []).append(r.run_id)
    alike = [ids for ids in groups.values() if len(ids) > 1]
    if not alike:
        return None
    return "the same answer to every question: " + "; ".join(
        "runs " + ", ".join(str(i) for i in ids) for ids in alike) + " (their scores differ by the judge alone)"


def reference_row() -> Row:
    means: dict[str, float | None] = dict(REFERENCE_ROW["scores"])
    means[MACRO], means[MACRO_WO] = macro(means), macro(means, with_others=False)
    return Row(REFERENCE_ROW["name"], None, {c: Cell(means[c]) for c in COLUMNS}, judge="as published")


@dataclass
class Delta:
    column: str
    mean: float | None
    low: float | None
    high: float | None
    n: int
    unpaired: tuple[str, ...] = ()  # the column's categories without one pair (why a macro has no mean)

    def shown(self) -> str:
        """The delta as every view prints it: signed, with its interval or why there is none."""
        if self.mean is None:
            why = f"no pair in {', '.join(self.unpaired)}" if self.unpaired else "no pair"
            return f"- ({why})"
        return shown(self.mean, self.low, self.high, signed=True)


def shown(mean: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    """A mean with its 95 % interval, `-` without a mean; a mean of too few scores (fewer than two in a
    category) has no interval to show, and says so rather than print one of no width."""
    if mean is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    if low is None or high is None:
        return f"{mean:{spec}} (too few for an interval)"
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


class NotComparable(ValueError):
    """Two evaluation runs whose scores cannot be set against each other."""


class DifferentItems(NotComparable):
    """Two evaluation runs hold different questions under one item id: they used different eval sets."""


class DifferentJudges(NotComparable):
    """Two evaluation runs scored by different judges (an LLM's rubric, a reward model's sigmoid): their
    scores are on different scales."""


def judges_of(items: Sequence[dict[str, Any]]) -> set[str]:
    return {i["judge"] for i in items if i.get("judge") and i.get("score") is not None}


def shared_items(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], a_name: str = "A", b_name: str = "B"
                 ) -> list[int]:
    """The item ids both runs hold. Items are numbered by their line in the eval set, so the same id in runs
    of two eval sets is two questions: pairing them would compare answers to different questions. Runs of
    one eval set may hold different subsets of it (`--limit`); the shared ids are the common part."""
    b_by_id = {i["item_id"]: i for i in b}
    shared = []
    for item in a:
        other = b_by_id.get(item["item_id"])
        if other is None:
            continue
        if (other["question"], other["category"]) != (item["question"], item["category"]):
            raise DifferentItems(
                f"{a_name} and {b_name} hold different questions (item {item['item_id']}: "
                f"{_clip(item['question'])!r} against {_clip(other['question'])!r}): they come from different "
                "eval sets, and only answers to the same questions can be paired")
        shared.append(item["item_id"])
    return shared


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _without_export_time(judge: str) -> str:
    """A reward model judge's name without its export's time (engine.judge.reward.rm_judge_label)."""
    return re.sub(r" \(exported [^)]*\)$", "", judge)


def paired_deltas(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], a_name: str = "A", b_name: str = "B",
                  seed: int = 0) -> list[Delta]:
    """B − A per column on the items both scored (same questions), with a paired bootstrap interval. Raises
    DifferentItems for runs of two eval sets."""
    import numpy as np

    if judges_of(a) and judges_of(b) and judges_of(a) != judges_of(b):
        unstamped = {_without_export_time(j) for j in judges_of(a) | judges_of(b)}
        why = ("; a reward model's verdicts recorded before its judge's name gave the export's time cannot be told "
               "from another export's: judge those answers again (rlhf eval belle --answers-from RUN)"
               if len(unstamped) == 1 else "")
        raise DifferentJudges(f"{a_name} was judged by {', '.join(sorted(judges_of(a)))} and {b_name} by "
                              f"{', '.join(sorted(judges_of(b)))}: their scores are on different scales, and "
                              f"only runs of one judge can be paired{why}")
    a_rubrics, b_rubrics = rubrics_of(a), rubrics_of(b)
    changed = sorted(cls for cls in a_rubrics.keys() & b_rubrics.keys() if a_rubrics[cls] != b_rubrics[cls])
    if changed:
        raise DifferentJudges(f"{a_name} and {b_name} were judged with different prompts for class {changed[0]!r} "
                              f"({_clip(a_rubrics[changed[0]])!r} against {_clip(b_rubrics[changed[0]])!r}: "
                              "eval_prompt.json changed between them): their scores are on different scales")
    a_by_id = {i["item_id"]: i for i in a}
    b_by_id = {i["item_id"]: i for i in b}
    pairs: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for item_id in shared_items(a, b, a_name, b_name):
        item, other = a_by_id[item_id], b_by_id[item_id]
        if item.get("score") is not None and other.get("score") is not None:
            pairs[item["category"]].append(float(other["score"]) - float(item["score"]))
    boot = _bootstrap(pairs, seed)
    deltas = []
    for column in COLUMNS:
        if column in (MACRO, MACRO_WO):
            cats = [c for c in CATEGORIES if column == MACRO or c != "others"]
            means = [np.mean(pairs[c]) if pairs[c] else None for c in cats]
            mean = None if any(m is None for m in means) else float(np.mean(means))
            n = sum(len(pairs[c]) for c in cats)
        else:
            cats = [column]
            mean = float(np.mean(pairs[column])) if pairs[column] else None
            n = len(pairs[column])
        low, high = _interval(boot[column])
        deltas.append(Delta(column, mean, low, high, n, tuple(c for c in cats if not pairs[c])))
    return deltas


def _scored(row: Row) -> bool:
    return row.run_id is not None and any(cell.mean is not None for cell in row.cells.values())


def _whole(row: Row) -> bool:
    """Every question of the run judged: one with failed or pending calls averages fewer questions."""
    return row.cells[MACRO].not_judged == 0 if MACRO in row.cells else True


def ranked_groups(rows: Sequence[Row]) -> list[list[int]]:
    """Indices of the rows ranked against each other, a list per group: the runs one judge scored on the same
    questions, two or more of them. Another judge's means are on another scale, and another subset's are
    means over other questions: each group is ranked on its own (a run added to one leaves the others' best
    as it was). A run without a single score (a judge that was down), or with questions not judged, is in
    none."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for k, r in enumerate(rows):
        if _scored(r) and _whole(r):
            groups.setdefault((r.judge, r.rubrics, r.questions), []).append(k)
    return [members for members in groups.values() if len(members) > 1]


def ranking_note(rows: Sequence[Row]) -> str | None:
    """What the bold best leaves out, or how it is grouped, where the scored runs are not all of one judge
    and one question set, all of it judged."""
    groups = ranked_groups(rows)
    scored = [k for k, r in enumerate(rows) if _scored(r)]
    grouped = {k for members in groups for k in members}
    if not scored or (len(groups) == 1 and len(grouped) == len(scored)):
        return None
    partial = [rows[k] for k in scored if not _whole(rows[k])]
    if partial:
        where = ", ".join(f"run {r.run_id} ({r.cells[MACRO].not_judged} of {r.size})" for r in partial)
        unjudged = f"questions not judged, their means over fewer questions: {where}"
    if not grouped:
        if len(scored) < 2 and not partial:  # one run: nothing to rank, nothing to explain
            return None
        if len(partial) == len(scored):
            return f"no run is marked best: every scored run has {unjudged}; resume them to judge the rest"
        prompts = " with the same class prompts" if len({(rows[k].judge, rows[k].rubrics) for k in scored}) > len(
            {rows[k].judge for k in scored}) else ""
        return (f"no run is marked best: no two runs were judged by one judge{prompts} on the same questions, each "
                f"of them judged{f' ({unjudged})' if partial else ''}")
    outside = [rows[k] for k in scored if k not in grouped]
    whole = [rows[k] for k in scored if _whole(rows[k])]
    why = [reason for differs, reason in (
        (len({r.judge for r in whole}) > 1 or any(r.judge != rows[groups[0][0]].judge for r in outside),
         "another judge's scores are on another scale"),
        (len({r.questions for r in whole}) > 1, "a run of other questions averages other questions"),
        (len({(r.judge, r.rubrics) for r in whole}) > len({r.judge for r in whole}),
         "a run judged with other class prompts (eval_prompt.json) is on another scale"),
        (bool(partial), unjudged if partial else ""),
    ) if differs]
    if len(groups) == 1:
        first = rows[groups[0][0]]
        return (f"best is marked among the runs judged by {first.judge} on the same {first.size} questions only "
                f"({'; '.join(why)})")
    each = "; ".join(f"runs {', '.join(str(rows[k].run_id) for k in members)} ({rows[members[0]].judge}, "
                     f"{rows[members[0]].size} questions)" for members in groups)
    return f"best is marked within each group of runs judged alike on the same questions: {each} ({'; '.join(why)})"


def best_per_column(rows: Sequence[Row]) -> dict[str, set[int]]:
    """Indices of the measured rows holding each column's highest mean as shown (three decimals: two rows
    that read the same are both best, not one by float noise), within each of `ranked_groups`; the
    published reference row is there to compare with, not to compete. A column of one run has no best."""
    best: dict[str, set[int]] = {}
    for members in ranked_groups(rows):
        for column in COLUMNS:
            values = [(round(rows[k].cells[column].mean, 3), k) for k in members
                      if rows[k].cells.get(column) and rows[k].cells[column].mean is not None]
            if len(values) > 1:  # the best of one run says nothing
                top = max(v for v, _ in values)
                best.setdefault(column, set()).update(k for v, k in values if v == top)
    return best


def _fmt(cell: Cell, intervals: bool) -> str:
    if not intervals or cell.mean is None:
        return "-" if cell.mean is None else f"{cell.mean:.3f}"
    return shown(cell.mean, cell.low, cell.high)


def _rounded(value: Any) -> Any:
    # Six decimals: what a score means; the binary float's 0.44999999999999996 is noise
    return round(value, 6) if isinstance(value, float) else value


def _made_by(row: Row) -> str:
    """'CHECKPOINT answering N questions of EVAL_DIR, ' where the row's settings are known."""
    checkpoint, eval_dir = row.settings.get("checkpoint"), row.settings.get("eval_dir")
    if not checkpoint or not eval_dir:
        return ""
    return f"{checkpoint} answering {row.size} question{'s' if row.size != 1 else ''} of {eval_dir}, "


def render(rows: Sequence[Row], fmt: str = "md") -> str:
    """The table as Markdown (best per column in bold), CSV (a `best` flag per cell) or JSON."""
    best = best_per_column(rows)
    if fmt == "json":
        return json.dumps([{"name": r.name, "run_id": r.run_id, "judge": r.judge, "questions": r.size or None,
                            "settings": r.settings or None,
                            "answers": {"count": r.answer_lengths.count,
                                        "mean_tokens": _rounded(r.answer_lengths.mean_tokens),
                                        "cut": r.answer_lengths.cut} if r.run_id is not None else None,
                            "columns": {c: {**{key: _rounded(v) for key, v in vars(r.cells[c]).items()},
                                            "best": k in best.get(c, set())} for c in COLUMNS}}
                           for k, r in enumerate(rows)], indent=2, ensure_ascii=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        parts = ("mean", "low", "high", "n", "unscored", "not judged", "best")
        # The answer columns last: a script reading the category columns by position finds them where they were
        writer.writerow(["name", "run_id", "judge", "checkpoint", "eval_dir", "questions",
                         *[f"{c} {part}" for c in COLUMNS for part in parts], "answers", "answer tokens mean",
                         "answers cut"])
        for k, r in enumerate(rows):
            cells = []
            for c in COLUMNS:
                cell = r.cells[c]
                counted = r.run_id is not None  # the published row has means only, no items to count
                cells += [_rounded(cell.mean), _rounded(cell.low), _rounded(cell.high),
                          *((cell.n, cell.unscored, cell.not_judged) if counted else (None, None, None)),
                          int(k in best.get(c, set()))]
            lengths = r.answer_lengths
            answers = ((lengths.count, _rounded(lengths.mean_tokens), lengths.cut) if r.run_id is not None
                       else (None, None, None))
            writer.writerow([r.name, r.run_id or "", r.judge, r.settings.get("checkpoint", ""),
                             r.settings.get("eval_dir", ""), r.size or "",
                             *["" if v is None else v for v in (*cells, *answers)]])
        return out.getvalue()
    header = "| model | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for k, r in enumerate(rows):
        cells = []
        for c in COLUMNS:
            text = _fmt(r.cells[c], intervals=r.run_id is not None)
            cells.append(f"**{text}**" if k in best.get(c, set()) else text)
        label = r.name if r.run_id is None else f"{r.name} (evaluation run {r.run_id})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"evaluation run {r.run_id}: {_made_by(r)}{f'judged by {r.judge}' if r.judge else 'not judged yet'}; "
             f"{r.answer_lengths.shown()}; n / unscored / not judged per column: " + ", ".join(
                 f"{c} {r.cells[c].n}/{r.cells[c].unscored}/{r.cells[c].not_judged}" for c in COLUMNS)
             for r in rows if r.run_id]
    notes += [note for note in (ranking_note(rows), same_answers_note(rows)) if note]
    return "\n".join(lines + [""] + notes) + "\n"
