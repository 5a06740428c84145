"""The recipe's chat template, rendered as text and tokenized with an assistant-token mask.

Single turn is exactly ``TEMPLATE.format(question)``. Multi-turn follows the Vicuna v1.1 layout the
template comes from: each assistant answer is ``" " + answer + "</s>"``, and the next user turn starts
right after it with ``"USER: …\\nASSISTANT:"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATE = SYSTEM + " USER: {}\nASSISTANT:"
END_OF_TURN = "</s>"

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


Conversation = tuple[Turn, ...]


def check_conversation(turns: Sequence[Turn], *, ends_with: Role) -> None:
    """Turns must alternate user/assistant, start with the user and end with `ends_with`."""
    if not turns:
        raise ValueError("conversation has no turns")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"turn {i + 1} is from {turn.role}, expected {expected} (turns must alternate)")
    if turns[-1].role != ends_with:
        raise ValueError(f"conversation must end with a {ends_with} turn")


def segments(turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, in order."""
    pieces: list[tuple[str, bool]] = []
    for i, turn in enumerate(turns):
        if turn.role == "user":
            user = TEMPLATE.format(turn.content) if i == 0 else f"USER: {turn.content}\nASSISTANT:"
            pieces.append((user, False))
        else:
            pieces.append((f" {turn.content}{END_OF_TURN}", True))
    return pieces


def render(turns: Sequence[Turn]) -> str:
    """A whole conversation as training text."""
    return "".join(text for text, _ in segments(turns))


def render_prompt(turns: Sequence[Turn]) -> str:
    """A conversation that ends with the user, ready for the model to answer."""
    check_conversation(turns, ends_with="user")
    return render(turns)


# The template as a Jinja chat template, for the tokenizer every export carries: `apply_chat_template` (and
# the servers that read it) renders a conversation as `render` does, the format the model was trained on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (" + repr(SYSTEM + " ") + " if loop.first else '') ~ 'USER: ' ~ message['content'] ~ '\\nASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' ~ message['content'] ~ '" + END_OF_TURN + "' -}}"
    "{%- else -%}"
    "{{- raise_exception('the recipe\\'s chat template has user and assistant turns only (its system line is "
    "fixed), not ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def with_chat_template(tokenizer: Any) -> Any:
    """The tokenizer, its chat template the recipe's (whatever the base model's was): what an export's
    tokenizer must render for whoever serves it. A tokenizer that starts a text with BOS got it at training
    (`tokenize_conversation`'s first piece); `apply_chat_template` and servers tokenize the rendered text
    without special tokens, so the template writes it."""
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    tokenizer.chat_template = ("{{- bos_token -}}" if starts_with_bos else "") + CHAT_TEMPLATE
    return tokenizer


def tokenize_conversation(tokenizer: Any, turns: Sequence[Turn], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and a mask that is 1 exactly on assistant tokens.

    Each piece is tokenized on its own so that a prompt tokenizes here as it will at generation time.
    """
    input_ids: list[int] = []
    mask: list[int] = []
    for i, (text, is_assistant) in enumerate(segments(turns)):
        ids = tokenizer(text, add_special_tokens=(i == 0))["input_ids"]
        input_ids.extend(ids)
        mask.extend([int(is_assistant)] * len(ids))
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def tokenize_pair(tokenizer: Any, prompt: Sequence[Turn], answer: str) -> list[int]:
    """Token ids of prompt + answer, tokenized piecewise exactly as in `tokenize_conversation`."""
    turns = (*prompt, Turn("assistant", answer))
    return tokenize_conversation(tokenizer, turns)["input_ids"]
