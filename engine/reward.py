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
from engine.data import load_preferences
from engine.models import freeze_bottom_layers, load_reward_trunk, load_tokenizer
from engine.run import RunHandle
from engine.template import tokenize_pair

log = logging.getLogger(__name__)


def build_dataset(tokenizer: Any, stage: RMStage, seed: int) -> Any:
    import datasets

    pairs, reports = load_preferences(stage.data, seed)
    for report in reports:
        log.info("rm data: %s", report.summary())
    limit = stage.train.max_length
    rows = []
    for pair in pairs:
        chosen = tokenize_pair(tokenizer, pair.prompt, pair.chosen)
        rejected = tokenize_pair(tokenizer, pair.prompt, pair.rejected)
        if len(chosen) <= limit and len(rejected) <= limit:
            rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
    if not rows:
        raise ValueError(f"every preference pair is longer than max_length={limit}")
    if len(rows) < len(pairs):
        log.warning("rm data: %d pairs longer than max_length=%d dropped", len(pairs) - len(rows), limit)
    return datasets.Dataset.from_list(rows)


def run_rm(recipe: Recipe, handle: RunHandle) -> Path:
    """Train, export `<run>/final`, return its path."""
    from trl import RewardConfig, RewardTrainer

    stage = recipe.stage("rm")
    assert isinstance(stage, RMStage)
    spec = recipe.stage_model("rm")
    tokenizer = load_tokenizer(spec)
    dataset = build_dataset(tokenizer, stage, recipe.seed)  # data errors surface before the model loads
    train_set, eval_set = hf_trainer.split_eval(dataset, stage.train.eval_ratio, recipe.seed)
    resume = hf_trainer.resume_target(stage.resume_from_checkpoint, handle)

    model = load_reward_trunk(spec, tokenizer.pad_token_id)
    freeze_bottom_layers(model, stage.num_layers_unfrozen)
    args = RewardConfig(
        **hf_trainer.training_kwargs(stage.train, handle.output_dir, recipe.seed, eval_set is not None),
    )
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
    trainer.accelerator.wait_for_everyone()
    hf_trainer.finish(trainer, handle, stop, final)
    return final
