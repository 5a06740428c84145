"""The BELLE eval set: its 1,000 questions, their classes, and the judge prompt BELLE's own scorer builds.

The files are read from a folder the user gives (`eval_set.json`, `eval_prompt.json`: JSON Lines despite
the name); nothing of their text is part of this project. Their quirks, handled here:

- class names differ between the two files in case and spacing (`open qa` / `open QA`, `closed\\xa0qa` with
  a non-breaking space / `closed QA`): both sides are normalised (NFKC, case-folded, spaces collapsed), so
  every item meets its class prompt; BELLE's own page matches them verbatim and cannot score 337 items;
- `math` and `code` form the "others" column of the score table;
- BELLE's scorer leaves the reference answer out of the prompt for generation, brainstorming and rewrite
  (369 items have none to give), including the 39 rewrite items that do have one; `rewrite_reference`
  puts those 39 references in.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

SET_FILE = "eval_set.json"
PROMPT_FILE = "eval_prompt.json"
# The score table's columns, in the order of the design's reference row.
CATEGORIES = ("others", "rewrite", "classification", "generation", "summarization", "extract", "open qa",
              "brainstorming", "closed qa")
OTHERS = ("math", "code")
NO_REFERENCE = ("generation", "brainstorming", "rewrite")  # judged without the reference, as BELLE does
# The seed's published row (DESIGN.md), shown beside measured rows.
REFERENCE_ROW = {
    "name": "published: bloomz-7b1-mt + SFT + RM + PPO (hydra value)",
    "scores": dict(zip(CATEGORIES, (0.619, 0.873, 0.706, 0.934, 0.755, 0.619, 0.527, 0.908, 0.615))),
}


class BelleError(ValueError):
    """An eval folder that cannot be used; the message names the file and line."""


def normalise_class(name: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", name)).strip().casefold()


def category_of(cls: str) -> str:
    return "others" if cls in OTHERS else cls


@dataclass(frozen=True)
class Item:
    id: int  # the item's line in eval_set.json (1-based): stable across runs of the same file
    question: str
    reference: str
    cls: str  # normalised class
    category: str  # score-table column
    rubric: str  # the class's judge prompt

    @property
    def judged_with_reference(self) -> bool:
        return self.cls not in NO_REFERENCE


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BelleError(f"{path}: not found (an eval folder holds {SET_FILE} and {PROMPT_FILE})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (an editor's) is no part of line 1
    except UnicodeDecodeError as err:
        from engine.data.records import not_utf8

        line = data.count(b"\n", 0, err.start) + 1
        raise BelleError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}): {not_utf8(data)}") from None
    rows = []
    # Lines end at a newline (LF, CRLF or a lone CR, which a JSON string cannot hold unescaped): splitlines()
    # would also cut a question at a U+2028 or a form feed, which JSON strings may hold as they are.
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            if not rows and line.lstrip().startswith("["):
                raise BelleError(f"{path}:{number}: a JSON array; the eval set is JSON Lines, one object per line "
                                 "(its line numbers are the questions' ids)") from None
            raise BelleError(f"{path}:{number}: not valid JSON ({err})") from None
        if isinstance(row, list):  # the whole set as one array on one line
            raise BelleError(f"{path}:{number}: a JSON array; the eval set is JSON Lines, one object per line "
                             "(its line numbers are the questions' ids)")
        if not isinstance(row, dict):
            raise BelleError(f"{path}:{number}: expected a JSON object")
        rows.append((number, row))
    return rows


def load_rubrics(folder: str | Path, lines: dict[str, int] | None = None) -> dict[str, str]:
    """Normalised class -> judge prompt; `lines`, when given, gets each class's line in the file."""
    path = Path(folder) / PROMPT_FILE
    rubrics = {}
    for number, row in _json_lines(path):
        if not isinstance(row.get("class"), str) or not isinstance(row.get("prompt"), str):
            raise BelleError(f"{path}:{number}: expected string fields 'class' and 'prompt'")
        rubrics[normalise_class(row["class"])] = row["prompt"]
        if lines is not None:
            lines[normalise_class(row["class"])] = number
    if not rubrics:
        raise BelleError(f"{path}: holds no class prompt (one JSON object a line, with 'class' and 'prompt')")
    return rubrics


def load_items(folder: str | Path, limit: int | None = None, per_class: int | None = None) -> list[Item]:
    """Every question with its class prompt; a question whose class has no prompt is an error. `limit`:
    the first N; `per_class`: the first N of each class (a subset that still has every score-table column,
    which the first N of BELLE's unevenly mixed order does not give)."""
    folder = Path(folder)
    if folder.is_file():  # the set itself, given for its folder
        raise BelleError(f"{folder}: a file; give the folder that holds it ({folder.parent}), with {SET_FILE} "
                         f"and {PROMPT_FILE}")
    if not folder.is_dir():
        raise BelleError(f"{folder}: no such folder (an eval folder holds {SET_FILE} and {PROMPT_FILE})")
    rubrics = load_rubrics(folder)
    path = folder / SET_FILE
    items = []
    for number, row in _json_lines(path):
        for key in ("question", "std_answer", "class"):
            if not isinstance(row.get(key), str):
                raise BelleError(f"{path}:{number}: missing or non-string '{key}'")
        cls = normalise_class(row["class"])
        if cls not in rubrics:
            raise BelleError(f"{path}:{number}: class {row['class']!r} has no prompt in {folder / PROMPT_FILE} "
                             f"(classes there: {', '.join(sorted(rubrics))})")
        category = category_of(cls)
        if category not in CATEGORIES:
            raise BelleError(f"{path}:{number}: class {row['class']!r} is not one of the score table's categories")
        # Every record is checked, past the part taken too: the reward-model judge reads the whole set.
        if per_class is not None and sum(1 for i in items if i.cls == cls) >= per_class:
            continue
        if limit is None or len(items) < limit:
            items.append(Item(number, row["question"], row["std_answer"], cls, category, rubrics[cls]))
    if not items:
        raise BelleError(f"{path}: no questions")
    return items


def judge_prompt(item: Item, answer: str, rewrite_reference: bool = False) -> str:
    """The prompt BELLE's scorer sends for one answer (its spacing and quotes kept as they are)."""
    with_reference = item.judged_with_reference or (rewrite_reference and item.cls == "rewrite" and item.reference)
    ask = "。请针对模型回答给出得分，顺便给出理由："
    if with_reference:
        return f"{item.rubric} {item.question} 标准回答:{item.reference}  模型回答：' {answer}'{ask}"
    return f"{item.rubric} {item.question}  模型回答： '{answer}'{ask}"


def coverage(items: list[Item], rewrite_reference: bool = False) -> str:
    """One line saying how many items are scorable and how they split."""
    by_category = {c: sum(1 for i in items if i.category == c) for c in CATEGORIES}
    rewrite_with_ref = sum(1 for i in items if i.cls == "rewrite" and i.reference.strip())
    no_ref = sum(1 for i in items if not i.judged_with_reference) - (rewrite_with_ref if rewrite_reference else 0)
    parts = ", ".join(f"{c} {n}" for c, n in by_category.items() if n)
    rewrites = (f"the {rewrite_with_ref} rewrite items that have one are given it (--rewrite-reference)"
                if rewrite_reference else
                f"{rewrite_with_ref} of them rewrite items that have one (--rewrite-reference includes it)")
    return (f"{len(items)} of {len(items)} items scorable (every class matched to its prompt): {parts}; "
            f"{no_ref} judged without the reference (BELLE's rule), {rewrites}")
