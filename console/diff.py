"""Changed keys between two runs' resolved configs (JSON), flattened to dotted keys."""

from __future__ import annotations

import json
from typing import Any

MISSING = "—"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
        return out
    return {prefix: value}


# A recipe's sections of one stage each; `eval` is what a pipeline evaluates with, which no training run uses
STAGE_SECTIONS = ("sft", "rm", "ppo", "eval")


def run_config(run: dict[str, Any]) -> dict[str, Any]:
    """What a run actually ran with: its stage, the recipe's shared keys and its own stage's section (a
    recipe holds every stage; an SFT and a PPO run of one recipe must not compare as identical). An
    evaluation run's config is its own settings, kept whole."""
    config = json.loads(run["config"]) if isinstance(run.get("config"), str) else dict(run.get("config") or {})
    view = {key: value for key, value in config.items() if key not in STAGE_SECTIONS}
    view["stage"] = run.get("stage")
    if run.get("stage") in config:
        view[run["stage"]] = config[run["stage"]]
    return view


def config_diff(a: str | dict | None, b: str | dict | None) -> list[tuple[str, str, str]]:
    """(key, value in a, value in b) for every key whose value differs, sorted by key."""
    left = flatten(json.loads(a) if isinstance(a, str) else (a or {}))
    right = flatten(json.loads(b) if isinstance(b, str) else (b or {}))
    rows = []
    for key in sorted(left.keys() | right.keys()):
        if left.get(key, MISSING) != right.get(key, MISSING):
            rows.append((key, _show(left.get(key, MISSING)), _show(right.get(key, MISSING))))
    return rows


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
