"""Environment switches between equivalent code paths (to compare them, or to rule one out), read without
torch: a run checks them before it is registered, so a mistyped value is an error, not a failed run or a
silently ignored switch."""

from __future__ import annotations

import os

from engine.config import RecipeError

TRUNK_CACHE_MODES = ("on", "score", "off")
DECODE_PATHS = ("", "transformers", "eager")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, default)
    value = raw.strip().lower()
    if value not in choices:
        shown = ", ".join(c or "unset" for c in choices)
        raise RecipeError(f"{name}={raw!r}: not one of {shown}")
    return value


def trunk_cache_mode() -> str:
    """RLHF_TRUNK_CACHE: on (the default: the trunk once per rollout, kept by the decoder as it samples where it
    can, else by the scoring forward), score (always by the scoring forward), off (recomputed in every forward:
    to compare, or to rule the cache out)."""
    return _choice("RLHF_TRUNK_CACHE", "on", TRUNK_CACHE_MODES)


def decode_path() -> str:
    """RLHF_DECODE: unset (the BLOOM decoder where the model is BLOOM), transformers (the transformers forward
    always), eager (the BLOOM decoder without CUDA graphs)."""
    return _choice("RLHF_DECODE", "", DECODE_PATHS)


def check_knobs() -> None:
    """Every switch's value, before anything is registered."""
    trunk_cache_mode()
    decode_path()
