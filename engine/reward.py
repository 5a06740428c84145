"""The reward-model stage: trl's RewardTrainer on a causal-LM trunk with a scalar head.

The head reads the last non-pad token; the loss is -log σ(r_chosen − r_rejected). Pairs are rendered
with the chat template (prompt, then `" " + answer + "</s>"`) and tokenized here. Accuracy and margin on
the held-out split are logged as `eval_accuracy` / `eval_margin`. The export in `<run>/final` loads with
`AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine import hf_trainer
from engine.config import Recipe, RMStage
from engine.data import DataError, load_preferences
from engine.lineage import write_lineage
from engine.models import freeze_bottom_layers, keep_fp32_masters, load_reward_trunk, load_tokenizer, sharding_of
from engine.run import RunHandle
from engine.template import tokenize_pair

log = logging.getLogger(__name__)


def _tokenized(tokenizer: Any, pairs: list, max_length: int) -> Any:
    import datasets

    rows = []
    for pair in pairs:
        chosen = tokenize_pair(tokenizer, pair.prompt, pair.chosen)
        rejected = tokenize_pair(tokenizer, pair.prompt, pair.rejected)
        if len(chosen) <= max_length and len(rejected) <= max_length:
            rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
    if not rows:
        raise DataError(f"rm.train.max_length={max_length}: every preference pair is longer")
    if len(rows) < len(pairs):
        log.warning("rm data: %d pairs longer than max_length=%d dropped", len(pairs) - len(rows), max_length)
    return datasets.Dataset.from_list(rows)


def build_datasets(tokenizer: Any, stage: RMStage, seed: int) -> tuple[Any, Any | None]:
    """Tokenized (train, eval) sets of `chosen_ids` / `rejected_ids`; eval is None without eval_ratio."""
    mixture = load_preferences(stage.data, seed, stage.train.eval_ratio)
    max_length = stage.train.max_length
    return hf_trainer.tokenized_splits(mixture, lambda items: _tokenized(tokenizer, items, max_length), "rm")


def run_rm(recipe: Recipe, handle: RunHandle) -> Path:
    """Train, export `<run>/final`, return its path."""
    from trl import RewardConfig, RewardTrainer

    stage = recipe.stage("rm")
    assert isinstance(stage, RMStage)
    spec = recipe.stage_model("rm")
    tokenizer = load_tokenizer(spec)
    train_set, eval_set = build_datasets(tokenizer, stage, recipe.seed)  # data errors before the model loads
    resume = hf_trainer.resume_target(stage.resume_from_checkpoint, handle)

    # Config before model: see run_sft (distributed set-up and ZeRO-3 sharded loading).
    args = RewardConfig(
        **hf_trainer.training_kwargs(stage.train, handle.output_dir, recipe.seed, eval_set is not None, spec),
    )
    model = load_reward_trunk(spec, tokenizer.pad_token_id)
    freeze_bottom_layers(model, stage.num_layers_unfrozen)
    keep_fp32_masters(model, sharding_of(args))
    callbacks, stop = hf_trainer.callbacks(handle)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    if eval_set is not None and not stop.stopped and not hf_trainer.evaluated_at(trainer, trainer.state.global_step):
        trainer.evaluate()  # the held-out accuracy and margin of the final weights, logged like the others

    final = handle.output_dir / "final"
    if not stop.stopped:
        trainer.save_model(str(final))  # every rank: sharded or ZeRO-3 weights are gathered for it
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(final)
            write_lineage(final, "rm", handle.run_id, spec.path)
    trainer.accelerator.wait_for_everyone()
    hf_trainer.finish(trainer, handle, stop, final)
    return final
