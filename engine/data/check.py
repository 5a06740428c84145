"""A stage's data checked before its run is registered: the first records of each local source read and
adapted as training will, and what max_length does to them measured with the model's own tokenizer.

An empty file, `[]`, a `.csv`, a file in another format, a malformed row under strict_data or a max_length
below most prompts is then exit 2 with nothing registered, instead of a failed run after ~10 s of imports.
Only a sample is read (whole files are read at training, where the counts are exact); hub data sets and
data set folders go through `datasets` and are checked there. No torch: the console validates with this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import Recipe, Stage, looks_local
from engine.data import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    held_out_count,
    lengths,
    nothing_held,
    nothing_left,
    nothing_taken,
    read_source,
)
from engine.data.records import DataError

SAMPLE = 200  # records read per source


class _TokenizerFile:
    """The model's tokenizer.json through `tokenizers` alone, called as a transformers tokenizer is."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


def _tokenizer(model_path: str) -> Any | None:
    path = Path(model_path).expanduser() / "tokenizer.json"
    try:
        return _TokenizerFile(path) if path.is_file() else None
    except Exception:  # a tokenizer `tokenizers` cannot read alone: training loads it the full way
        return None


def check_stage_data(stage: Stage, recipe: Recipe) -> None:
    """Raise DataError (naming the field, the file and the line) for data the stage cannot train on."""
    section = recipe.stage(stage)
    field, kind, adapters = {"sft": ("data", "sft", SFT_FORMATS), "rm": ("data", "preference", PREFERENCE_FORMATS),
                             "ppo": ("prompts", "prompt", PROMPT_FORMATS)}[stage]
    items: list[Any] = []
    sources: list[str] = []
    whole: dict[str, int] = {}  # the record counts of the sources read to their end
    partly = False  # a source not read to its end (or not read: a hub id): what the whole holds out is unknown
    ratio = section.train.eval_ratio if stage != "ppo" else 0.0
    for i, source in enumerate(getattr(section, field)):
        if not Path(source.path).expanduser().exists() and not looks_local(source.path):
            partly = True
            continue  # a hub id: read through `datasets` at training
        sample = source.model_copy(update={"limit": min(source.limit or SAMPLE, SAMPLE)})
        try:
            read, report = read_source(sample, kind, adapters, recipe.strict_data, sample=True)
        except DataError as err:
            raise DataError(f"{stage}.{field}.{i}: {err}") from None
        items += read
        sources += [source.path] * len(read)
        # Read to its end, or to the source's own limit (the trainer stops there too): its count is the trainer's.
        if report.used + report.malformed < sample.limit or (source.limit or SAMPLE + 1) <= SAMPLE:
            whole[source.path] = report.used
            problem = nothing_left(source.path, report.used, ratio)
            if problem:
                raise DataError(f"{recipe.where(f'{stage}.train.eval_ratio')}: {stage}.train.{problem}")
            problem = nothing_taken(source.path, report.used - held_out_count(report.used, ratio), source.weight)
            if problem:
                weight = f"{stage}.{field}.{i}.weight"
                raise DataError(f"{recipe.where(weight)}: {weight}: {problem}")
        else:
            partly = True
    problem = None if partly else nothing_held(whole, ratio)
    if problem:
        raise DataError(f"{recipe.where(f'{stage}.train.eval_ratio')}: {stage}.train.{problem}")
    if stage == "ppo" or not items:
        return
    tokenizer = _tokenizer(recipe.stage_model(stage).path)
    if tokenizer is None:
        return
    max_length = section.train.max_length
    row = lengths.sft_row if stage == "sft" else lengths.rm_row
    _, counts = lengths.fit(items, sources, lambda item: row(tokenizer, item, max_length))
    field = f"{stage}.train.max_length"
    try:
        lengths.report(counts, field, max_length, "conversations" if stage == "sft" else "preference pairs")
    except DataError as err:
        raise DataError(f"{recipe.where(field)}: {err} (measured on the first {SAMPLE} records of each file)") from None
