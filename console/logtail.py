"""Follow a run's train.log by byte offset: only new bytes are read, whatever the log's length.

Progress bars (`\\r`-separated redraws) fold to their last state, ANSI colour codes are stripped, a
line split across two reads is joined, and a log replaced by a shorter one starts over.
"""

from __future__ import annotations

import os
from pathlib import Path

from console.text import ESCAPES, terminal_safe

TRACEBACK = "Traceback (most recent call last):"
MAX_LINE_BYTES = 16 * 1024  # longer lines are shown cut: a run that never ends its line costs no memory


def clean_line(raw: str) -> str:
    """What a terminal would finally show of one line: the last `\\r` redraw, without colour codes or
    any other escape or control sequence (a log is data: `ESC # 8` must not fill the screen with E)."""
    text = ESCAPES.sub("", raw)
    parts = [p for p in text.split("\r") if p.strip()]
    return terminal_safe(parts[-1]).rstrip() if parts else ""


# A launcher's own traceback about its child having failed: not where the error is.
_WRAPPER_MARKS = ("CalledProcessError", "accelerate/commands/launch.py", "accelerate/commands/accelerate_cli.py")


# How a run says it failed on bad input (engine.run.BAD_INPUT): one line, no traceback.
BAD_INPUT = "error: "


def last_traceback(lines: list[str]) -> int | None:
    """Index of the start of the last Python traceback in `lines` that is the program's own, or of the
    last `error: ...` line a run ends with on bad input: a launcher's traceback about its failed child
    (accelerate's `CalledProcessError`) is passed over when an earlier one exists."""
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(TRACEBACK) or line.startswith(BAD_INPUT)]
    for n in range(len(starts) - 1, -1, -1):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = "\n".join(lines[starts[n]:end])
        if not any(mark in block for mark in _WRAPPER_MARKS):
            return starts[n]
    return starts[-1] if starts else None


class LogTail:
    """Incremental reader of one log file. `read()` returns (new complete lines, the line in progress).

    The first read starts `initial_bytes` from the end, so a week-long log opens at once.
    """

    def __init__(self, path: str | os.PathLike, initial_bytes: int = 256 * 1024):
        self.path = Path(path)
        self.initial_bytes = initial_bytes
        self.offset: int | None = None
        self._partial = b""
        self.truncated_start = False  # the first read skipped the log's beginning

    def read(self, max_bytes: int = 4 * 1024 * 1024) -> tuple[list[str], str]:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if self.offset is None or size < self.offset:
                    start = max(0, size - self.initial_bytes) if self.offset is None else 0
                    self.truncated_start = start > 0
                    self.offset, self._partial = start, b""
                    if start:
                        fh.seek(start)
                        fh.readline()  # skip to the first whole line
                        self.offset = fh.tell()
                fh.seek(self.offset)
                chunk = fh.read(max_bytes)
        except FileNotFoundError:
            return [], ""
        except OSError as err:  # unreadable (permissions, a folder): say so in place of the log
            return [], f"cannot read {self.path}: {err.strerror}"
        self.offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        self._partial = _last_redraw(self._partial)
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial = self._partial[-MAX_LINE_BYTES:]  # the end is what a terminal would show
        lines = [clean_line(_capped(line).decode("utf-8", errors="replace")) for line in complete]
        pending = clean_line(self._partial.decode("utf-8", errors="replace"))
        return lines, pending


def _capped(line: bytes) -> bytes:
    if len(line) <= MAX_LINE_BYTES:
        return line
    return line[: MAX_LINE_BYTES // 2] + f" … {len(line) - MAX_LINE_BYTES:,} bytes cut … ".encode() + \
        line[-MAX_LINE_BYTES // 2 :]


def _last_redraw(partial: bytes) -> bytes:
    """A progress bar redraws with `\r` and may never end its line: keep only its last visible state,
    so the unfinished line does not grow with every redraw."""
    cut = partial.rfind(b"\r")
    if cut > 0 and not partial[cut + 1:].strip():
        cut = partial.rfind(b"\r", 0, cut)  # the last redraw is still empty: keep the one before it
    return partial[cut:] if cut > 0 else partial
