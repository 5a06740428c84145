"""Text that a run or a model wrote, made safe for the terminal: no escape or control sequences.

Run names, log lines, samples and model answers are data, never instructions to the terminal: an
`ESC # 8` in a log line would fill the screen with `E`. Only newlines and tabs survive; everything else
below 0x20, DEL, the C1 range and every ESC sequence is removed.
"""

from __future__ import annotations

import re

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]?")
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    return CONTROLS.sub("", ESCAPES.sub("", text))
