"""What the SFT and reward-model stages share around trl's trainers: arguments, eval split, resume, callbacks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from engine.config import ModelSpec, TrainArgs
from engine.data import DataError, Mixture, lengths
from engine.data.lengths import Fate
from engine.models import cuda_available, precision_flags
from engine.run import RunHandle, at_last_step, continue_from, no_sharded_export, resume_from, write_run_card
from engine.track import GracefulStop, RecipeRates, StoreCallback


def training_kwargs(
    train: TrainArgs, output_dir: Path, seed: int, has_eval: bool, spec: ModelSpec
) -> dict[str, Any]:
    """Keyword arguments common to SFTConfig and RewardConfig (both are TrainingArguments)."""
    flags = precision_flags(train.precision, spec)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=train.lr,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler,
        max_length=train.max_length,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        activation_checkpointing=train.gradient_checkpointing,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda_available(),
        ddp_find_unused_parameters=False,  # every trainable parameter is used; the search costs a graph walk
        **flags,
    )
    if any(flags.values()) and not cuda_available():
        kwargs["use_cpu"] = True  # CPU bf16 autocast: the Trainer refuses half precision without it
    if has_eval:
        kwargs.update(eval_strategy="steps", eval_steps=train.eval_steps or train.save_steps)
    return kwargs


log = logging.getLogger(__name__)


def tokenized_splits(mixture: Mixture, row: Callable[[Any], tuple[dict | None, Fate]], field: str, max_length: int,
                     what: str) -> tuple[Any, Any | None, dict[str, dict[str, int]]]:
    """Report each source, then tokenize the training and (if any) held-out records: (train, eval, what
    max_length did to each source's training records). Refuses a stage that would drop most of them."""
    import datasets

    for source in mixture.reports:
        log.info("%s data: %s", field.split(".")[0], source.summary())
    rows, counts = lengths.fit(mixture.train, mixture.train_sources, row)
    lengths.report(counts, field, max_length, what)
    held_out = lengths.fit(mixture.eval, mixture.eval_sources, row)[0] if mixture.eval else []
    if mixture.eval and not held_out:
        raise DataError(f"{field}={max_length}: every held-out record is dropped")
    return datasets.Dataset.from_list(rows), datasets.Dataset.from_list(held_out) if held_out else None, counts


def note_batches(trainer: Any, stage: str) -> None:
    """Say, once, how many rows an optimiser step takes across processes and accumulation (the global batch
    a recipe's learning rate goes with), and what accelerate's even batches add: with several processes the
    last batch of an epoch is filled up with records from the epoch's start (every process must take a
    batch), so a small set is partly trained twice an epoch (3 records at 4 a process on 2 processes: a
    batch of 8, 5 of them repeats)."""
    if not trainer.is_world_process_zero():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows, batch = len(trainer.train_dataset), trainer.args.per_device_train_batch_size
    accumulation = trainer.args.gradient_accumulation_steps
    log.info("%s: %d training rows; an optimiser step takes %d (%d process%s x train.batch_size %d x "
             "train.grad_accum %d)", stage, rows, world * batch * accumulation, world, "" if world == 1 else "es",
             batch, accumulation)
    together = world * batch
    if world > 1 and rows % together:
        repeats = together - rows % together
        log.warning("%s: %d training rows in batches of %d (%d processes x %d): the last batch of each epoch "
                    "repeats %d of them (accelerate gives every process a whole batch), %.0f %% more rows an "
                    "epoch", stage, rows, together, world, batch, repeats, 100 * repeats / rows)


def record_fates(handle: RunHandle, fates: dict[str, dict[str, int]]) -> None:
    if handle.store is not None:
        handle.store.update_run(handle.run_id, data_fates=json.dumps(fates))


def resume_target(value: str | bool | None, handle: RunHandle) -> str | None:
    """A checkpoint folder to resume from; `True` picks the newest in this run's folder, if any.

    Metrics this run logged after that checkpoint are dropped: that stretch of training is redone, and
    keeping both would show each of its steps twice.
    """
    picked = resume_from(value, handle.output_dir, "trainer_state.json")
    target = None if picked is None else str(picked)
    if target is not None:
        continue_from(handle, picked, json.loads((picked / "trainer_state.json").read_text())["global_step"])
    return target


def resume_knows_tied_keys(model: Any) -> None:
    """A checkpoint holds a tied head once (safetensors keeps no aliases), so the Trainer's resume finds
    `lm_head.weight` missing and warns as if weights were lost, unless the model lists it among the keys it
    does not save (then it ties it again, silently). Listed only where the tie holds: an untied head is saved,
    and a checkpoint without it must still be reported."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set()
    for name, source in tied.items():
        try:
            if model.get_parameter(name) is model.get_parameter(source):
                keys.add(name)
        except AttributeError:
            continue
    if keys:
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | keys


def own_model_card(trainer: Any, handle: RunHandle, stage: str, start: str) -> None:
    """trl writes a Hub model card into the run's folder at each save; for a local base model it reads
    "a fine-tuned version of [None](https://huggingface.co/None)" and loads `model="None"`. The run's card
    says instead what the run is, from what it trained and where its weights lie."""
    head = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
    final = (handle.output_dir / "final").resolve()

    def write(*_: Any, **__: Any) -> None:  # trl's and push_to_hub's arguments: the card needs none of them
        if trainer.is_world_process_zero():
            write_run_card(handle, stage, start,
                           f"the model, once the run has finished; its `rlhf_lineage.json` names every run it "
                           f"comes from. Load it with `transformers.{head}.from_pretrained(\"{final}\")`.",
                           "the saves a resume continues from")

    trainer.create_model_card = write


def at_the_end(resume: str | None, args: Any) -> bool:
    """Whether the checkpoint to resume from is at the run's last step (a run stopped there, or one that died
    while it exported): the trainer, resumed, would take a step past the end before it checks."""
    return resume is not None and at_last_step(Path(resume), args.max_steps, args.num_train_epochs)


def load_the_end(trainer: Any, resume: str) -> None:
    """The trainer as `resume` (at the run's last step) left it, without a training step: its weights (the
    adapters alone under LoRA) and its state, for the export the run did not finish."""
    from transformers import TrainerState

    from engine.models import sharding_of

    if sharding_of(trainer.args):  # the launch refuses it before the claim (engine.launch.prepare)
        raise no_sharded_export(Path(resume), sharding_of(trainer.args))
    # Trainer's own loader (what train() calls for a resume): full weights, or a PEFT model's adapters.
    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))


def evaluated_at(trainer: Any, step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)


def callbacks(handle: RunHandle, stage: str, start: str) -> tuple[list[Any], GracefulStop]:
    """The metric sink (and checkpoints' lineage: `stage` trained from `start`) and the graceful stop."""
    stop = GracefulStop()
    return [StoreCallback(handle.store, handle.run_id, (stage, start)), RecipeRates(), stop], stop


def finish(trainer: Any, handle: RunHandle, stop: GracefulStop, final_dir: Path) -> None:
    """Record how the run ended and where its exported model lies."""
    if stop.stopped:
        handle.status = "stopped"
        return
    if handle.store is not None:
        metrics = trainer.state.log_history[-1] if trainer.state.log_history else {}
        handle.store.add_checkpoint(handle.run_id, trainer.state.global_step, str(final_dir), metrics)
