"""What `max_length` does to each record, counted per source: kept whole, truncated, or dropped.

SFT truncates a conversation at max_length and drops one whose answer would start past it (a prompt that
fills max_length teaches nothing); the reward model drops a pair either of whose answers does not fit
(a cut answer would be judged on what was cut). Users see the counts per source in the log and in runs.db,
and a stage that would drop most of its data is refused: its curve would describe another data set.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Sequence

from engine.data.records import DataError
from engine.template import Conversation, tokenize_conversation, tokenize_pair

log = logging.getLogger(__name__)
Fate = Literal["kept", "truncated", "dropped"]
MOST = 0.5  # a stage that drops more than this share of its records is refused


def sft_row(tokenizer: Any, turns: Conversation, max_length: int) -> tuple[dict | None, Fate]:
    whole = tokenize_conversation(tokenizer, turns)
    mask = whole["assistant_masks"]
    first_answer = mask.index(1) if 1 in mask else len(mask)
    if first_answer >= max_length:
        return None, "dropped"
    if len(mask) <= max_length:
        return whole, "kept"
    return {key: value[:max_length] for key, value in whole.items()}, "truncated"


def rm_row(tokenizer: Any, pair: Any, max_length: int) -> tuple[dict | None, Fate]:
    chosen = tokenize_pair(tokenizer, pair.prompt, pair.chosen)
    rejected = tokenize_pair(tokenizer, pair.prompt, pair.rejected)
    if len(chosen) > max_length or len(rejected) > max_length:
        return None, "dropped"
    return {"chosen_ids": chosen, "rejected_ids": rejected}, "kept"


def fit(items: Sequence[Any], sources: Sequence[str], row: Callable[[Any], tuple[dict | None, Fate]]
        ) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Rows that fit, and per source path the count of each fate."""
    rows: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    for item, source in zip(items, sources, strict=True):
        value, fate = row(item)
        tally = counts.setdefault(source, {"kept": 0, "truncated": 0, "dropped": 0})
        tally[fate] += 1
        if value is not None:
            rows.append(value)
    return rows, counts


def report(counts: dict[str, dict[str, int]], field: str, max_length: int, what: str = "records") -> None:
    """Log each source's fates; refuse (DataError naming the field) when most records are dropped."""
    for path, tally in counts.items():
        if tally["truncated"] or tally["dropped"]:
            log.warning("%s: %d %s longer than %s=%d: %d truncated, %d dropped (%d kept whole)", path,
                        tally["truncated"] + tally["dropped"], what, field, max_length, tally["truncated"],
                        tally["dropped"], tally["kept"])
    total = sum(sum(t.values()) for t in counts.values())
    dropped = sum(t["dropped"] for t in counts.values())
    if total and dropped > MOST * total:
        worst = max(counts, key=lambda p: counts[p]["dropped"])
        # of what was measured: the check before a run measures a source's first records only
        left = ("nothing would be left to train on" if dropped == total else
                f"only {total - dropped} of {total} would be left")
        raise DataError(f"{field}={max_length} drops {dropped} of {total} {what} (most from {worst}): raise "
                        f"{field} or shorten the data; {left}")
