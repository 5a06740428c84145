"""The reward-model stage: trl's RewardTrainer on a causal-LM trunk with a scalar head.

The head reads the last non-pad token; the loss is -log σ(r_chosen − r_rejected). Pairs are rendered
with the chat template (prompt, then `" " + answer + "</s>"`) and tokenized here. Accuracy and margin on
the held-out split are logged as `eval_accuracy` / `eval_margin`. The scalar head computes in float32
accuracy (engine.head.float32_head), here and wherever the model scores. The export in `<run>/final` loads with
`AutoModelForSequenceClassification`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import hf_trainer
from engine.config import Recipe, RMStage
from engine.data import load_preferences
from engine.data.lengths import rm_row
from engine.lineage import write_lineage
from engine.models import (
    config_names_float32,
    freeze_bottom_layers,
    keep_fp32_masters,
    load_reward_trunk,
    load_tokenizer,
    sharding_of,
)
from engine.run import RunHandle
from engine.template import with_chat_template


def build_datasets(tokenizer: Any, stage: RMStage, seed: int, strict: bool = False
                   ) -> tuple[Any, Any | None, dict[str, dict[str, int]]]:
    """Tokenized (train, eval) sets of `chosen_ids` / `rejected_ids`; eval is None without eval_ratio;
    and per source how many pairs fit max_length."""
    mixture = load_preferences(stage.data, seed, stage.train.eval_ratio, strict)
    max_length = stage.train.max_length
    return hf_trainer.tokenized_splits(mixture, lambda pair: rm_row(tokenizer, pair, max_length),
                                       "rm.train.max_length", max_length, "preference pairs")


def run_rm(recipe: Recipe, handle: RunHandle) -> Path:
    """Train, export `<run>/final`, return its path."""
    from trl import RewardConfig, RewardTrainer

    from engine.head import float32_head

    stage = recipe.stage("rm")
    assert isinstance(stage, RMStage)
    spec = recipe.stage_model("rm")
    tokenizer = load_tokenizer(spec)
    # Data errors before the model loads.
    train_set, eval_set, fates = build_datasets(tokenizer, stage, recipe.seed, recipe.strict_data)
    hf_trainer.record_fates(handle, fates)
    resume = hf_trainer.resume_target(stage.resume_from_checkpoint, handle)

    # Config before model: see run_sft (distributed set-up and ZeRO-3 sharded loading).
    args = RewardConfig(
        **hf_trainer.training_kwargs(stage.train, handle.output_dir, recipe.seed, eval_set is not None, spec),
    )
    model = load_reward_trunk(spec, tokenizer.pad_token_id)
    use_cache = model.config.use_cache  # the Trainer sets its own (off) into the config, which the export saved
    float32_head(model.score)  # rewards, their differences and the loss free of bf16's rounding quanta
    freeze_bottom_layers(model, stage.num_layers_unfrozen)
    keep_fp32_masters(model, sharding_of(args))
    callbacks, stop = hf_trainer.callbacks(handle, "rm", spec.path)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        # Checkpoints save it as exports do: each one is a model folder a server can render chats with
        processing_class=with_chat_template(tokenizer),
        callbacks=callbacks,
    )
    hf_trainer.own_model_card(trainer, handle, "rm", spec.path)
    hf_trainer.note_batches(trainer, "rm")
    if hf_trainer.at_the_end(resume, args):
        hf_trainer.load_the_end(trainer, resume)  # its export is what is left
    else:
        trainer.train(resume_from_checkpoint=resume)
    if eval_set is not None and not stop.stopped and not hf_trainer.evaluated_at(trainer, trainer.state.global_step):
        trainer.evaluate()  # the held-out accuracy and margin of the final weights, logged like the others

    final = handle.output_dir / "final"
    if not stop.stopped:
        model.config.use_cache = use_cache
        trainer.save_model(str(final))  # every rank: sharded or ZeRO-3 weights are gathered for it
        if trainer.is_world_process_zero():
            config_names_float32(final)
            tokenizer.save_pretrained(final)
            write_lineage(final, "rm", handle.run_id, spec.path)
    trainer.accelerator.wait_for_everyone()
    hf_trainer.finish(trainer, handle, stop, final)
    return final
