"""Every key, read from the bindings themselves so that the list cannot drift from the code."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


def _keys(bindings: list[Binding]) -> list[tuple[str, str]]:
    rows = []
    for b in bindings:
        keys = ", ".join(b.key_display or k for k in b.key.split(","))
        keys = keys.replace("left_square_bracket", "[").replace("right_square_bracket", "]")
        keys = keys.replace("full_stop", ".").replace("comma", ",").replace("question_mark", "?")
        rows.append((keys, b.description))
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        from console.app import RlhfConsole
        from console.screens.gpu import GpuScreen
        from console.screens.launch import LaunchScreen
        from console.screens.runs import RunsScreen

        sections = [("Everywhere", RlhfConsole.BINDINGS), ("Runs", RunsScreen.BINDINGS),
                    ("Launch", LaunchScreen.BINDINGS), ("GPUs", GpuScreen.BINDINGS)]
        lines = []
        for title, bindings in sections:
            lines.append(f"[b]{title}[/b]")
            lines += [f"  [b]{keys:<14}[/b] {description}" for keys, description in _keys(bindings)]
            lines.append("")
        lines += ["[b]Also[/b]", "  ctrl+p         command palette (every action by name)",
                  "  tab, shift+tab move between panes; arrows move in tables and lists", "",
                  "  Esc closes this screen."]
        with VerticalScroll(classes="dialog wide"):
            yield Static("\n".join(lines))
