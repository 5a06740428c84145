"""Reading an accelerate config file (what `accelerate config` writes), for the launcher and the estimate."""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import RecipeError


def read_accelerate_config(path: str | os.PathLike) -> dict:
    """The file's mapping; a RecipeError naming the file when it is missing, not YAML, or not an accelerate
    config (no distributed_type)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"--accelerate-config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"--accelerate-config {path}: cannot read it ({err})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"--accelerate-config {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise RecipeError(f"--accelerate-config {path}: not an accelerate config (no distributed_type)")
    return data
