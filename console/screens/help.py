"""Every key, read from the bindings themselves so that the list cannot drift from the code."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from console.keys import rows


def _plain(action: str) -> str:
    # `app.help` on a screen and `help` on the app, `screen.sample_step(1)` in a pane: the same action
    return action.removeprefix("app.").removeprefix("screen.")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, sections: list[tuple[str, list[Binding]]]):
        """`sections`: (title, bindings) per screen, as the app gives them (this module imports no screen)."""
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        # Text, not markup: keys such as [ and ] would read as markup tags.
        text = Text()
        # A screen's own key for an app key (its n, g, ?: the same key, the same action) is listed once, under
        # the app (the first section); two screens' actions of one name (each its `mark`, its `export`) are
        # each listed under their screen, and so is a screen's own key for an action the app has too.
        app_keys = {(b.key, _plain(b.action)) for b in self.sections[0][1]} if self.sections else set()
        for k, (title, bindings) in enumerate(self.sections):
            fresh = bindings if k == 0 else [b for b in bindings if (b.key, _plain(b.action)) not in app_keys]
            text.append(f"{title}\n", style="bold")
            for keys, description in rows(fresh):
                text.append(f"  {keys:<14}", style="bold")
                text.append(f" {description}\n")
            text.append("\n")
        text.append("Also\n", style="bold")
        text.append("  ctrl+p         command palette: every action above, by name\n"
                    "  tab, shift+tab move between panes; arrows move in tables and lists\n\n"
                    "  Esc closes this screen.")
        with VerticalScroll(classes="dialog wide"):
            yield Static(text)
