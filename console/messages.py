"""What the App's workers report. Workers post these; the App's handlers change state and widgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class RunsPolled(Message):
    runs: list[dict[str, Any]]
    pipelines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MetricsPolled(Message):
    rows: list[dict[str, Any]]


@dataclass
class HistoryReset(Message):
    """A run's history anew: all of it (a run now looked at, or one a resume rewrote), or light (its
    newest rows and its best-metric extremes, for a run nobody is looking at)."""

    run_id: int
    history_version: int
    rows: list[dict[str, Any]]
    full: bool = True
    extremes: dict[str, tuple[float | None, float | None]] | None = None
    columns: dict[str, tuple[Any, Any, Any]] | None = None  # a whole history, packed: name -> steps, walls, values


@dataclass
class HistoryLoading(Message):
    """A whole history that takes more than one poll to read: how many of its rows have been read."""

    run_id: int
    rows: int


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
    note: str | None = None  # what to tell the user when the action is not about one run
    pipeline_id: int | None = None  # a pipeline launched: its first run is selected once it appears
    warning: str | None = None  # said beside a success (a judge whose model list lacks its model, say)


@dataclass
class ChatEvent(Message):
    """A line from a chat generation worker (or its end: event "exit")."""

    side: str  # left / right
    event: dict[str, Any]


@dataclass
class BelleQuestion(Message):
    """A BELLE question drawn for the chat (so a blind vote on it can be set against the judge)."""

    item_id: int | None
    category: str | None
    question: str | None
    error: str | None = None


@dataclass
class ChatSaved(Message):
    """A chat exchange is in runs.db as chat `chat_id`; `token`: what the screen gave with it (which
    conversation, and its transcript as the screen compares it)."""

    chat_id: int
    token: Any


@dataclass
class ChatModelsResolved(Message):
    """The chat screen's model specs, resolved to folders or endpoints (or why they cannot be)."""

    choices: dict[str, Any]  # side -> console.chat_client.ModelChoice
    errors: dict[str, str] = field(default_factory=dict)  # side -> why it has no model


@dataclass
class ChatSettingsChosen(Message):
    """The chat's sampling settings as the user set them (`o`): the next chat opens with them too."""

    settings: Any  # console.screens.chat.ChatSettings
