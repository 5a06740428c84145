"""The score table screen: every evaluation run against the published row; a cell opens its items.

Keys: arrows move between cells (the line below shows the cell's 95 % interval, n, unscored and not
judged); Enter lists the cell's items (question, reference, answer, judge reply, score); space marks a
row (▸ by its name; space again unmarks) and `p` shows the paired deltas of the second marked row (or the
highlighted one) against the first;
`e` exports Markdown and CSV. The table follows runs.db: an evaluation run added or ended shows at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from console.screens.dialogs import TextScreen
from console.text import terminal_safe
from console.widgets.score_table import ScoreTable
from console.worker_failures import SaysWorkerFailures


@dataclass
class ScoresLoaded(Message):
    rows: list[Any]
    best: dict[str, set[int]]
    error: str | None = None


@dataclass
class ItemsLoaded(Message):
    title: str
    items: list[dict[str, Any]]


@dataclass
class DeltasLoaded(Message):
    title: str
    lines: list[str]
    problem: str = ""  # why there are none


class ScoresScreen(SaysWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("enter", "items", "Items"),
        Binding("space", "mark", "Mark"),
        Binding("p", "deltas", "Paired delta"),
        Binding("e", "export", "Export"),
        Binding("R", "reload", "Reload", show=False),
        Binding("q,escape", "close", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._seen: tuple = ()  # the evaluation runs as the table last showed them
        self._loaded_at = 0.0

    def compose(self) -> ComposeResult:
        yield Static(Text("BELLE scores per category · best measured in bold · a cell's interval below"),
                     id="scores-title")
        yield ScoreTable(id="score-table")
        yield Static("loading…", id="cell-info")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ScoreTable).focus()
        self._seen = self._evaluations()
        self.load()
        self.set_interval(1.0, self._reload_if_changed)

    def _evaluations(self) -> tuple:
        return tuple((r["id"], r["status"], r.get("step")) for r in self.app.runs.values() if r["stage"] == "eval")

    def _reload_if_changed(self) -> None:
        """An evaluation run added, ended or deleted reloads the table at once; one still judging, every
        10 s (a reload recomputes every run's intervals)."""
        now = self._evaluations()
        if now == self._seen:
            return
        ended = {(i, s) for i, s, _ in now} != {(i, s) for i, s, _ in self._seen}
        if ended or time.monotonic() - self._loaded_at >= 10:
            self._seen = now
            self.load()

    @work(thread=True, exclusive=True, group="scores", exit_on_error=False)
    def load(self) -> None:
        from engine.eval_cli import eval_rows
        from engine.scores import best_per_column

        self._loaded_at = time.monotonic()
        try:
            rows = eval_rows(self.app.db_path)
        except Exception as err:  # StoreError, sqlite3.Error
            self.post_message(ScoresLoaded([], {}, str(err)))
            return
        self.post_message(ScoresLoaded(rows, best_per_column(rows)))

    def on_scores_loaded(self, message: ScoresLoaded) -> None:
        info = self.query_one("#cell-info", Static)
        if message.error:
            info.update(Text(message.error, style="red"))
            return
        self.query_one(ScoreTable).show(message.rows, message.best)
        from engine.scores import ranking_note, same_answers_note

        measured = sum(1 for r in message.rows if r.run_id is not None)
        notes = [note for note in (ranking_note(message.rows), same_answers_note(message.rows)) if note]
        mixed = "".join(f" · {note}" for note in notes)
        info.update(Text(f"{measured} evaluation runs{mixed} · rlhf eval belle CHECKPOINT --eval-dir DIR adds one"
                         if measured else "no evaluation run yet: rlhf eval belle CHECKPOINT --eval-dir DIR"))

    def on_data_table_cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        from engine.scores import shown

        table = self.query_one(ScoreTable)
        picked = table.cell_at_cursor()
        if picked is None:  # the model column: the row, not the cell last visited
            row = table.row_at_cursor()
            text = "" if row is None else row.name if row.run_id is None else \
                (f"run {row.run_id} · {row.name} · {row.size} questions · {row.judge or 'not judged yet'} · "
                 f"{row.answer_lengths.shown()}")
            self.query_one("#cell-info", Static).update(Text(terminal_safe(text), no_wrap=True, overflow="ellipsis"))
            return
        row, column = picked
        cell = row.cells[column]
        if row.run_id is None:
            text = f"{row.name} · {column}: {cell.mean:.3f} (as published)"
        elif cell.mean is None and not cell.not_judged:  # every answer judged: no score will come
            from engine.scores import MACRO, MACRO_WO

            why = ("a macro needs a score in every category it averages, and this run's questions leave some "
                   "without one") if column in (MACRO, MACRO_WO) else "no question of it has a score"
            text = f"run {row.run_id} · {column}: none ({why}; {cell.unscored} unscored)"
        elif cell.mean is None:
            text = f"run {row.run_id} · {column}: no score yet ({cell.not_judged} not judged, {cell.unscored} unscored)"
        else:
            text = (f"run {row.run_id} · {column}: {shown(cell.mean, cell.low, cell.high)} · n {cell.n} · "
                    f"unscored {cell.unscored} · not judged {cell.not_judged} · {row.judge}")
        self.query_one("#cell-info", Static).update(Text(terminal_safe(text), no_wrap=True, overflow="ellipsis"))

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        self.action_items()  # Enter on a cell: the table takes the key itself and says so

    def action_items(self) -> None:
        table = self.query_one(ScoreTable)
        picked = table.cell_at_cursor()
        if picked is None:  # on the model's name: every item of its run
            row = table.row_at_cursor()
            picked = (row, "every class") if row is not None else None
        if picked is None:
            return
        if picked[0].run_id is None:
            self.notify("the published row is BELLE's own figures: it has no answers here", severity="warning")
            return
        self.load_items(picked[0].run_id, picked[0].name, picked[1])

    @work(thread=True, group="scores-items", exit_on_error=False)
    def load_items(self, run_id: int, name: str, column: str) -> None:
        from engine.store import EvalStore, Store

        with Store(self.app.db_path) as store:
            items = EvalStore(store).scored_items(run_id)
        if column not in ("macro", "macro w/o others", "every class"):
            items = [i for i in items if i["category"] == column]
        elif column == "macro w/o others":
            items = [i for i in items if i["category"] != "others"]
        self.post_message(ItemsLoaded(f"{name} (evaluation run {run_id}) · {column} · {len(items)} items", items))

    def on_items_loaded(self, message: ItemsLoaded) -> None:
        self.app.push_screen(ItemsScreen(message.title, message.items))

    def action_mark(self) -> None:
        table = self.query_one(ScoreTable)
        row = table.row_at_cursor()
        if row is None or row.run_id is None:
            return
        if row.run_id in table.marked:  # space again: unmarked
            table.mark([r for r in table.marked if r != row.run_id])
            return
        # Two marks, as the run table's diff takes them: a third mark lets go of the first.
        marked = [*table.marked, row.run_id]
        table.mark(marked[-2:])
        if len(marked) == 1:
            self.notify(f"run {row.run_id} marked: p compares the row under the cursor against it (or mark a "
                        "second run)", markup=False)
            return
        dropped = f"run {marked[0]} unmarked; " if len(marked) > 2 else ""
        self.notify(f"{dropped}runs {marked[-2]} and {marked[-1]} marked: p shows run {marked[-1]} minus run "
                    f"{marked[-2]}", markup=False)

    def action_deltas(self) -> None:
        table = self.query_one(ScoreTable)
        row = table.row_at_cursor()
        if len(table.marked) == 2:
            self.load_deltas(*table.marked)
            return
        if not table.marked or row is None or row.run_id in (None, *table.marked):
            self.notify("mark two runs with space (or one, and put the cursor on another), then press p",
                        title="paired delta")
            return
        self.load_deltas(table.marked[0], row.run_id)

    @work(thread=True, group="scores-deltas", exit_on_error=False)
    def load_deltas(self, a: int, b: int) -> None:
        from engine.scores import NotComparable, paired_deltas
        from engine.store import EvalStore, Store

        with Store(self.app.db_path) as store:
            evals = EvalStore(store)
            try:
                deltas = paired_deltas(evals.scored_items(a), evals.scored_items(b), f"run {a}", f"run {b}")
            except NotComparable as err:
                self.post_message(DeltasLoaded("", [], str(err)))
                return
        lines = [f"{d.column:>16}: {d.shown()}  n {d.n}" for d in deltas]
        self.post_message(DeltasLoaded(f"run {b} minus run {a}, on the items both scored (95 % paired bootstrap)",
                                       lines))

    def on_deltas_loaded(self, message: DeltasLoaded) -> None:
        if message.problem:
            self.notify(message.problem, title="no paired deltas", severity="error", markup=False)
            return
        self.app.push_screen(TextScreen(message.title, "\n".join(message.lines)))

    def action_export(self) -> None:
        self.app.export_scores()

    def action_reload(self) -> None:
        self.load()

    def action_close(self) -> None:
        self.app.pop_screen()


class ItemsScreen(ModalScreen[None]):
    """A cell's items; the highlighted one in full below (question, reference, answer, judge's reply)."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, items: list[dict[str, Any]]):
        super().__init__()
        self.heading, self.items = title, items

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Static(Text(self.heading, style="bold"))
            yield DataTable(id="items-table", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="item-detail"):
                yield Static("", id="item-text")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "score", "question")
        for item in self.items:
            score = "-" if item.get("score") is None else f"{item['score']:.2f}"
            if item.get("status") == "unscored":
                score = "unscored"
            question = " ".join(terminal_safe(item["question"]).split())
            table.add_row(str(item["item_id"]), score, Text(question[:120], no_wrap=True, overflow="ellipsis"))
        table.focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row >= len(self.items):
            return
        item = self.items[event.cursor_row]
        text = Text()
        for label, value in (("question", item["question"]), ("reference", item["reference"] or "(none)"),
                             ("answer", item["answer"] or "(not answered)"),
                             ("judge", item.get("reply") or item.get("problem") or "(not judged)"),
                             ("score", "-" if item.get("score") is None else f"{item['score']:.3f}")):
            text.append(f"{label}: ", style="bold")
            text.append(terminal_safe(str(value)) + "\n")
        self.query_one("#item-text", Static).update(text)
