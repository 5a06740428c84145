"""The selected run's log: folded lines from LogTail, the progress line in place, a jump to the last
traceback, a failed run's stored error pinned above it, search (`/`, then n / N between hits) and a wrap
toggle (`w`: long lines folded at the pane's width instead of cut at its edge)."""

from __future__ import annotations

import re
from collections import deque

from rich.highlighter import Highlighter
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Log, Static

from console.logtail import clean_line, last_traceback
from console.text import terminal_safe
from engine.run_facts import error_summary

MAX_LINES = 5000


class _Hits(Highlighter):
    """Marks every occurrence of the search term in the lines the log draws."""

    def __init__(self, term: str):
        self.pattern = re.compile(re.escape(term), re.IGNORECASE)

    def highlight(self, text: Text) -> None:
        for match in self.pattern.finditer(text.plain):
            text.stylize("black on yellow", match.start(), match.end())


class LogView(Vertical):
    # Active while the log (or its search box) has focus, before the screen's keys: the footer shows them
    # first, and n / N mean next / previous hit here while a search is on (New run elsewhere).
    BINDINGS = [
        Binding("slash", "search", "Search"),
        Binding("n", "hit(1)", "Next hit"),
        Binding("N", "hit(-1)", "Previous hit"),
        Binding("e", "follow", "Follow"),
        Binding("w", "wrap", "Wrap"),
        Binding("escape", "end_search", "End search", show=False),
    ]
    DEFAULT_CSS = """
    LogView > Log { height: 1fr; }
    LogView > #log-progress { height: 1; color: $text-muted; }
    LogView > #log-error { height: auto; max-height: 8; color: $error; border-bottom: solid $error;
                           overflow-y: auto; display: none; }
    LogView > #log-search { height: 1; display: none; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lines: deque[str] = deque(maxlen=MAX_LINES)
        self.run_id: int | None = None
        self.error: str | None = None
        self.error_by: str | None = None
        self.pending = ""
        self.term = ""
        self.wrap = False
        self._wrapped_at = 0  # the width the shown lines were folded at
        self.unseen = 0  # lines that came while the view was not at the end (a search, a scroll up)
        self.wants_focus = False  # asked for focus before it had mounted its log

    def compose(self) -> ComposeResult:
        yield Static("", id="log-error")
        yield Log(max_lines=MAX_LINES, auto_scroll=True)
        yield Static("", id="log-progress")
        yield Input(placeholder="search the log (enter: first hit below; n / N: next / previous)", id="log-search",
                    compact=True)

    @property
    def _composed(self) -> bool:
        """Its children are there: the view mounts lazily, and for a moment is mounted without them."""
        return self.is_mounted and bool(self.query(Log))

    def on_mount(self) -> None:
        # Lines that arrived before the view was mounted (it mounts lazily) are kept in `lines`.
        self.query_one(Log).write_lines(self._shown(list(self.lines)))
        self.query_one("#log-progress", Static).update(Text(self.pending))
        self._show_error()
        if self.wants_focus:
            self.take_focus()

    def take_focus(self) -> None:
        """Focus the log (its keys at once); if it is not mounted yet, as soon as it is."""
        self.wants_focus = not self._composed
        if not self.wants_focus:
            self.query_one(Log).focus()

    def pin_error(self, error: str | None, by: str | None = None) -> None:
        """The run's error as runs.db holds it (the trainer's traceback, or what its supervisor or a look at
        its gone processes wrote; or the error of the pipeline it belongs to: `by`), above the log; None
        unpins it."""
        if (error, by) == (self.error, self.error_by):
            return
        self.error, self.error_by = error, by
        if self._composed:
            self._show_error()

    def _show_error(self) -> None:
        pinned = self.query_one("#log-error", Static)
        pinned.display = bool(self.error)
        if self.error:
            # As the log shows it: a launcher killed mid-progress-bar leaves its redraws in the recorded error.
            lines = [line for line in map(clean_line, self.error.split("\n")) if line.strip()]
            # What happened (a traceback's last line) goes first, on the heading: the box shows 7 lines, and a
            # traceback's tail below it scrolls.
            source = f"error recorded by {self.error_by}" if self.error_by else "error on record"
            head = f"{source}: {error_summary(self.error)}"
            pinned.update(Text(terminal_safe("\n".join([head, *lines[-12:-1]]))))

    def append(self, run_id: int, lines: list[str], pending: str, reset: bool, skipped_start: bool) -> None:
        fresh = reset or run_id != self.run_id
        if fresh:
            self.run_id = run_id
            self.lines.clear()
            self.unseen = 0
            if self._composed:
                self.query_one(Log).clear()
                self.query_one(Log).auto_scroll = True  # a log opens at its end, following
            if skipped_start:
                lines = ["… (earlier lines of the log skipped)", *lines]
        self.lines.extend(lines)
        self.pending = pending
        if self._composed:
            if lines:
                log = self.query_one(Log)
                following = log.auto_scroll and log.is_vertical_scroll_end
                full = log.line_count + len(lines) > MAX_LINES
                log.write_lines(self._shown(lines))
                if full:
                    # Log drops its oldest lines but repaints only rows past its old end, at the same scroll
                    # offset: every row moved, so all of them are drawn again (the view stood still otherwise)
                    log.refresh()
                self.unseen = 0 if following else self.unseen + len(lines)
            self._progress()

    def _progress(self) -> None:
        # The log's last, unfinished line (a progress bar); and, while the view is not at the end, that it is
        # not following: new lines land below unseen.
        held = f"↓ {self.unseen:,} new line{'s' if self.unseen != 1 else ''} below (e follows)  " if self.unseen else ""
        self.query_one("#log-progress", Static).update(Text(held + self.pending))

    def clear(self, note: str = "") -> None:
        self.run_id = None
        self.lines.clear()
        self.pending = note
        self.unseen = 0
        if self._composed:
            self.query_one(Log).clear()
            self._progress()

    def jump_to_traceback(self) -> bool:
        if not self._composed:
            return False
        log = self.query_one(Log)
        index = last_traceback(list(log.lines))  # the widget's own lines: its line numbers are what scrolls
        if index is None:
            return False
        log.auto_scroll = False
        log.scroll_to(y=index, animate=False)
        return True

    # -- search ------------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("hit", "end_search") and not self.term:
            return False  # n is New run, escape what the screen makes it, while no search is on
        return True

    def action_search(self) -> None:
        box = self.query_one("#log-search", Input)
        box.display = True
        box.value = self.term
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "log-search":
            return
        event.stop()
        self.term = event.value.strip()
        event.input.display = False
        log = self.query_one(Log)
        log.highlighter = _Hits(self.term) if self.term else log.highlighter
        log.highlight = bool(self.term)
        log.notify_style_update()  # clears the lines drawn before: they are cached without the marks
        log.refresh()
        log.focus()
        self.refresh_bindings()
        if self.term:
            self.action_hit(1, from_top_line=True)

    def hits(self) -> list[int]:
        """Line numbers (the log widget's own) holding the term."""
        needle = self.term.lower()
        return [i for i, line in enumerate(self.query_one(Log).lines) if needle in line.lower()]

    def action_hit(self, direction: int, from_top_line: bool = False) -> None:
        log = self.query_one(Log)
        top = int(log.scroll_offset.y)
        hits = self.hits()
        if not hits:
            self.notify(f"no line holds {self.term!r}", title="search")
            return
        if direction > 0:
            after = [i for i in hits if i > top or (from_top_line and i == top)]
            target = after[0] if after else hits[0]  # wraps round, as less does
        else:
            before = [i for i in hits if i < top]
            target = before[-1] if before else hits[-1]
        log.auto_scroll = False
        log.scroll_to(y=target, animate=False)
        self.current_hit = target

    def action_end_search(self) -> None:
        self.term = ""
        log = self.query_one(Log)
        log.highlight = False
        log.notify_style_update()
        log.refresh()
        self.refresh_bindings()

    # -- wrap --------------------------------------------------------------------------------------------
    def _width(self) -> int:
        log = self.query_one(Log)
        return max(20, log.scrollable_content_region.width or log.size.width or 80)

    def _shown(self, lines: list[str]) -> list[str]:
        """The lines as the log draws them: folded at the pane's width (in cells) when wrapping."""
        if not self.wrap:
            return lines
        from rich.cells import chop_cells

        width = self._wrapped_at = self._width()
        return [part for line in lines for part in (chop_cells(line, width) or [""])]

    def _redraw(self) -> None:
        log = self.query_one(Log)
        following = log.auto_scroll
        log.clear()
        log.write_lines(self._shown(list(self.lines)))
        if following:
            log.scroll_end(animate=False)

    def action_wrap(self) -> None:
        self.wrap = not self.wrap
        if self._composed:
            self._redraw()
        self.notify("long lines wrapped" if self.wrap else "long lines cut at the edge (scroll right)",
                    title="log")

    def on_resize(self) -> None:
        if self.wrap and self._composed and self._width() != self._wrapped_at:
            self._redraw()

    def action_follow(self) -> None:
        self.follow()

    def follow(self) -> None:
        if not self._composed:
            return
        log = self.query_one(Log)
        log.auto_scroll = True
        log.scroll_end(animate=False)
        self.unseen = 0
        self._progress()
