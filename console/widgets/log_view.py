"""The selected run's log: folded lines from LogTail, the progress line in place, a jump to the last
traceback, and a failed run's stored error pinned above it."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Log, Static

from console.logtail import last_traceback
from console.text import terminal_safe

MAX_LINES = 5000


class LogView(Vertical):
    DEFAULT_CSS = """
    LogView > Log { height: 1fr; }
    LogView > #log-progress { height: 1; color: $text-muted; }
    LogView > #log-error { height: auto; max-height: 8; color: $error; border-bottom: solid $error;
                           overflow-y: auto; display: none; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lines: deque[str] = deque(maxlen=MAX_LINES)
        self.run_id: int | None = None
        self.error: str | None = None
        self.pending = ""

    def compose(self) -> ComposeResult:
        yield Static("", id="log-error")
        yield Log(max_lines=MAX_LINES, auto_scroll=True)
        yield Static("", id="log-progress")

    def on_mount(self) -> None:
        # Lines that arrived before the view was mounted (it mounts lazily) are kept in `lines`.
        self.query_one(Log).write_lines(list(self.lines))
        self.query_one("#log-progress", Static).update(Text(self.pending))
        self._show_error()

    def pin_error(self, error: str | None) -> None:
        """The trainer's own error as runs.db holds it (a failed run's traceback), above the log; None
        unpins it."""
        if error == self.error:
            return
        self.error = error
        if self.is_mounted:
            self._show_error()

    def _show_error(self) -> None:
        pinned = self.query_one("#log-error", Static)
        pinned.display = bool(self.error)
        if self.error:
            lines = [line for line in self.error.splitlines() if line.strip()]
            # the end of a traceback says what happened: keep it when the pane is short
            pinned.update(Text(terminal_safe("\n".join(["error recorded by the run:", *lines[-12:]]))))

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
        if not self.is_mounted:
            return False
        log = self.query_one(Log)
        index = last_traceback(list(log.lines))  # the widget's own lines: its line numbers are what scrolls
        if index is None:
            return False
        log.auto_scroll = False
        log.scroll_to(y=index, animate=False)
        return True

    def follow(self) -> None:
        if not self.is_mounted:
            return
        log = self.query_one(Log)
        log.auto_scroll = True
        log.scroll_end(animate=False)
