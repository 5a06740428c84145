"""Format adapters: one raw record in, one conversation or preference pair out.

Each adapter raises `ValueError` with a short reason for a malformed record; the loader counts it and
reports it with the record's file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from engine.template import Conversation, Turn, check_conversation

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
_SYSTEM_ROLES = {"system"}


@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # ends with a user turn
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        # Every format's pairs are made here: a pair of one answer twice has a zero loss gradient (r_c - r_r
        # is 0 whatever the model) and drags accuracy down as a tie.
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("chosen and rejected are the same answer: the pair teaches nothing")


def _text(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing '{key}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def _turns(items: Any, key: str, role_key: str, text_key: str) -> list[Turn]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{key}' must be a non-empty list")
    turns: list[Turn] = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{key}[{i}] is not an object")
        raw_role = str(item.get(role_key, "")).lower()
        text = item.get(text_key)
        if raw_role in _SYSTEM_ROLES:
            continue  # the recipe's template carries its own system line
        if raw_role not in _ROLES:
            raise ValueError(f"{key}[{i}].{role_key} is {item.get(role_key)!r}, not a known speaker")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{key}[{i}].{text_key} is empty or not a string")
        turns.append(Turn(_ROLES[raw_role], text))
    return turns


def _dialogue(turns: list[Turn]) -> Conversation:
    if turns and turns[-1].role == "user":
        turns = turns[:-1]  # an unanswered last question teaches nothing
        if not turns:  # "has no turns" of a record that had one read as an empty record
            raise ValueError("no assistant answer: the conversation is a question alone")
    check_conversation(turns, ends_with="assistant")
    return tuple(turns)


def from_alpaca(record: dict) -> Conversation:
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False).strip()
    question = f"{instruction}\n{extra}" if extra else instruction
    return (Turn("user", question), Turn("assistant", _text(record, "output")))


def from_sharegpt(record: dict) -> Conversation:
    return _dialogue(_turns(record.get("conversations"), "conversations", "from", "value"))


def from_messages(record: dict) -> Conversation:
    return _dialogue(_turns(record.get("messages"), "messages", "role", "content"))


def _prompt_turns(value: Any) -> list[Turn]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("'prompt' is empty")
        return [Turn("user", value)]
    turns = _turns(value, "prompt", "role", "content")
    check_conversation(turns, ends_with="user")
    return turns


def from_prompt_completion(record: dict) -> Conversation:
    completion = record.get("completion")
    if isinstance(completion, list):  # conversational completion: [{"role": "assistant", ...}]
        answer = _turns(completion, "completion", "role", "content")
        if len(answer) != 1 or answer[0].role != "assistant":
            raise ValueError("'completion' must hold exactly one assistant message")
        completion = answer[0].content
    elif not isinstance(completion, str) or not completion.strip():
        raise ValueError("'completion' is missing or empty")
    return (*_prompt_turns(record.get("prompt")), Turn("assistant", completion))


def _answer(value: Any, key: str) -> str:
    if isinstance(value, list):  # conversational: the last assistant message is the answer
        turns = _turns(value, key, "role", "content")
        if turns[-1].role != "assistant":
            raise ValueError(f"'{key}' must end with an assistant message")
        return turns[-1].content
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing or empty")
    return value


def from_preference(record: dict) -> PreferencePair:
    if "prompt" not in record:
        raise ValueError("missing 'prompt'")
    prompt = tuple(_prompt_turns(record["prompt"]))
    return PreferencePair(prompt, _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected"))


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, key: str) -> list[Turn]:
    parts = _HH_SPLIT.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise ValueError(f"'{key}' does not start with '\\n\\nHuman: '")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append(Turn("user" if speaker == "Human" else "assistant", content.strip()))
    if not turns:
        raise ValueError(f"'{key}' has no Human/Assistant turns")
    return turns


def from_hh(record: dict) -> PreferencePair:
    chosen = _hh_turns(_text(record, "chosen"), "chosen")
    rejected = _hh_turns(_text(record, "rejected"), "rejected")
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise ValueError("both dialogues must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected dialogues do not share the same prompt")
    prompt = chosen[:-1]
    check_conversation(prompt, ends_with="user")
    if not chosen[-1].content or not rejected[-1].content:
        raise ValueError("an Assistant answer is empty")
    return PreferencePair(tuple(prompt), chosen[-1].content, rejected[-1].content)


def to_prompt(record: dict) -> Conversation:
    """A rollout prompt: `prompt` (text or messages), an Alpaca/BELLE instruction, or a dialogue whose
    last assistant turn (if any) is dropped."""
    if "prompt" in record:
        return tuple(_prompt_turns(record["prompt"]))
    if "instruction" in record:
        return from_alpaca({**record, "output": record.get("output") or "-"})[:1]
    for key, role_key, text_key in (("messages", "role", "content"), ("conversations", "from", "value")):
        if key in record:
            turns = _turns(record[key], key, role_key, text_key)
            if turns and turns[-1].role == "assistant":
                turns = turns[:-1]
            check_conversation(turns, ends_with="user")
            return tuple(turns)
    raise ValueError(f"keys {sorted(record)}: expected prompt, instruction, messages or conversations")


SFT_FORMATS: dict[str, Callable[[dict], Conversation]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
}
PREFERENCE_FORMATS: dict[str, Callable[[dict], PreferencePair]] = {
    "preference": from_preference,
    "hh": from_hh,
}


PROMPT_FORMATS: dict[str, Callable[[dict], Conversation]] = {"prompt": to_prompt}


def detect_format(record: dict, kind: str) -> str:
    """The format of one record, from its keys."""
    keys = set(record)
    if kind == "prompt":
        return "prompt"
    if kind == "preference":
        if {"chosen", "rejected"} <= keys:
            return "preference" if "prompt" in keys else "hh"
        raise ValueError(f"keys {sorted(keys)}: expected prompt+chosen+rejected or chosen+rejected (HH dialogues)")
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "completion" in keys:
        return "prompt_completion"
    raise ValueError(
        f"keys {sorted(keys)}: expected instruction+output (Alpaca/BELLE), conversations (ShareGPT), "
        "messages, or prompt+completion"
    )
