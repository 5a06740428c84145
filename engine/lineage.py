"""Where an exported model came from: every export carries `rlhf_lineage.json` (stage, run, start, base).

PPO's value branch may start from the reward model's top layers (`init_value_from_rm`). Those layers only
make sense on the features they were trained on: a reward model trained from the base model, put on top of
an SFT policy's trunk, reads features it never saw. The lineage lets PPO check that before training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.config import RecipeError

LINEAGE_FILE = "rlhf_lineage.json"
log = logging.getLogger(__name__)


def model_id(path: str) -> str:
    """A local folder as its absolute path, a hub id as it is."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def read_lineage(folder: str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder).expanduser() / LINEAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_lineage(folder: Path, stage: str, run_id: int, start: str, **more: Any) -> None:
    """Record that `folder` is `stage`'s export (or checkpoint) of run `run_id`, trained from `start`; `more`:
    what else it came from (PPO's reward)."""
    parent = read_lineage(start)
    # `written`: when, so that what was evaluated from this folder can tell a later export into it (a run
    # extended since) from a copy of the folder
    record = {"stage": stage, "run_id": run_id, "start": model_id(start),
              "base": parent["base"] if parent else model_id(start), "written": time.time(), **more}
    (Path(folder) / LINEAGE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def trained_against(lineage: dict[str, Any] | None, reward_model: str) -> bool:
    """Whether the model of this lineage (read_lineage) is a PPO policy trained to please `reward_model`."""
    rewarded_by = (lineage or {}).get("reward_model")
    return rewarded_by is not None and rewarded_by == model_id(reward_model)


def check_value_init(policy: str, reward_model: str, where: str) -> str | None:
    """Refuse a reward model of another base than the policy's; return a warning when the reward model
    was trained from the base while the policy is a fine-tune of it (None when consistent)."""
    rm = read_lineage(reward_model)
    mine = read_lineage(policy)
    policy_id = model_id(policy)
    policy_base = mine["base"] if mine else policy_id
    if rm is None:
        return (f"{where}: cannot check that the reward model {reward_model} starts from the policy's model "
                f"(it has no {LINEAGE_FILE}); the value branch may start on features its layers never saw")
    if rm["start"] == policy_id:
        return None
    if rm["base"] != policy_base:
        raise RecipeError(
            f"{where}: init_value_from_rm: the reward model was trained from {rm['start']} (base {rm['base']}), "
            f"the policy comes from {policy_base}: different models; turn init_value_from_rm off"
        )
    return (f"{where}: init_value_from_rm: the reward model was trained from {rm['start']}, but the policy is "
            f"{policy_id} (a {mine['stage'] if mine else 'fine-tune'} of it): the value branch starts from "
            "reward-model layers on features they never saw; train the reward model from the policy's start "
            "(rm.model.path = the SFT export) for a consistent start")
