"""The selected run's log: folded lines from LogTail, the progress line in place, a jump to the last
traceback."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Log, Static

from console.logtail import last_traceback

MAX_LINES = 5000


class LogView(Vertical):
    DEFAULT_CSS = """
    LogView > Log { height: 1fr; }
    LogView > #log-progress { height: 1; color: $text-muted; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lines: deque[str] = deque(maxlen=MAX_LINES)
        self.run_id: int | None = None

        self.pending = ""

    def compose(self) -> ComposeResult:
        yield Log(max_lines=MAX_LINES, auto_scroll=True)
        yield Static("", id="log-progress")

    def on_mount(self) -> None:
        # Lines that arrived before the view was mounted (it mounts lazily) are kept in `lines`.
        self.query_one(Log).write_lines(list(self.lines))
        self.query_one("#log-progress", Static).update(Text(self.pending))

    def append(self, run_id: int, lines: list[str], pending: str, reset: bool, skipped_start: bool) -> None:
        if reset or run_id != self.run_id:
            self.run_id = run_id
            self.lines.clear()
            if self.is_mounted:
                self.query_one(Log).clear()
            if skipped_start:
                lines = ["… (earlier lines of the log skipped)", *lines]
        self.lines.extend(lines)
        self.pending = pending
        if self.is_mounted:
            if lines:
                self.query_one(Log).write_lines(lines)
            self.query_one("#log-progress", Static).update(Text(pending))

    def clear(self, note: str = "") -> None:
        self.run_id = None
        self.lines.clear()
        self.pending = note
        if self.is_mounted:
            self.query_one(Log).clear()
            self.query_one("#log-progress", Static).update(Text(note))

    def jump_to_traceback(self) -> bool:
        index = last_traceback(list(self.lines))
        if index is None or not self.is_mounted:
            return False
        log = self.query_one(Log)
        log.auto_scroll = False
        log.scroll_to(y=index + (log.line_count - len(self.lines)), animate=False)
        return True

    def follow(self) -> None:
        if not self.is_mounted:
            return
        log = self.query_one(Log)
        log.auto_scroll = True
        log.scroll_end(animate=False)
