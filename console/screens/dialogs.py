"""Dialogs: confirmations (stop, resume, delete; Enter/y confirms, Escape/n cancels), a run's note, a text
viewer and two texts side by side."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Static

from console.text import terminal_safe


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "cancel", "Cancel"), Binding("y", "confirm", "Confirm")]

    def __init__(self, question: str, verb: str):
        super().__init__()
        self.question, self.verb = question, verb

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            # run names and paths: never markup, never an escape sequence
            yield Static(Text(terminal_safe(self.question)), classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.verb} (y)", variant="error", id="confirm")
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class _OneLineInput(Input):
    """An Input that keeps a multi-line paste, its lines joined by spaces (Input keeps its first line: a note
    pasted from a notebook lost all but its first line, unseen), cut to the room left (Input drops a paste
    that does not fit whole)."""

    def _on_paste(self, event: events.Paste) -> None:
        # Textual calls each class's handler in turn, this one first: Input's then inserts the joined text.
        text = " ".join(event.text.split())
        if self.max_length:
            start, end = self.selection
            text = text[: max(self.max_length - len(self.value) + abs(end - start), 0)]
        event.text = text


class NoteScreen(ModalScreen[str | None]):
    """A run's note: Enter keeps it (empty removes it), Escape leaves it as it was."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, run_id: int, note: str | None):
        super().__init__()
        self.run_id, self.note = run_id, note or ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"A note on run {self.run_id}, up to 80 characters (shown beside its recipe; Enter keeps "
                         "it, Esc cancels)", classes="question")
            yield _OneLineInput(self.note, placeholder="e.g. lr sweep, 2e-5", id="note", max_length=80)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(" ".join(event.value.split()))

    def action_cancel(self) -> None:
        self.dismiss(None)


class DeleteScreen(ModalScreen[tuple[bool, bool]]):
    """Returns (delete?, also delete the run's files?)."""

    BINDINGS = [Binding("escape,n", "cancel", "Cancel"), Binding("y", "confirm", "Delete")]

    def __init__(self, run_id: int, output_dir: str | None, used_by: list[int] | None = None):
        """`used_by`: the runs whose settings name its files (engine.run_facts.runs_using)."""
        super().__init__()
        self.run_id, self.output_dir, self.used_by = run_id, output_dir, used_by or []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(f"Delete run {self.run_id} from runs.db (its metrics, samples and checkpoint list)?"),
                         classes="question")
            if self.used_by:
                many = len(self.used_by) > 1
                runs = ", ".join(str(i) for i in self.used_by)
                their = "their" if many else "its"
                yield Static(Text(f"run{'s' if many else ''} {runs} use{'' if many else 's'} its files (trained "
                                  f"from its export, scored by it, or evaluated it): without them {their} resume "
                                  f"fails and {their} score rows name a model that is gone", style="bold"),
                             id="used-by")
            yield Checkbox(Text(terminal_safe(f"also delete its files ({self.output_dir})")), False, id="files")
            with Horizontal(classes="buttons"):
                yield Button("Delete (y)", variant="error", id="confirm")
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id == "confirm", self.query_one("#files", Checkbox).value))

    def action_confirm(self) -> None:
        self.dismiss((True, self.query_one("#files", Checkbox).value))

    def action_cancel(self) -> None:
        self.dismiss((False, False))


class TextScreen(ModalScreen[None]):
    """A title and a scrollable text (a diff of two answers, paired deltas); Esc closes."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, body: Text | str):
        super().__init__()
        self.heading, self.body = title, body

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Static(Text(self.heading, style="bold") + Text("   Esc closes", style="dim"))
            with VerticalScroll():
                yield Static(self.body if isinstance(self.body, Text) else Text(self.body))


class SideBySideScreen(ModalScreen[None]):
    """Two texts in columns of their own, each under its name (two answers to one question, their
    differences marked): each keeps its own lines, which one text merged from both could not."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, left: tuple[str, Text], right: tuple[str, Text]):
        super().__init__()
        self.heading, self.columns = title, (left, right)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Static(Text(self.heading, style="bold") + Text("   Esc closes", style="dim"), classes="question")
            with Horizontal(classes="side-by-side"):
                for name, text in self.columns:
                    with VerticalScroll(classes="column"):
                        yield Static(Text(name, style="bold underline"))
                        yield Static(text)
