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
        seen: set[str] = set()  # a screen's own key for an app action (n, g, ?) is listed once, under the app
        for title, bindings in self.sections:
            fresh = [b for b in bindings if _plain(b.action) not in seen]
            seen.update(_plain(b.action) for b in bindings)
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
