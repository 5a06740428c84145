"""Key bindings as people read them: one source for the help screen and the command palette, so that
neither can drift from the bindings themselves."""

from __future__ import annotations

from typing import Iterable

from textual.app import SystemCommand
from textual.binding import Binding
from textual.dom import DOMNode
from textual.keys import format_key


def key_label(binding: Binding) -> str:
    """Every key of a binding as the footer shows it ("delete,D" -> "del, D"; "ctrl+equals_sign" -> "ctrl+=")."""
    keys = ["+".join(format_key(part) for part in k.strip().split("+")) for k in binding.key.split(",")]
    return ", ".join(dict.fromkeys(keys))


def described(binding: Binding) -> str:
    return binding.tooltip or binding.description


def rows(bindings: Iterable[Binding]) -> list[tuple[str, str]]:
    """(keys, description) per action: two bindings of one action (? and F1) make one row. A binding's
    tooltip, where it has one, is its description in full (the footer shows the short one)."""
    merged: dict[tuple[str, str], list[str]] = {}
    for binding in bindings:
        merged.setdefault((binding.action, described(binding)), []).append(key_label(binding))
    return [(", ".join(keys), description) for (_, description), keys in merged.items()]


def commands(node: DOMNode, bindings: Iterable[Binding], skip: Iterable[str] = ()) -> Iterable[SystemCommand]:
    """A palette entry per action of `bindings`, run on `node` (what its key would do)."""
    seen = set(skip)
    for binding in bindings:
        if binding.action in seen or not binding.description:
            continue
        seen.add(binding.action)

        def run(action: str = binding.action) -> None:
            node.call_later(node.run_action, action)  # run_action is a coroutine: the loop awaits it

        yield SystemCommand(described(binding), f"key: {key_label(binding)}", run)
