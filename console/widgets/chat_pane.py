"""One side of the chat screen: a model's conversation, its answer streaming in, and its live figures.

Chunks are gathered and drawn at most FRAME_S apart, into a StreamText that re-wraps only its last line
and draws only the lines on screen: the cost of a chunk does not grow with the answer's length, and keys
stay responsive while both sides stream. A finished answer is shown as Markdown (parsed once). The view
follows the answer while the user leaves it at the bottom (an anchor that scrolling up releases), once
the conversation is taller than the pane.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import Markdown, Static

from console.text import terminal_safe
from console.widgets.stream_text import StreamText

FRAME_S = 1 / 30


class ChatPane(Vertical):
    DEFAULT_CSS = """
    ChatPane { width: 1fr; border-right: solid $primary-background; }
    /* One line, cut at its end: Textual wraps a Text at its spaces whatever its no_wrap says, and the
       label on the second line was hidden ("right:" alone at 80 columns). */
    ChatPane > .pane-title { height: 1; background: $boost; padding: 0 1; text-style: bold; text-wrap: nowrap;
                             text-overflow: ellipsis; }
    ChatPane > .pane-stats { height: 1; padding: 0 1; color: $text-muted; text-wrap: nowrap;
                             text-overflow: ellipsis; }
    ChatPane > VerticalScroll { height: 1fr; }
    ChatPane .user-turn { margin: 1 1 0 1; color: $accent; }
    ChatPane Markdown, ChatPane StreamText { margin: 0 0 0 1; padding: 0; }
    ChatPane .pane-error { margin: 1 1 0 1; color: $error; }
    ChatPane .pane-note { margin: 1 1 0 1; color: $text-muted; }
    """

    def __init__(self, side: str, **kwargs: object):
        super().__init__(**kwargs)
        self.side = side
        self.heading = Static("", classes="pane-title")
        self.idle = "loading…"  # the figures line of an empty pane: the model's state, not a past answer's figures
        self.stats = Static(self.idle, classes="pane-stats")
        self.body = VerticalScroll()
        self._text: StreamText | None = None
        self._pending: list[str] = []
        self._flush_timer: Timer | None = None
        self.answer = ""  # the answer in progress, or the last one
        self._question: Static | None = None  # the last question shown: what follows it is its answer
        self.busy = False
        self.dead = False
        self._started = 0.0
        self._first: float | None = None
        self.tokens = 0

    def compose(self) -> ComposeResult:
        yield self.heading
        yield self.stats
        yield self.body

    def _follow(self) -> None:
        """Keep the newest text in view: anchor the conversation to the bottom once it is taller than the
        pane (checked after the layout has the new text). Textual 8.2.8 anchors a shorter one with a negative
        scroll offset: a first question and answer sat at the bottom of the pane under a blank void
        (textual#6652)."""
        self.body.call_after_refresh(self._anchor_if_taller)

    def on_resize(self) -> None:
        self._follow()  # a taller terminal can make an anchored conversation shorter than the pane

    def _anchor_if_taller(self) -> None:
        taller = self.body.max_scroll_y > 0
        if taller and not self.body.is_anchored:
            self.body.anchor()
        elif not taller and self.body.is_anchored:
            self._unanchor()

    def _unanchor(self) -> None:
        """Before the conversation shrinks (see _follow)."""
        self.body.anchor(False)
        # force: with nothing to scroll Textual ignores a scroll, and the negative offset (above) would stay
        self.body.scroll_home(animate=False, immediate=True, force=True)

    def set_title(self, text: str) -> None:
        self.heading.update(Text(terminal_safe(text), overflow="ellipsis", no_wrap=True))

    def set_stats(self, text: str) -> None:
        self.stats.update(Text(text, overflow="ellipsis", no_wrap=True))

    async def clear(self) -> None:
        self._flush()
        self._unanchor()
        await self.body.remove_children()
        self._text, self.answer, self.busy, self._question = None, "", False, None
        if not self.dead:
            self.set_stats(self.idle)

    async def begin(self, question: str | None) -> None:
        """A new answer (after the user's `question`, or in place of the last answer when regenerating)."""
        self._flush()
        if question is not None:
            self._question = Static(Text("> " + terminal_safe(question)), classes="user-turn")
            await self.body.mount(self._question)
        self._text = StreamText(classes="answer")
        await self.body.mount(self._text)
        self.answer, self.busy, self.tokens = "", True, 0
        self._started, self._first = time.perf_counter(), None
        self.set_stats("waiting for the first token…")
        if self.body.is_anchored:
            self.body.anchor()  # back to the newest text if the user had scrolled up
        self._follow()

    async def drop_last_answer(self) -> None:
        """Everything below the last question: its answer and whatever was said of it (stopped, cut, an
        error), so that the pane shows what the conversation holds."""
        self._flush()
        children = list(self.body.children)
        after = children[children.index(self._question) + 1:] if self._question in children else []
        if after:
            self._unanchor()
            await self.body.remove_children(after)
        self._text = None

    def add(self, text: str, tokens: int) -> None:
        """A chunk of the answer; drawn with the others that arrive within the same frame."""
        if self._text is None:
            return
        if self._first is None:
            self._first = time.perf_counter() - self._started
        text = terminal_safe(text)
        self.answer += text
        self.tokens = tokens
        self._pending.append(text)
        if self._flush_timer is None:
            self._flush_timer = self.set_timer(FRAME_S, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        if not self._pending or self._text is None:
            self._pending = []
            return
        self._text.append("".join(self._pending))
        self._pending = []
        if not self.body.is_anchored:
            self._follow()
        if self.busy and self._first is not None:
            elapsed = max(time.perf_counter() - self._started - self._first, 1e-9)
            rate = (self.tokens - 1) / elapsed if self.tokens > 1 else 0.0
            self.set_stats(f"{rate:.1f} tok/s · {self.tokens} tokens · TTFT {self._first:.2f} s")

    async def finish(self, event: dict) -> None:
        self._flush()
        self.busy = False
        tokens, seconds, ttft = event.get("tokens", 0), event.get("seconds") or 0.0, event.get("ttft_s")
        decode = max(seconds - (ttft or 0.0), 1e-9)
        rate = (tokens - 1) / decode if tokens > 1 else 0.0
        # The rate, the count and why it ended first: at 80 columns a pane is ~38 wide, and TTFT is cut first.
        first = f" · TTFT {ttft:.2f} s" if ttft is not None else ""
        if event.get("pieces") == 1:  # an endpoint that sent it whole (or one token): no decode rate to read
            self.set_stats(f"one piece in {seconds:.2f} s · {tokens} tokens · {event.get('finish', '')}")
        else:
            self.set_stats(f"{rate:.1f} tok/s · {tokens} tokens · {event.get('finish', '')}{first}")
        if self._text is not None:  # the finished answer, formatted once
            text, self._text = self._text, None
            await self.body.mount(Markdown(self.answer), after=text)
            await text.remove()
            self._follow()

    async def revive(self, note: str) -> None:
        """A new worker speaks for this side: it answers again (an answer the old one was writing is gone)."""
        self._flush()
        self.dead, self.busy, self._text = False, False, None
        await self.note(note)
        self.idle = "starting"
        self.set_stats(self.idle)

    async def note(self, text: str) -> None:
        """A line about the conversation (not part of it), below what is shown."""
        await self.body.mount(Static(Text(terminal_safe(text)), classes="pane-note"))
        self._follow()

    async def fail(self, message: str, fatal: bool = False) -> None:
        self._flush()
        self.busy = False
        self.dead = self.dead or fatal
        self._text = None
        await self.body.mount(Static(Text(terminal_safe(message)), classes="pane-error"))
        self.set_stats("worker stopped" if fatal else "error")
        self._follow()
