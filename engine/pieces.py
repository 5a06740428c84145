"""A streamed answer, piece by piece: what the generation engine and an endpoint both give the chat worker
(light, so that an endpoint's worker never imports torch: that import was its first answer's TTFT)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """A stretch of a streamed answer; the last one (`final`) holds the whole answer instead."""

    text: str
    tokens: int  # generated so far
    final: bool = False
    finish: str | None = None  # on the final piece, where the source says why it stopped ("eos", "length")
