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
    "DataError", "Mixture", "PreferencePair", "SourceReport", "load_conversations", "load_preferences", "load_prompts",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SHOWN_PER_SOURCE = 5


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


def _read_source(
    source: DataSource, kind: str, adapters: dict[str, Callable[[dict], T]]
) -> tuple[list[T], SourceReport]:
    report = SourceReport(source.path)
    items: list[T] = []
    for raw in read_records(source.path, source.split, source.limit):
        try:
            if raw.error:
                raise ValueError(raw.error)
            if not isinstance(raw.value, dict):
                raise ValueError(f"record is a {type(raw.value).__name__}, not an object")
            fmt = detect_format(raw.value, kind) if source.format == "auto" else source.format
            if fmt not in adapters:
                raise ValueError(f"format {fmt!r} is not a {kind} format ({', '.join(adapters)})")
            items.append(adapters[fmt](raw.value))
            report.used += 1
        except ValueError as err:
            report.malformed += 1
            if len(report.examples) < _SHOWN_PER_SOURCE:
                report.examples.append(f"{raw.where}: {err}")
    for example in report.examples:
        log.warning("malformed record skipped: %s", example)
    if report.malformed > len(report.examples):
        log.warning("%s: %d more malformed records", source.path, report.malformed - len(report.examples))
    if not items:
        detail = f"; first problem: {report.examples[0]}" if report.examples else " (the source is empty)"
        raise DataError(f"{source.path}: no usable {kind} record{detail}")
    return items, report


def _weighted(items: list[T], weight: float, rng: random.Random) -> list[T]:
    whole, frac = divmod(weight, 1.0)
    taken = items * int(whole)
    extra = round(frac * len(items))
    if extra:
        taken += rng.sample(items, extra)
    return taken


@dataclass
class Mixture(Generic[T]):
    train: list[T]
    eval: list[T]  # held out per source before weighting, so no record is in both
    reports: list[SourceReport]


def _mix(
    sources: Sequence[DataSource],
    seed: int,
    kind: str,
    adapters: dict[str, Callable[[dict], T]],
    eval_ratio: float,
) -> Mixture[T]:
    rng = random.Random(seed)
    mixture = Mixture([], [], [])
    for source in sources:
        items, report = _read_source(source, kind, adapters)
        rng.shuffle(items)
        n_eval = round(len(items) * eval_ratio)
        held_out, items = items[:n_eval], items[n_eval:]
        if not items:
            raise DataError(f"{source.path}: eval_ratio={eval_ratio} leaves no training record of {report.used}")
        taken = _weighted(items, source.weight, rng)
        if not taken:
            raise DataError(f"{source.path}: weight {source.weight} selects no record of {len(items)}")
        report.taken = len(taken)
        report.held_out = len(held_out)
        mixture.train.extend(taken)
        mixture.eval.extend(held_out)
        mixture.reports.append(report)
    if eval_ratio > 0 and not mixture.eval:
        raise DataError(f"eval_ratio={eval_ratio} holds out no record: the sources are too small; raise it or set 0")
    rng.shuffle(mixture.train)
    return mixture


def load_conversations(sources: Sequence[DataSource], seed: int = 0, eval_ratio: float = 0.0) -> Mixture[Conversation]:
    """SFT conversations from all sources, mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "sft", SFT_FORMATS, eval_ratio)


def load_preferences(sources: Sequence[DataSource], seed: int = 0, eval_ratio: float = 0.0) -> Mixture[PreferencePair]:
    """Preference pairs from all sources, mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "preference", PREFERENCE_FORMATS, eval_ratio)


def load_prompts(sources: Sequence[DataSource], seed: int = 0) -> Mixture[Conversation]:
    """Rollout prompts (conversations ending with the user), mixed by weight and shuffled with `seed`."""
    return _mix(sources, seed, "prompt", PROMPT_FORMATS, 0.0)
