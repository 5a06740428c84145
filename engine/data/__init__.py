"""Training data: sources in any supported format, mixed by weight, as conversations or preference pairs.

`load_conversations` feeds SFT, `load_preferences` feeds the reward model. Both read every source before
training starts, count and report malformed records with their file and line, and refuse a source that
yields no usable record.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from engine.config import DataSource
from engine.data.formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    PreferencePair,
    detect_format,
)
from engine.data.records import DataError, read_records
from engine.template import Conversation

__all__ = [
    "DataError", "Mixture", "PREFERENCE_FORMATS", "PROMPT_FORMATS", "PreferencePair", "SFT_FORMATS", "SourceReport",
    "load_conversations", "load_preferences", "load_prompts", "read_source",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SHOWN_PER_SOURCE = 5
_WRONG_FORMAT_AFTER = 20  # malformed records before the first usable one that mean a wrong file


@dataclass
class SourceReport:
    path: str
    used: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)  # "file:line: reason", the first few
    taken: int = 0  # training records after weighting
    held_out: int = 0  # evaluation records

    def summary(self) -> str:
        text = f"{self.path}: {self.used} records"
        if self.malformed:
            text += f", {self.malformed} malformed skipped"
        text += f", {self.taken} in the training mixture"
        return text + (f", {self.held_out} held out" if self.held_out else "")


def _noun(kind: str) -> str:
    """SFT, preference, prompt: the kind of record a message names."""
    return "SFT" if kind == "sft" else kind


def _a(kind: str) -> str:
    return f"an {_noun(kind)}" if kind == "sft" else f"a {_noun(kind)}"


def read_source(
    source: DataSource, kind: str, adapters: dict[str, Callable[[dict], T]], strict: bool = False,
    sample: bool = False,
) -> tuple[list[T], SourceReport]:
    """A source's usable records, malformed ones counted and skipped (`strict`: the first is an error).
    A file none of whose first records is usable is in the wrong format: one error, not a warning a row."""
    report = SourceReport(source.path)
    items: list[T] = []
    for raw in read_records(source.path, source.split, source.limit, sample):
        try:
            if raw.error:
                raise ValueError(raw.error)
            if not isinstance(raw.value, dict):
                raise ValueError(f"record is a {type(raw.value).__name__}, not an object")
            fmt = detect_format(raw.value, kind) if source.format == "auto" else source.format
            if fmt not in adapters:
                raise ValueError(f"format {fmt!r} is not {_a(kind)} format ({', '.join(adapters)})")
            items.append(adapters[fmt](raw.value))
            report.used += 1
        except ValueError as err:
            if strict:
                raise DataError(f"{raw.where}: {err} (strict data: a malformed record is an error)") from None
            report.malformed += 1
            if len(report.examples) < _SHOWN_PER_SOURCE:
                report.examples.append(f"{raw.where}: {err}")
            if not items and report.malformed == _WRONG_FORMAT_AFTER:
                raise DataError(f"{source.path}: none of its first {_WRONG_FORMAT_AFTER} records is {_a(kind)} "
                                f"record: is it the right file and format? First problem: {report.examples[0]}")
    if not items:
        detail = f"; first problem: {report.examples[0]}" if report.examples else " (the source is empty)"
        raise DataError(f"{source.path}: no usable {_noun(kind)} record{detail}")
    if report.malformed > report.used:  # as a max_length that drops most records: a wrong file, not noise
        raise DataError(f"{source.path}: {report.malformed} of its {report.malformed + report.used} records are "
                        f"not usable {_noun(kind)} records, more than half: is it the right file and format? First "
                        f"problem: {report.examples[0]}")
    for example in report.examples:
        log.warning("malformed record skipped: %s", example)
    if report.malformed > len(report.examples):
        log.warning("%s: %d more malformed records", source.path, report.malformed - len(report.examples))
    return items, report


def _weighted(items: list[T], weight: float, rng: random.Random) -> list[T]:
    copies, extra = _weight_parts(len(items), weight)
    taken = items * copies
    if extra:
        taken += rng.sample(items, extra)
    return taken


def _weight_parts(n: int, weight: float) -> tuple[int, int]:
    """A weight over `n` records: whole copies of them all, and how many more are drawn once each."""
    whole, frac = divmod(weight, 1.0)
    return int(whole), round(frac * n)


def nothing_taken(path: str, n: int, weight: float) -> str | None:
    """Why a source's `n` training records weighted `weight` give training none (None: they give some). The
    trainer and the check before a run registers ask the same question."""
    copies, extra = _weight_parts(n, weight)
    if n and not copies and not extra:
        return f"weight {weight} selects no record of {path}'s {n}: raise it (or drop the source)"
    return None


@dataclass
class Mixture(Generic[T]):
    train: list[T]
    eval: list[T]  # held out per source before weighting, so no record is in both
    reports: list[SourceReport]
    train_sources: list[str] = field(default_factory=list)  # the source path of each training record
    eval_sources: list[str] = field(default_factory=list)


def held_out_count(n: int, eval_ratio: float) -> int:
    """How many of a source's `n` records evaluation holds out; the rest train."""
    return round(n * eval_ratio)


def nothing_left(path: str, n: int, eval_ratio: float) -> str | None:
    """Why a source of `n` records cannot train with `eval_ratio` held out (None: it can). The trainer and
    the check before a run registers ask the same question."""
    if n - held_out_count(n, eval_ratio) <= 0:
        return f"eval_ratio={eval_ratio} holds out every record of {path} ({n}): none is left to train on"
    return None


def nothing_held(counts: dict[str, int], eval_ratio: float) -> str | None:
    """Why sources of these record counts (by path) give evaluation no record at all (None: they do)."""
    if eval_ratio > 0 and not any(held_out_count(n, eval_ratio) for n in counts.values()):
        return (f"eval_ratio={eval_ratio} holds out no record of {sum(counts.values())}: the sources are too "
                "small; raise it or set 0")
    return None


def _mix(
    sources: Sequence[DataSource],
    seed: int,
    kind: str,
    adapters: dict[str, Callable[[dict], T]],
    eval_ratio: float,
    strict: bool = False,
) -> Mixture[T]:
    rng = random.Random(seed)
    mixture: Mixture[T] = Mixture([], [], [])
    for source in sources:
        items, report = read_source(source, kind, adapters, strict)
        rng.shuffle(items)
        problem = nothing_left(source.path, len(items), eval_ratio)
        if problem:
            raise DataError(problem)
        n_eval = held_out_count(len(items), eval_ratio)
        held_out, items = items[:n_eval], items[n_eval:]
        problem = nothing_taken(source.path, len(items), source.weight)
        if problem:
            raise DataError(problem)
        taken = _weighted(items, source.weight, rng)
        report.taken = len(taken)
        report.held_out = len(held_out)
        mixture.train.extend(taken)
        mixture.train_sources.extend([source.path] * len(taken))
        mixture.eval.extend(held_out)
        mixture.eval_sources.extend([source.path] * len(held_out))
        mixture.reports.append(report)
    problem = nothing_held({r.path: r.used for r in mixture.reports}, eval_ratio)
    if problem:
        raise DataError(problem)
    order = list(range(len(mixture.train)))
    rng.shuffle(order)  # the same permutation shuffling the records themselves would make
    mixture.train = [mixture.train[i] for i in order]
    mixture.train_sources = [mixture.train_sources[i] for i in order]
    return mixture


def load_conversations(sources: Sequence[DataSource], seed: int = 0, eval_ratio: float = 0.0,
                       strict: bool = False) -> Mixture[Conversation]:
    """SFT conversations from all sources, mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "sft", SFT_FORMATS, eval_ratio, strict)


def load_preferences(sources: Sequence[DataSource], seed: int = 0, eval_ratio: float = 0.0,
                     strict: bool = False) -> Mixture[PreferencePair]:
    """Preference pairs from all sources, mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "preference", PREFERENCE_FORMATS, eval_ratio, strict)


def load_prompts(sources: Sequence[DataSource], seed: int = 0, strict: bool = False) -> Mixture[Conversation]:
    """Rollout prompts (conversations ending with the user), mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "prompt", PROMPT_FORMATS, 0.0, strict)
