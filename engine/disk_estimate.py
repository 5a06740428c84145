"""Disk a recipe's runs fill with checkpoints and exports, before launch, from the model's config alone.

A week-long run that fills its disk fails at a save, days in; the figure belongs beside the memory estimate
and in the launch's checks. Counted as the project's own saves write them (bytes of weights, AdamW's moments,
and the model folder's other files such as the tokenizer), item by item:

- SFT / RM (the HF Trainer): `checkpoint-N` holds the model (trainable weights as float32 masters, frozen
  ones in the load dtype; with LoRA, the adapters alone), AdamW's two float32 moments per trainable weight
  and a few small files; `final/` the model (with LoRA, merged into the base in the load dtype).
- PPO (engine/ppo/trainer.py `save`): `checkpoint-N` holds the policy as a model folder (with LoRA, its
  adapters), the value and reference branches, AdamW's moments; `final/` the policy (LoRA merged, its
  adapted layers in float32).
- A save writes the new checkpoint before the oldest beyond `save_total_limit` goes, so one more is on disk
  for a while; a stop saves one too.

DeepSpeed and FSDP write their own formats (their figure is approximate, and said so).
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from engine.config import Recipe
from engine.estimate import (
    Parallel,
    PPOSetup,
    TrainSetup,
    gib,
    hub_cache_config,
    ppo_counts,
    resolve_reference,
    stage_setup,
    train_counts,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt", ".index.json")


@dataclass
class StageDisk:
    """One stage's files: a checkpoint's parts, how many may be on disk at once, and its export."""

    stage: str
    checkpoint: dict[str, int]  # part -> bytes
    export: int
    kept: int | None  # checkpoints left after the run (save_total_limit, or every save); None: not known
    saves: int | None  # saves the run makes, where its steps are known
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(self.checkpoint.values())

    @property
    def at_end(self) -> int | None:
        """What the run leaves: its kept checkpoints and its export."""
        return None if self.kept is None else self.kept * self.checkpoint_bytes + self.export

    @property
    def peak(self) -> int | None:
        """The most on disk during the run: a save beside the kept ones (where rotation has one to drop),
        or the export beside them."""
        if self.kept is None:
            return None
        beside = self.checkpoint_bytes if self.saves is None or self.saves > self.kept else 0
        return self.kept * self.checkpoint_bytes + max(beside, self.export)


def side_files(recipe: Recipe, stage: str) -> int:
    """Bytes of the model folder's files other than weights (the tokenizer, configs) that each checkpoint and
    export copies; 0 where the folder is not on this machine."""
    path = resolve_reference(recipe, recipe.stage_model(stage).path)  # type: ignore[arg-type]
    folder = Path(path).expanduser()
    if not folder.is_dir():
        cached = hub_cache_config(path)
        if cached is None:
            return 0
        folder = cached.parent
    total = 0
    try:
        for entry in folder.iterdir():
            if entry.is_file() and not entry.name.endswith(WEIGHT_SUFFIXES):
                total += entry.stat().st_size  # the hub cache's links resolve to the blobs
    except OSError:  # a folder this user cannot list: its small files are left out of the figure
        return 0
    return total


def _kept(limit: int | None, saves: int | None) -> int | None:
    if saves is None:
        return limit
    return saves if limit is None else min(limit, saves)


def train_disk(s: TrainSetup, save_steps: int, limit: int | None, max_steps: int, other: int) -> StageDisk:
    trainable, frozen, _, _ = train_counts(s)
    par = s.parallel
    notes = []
    if s.lora is not None:
        # The base stays in the load dtype (keep_fp32_masters is skipped); the export merges into it
        checkpoint = {"adapters (float32)": trainable * 4, "AdamW's 2 moments (float32)": trainable * 8}
        export = frozen * s.load_bytes
    elif par.kind == "zero":
        c = 2 if s.compute in ("bf16", "fp16") else 4
        checkpoint = {"weights": (trainable + frozen) * c, "optimizer: masters and AdamW's 2 moments": trainable * 12}
        export = (trainable + frozen) * c
        notes.append("approximate: DeepSpeed writes its own checkpoint format")
    elif par.kind == "fsdp":
        # The whole model trains float32 under FSDP (engine/models.py), and its checkpoint holds the model
        # twice: the Trainer's model.safetensors and FSDP's own state dict
        weights = (trainable + frozen) * 4
        checkpoint = {"weights, twice (float32)": 2 * weights, "AdamW's 2 moments (float32)": trainable * 8}
        export = weights
        notes.append("approximate: FSDP writes its own checkpoint format")
    else:
        weights = trainable * 4 + frozen * s.load_bytes
        checkpoint = {"weights (trained float32)": weights, "AdamW's 2 moments (float32)": trainable * 8}
        export = weights
    checkpoint["tokenizer, configs and trainer state"] = other + 64 * 1024
    saves = -(-max_steps // save_steps) if max_steps > 0 else None  # the Trainer saves at the last step too
    if saves is None and limit is None:
        notes.append("no save_total_limit and steps from epochs: every save is kept, how many is not known here")
    return StageDisk(s.stage, checkpoint, export + other, _kept(limit, saves), saves, notes)


def ppo_disk(s: PPOSetup, save_steps: int, limit: int | None, steps: int, other: int) -> StageDisk:
    counts = ppo_counts(s)
    w = s.load_bytes
    value = counts["value"] * 4
    if s.lora is not None:
        adapters = counts["policy"] * 4
        checkpoint = {"policy: LoRA adapters (float32)": adapters,
                      "value branch (float32) and adapters": value + adapters}
        # merged into float32 where the adapters are: the targeted linears of the top k layers
        linears = s.shape.linears()
        targets = linears if s.lora.target_modules == "all-linear" else s.lora.target_modules
        bias = s.shape.arch == "bloom"  # BLOOM's linears have biases, cast with their weights
        adapted = s.k * sum(linears[n][0] * linears[n][1] + (linears[n][1] if bias else 0)
                            for n in targets if n in linears)
        export = counts["trunk"] * w + adapted * (4 - w)
    else:
        policy = counts["trunk"] * w + counts["policy"] * 4
        checkpoint = {"policy (trained float32)": policy,
                      "value (float32) and reference branches": value + counts["reference"] * w}
        export = policy
    checkpoint["AdamW's 2 moments (float32)"] = (counts["policy"] + counts["value"]) * 8
    checkpoint["tokenizer, configs and state"] = other + 64 * 1024
    saves = -(-steps // save_steps)  # and one at the last step
    return StageDisk("ppo", checkpoint, export + other, _kept(limit, saves), saves)


def estimate_disk(recipe: Recipe, stages: Iterable[str] | None = None, parallel: Parallel | None = None,
                  cuda: bool | None = None) -> list[StageDisk]:
    """One figure per stage the recipe has (or those named), as the memory estimate reads the recipe."""
    parallel = parallel or Parallel()
    cuda = not parallel.cpu if cuda is None else cuda
    wanted = list(stages) if stages is not None else [s for s in ("sft", "rm", "ppo") if getattr(recipe, s, None)]
    out = []
    for stage in wanted:
        setup = stage_setup(recipe, stage, parallel, cuda)
        section = recipe.stage(stage)  # type: ignore[arg-type]
        other = side_files(recipe, stage)
        if isinstance(setup, PPOSetup):
            out.append(ppo_disk(setup, section.save_steps, section.save_total_limit, section.steps, other))
        else:
            train = section.train
            out.append(train_disk(setup, train.save_steps, train.save_total_limit, train.max_steps, other))
    return out


def pipeline_peak(stages: list[StageDisk]) -> int | None:
    """The most on disk while the stages run one after another (each one's files stay)."""
    done, peak = 0, 0
    for stage in stages:
        if stage.peak is None or stage.at_end is None:
            return None
        peak = max(peak, done + stage.peak)
        done += stage.at_end
    return peak


def free_bytes(path: str | os.PathLike) -> tuple[Path, int]:
    """The nearest existing folder of `path` (where it will be) and the free space there. OSError where none
    can be looked at."""
    folder = Path(path).expanduser().resolve()
    while folder != folder.parent:
        try:
            if folder.exists():
                break
        except OSError:  # a folder above this user may not look into
            pass
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files under `folder` (0 where it is missing)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def disk_lines(stages: list[StageDisk], output_root: str) -> list[str]:
    """The figures as text: each stage's checkpoint, how many stay, its export; the whole against the free
    space under `output_root`."""
    folder, free = free_bytes(output_root)
    lines = [f"disk: checkpoints and exports in {output_root} ({gib(free)} free there)"]
    for s in stages:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in s.checkpoint.items())
        kept = (f"at most {s.kept} kept" if s.kept is not None else "how many are kept is not known")
        saves = f" of {s.saves} saves" if s.saves is not None else ""
        rotates = s.saves is None or s.kept is None or s.saves > s.kept
        line = (f"{s.stage}: a checkpoint {gib(s.checkpoint_bytes)} ({parts}); {kept}{saves}"
                + (", one more while a save is written" if rotates else "") + f"; export {gib(s.export)}"
                + (f"; up to {gib(s.peak)} at once" if s.peak else ""))
        # a figure and its unit stay on one line
        wrapped = textwrap.wrap(re.sub(r"(\d) (GiB|MiB|KiB)", "\\1\0\\2", line), 116, initial_indent="  ",
                                subsequent_indent="    ")
        lines += [part.replace("\0", " ") for part in wrapped]
        lines += [f"    note: {n}" for n in s.notes]
    peak = pipeline_peak(stages)
    if peak is not None:
        what = "the stages one after another" if len(stages) > 1 else "the run"
        verdict = "fits" if peak <= free else "DOES NOT FIT: free space first, or lower save_total_limit"
        lines.append(f"  {what}: up to {gib(peak)} at once, {verdict}")
    return lines


def disk_warning(recipe: Recipe, stage: str, folder: str | os.PathLike, parallel: Parallel | None = None,
                 cuda: bool = False) -> str | None:
    """A line for a run about to write into `folder` whose files would not fit there, else None (also where
    the model's shape is not known here)."""
    try:
        [disk] = estimate_disk(recipe, [stage], parallel, cuda)
        where, free = free_bytes(folder)
        # A resumed run's checkpoints are on disk already, out of the free space
        already = folder_bytes(folder)
    except Exception:  # advice only: a config it cannot reckon with (any shape of error) fails no run
        return None
    if disk.peak is None or disk.peak - already <= free:
        return None
    limit = f"{stage}.save_total_limit" if stage == "ppo" else f"{stage}.train.save_total_limit"
    return (f"{stage}'s checkpoints and export need up to {gib(disk.peak)} (a checkpoint is "
            f"{gib(disk.checkpoint_bytes)}, at most {disk.kept} kept) and {where} has {gib(free)} free: a save "
            f"will fail when the disk is full; free space, or lower {limit}")


def after_save(checkpoint: str | os.PathLike, step: int, save_steps: int, limit_field: str,
               last: bool = False) -> str | None:
    """A line where the disk that took checkpoint `checkpoint` has less free than it took: the next save
    writes a whole one before the oldest goes, and would fail. None where it fits, cannot be measured, or
    is the `last` one (a stop's, or the run's end: no next save; the export was in the run's start warning)."""
    if last:
        return None
    folder = Path(checkpoint)
    try:
        size = folder_bytes(folder)
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= size:
        return None
    return (f"{folder.parent} has {gib(free)} free and checkpoint-{step} took {gib(size)}: the next save (step "
            f"{step + save_steps}) will not fit (it is written whole before the oldest beyond {limit_field} goes); "
            f"free space before then")

