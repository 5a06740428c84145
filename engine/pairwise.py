"""`rlhf eval pairwise A B`: a judge compares two evaluation runs' answers, item by item, in both orders.

Position bias is real (the seed's authors dropped a GPT-4 pairwise evaluation for it), so every item is
judged with A in the first slot and again with B there. A verdict that changes with the order counts as a
tie. Reported: win / tie / loss of B against A with 95 % bootstrap intervals, position consistency (share
of items whose verdict survived the swap), first-slot preference (share of decisive verdicts that chose
whichever answer came first), a length-controlled win rate (a logistic fit of the win on the relative
length difference, read at equal length), and categories below 60 % consistency flagged. Blind votes from
the chat screen on the same two checkpoints join the table; judge-human agreement is shown from 50 votes.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from engine.belle import CATEGORIES

FIRST, SECOND, TIE = "first", "second", "tie"
# The reply stored for an item whose two answers are the same text: a tie, no judge asked.
IDENTICAL = "identical answers: a tie without a call"
CONSISTENCY_FLAG = 0.6
MIN_VOTES = 50

_VERDICT = re.compile(
    r"(?:结论|verdict|winner)\s*[:：]?\s*\**\s*"
    r"(?:an?\s+)?(回答一|回答二|平局|answer\s*[12AB]\b|\btie\b|(?-i:\b[AB]\b))",
    re.IGNORECASE,
)


def pairwise_prompt(question: str, reference: str, first: str, second: str) -> str:
    """Ask for the better of two answers to one question (the reference, where there is one, as a guide)."""
    guide = f"标准回答（仅供参考）：{reference}\n" if reference.strip() else ""
    return (
        "请比较两个模型对同一问题的回答，判断哪一个更好：更准确、更有帮助、更符合问题的要求，且真实无害。"
        "不要因为回答的先后顺序或长短而偏向任何一方。\n"
        f"问题：{question}\n{guide}回答一：{first}\n回答二：{second}\n"
        "请先简要说明理由，最后一行按“结论: 回答一”、“结论: 回答二”或“结论: 平局”的形式给出结论。"
    )


def parse_verdict(reply: str) -> str | None:
    """first / second / tie from the judge's last conclusion, or None."""
    found = _VERDICT.findall(reply or "")
    if not found:
        return None
    word = re.sub(r"\s+", "", found[-1]).lower()
    return {"回答一": FIRST, "answer1": FIRST, "answera": FIRST, "a": FIRST, "回答二": SECOND, "answer2": SECOND,
            "answerb": SECOND, "b": SECOND, "平局": TIE, "tie": TIE}.get(word)


def outcome(ab: str | None, ba: str | None) -> str | None:
    """B's result against A for one item: win / tie / loss (a flip between orders is a tie), or None if a
    verdict is missing. `ab`: the verdict with A first; `ba`: with B first."""
    if ab is None or ba is None:
        return None
    b_ab = {FIRST: "loss", SECOND: "win", TIE: "tie"}[ab]
    b_ba = {FIRST: "win", SECOND: "loss", TIE: "tie"}[ba]
    return b_ab if b_ab == b_ba else "tie"


@dataclass
class PairwiseReport:
    a: str
    b: str
    items: int = 0
    win: tuple[float, float, float] = (0.0, 0.0, 0.0)  # B's rate, low, high
    tie: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loss: tuple[float, float, float] = (0.0, 0.0, 0.0)
    consistency: float | None = None
    first_slot: float | None = None
    length_controlled: float | None = None
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None
    missing: int = 0


def _rates(outcomes: Sequence[str], seed: int) -> dict[str, tuple[float, float, float]]:
    import numpy as np

    names = ("win", "tie", "loss")
    if not outcomes:
        return {n: (0.0, 0.0, 0.0) for n in names}
    codes = np.array([names.index(o) for o in outcomes])
    picks = np.random.default_rng(seed).integers(0, len(codes), size=(1000, len(codes)))
    rates = {}
    for k, name in enumerate(names):
        boot = (codes[picks] == k).mean(axis=1)
        rates[name] = (float((codes == k).mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))
    return rates


def length_controlled_win_rate(wins: Sequence[float], length_a: Sequence[int], length_b: Sequence[int]) -> float | None:
    """P(B wins) at equal lengths: logistic regression of the outcome (win 1, tie 0.5, loss 0) on the
    relative length difference (len B − len A) / (len B + len A), read at 0."""
    import numpy as np

    if len(wins) < 2:
        return None
    y = np.asarray(wins, dtype=float)
    x = np.array([(lb - la) / max(la + lb, 1) for la, lb in zip(length_a, length_b)], dtype=float)
    features = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    for _ in range(50):  # Newton's method, lightly ridged so a separable sample stays finite
        p = 1 / (1 + np.exp(-features @ beta))
        gradient = features.T @ (y - p) - 1e-3 * beta
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-beta[0])))


def report(a_name: str, b_name: str, a_items: Sequence[dict], b_items: Sequence[dict], verdicts: Sequence[dict],
           votes: Sequence[dict] = (), seed: int = 0) -> PairwiseReport:
    """The comparison of B against A from stored verdicts (rows with item_id, first = 'a'|'b', verdict)."""
    by_item: dict[int, dict[str, str | None]] = {}
    for row in verdicts:
        by_item.setdefault(row["item_id"], {})[row["first"]] = row["verdict"]
    a_by_id = {i["item_id"]: i for i in a_items}
    b_by_id = {i["item_id"]: i for i in b_items}
    rep = PairwiseReport(a_name, b_name)
    outcomes, wins, la, lb, cats = [], [], [], [], []
    consistent = decisive = first_chosen = asked = 0
    per_cat: dict[str, list[int]] = {c: [0, 0, 0] for c in CATEGORIES}  # consistent, judged by a judge, total
    for item_id, pair in sorted(by_item.items()):
        result = outcome(pair.get("a"), pair.get("b"))
        if result is None:
            rep.missing += 1
            continue
        outcomes.append(result)
        category = a_by_id[item_id]["category"]
        per_cat[category][2] += 1
        # Identical answers are a tie without a judge: they say nothing of its position bias.
        if a_by_id[item_id]["answer"] != b_by_id[item_id]["answer"]:
            same = (pair["a"] == TIE and pair["b"] == TIE) or (pair["a"] != TIE and pair["b"] != TIE and
                                                             pair["a"] != pair["b"])
            consistent += same
            asked += 1
            for verdict in (pair["a"], pair["b"]):
                if verdict != TIE:
                    decisive += 1
                    first_chosen += verdict == FIRST
            per_cat[category][0] += same
            per_cat[category][1] += 1
        wins.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[result])
        la.append(len(a_by_id[item_id]["answer"] or ""))
        lb.append(len(b_by_id[item_id]["answer"] or ""))
        cats.append(category)
    rep.items = len(outcomes)
    rates = _rates(outcomes, seed)
    rep.win, rep.tie, rep.loss = rates["win"], rates["tie"], rates["loss"]
    rep.consistency = consistent / asked if asked else None
    rep.first_slot = first_chosen / decisive if decisive else None
    rep.length_controlled = length_controlled_win_rate(wins, la, lb)
    for cat, (ok, judged, total) in per_cat.items():
        if total:
            cat_outcomes = [o for o, c in zip(outcomes, cats) if c == cat]
            rep.per_category[cat] = {"items": total, "consistency": ok / judged if judged else None,
                                     "win": cat_outcomes.count("win") / total, "tie": cat_outcomes.count("tie") / total,
                                     "loss": cat_outcomes.count("loss") / total}
            if judged and ok / judged < CONSISTENCY_FLAG:
                rep.flagged.append(cat)
    _add_votes(rep, votes, {i: o for i, o in zip(sorted(k for k in by_item if outcome(
        by_item[k].get("a"), by_item[k].get("b")) is not None), outcomes)})
    return rep


def _add_votes(rep: PairwiseReport, votes: Sequence[dict], judged: dict[int, str]) -> None:
    """Blind votes (already turned into B's win / tie / loss / both bad) and, from MIN_VOTES on, how often
    the judge agreed with people on the questions both judged."""
    counts = {"win": 0, "tie": 0, "loss": 0, "both bad": 0}
    agree = compared = 0
    for vote in votes:
        counts[vote["result"]] += 1
        judge = judged.get(vote.get("item_id")) if vote.get("item_id") is not None else None
        if judge is not None:
            compared += 1
            human = "tie" if vote["result"] == "both bad" else vote["result"]
            agree += human == judge
    rep.votes = counts
    if sum(counts.values()) >= MIN_VOTES and compared:
        rep.agreement = agree / compared


def render(rep: PairwiseReport) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    def rate(r: tuple[float, float, float]) -> str:
        # of no item: no rate, not a measured 0 % with an interval of no width
        return f"{r[0]:.1%} [{r[1]:.1%}, {r[2]:.1%}]" if rep.items else "-"

    lines = [f"B = {rep.b} against A = {rep.a}: {rep.items} items judged in both orders"
             + (f" ({rep.missing} still missing a verdict)" if rep.missing else ""),
             "", "| B wins | ties | B loses | position consistency | first-slot preference | length-controlled win |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {rate(rep.win)} | {rate(rep.tie)} | {rate(rep.loss)} | {pct(rep.consistency)} | {pct(rep.first_slot)} "
             f"| {pct(rep.length_controlled)} |", "", "| category | items | consistency | B wins | ties | B loses |",
             "|---|---:|---:|---:|---:|---:|"]
    for cat, row in rep.per_category.items():
        flag = " (below 60 %: order decides here)" if cat in rep.flagged else ""
        lines.append(f"| {cat}{flag} | {row['items']} | {pct(row['consistency'])} | {pct(row['win'])} | "
                     f"{pct(row['tie'])} | {pct(row['loss'])} |")
    total = sum(rep.votes.values())
    if total:
        lines += ["", f"blind votes: {total} (B wins {rep.votes['win']}, ties {rep.votes['tie']}, B loses "
                      f"{rep.votes['loss']}, both bad {rep.votes['both bad']})",
                  f"judge-human agreement: {pct(rep.agreement)}" if rep.agreement is not None else
                  f"judge-human agreement: shown from {MIN_VOTES} votes on judged questions"]
    return "\n".join(lines) + "\n"


def cached_verdict(judge: Any, prompt: str) -> dict[str, Any] | None:
    """The cached reply to a pairwise prompt, if it names a winner: one that does not (cached before such
    replies stopped being kept) is asked again."""
    from engine.judge import request_key

    cached = judge.cache.get(request_key(judge.request(prompt))) if judge.cache is not None else None
    return cached if cached is not None and parse_verdict(cached["reply"]) is not None else None


def judge_pairs(judge: Any, jobs: Iterable[tuple[tuple[int, str], str]], stop: threading.Event | None = None
                ) -> Iterable[tuple[tuple[int, str], str, str | None, str]]:
    """(job, cache key, verdict, reply) per (job, prompt) through an endpoint judge: its retries and cache,
    a reply without a conclusion asked again once."""
    from engine.judge import request_key

    def one(prompt: str, dropped: threading.Event) -> tuple[str, str | None, str]:
        request = judge.request(prompt)
        key = request_key(request)
        cached = cached_verdict(judge, prompt)
        if cached is not None:
            return key, parse_verdict(cached["reply"]), cached["reply"]
        calls = [0]
        reply = ""
        for _ in range(2):
            reply, p, c = judge.call(request, calls, dropped)
            if parse_verdict(reply) is not None:
                break
        if judge.cache is not None and parse_verdict(reply) is not None:  # no conclusion: asked again next time
            judge.cache.put(key, judge.label, request, reply, (p, c))
        return key, parse_verdict(reply), reply

    from engine.judge.endpoint import CallFailed, as_completed_calls

    # A refusal (JudgeRefused) ends this at once: every queued call would be refused too, none is made.
    calls = ((job, (prompt, judge.batch_event)) for job, prompt in jobs)  # as each call starts
    for job, future in as_completed_calls(one, calls, judge.concurrency, stop, judge.drop_in_flight):
        try:
            key, verdict, reply = future.result()
        except CallFailed as err:
            yield job, "", None, f"failed: {err}"
            continue
        yield job, key, verdict, reply
