"""Every key, read from the bindings themselves so that the list cannot drift from the code."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from console.keys import rows
from console.metric_meanings import MEANINGS

# Not bindings of any screen: what Textual itself does with these keys.
ALSO = [("ctrl+p", "command palette: every action above, by name"),
        ("tab, shift+tab", "move between panes; arrows move in tables and lists")]


def _plain(action: str) -> str:
    # `app.help` on a screen and `help` on the app, `screen.sample_step(1)` in a pane: the same action
    return action.removeprefix("app.").removeprefix("screen.")


def _section(title: str, entries: list[tuple[str, str]], key_width: int) -> list[Text | Table]:
    # A grid, not padded text: a description too long for a narrow terminal wraps under itself, not under
    # the keys.
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=key_width, no_wrap=True, style="bold")
    grid.add_column(ratio=1)
    for keys, description in entries:
        grid.add_row(keys, description)
    return [Text(title, style="bold"), grid, Text("")]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, sections: list[tuple[str, list[Binding]]]):
        """`sections`: (title, bindings) per screen, as the app gives them (this module imports no screen)."""
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        # A screen's own key for an app key (its n, g, ?: the same key, the same action) is listed once, under
        # the app (the first section); two screens' actions of one name (each its `mark`, its `export`) are
        # each listed under their screen, and so is a screen's own key for an action the app has too.
        app_keys = {(b.key, _plain(b.action)) for b in self.sections[0][1]} if self.sections else set()
        listed = [(title, rows(bindings if k == 0 else
                               [b for b in bindings if (b.key, _plain(b.action)) not in app_keys]))
                  for k, (title, bindings) in enumerate(self.sections)] + [("Also", ALSO)]
        key_width = 2 + max(len(keys) for _, entries in listed for keys, _ in entries)
        parts: list[Text | Table] = []
        for title, entries in listed:
            parts += _section(title, [(f"  {keys}", description) for keys, description in entries], key_width)
        parts += _section("Metrics (the curves the runs log)", [(f"  {name}", meaning)
                                                               for name, meaning in MEANINGS.items()],
                          2 + max(len(name) for name in MEANINGS))
        parts.append(Text("Esc closes this screen."))
        with VerticalScroll(classes="dialog wide"):
            yield Static(Group(*parts))
        yield Footer()
