"""The one chart widget of the console: a metric of one or several runs, raw line faint, smoothed bright.

It wraps textual-plot's PlotWidget so that the plotting library can be swapped without touching the
screens. Every line is downsampled to the drawn width first: a 100,000-point history costs what a
few hundred points cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from textual.app import ComposeResult, RenderResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Static
from textual_hires_canvas import Canvas
from textual_plot import HiResMode, PlotWidget

from console.series import downsample


@dataclass
class ChartLine:
    label: str
    colour: str
    x: np.ndarray
    raw: np.ndarray
    smooth: np.ndarray | None  # None: smoothing off
    show_raw: bool = True  # with smoothing on: draw the raw line faintly behind the smoothed one


class _BatchedPlot(PlotWidget, inherit_bindings=False):
    """PlotWidget whose canvas refreshes once per frame: the canvas otherwise refreshes once per cell it
    sets, which costs more than the drawing itself. Its scale reset moves from `r` to `0`: focus lands on
    the chart easily, and `r` there must stay the console's resume."""

    BINDINGS = [*(b for b in PlotWidget.BINDINGS if not (isinstance(b, tuple) and b[0] == "r")),
                Binding("0", "reset_scales", "Reset scales")]

    def render(self) -> RenderResult:
        with self.query_one("#plot", Canvas).batch_refresh():
            return super().render()

    def _render_x_ticks(self) -> None:
        # The plot centres each tick label on its tick, so one near the right edge lost its last digits
        # (at 80 columns, a "1000" read "100"). Ticks whose label would not fit whole are left out.
        if self._x_ticks is not None:
            return super()._render_x_ticks()
        ticks, labels = self._x_formatter.get_ticks_and_labels(self._x_min, self._x_max)
        width = self.query_one("#margin-bottom", Canvas).size.width
        fits = []
        for tick, label in zip(ticks, labels):
            x = self.get_pixel_from_coordinate(tick, 0.0)[0] + self.margin_left
            start = x - len(label) // 2 + (len(label) % 2 == 0)  # as the canvas centres a label
            if tick == self._x_max or start + len(label) <= width:  # the plot right-aligns x_max itself
                fits.append(tick)
        self._x_ticks = fits
        try:
            super()._render_x_ticks()
        finally:
            self._x_ticks = None


CHART_KEYS = _BatchedPlot.BINDINGS  # the focused chart's own keys, for the help screen


POINT = "●"


class MetricChart(Vertical):
    DEFAULT_CSS = """
    MetricChart { height: 1fr; }
    MetricChart > #chart-title { height: 1; color: $text-muted; }
    MetricChart > PlotWidget { height: 1fr; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._set_limits: tuple | None = ((None, None), (None, None))  # None: unknown, set them next time

    def compose(self) -> ComposeResult:
        yield Static("", id="chart-title")
        yield _BatchedPlot(allow_pan_and_zoom=False)

    @property
    def plot(self) -> PlotWidget:
        return self.query_one(PlotWidget)

    def points_wide(self) -> int:
        # Braille cells hold two columns of dots; the y axis takes about 10 columns.
        return max(8, 2 * (self.size.width - 10))

    def draw(self, title: str, lines: list[ChartLine], x_label: str) -> int:
        """Replace what is drawn; returns the number of points handed to the plot."""
        heading = self.query_one("#chart-title", Static)
        if str(heading.content) != title:
            heading.update(title)
        plot = self.plot
        plot.clear()
        plot.set_xlabel(x_label)
        buckets = self.points_wide() // 2
        drawn = 0
        for line in lines:
            if not len(line.x):
                continue
            if line.smooth is None or line.show_raw:
                # behind a smoothed line the raw one is context: one point per cell is enough, and half
                # the cost of a braille line at full resolution
                x, y = downsample(line.x, line.raw, buckets if line.smooth is None else max(4, buckets // 2))
            if line.smooth is None:
                plot.plot(x, y, line_style=line.colour, hires_mode=HiResMode.BRAILLE)
                drawn += len(x)
            elif line.show_raw:
                # Behind a smoothed line the raw one is context: dim braille, as thin as the smoothed line
                # (half-block cells drew it heavier than the line it is context for).
                plot.plot(x, y, line_style=f"dim {line.colour}", hires_mode=HiResMode.BRAILLE)
                drawn += len(x)
            if line.smooth is not None:
                xs, ys = downsample(line.x, line.smooth, buckets)
                plot.plot(xs, ys, line_style=f"bold {line.colour}", hires_mode=HiResMode.BRAILLE)
                drawn += len(xs)
            if len(line.x) == 1:  # a line of one point draws nothing: an evaluation's metrics are one point
                plot.scatter(line.x, line.raw, marker=POINT, marker_style=f"bold {line.colour}")
        if not drawn:  # nothing to show: plain axes, not the last run's scale (autoscale would keep it)
            self._limits((None, None), (None, None), force=True)
            return drawn
        # A single point (or a flat line) has no span: the plot would label its axis with ten-digit ticks
        # around one value. A span of its own around the value instead; else the plot scales itself.
        xs = np.concatenate([line.x for line in lines if len(line.x)])
        ys = np.concatenate([line.raw for line in lines if len(line.x)])
        ys = ys[np.isfinite(ys)]
        flat_x = xs.min() == xs.max()
        flat_y = len(ys) and ys.min() == ys.max()
        pad = max(abs(float(ys[0])) * 0.1, 1e-3) if flat_y else 0.0
        self._limits((float(xs.min()) - 1, float(xs.max()) + 1) if flat_x else (None, None),
                     (float(ys[0]) - pad, float(ys[0]) + pad) if flat_y else (None, None))
        return drawn

    def _limits(self, x: tuple, y: tuple, force: bool = False) -> None:
        """Axis limits (None: the plot scales itself), set only when they change (each setting re-renders
        the plot) or when `force`d: setting autoscale again is what resets the scale of data now gone."""
        if not force and (x, y) == self._set_limits:
            return
        self._set_limits = None if force else (x, y)
        self.plot.set_xlimits(*x)
        self.plot.set_ylimits(*y)
