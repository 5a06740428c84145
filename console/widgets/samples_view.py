"""A PPO run's recorded rollout samples (prompt, response, score), one step at a time."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from console.text import terminal_safe


def _one_line(text: str, width: int = 200) -> str:
    flat = " ".join(terminal_safe(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class SamplesView(Vertical):
    DEFAULT_CSS = """
    SamplesView > #samples-head { height: 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", id="samples-head")
        yield DataTable(id="samples-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("score", "prompt", "response")

    def show(self, run_id: int, steps: list[int], step: int | None, rows: list[dict[str, Any]]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for row in rows:
            score = "-" if row["score"] is None else f"{row['score']:.3f}"
            # model output is arbitrary text ("[/INST]", say): cells are Text, never markup
            table.add_row(score, Text(_one_line(row["prompt"])), Text(_one_line(row["response"])))
        where = (f"step {step} ({steps.index(step) + 1} of {len(steps)})" if step is not None
                 else "no samples recorded")
        self.query_one("#samples-head", Static).update(Text(f"run {run_id} samples: {where}   [ ] browse steps"))
