"""The BELLE score table: one row per evaluation run (and the published row), DESIGN.md's columns.

Each column's best measured value is bold; the highlighted cell's interval and counts are shown below
the table by the screen.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from console.text import terminal_safe

COLUMNS = ("others", "rewrite", "classification", "generation", "summarization", "extract", "open qa",
           "brainstorming", "closed qa", "macro", "macro w/o others")
# The scores take the width first; a name longer than this gets what the scores leave over.
MODEL_WIDTH = 22
SHORT = {"classification": "classif.", "generation": "gener.", "summarization": "summ.",
         "brainstorming": "brainst.", "macro w/o others": "macro w/o"}


class ScoreTable(DataTable):
    """Rows are engine.scores.Row objects."""

    model_key = ColumnKey("model")

    def __init__(self, **kwargs: Any):
        # The model column stays when the cursor moves right: at 80 columns the macro averages are off screen.
        super().__init__(cursor_type="cell", zebra_stripes=True, fixed_columns=1, **kwargs)
        self.rows_data: list[Any] = []
        self.marked: list[int] = []  # the runs paired deltas compare, in the order marked (two at most)

    def on_mount(self) -> None:
        self.add_column("model", key=self.model_key.value, width=MODEL_WIDTH)
        for column in COLUMNS:
            self.add_column(SHORT.get(column, column), key=column)

    def show(self, rows: list[Any], best: dict[str, set[int]]) -> None:
        """Every row anew (a reload), the cursor kept on the same run and column."""
        here = self.row_at_cursor()
        at_column = self.cursor_coordinate.column
        self.rows_data = list(rows)
        self.clear()
        for k, row in enumerate(rows):
            cells = [self._label(row)]
            for column in COLUMNS:
                cell = row.cells[column]
                text = "-" if cell.mean is None else f"{cell.mean:.3f}"
                cells.append(Text(text, style="bold reverse" if k in best.get(column, set()) else "",
                                  justify="right"))
            self.add_row(*cells, key=str(k))
        self._fit_model_column()
        if here is not None:
            k = next((k for k, row in enumerate(rows) if row.run_id == here.run_id), 0)
            self.move_cursor(row=k, column=at_column, animate=False)

    def on_resize(self) -> None:
        self._fit_model_column()

    def _fit_model_column(self) -> None:
        column = self.columns.get(self.model_key)
        if column is None or not self.size.width:
            return
        longest = max((self._label(row).cell_len for row in self.rows_data), default=0)
        scores = sum(c.get_render_width(self) for c in self.columns.values() if c is not column)
        left = self.size.width - scores - 2 * self.cell_padding - self.styles.scrollbar_size_vertical
        width = max(MODEL_WIDTH, min(longest, left))
        if width != column.width:
            column.width = width
            self._require_update_dimensions = True
            self._clear_caches()
            self.refresh()

    def _label(self, row: Any) -> Text:
        label = terminal_safe(row.name if row.run_id is None else f"{row.run_id} {row.name}")
        if row.run_id is not None and row.run_id in self.marked:
            return Text("▸ " + label, no_wrap=True, overflow="ellipsis", style="bold")
        return Text(label, no_wrap=True, overflow="ellipsis", style="italic" if row.run_id is None else "")

    def mark(self, run_ids: list[int]) -> None:
        """Mark these runs (none: an empty list), shown by their names."""
        self.marked = list(run_ids)
        for k, row in enumerate(self.rows_data):
            self.update_cell(str(k), "model", self._label(row))
        self._fit_model_column()  # the mark's two cells

    def row_at_cursor(self) -> Any | None:
        """The row under the cursor, whichever its column."""
        row = self.cursor_coordinate.row
        return self.rows_data[row] if row < len(self.rows_data) else None

    def cell_at_cursor(self) -> tuple[Any, str] | None:
        """(row, column name) under the cursor, if it is a score cell."""
        coordinate = self.cursor_coordinate
        if not self.rows_data or coordinate.column == 0 or coordinate.row >= len(self.rows_data):
            return None
        return self.rows_data[coordinate.row], COLUMNS[coordinate.column - 1]
