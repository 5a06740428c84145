"""Reading a judge's score out of its free-text reply.

Judges write `得分: 0.8`, `得分：0.8分`, `**得分:** 0.5`, `得分为0.5`, `Score: 0.8`, `得分: 8/10`, `得分：80%`,
`得分: 0,8`... (a number is read only after a label), restate the rubric (`分数范围0-1`: a range, no score),
and often quote the answer they judge, which may itself contain `得分: 1`: the judge's own score is its
last one, and a score inside text quoted from the answer is not the judge's. A reply with no score in [0, 1]
is unscored, never read as 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCORE = re.compile(
    r"(?:得分|分数|评分|打分|score)"  # the label
    r"(?:\s*[（(][^）)\n]*[）)])?"  # an aside such as （满分1分）, whose number is not the score
    r"[^\d\n（(]{0,8}?"  # what may sit before the number: ':', '：', '为', '是', '**', spaces, '应该是'
    r"(?P<neg>[-−](?=\.?\d))?"  # a minus on the number is its sign ('- 0.8' with a space is a dash)
    # '0,8': a decimal comma; '1e-1': an exponent (read as 1, it was a score ten times too high); never a
    # number cut short
    r"(?P<num>(?:\d+(?:[.,]\d+)?|\.\d+)(?:[eE][-+]?\d+)?)(?![.,]?\d)"
    r"\s*(?:(?P<pct>%)|/\s*(?P<den>\d+(?:\.\d+)?)(?!\.?\d))?"
    # the start of a range is no score: judges restate the rubric ('分数范围0-1', '分数在0到1之间'); on its
    # own line, '- 1.' starts a list, not a range
    r"(?![ \t]*(?:[-~～–—至到和]|to\b)[ \t]*\.?\d)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Parsed:
    score: float | None
    problem: str | None = None  # why there is no score


_OPEN, _CLOSE = "“‘「『\"'", "”’」』\"'"


def _quoted(reply: str, match: re.Match, answer: str) -> bool:
    """The match sits in text copied from the answer (the judge quoting it): four characters of context
    on either side appear in the answer too, or the match itself does and stands inside quotation marks."""
    start, end = match.span()
    if any(len(window) == end - start + 4 and window in answer
           for window in (reply[max(0, start - 4) : end], reply[start : end + 4])):
        return True
    if match.group(0) not in answer:
        return False
    before = reply[:start]
    opened = max(before.rfind(q) for q in _OPEN)
    closed = max(before.rfind(q) for q in _CLOSE if q not in "\"'") if opened >= 0 else -1
    return opened >= 0 and opened > closed and start - opened <= 20


def parse_score(reply: str, answer: str = "") -> Parsed:
    """The judge's score: its last one outside any text quoted from `answer`."""
    found = list(_SCORE.finditer(reply or ""))
    if not found:
        return Parsed(None, "no score in the reply")
    own = [m for m in found if not (answer and _quoted(reply, m, answer))]
    if not own:  # every score in the reply is one quoted from the answer: the judge gave none
        return Parsed(None, "only scores quoted from the answer")
    match = own[-1]
    value = float(match["num"].replace(",", "."))
    if match["neg"]:
        return Parsed(None, f"score {match.group(0).strip()!r} is outside 0-1")
    if match["pct"]:
        value /= 100
    elif match["den"]:
        denominator = float(match["den"])
        if denominator <= 0:
            return Parsed(None, f"score {match.group(0)!r} divides by zero")
        value /= denominator
    if not 0.0 <= value <= 1.0:
        return Parsed(None, f"score {match.group(0).strip()!r} is outside 0-1")
    return Parsed(value)
