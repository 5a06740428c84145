"""The chat's question box: Enter sends, ctrl+j starts a new line, a paste keeps its lines.

Textual's Input holds one line and keeps only the first line of a paste: a multi-line prompt (code, a
question with its context) was sent cut to its first line, silently. The box grows with its text up to
a few lines and scrolls after that.
"""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

# What terminals send for a line break typed in the box: ctrl+j is a bare line feed everywhere; shift+enter
# and ctrl+enter arrive as themselves only where the terminal reports them (kitty's keyboard protocol).
NEW_LINE_KEYS = ("ctrl+j", "newline", "shift+enter", "ctrl+enter")


class PromptBox(TextArea):
    DEFAULT_CSS = """
    PromptBox { height: auto; min-height: 3; max-height: 10; }
    """

    class Submitted(Message):
        """Enter: the box's whole text (the box is left as it is: its owner clears it once the text is taken)."""

        def __init__(self, box: PromptBox, value: str):
            super().__init__()
            self.box = box
            self.value = value

        @property
        def control(self) -> PromptBox:
            return self.box

    def __init__(self, placeholder: str = "", **kwargs: object):
        super().__init__(soft_wrap=True, tab_behavior="focus", show_line_numbers=False, placeholder=placeholder,
                         **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEW_LINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        # Anything else: TextArea._on_key, which Textual calls next on its own (it walks the classes)

    def set_text(self, text: str) -> None:
        """Replace the text, the cursor at its end (ready to add to it or send it)."""
        self.load_text(text)
        self.move_cursor(self.document.end)
