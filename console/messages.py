"""What the App's workers report. Workers post these; the App's handlers change state and widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class RunsPolled(Message):
    runs: list[dict[str, Any]]


@dataclass
class MetricsPolled(Message):
    rows: list[dict[str, Any]]


@dataclass
class HistoryReset(Message):
    """A resume dropped a run's newer metrics: reload it from these rows."""

    run_id: int
    history_version: int
    rows: list[dict[str, Any]]


@dataclass
class StoreFailed(Message):
    reason: str


@dataclass
class LogRead(Message):
    run_id: int
    lines: list[str]
    pending: str
    reset: bool
    skipped_start: bool


@dataclass
class GpuRead(Message):
    readings: list[Any] | None  # engine.gpu.GpuReading
    pgids: dict[int, int | None]  # pid -> process group, to match runs
    unavailable: str | None = None


@dataclass
class SamplesLoaded(Message):
    run_id: int
    steps: list[int]
    step: int | None
    rows: list[dict[str, Any]]


@dataclass
class ActionDone(Message):
    """A launch, stop, resume or delete finished (or failed: `error`)."""

    verb: str
    run_id: int | None
    error: str | None = None
    fields: dict[str, str] | None = None
