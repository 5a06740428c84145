"""A rule reward for the demo's tasks, usable as `reward_fn: engine.demo.rewards:correct_answer`.

It checks what can be checked: an answer to one of the demo's questions scores 1 when it contains the
right sum, word or opposite, else 0. Prompts it does not know score 0.
"""

from __future__ import annotations

from functools import lru_cache

from engine.demo.tasks import qa_pairs
from engine.template import Turn, render_prompt


@lru_cache(maxsize=1)
def _keys() -> dict[str, str]:
    return {render_prompt([Turn("user", qa.question)]): qa.key for qa in qa_pairs()}


def correct_answer(prompts: list[str], responses: list[str]) -> list[float]:
    keys = _keys()
    return [1.0 if prompt in keys and keys[prompt] in response else 0.0 for prompt, response in zip(prompts, responses)]
