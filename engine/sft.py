"""The SFT stage: trl's SFTTrainer on the recipe's data mixture, loss on assistant tokens only.

Conversations are rendered with the recipe's template and tokenized here (with an assistant mask), so
the trainer receives `input_ids` + `assistant_masks` and builds labels that are -100 everywhere else.
The final model is exported as a plain Hugging Face folder (LoRA adapters merged) in `<run>/final`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import hf_trainer
from engine.config import Recipe, SFTStage
from engine.data import load_conversations
from engine.data.lengths import sft_row
from engine.lineage import write_lineage
from engine.models import (
    config_names_float32,
    freeze_bottom_layers,
    keep_fp32_masters,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    sharding_of,
)
from engine.run import RunHandle
from engine.template import with_chat_template


def build_datasets(tokenizer: Any, stage: SFTStage, seed: int, strict: bool = False
                   ) -> tuple[Any, Any | None, dict[str, dict[str, int]]]:
    """Tokenized (train, eval) sets: `input_ids` + `assistant_masks`; eval is None without eval_ratio;
    and per source how many conversations max_length kept whole, truncated or dropped."""
    mixture = load_conversations(stage.data, seed, stage.train.eval_ratio, strict)
    max_length = stage.train.max_length
    return hf_trainer.tokenized_splits(mixture, lambda turns: sft_row(tokenizer, turns, max_length),
                                       "sft.train.max_length", max_length, "conversations")


def packing_strategy(model: Any) -> str:
    """BFD keeps whole conversations apart only with a flash-attention kernel (it packs padding-free and
    separates them by position ids); with any other kernel it would let them attend to each other and run
    one huge sequence, so those models get classic wrapped packing."""
    kernel = getattr(model.config, "_attn_implementation", None) or ""
    return "bfd" if "flash" in kernel else "wrapped"


def run_sft(recipe: Recipe, handle: RunHandle) -> Path:
    """Train, export `<run>/final`, return its path."""
    from trl import SFTConfig, SFTTrainer

    stage = recipe.stage("sft")
    assert isinstance(stage, SFTStage)
    spec = recipe.stage_model("sft")
    tokenizer = load_tokenizer(spec)
    # Data errors before the model loads.
    train_set, eval_set, fates = build_datasets(tokenizer, stage, recipe.seed, recipe.strict_data)
    hf_trainer.record_fates(handle, fates)
    resume = hf_trainer.resume_target(stage.resume_from_checkpoint, handle)

    # The config comes first: building it sets up torch.distributed and DeepSpeed's ZeRO-3 context, and
    # only a model loaded after that is sharded as it loads instead of whole on every rank.
    args = SFTConfig(
        **hf_trainer.training_kwargs(stage.train, handle.output_dir, recipe.seed, eval_set is not None, spec),
        packing=stage.packing,
    )
    model = load_causal_lm(spec)
    use_cache = model.config.use_cache  # the Trainer sets its own (off) into the config, which the export saved
    args.packing_strategy = packing_strategy(model)
    freeze_bottom_layers(model, stage.num_layers_unfrozen)
    hf_trainer.resume_knows_tied_keys(model)
    if stage.lora is None:  # peft keeps LoRA adapters in float32 by itself
        keep_fp32_masters(model, sharding_of(args))
    callbacks, stop = hf_trainer.callbacks(handle, "sft", spec.path)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        # Checkpoints save it as exports do: each one is a model folder a server can render chats with
        processing_class=with_chat_template(tokenizer),
        peft_config=lora_config(stage.lora) if stage.lora is not None else None,
        callbacks=callbacks,
    )
    hf_trainer.own_model_card(trainer, handle, "sft", spec.path)
    hf_trainer.note_batches(trainer, "sft")
    if hf_trainer.at_the_end(resume, args):
        hf_trainer.load_the_end(trainer, resume)  # its export is what is left
    else:
        trainer.train(resume_from_checkpoint=resume)

    final = handle.output_dir / "final"
    if not stop.stopped:
        model.config.use_cache = use_cache  # the model's own: its export generates with a cache
        if stage.lora is None:
            trainer.save_model(str(final))  # every rank: sharded or ZeRO-3 weights are gathered for it
        elif trainer.is_world_process_zero():
            # Downstream stages load a plain model, so the adapters are merged into the base weights.
            trainer.model.merge_and_unload().save_pretrained(final)
        if trainer.is_world_process_zero():
            config_names_float32(final)
            tokenizer.save_pretrained(final)
            write_lineage(final, "sft", handle.run_id, spec.path)
    trainer.accelerator.wait_for_everyone()
    hf_trainer.finish(trainer, handle, stop, final)
    return final
