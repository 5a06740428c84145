"""The changed keys of two runs' resolved configs (and their --set overrides)."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from console.diff import config_diff, run_config
from console.text import terminal_safe


class ConfigDiffScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,d", "dismiss", "Close")]

    def __init__(self, a: dict[str, Any], b: dict[str, Any]):
        super().__init__()
        self.a, self.b = a, b

    def compose(self) -> ComposeResult:
        rows = config_diff(run_config(self.a), run_config(self.b))
        # The --set items one run has and the other has not: the whole lists, one JSON string each, pushed
        # the second run's column off the screen with the items both share
        items = [[str(i) for i in json.loads(run.get("overrides") or "[]")] for run in (self.a, self.b)]
        own = [[i for i in mine if i not in theirs] for mine, theirs in (items, items[::-1])]
        overrides = [("--set (not in both)", " ".join(own[0]) or "—", " ".join(own[1]) or "—")] if any(own) else []
        with Vertical(classes="dialog wide"):
            noun = "changed key" if len(rows) == 1 else "changed keys"
            sets = ", and --set items not in both" if overrides else ""
            yield Static(f"run {self.a['id']} vs run {self.b['id']}: {len(rows)} {noun}{sets}   (Esc closes)")
            table = DataTable(zebra_stripes=True, cursor_type="row")
            table.add_columns("key", f"run {self.a['id']}", f"run {self.b['id']}")
            for key, left, right in rows + overrides:
                table.add_row(Text(terminal_safe(key)), Text(terminal_safe(left)), Text(terminal_safe(right)))
            if not rows and not overrides:
                table.add_row("(identical configs)", "", "")
            yield table
