"""Text that grows at its end, drawn line by line: the chat pane's answer while it streams.

Appending re-wraps only the last visual line, and only the lines on screen are drawn (the Line API), so
a chunk costs the same at the 10th token and at the 10,000th. Wrapping counts terminal cells, so Chinese
(two cells a character) wraps where it should; a line breaks at its last space when it has one.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget


def _split(line: str, width: int) -> list[str]:
    """`line` cut into pieces of at most `width` cells, at a space where one is near the end."""
    pieces = []
    while cell_len(line) > width:
        cut, cells = 0, 0
        for cut, ch in enumerate(line):
            cells += cell_len(ch)
            if cells > width:
                break
        space = line.rfind(" ", 0, cut)
        if space > cut // 2:  # a word break that does not waste half the line
            cut = space + 1
        cut = max(cut, 1)  # a character wider than the line still goes on a line of its own
        pieces.append(line[:cut])
        line = line[cut:]
    if line or not pieces:
        pieces.append(line)
    return pieces


class StreamText(Widget):
    DEFAULT_CSS = "StreamText { height: auto; }"

    def __init__(self, text: str = "", **kwargs: object):
        super().__init__(**kwargs)
        self.text = ""
        self._lines: list[str] = [""]  # visual lines, wrapped to _width
        self._width = 0
        if text:
            self.append(text)

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def _wrap_width(self) -> int:
        return max(self.size.width, 1) if self.size.width else 80

    def on_resize(self) -> None:
        if self._wrap_width() != self._width:
            self._rewrap()

    def _rewrap(self) -> None:
        self._width = self._wrap_width()
        self._lines = []
        for logical in self.text.split("\n"):
            self._lines.extend(_split(logical, self._width))
        self.refresh(layout=True)

    def append(self, text: str) -> None:
        if not text:
            return
        self.text += text
        if not self._width:
            self._width = self._wrap_width()
        before = len(self._lines)
        first_changed = before - 1
        parts = text.split("\n")
        tail = self._lines.pop() + parts[0]
        self._lines.extend(_split(tail, self._width))
        for logical in parts[1:]:
            self._lines.extend(_split(logical, self._width))
        if len(self._lines) != before:
            self.refresh(layout=True)  # taller: the container lays out again (cheap: one widget's height)
        else:
            self.refresh(Region(0, first_changed, self.size.width, 1))

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if width and width != self._width:
            self._width = width
            self._lines = [p for logical in self.text.split("\n") for p in _split(logical, width)]
        return len(self._lines)

    def render_line(self, y: int) -> Strip:
        if y >= len(self._lines):
            return Strip.blank(self.size.width)
        line = self._lines[y]
        style = self.rich_style or Style()
        return Strip([Segment(line, style)], cell_len(line)).extend_cell_length(self.size.width, style)
