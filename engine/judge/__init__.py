"""Judges: something that scores an answer 0-1. Every call is a record: its full input, the verbatim
reply, the parsed score or why there is none. `endpoint` asks any OpenAI-compatible chat-completions
server; `reward` uses the project's own reward model offline."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

SCORED, UNSCORED, FAILED = "scored", "unscored", "failed"
# An unscored verdict's reason when the endpoint refused the call for what it holds (a prompt too long for
# the judge, a content filter): the item's answer for good, where a reply without a score may be noise.
REFUSED = "the judge refused it: "


@dataclass
class Verdict:
    """One judged answer."""

    score: float | None
    status: str  # scored; unscored (a reply with no score, after one retry); failed (no reply, after retries)
    reply: str = ""  # verbatim
    problem: str | None = None
    prompt_tokens: int | None = 0  # spent on it by this run, as the endpoint reported (None: it did not)
    completion_tokens: int | None = 0
    calls: int = 0  # calls made for it (0: from the cache)


def request_key(request: dict[str, Any]) -> str:
    """The cache key of a judge call: a hash of its full input (endpoint, model, messages, sampling)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def estimate_tokens(text: str) -> int:
    """A rough token count for the plan printed before judging: one per CJK character, one per four
    other characters (what GPT tokenizers give on mixed Chinese text, within ~25 %)."""
    cjk = sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef")
    return cjk + (len(text) - cjk + 3) // 4
