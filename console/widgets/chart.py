"""The one chart widget of the console: a metric of one or several runs, raw line faint, smoothed bright.

It wraps textual-plot's PlotWidget so that the plotting library can be swapped without touching the
screens. Every line is downsampled to the drawn width first: a 100,000-point history costs what a
few hundred points cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_plot import HiResMode, PlotWidget

from console.series import downsample

# Stable colours: a run keeps its colour whatever else is overlaid.
PALETTE = ("#4fc1ff", "#ffb454", "#7fd962", "#f07178", "#c792ea", "#ffd580", "#95e6cb", "#ff8f40")


def run_colour(run_id: int) -> str:
    return PALETTE[run_id % len(PALETTE)]


@dataclass
class ChartLine:
    label: str
    colour: str
    x: np.ndarray
    raw: np.ndarray
    smooth: np.ndarray | None  # None: smoothing off


class MetricChart(Vertical):
    DEFAULT_CSS = """
    MetricChart { height: 1fr; }
    MetricChart > #chart-title { height: 1; color: $text-muted; }
    MetricChart > PlotWidget { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", id="chart-title")
        yield PlotWidget(allow_pan_and_zoom=False)

    @property
    def plot(self) -> PlotWidget:
        return self.query_one(PlotWidget)

    def points_wide(self) -> int:
        # Braille cells hold two columns of dots; the y axis takes about 10 columns.
        return max(8, 2 * (self.size.width - 10))

    def draw(self, title: str, lines: list[ChartLine], x_label: str) -> int:
        """Replace what is drawn; returns the number of points handed to the plot."""
        self.query_one("#chart-title", Static).update(title)
        plot = self.plot
        plot.clear()
        plot.set_xlabel(x_label)
        buckets = self.points_wide() // 2
        drawn = 0
        for line in lines:
            if not len(line.x):
                continue
            x, y = downsample(line.x, line.raw, buckets)
            faint = line.smooth is not None
            plot.plot(x, y, line_style=f"dim {line.colour}" if faint else line.colour,
                      hires_mode=HiResMode.BRAILLE)
            drawn += len(x)
            if line.smooth is not None:
                xs, ys = downsample(line.x, line.smooth, buckets)
                plot.plot(xs, ys, line_style=f"bold {line.colour}", hires_mode=HiResMode.BRAILLE)
                drawn += len(xs)
        return drawn
