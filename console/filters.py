"""Textual's line filters, made safe for segments without a style.

With NO_COLOR set, Textual turns every line monochrome; its filter reads the style of each segment, and an
empty line of the charts' canvas (textual-hires-canvas) is a segment whose style is None: the console
crashed at start. The filter is kept, and is given a blank style where a segment has none.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.color import Color
from textual.filter import LineFilter

_BLANK = Style()


class StyledSegments(LineFilter):
    """`inner`, on segments that all have a style."""

    def __init__(self, inner: LineFilter):
        super().__init__(enabled=inner.enabled)
        self.inner = inner

    def apply(self, segments: list[Segment], background: Color) -> list[Segment]:
        if any(segment.style is None for segment in segments):
            segments = [Segment(text, _BLANK if style is None else style, control)
                        for text, style, control in segments]
        return self.inner.apply(segments, background)
