"""A PPO run's recorded rollout samples (prompt, response, score), one step at a time.

Prompts of a run usually share a long start (a system preamble, the template's first turn): the table
shows each prompt from where they differ, and Enter opens the whole sample.
"""

from __future__ import annotations

import os
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from console.text import terminal_safe


def _one_line(text: str, width: int = 200) -> str:
    flat = " ".join(terminal_safe(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


SHARED_MIN = 32  # a shorter shared start ("Question: ") is worth reading, not hiding


def shared_start(texts: list[str]) -> int:
    """Length of the start every text shares (a preamble), cut back to its last line break (or, without
    one, its last space) so that no word is split; 0 for fewer than two texts or a start shorter than
    SHARED_MIN."""
    if len(texts) < 2:
        return 0
    common = os.path.commonprefix(texts)
    if len(common) == min(len(t) for t in texts):  # one prompt is the start of another: nothing to hide
        return 0
    # A line break ends a preamble (a system turn, a template's header); else the last whole word.
    line = common.rfind("\n") + 1
    cut = line if line >= SHARED_MIN else common.rfind(" ") + 1
    return cut if cut >= SHARED_MIN else 0


class SampleScreen(ModalScreen[None]):
    """One sample in full: score, prompt, response."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self, title: str, row: dict[str, Any]):
        super().__init__()
        self.title_text, self.row = title, row

    def compose(self) -> ComposeResult:
        score = "-" if self.row["score"] is None else f"{self.row['score']:.4f}"
        text = Text()
        text.append(f"{self.title_text}   score {score}", style="bold")
        text.append("   Esc closes\n\n", style="dim")
        text.append("prompt\n", style="bold")
        text.append(terminal_safe(self.row["prompt"]) + "\n\n")
        text.append("response\n", style="bold")
        text.append(terminal_safe(self.row["response"]))
        with VerticalScroll(classes="dialog wide"):
            yield Static(text)


class SamplesView(Vertical):
    # While the samples have focus the footer shows these first (the screen's own [ and ] do the work);
    # enter, the table's own key, opens the whole sample (the heading says so).
    BINDINGS = [
        Binding("left_square_bracket", "screen.sample_step(-1)", "Prev step"),
        Binding("right_square_bracket", "screen.sample_step(1)", "Next step"),
        Binding("slash", "find", "Find"),
    ]
    DEFAULT_CSS = """
    SamplesView > #samples-head { height: 1; }
    SamplesView > #samples-find { height: 1; display: none; }
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.rows: list[dict[str, Any]] = []  # the rows shown (those holding the find text)
        self.where = ""
        self.term = ""  # `/`: only samples whose prompt or response holds it
        self._shown: tuple = ()

    def compose(self) -> ComposeResult:
        yield Static("", id="samples-head")
        yield Input(placeholder="find in this step's samples (prompt or response)", id="samples-find", compact=True)
        yield DataTable(id="samples-table", cursor_type="row", zebra_stripes=True)

    def action_find(self) -> None:
        box = self.query_one("#samples-find", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "samples-find":
            event.stop()
            self.term = event.value.strip().lower()
            if self._shown:
                self.show(*self._shown)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "samples-find":
            event.stop()
            event.input.display = bool(event.value.strip())
            self.query_one(DataTable).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#samples-find", Input)
        if event.key == "escape" and self.screen.focused is box:
            event.stop()
            box.value = ""
            box.display = False
            self.query_one(DataTable).focus()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("score", "prompt", "response")

    def set_following(self, following: bool) -> None:
        """Whether the heading says the view follows the run (it ended meanwhile: no more samples come)."""
        if self._shown and self._shown[4] != following:
            self.show(*self._shown[:4], following)

    def show(self, run_id: int, steps: list[int], step: int | None, rows: list[dict[str, Any]],
             following: bool = False) -> None:
        self._shown = (run_id, steps, step, rows, following)
        hidden = shared_start([row["prompt"] for row in rows])
        every = len(rows)
        if self.term:
            rows = [r for r in rows if self.term in r["prompt"].lower() or self.term in r["response"].lower()]
        self.rows = rows
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            score = "-" if row["score"] is None else f"{row['score']:.3f}"
            prompt = ("…" if hidden else "") + row["prompt"][hidden:]
            # model output is arbitrary text ("[/INST]", say): cells are Text, never markup
            table.add_row(score, Text(_one_line(prompt)), Text(_one_line(row["response"])))
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))
        self.where = (f"step {step} ({steps.index(step) + 1} of {len(steps)})" if step is not None
                      else "no samples recorded")
        head = f"run {run_id} samples: {self.where}{' · following' if following else ''}"
        if self.term:
            head += f" · {len(rows)} of {every} hold {self.term!r}"
        if hidden:
            head += f" · the prompts' shared start ({hidden} characters) hidden"
        self.query_one("#samples-head", Static).update(Text(f"{head}   [ ] steps · enter: whole sample"))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "samples-table":
            event.stop()
            self.action_open()

    def action_open(self) -> None:
        row = self.query_one(DataTable).cursor_row
        if 0 <= row < len(self.rows):
            self.app.push_screen(SampleScreen(self.where, self.rows[row]))
