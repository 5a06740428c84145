"""Run one stage of a recipe in this process: `python -m engine.train sft RECIPE [--set k=v ...]`.

This is what `rlhf train` calls directly and what every rank runs under `accelerate launch -m`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from engine.config import (
    DATA_SUFFIXES,
    STAGE_REFS,
    Recipe,
    RecipeError,
    Stage,
    function_spec_problem,
    load_recipe,
    looks_local,
    repeated_source,
)
from engine.framing import WEIGHT_FILES
from engine.run import BAD_INPUT, EXIT_BAD_INPUT, LAUNCHED_ENV, StopRequested, exit_code_of, stop_seen, tracked_run
from engine.store import default_db_path

log = logging.getLogger(__name__)
RUNNERS = {"sft": "engine.sft:run_sft", "rm": "engine.reward:run_rm", "ppo": "engine.ppo.trainer:run_ppo"}


# Architectures of models that score or label text and write none (config.json's `architectures`).
SCORING_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
# Any of these: a fast tokenizer, a config naming one, or a slow tokenizer's own vocabulary files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def _weights_problem(folder: Path) -> str | None:
    """A weights file cut short (a copy or a save that did not finish) fails deep inside loading with
    "incomplete metadata": said here from its framing, naming it."""
    from engine.framing import index_shards, safetensors_damage

    # One file first, as transformers reads it (a folder saved whole over a sharded save keeps the old index
    # beside it).
    index = folder / "model.safetensors.index.json"
    files: list[Path] = []
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files, gone = index_shards(index)
        if gone is not None:
            return f"has a damaged weights file ({gone})"
    for path in files:
        why = safetensors_damage(path)
        if why is not None:
            return f"has a damaged weights file ({why}; a copy or save cut short?)"
    return None


def model_folder_problem(path: str, kind: str = "model") -> str | None:
    """Why a local folder cannot be loaded as a `kind` ("model", "reward model", or "answering model": one
    that writes answers, for chat and evaluation), or None if it can."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return "is not a folder"
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / "policy" / "config.json").is_file():  # a PPO checkpoint: policy and value apart
            return f"holds no model itself (no config.json): a PPO checkpoint's policy is in {folder / 'policy'}"
        if (folder / "adapter_config.json").is_file() or (folder / "policy" / "adapter_config.json").is_file():
            return ("holds LoRA adapters, not a model (no config.json): a LoRA run's checkpoints keep its adapters "
                    "alone; its final folder is the merged model")
        return "holds no model (no config.json)"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"holds no weights (none of {', '.join(WEIGHT_FILES)})"
    # What the model is comes first (the wrong kind of model is the mistake to name), then whether its files
    # are whole.
    wrong_kind = _kind_problem(config_file, kind) if kind != "model" else None
    if wrong_kind is not None:
        return wrong_kind
    damaged = _weights_problem(folder)
    if damaged is not None:
        return damaged
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return f"holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside the model"
    return None


def _kind_problem(config_file: Path, kind: str) -> str | None:
    import json

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json cannot be read ({err})"
    architectures = config.get("architectures") or []
    if kind == "reward model":
        heads = [a for a in architectures if a.endswith("ForSequenceClassification")]
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
        if not heads or labels != 1:
            return "is not a reward model (a sequence-classification model with one label, as the rm stage exports)"
    elif architectures and all(a.endswith(SCORING_HEADS) for a in architectures):
        # Loaded as a causal LM, a reward model's trunk would run under an untrained head: fluent-looking noise.
        return (f"does not write answers (it is a {', '.join(architectures)}; this takes a causal language model, "
                "such as an SFT or PPO export)")
    return None


def _check_minibatches(recipe: Recipe, stage: Stage) -> None:
    """A new PPO run's minibatches divide its rollout: each epoch splits a rollout into them, and a larger one
    trained on the rollout whole under a size it never had, a remainder was an optimiser step on a few rows.
    Not for a resume (resume_from_checkpoint set): a run recorded before this check continues as it was."""
    section = recipe.ppo
    if stage != "ppo" or section is None or section.resume_from_checkpoint is not None:
        return
    minibatch, rollout = section.minibatch_size, section.rollout_batch_size
    if minibatch > rollout or rollout % minibatch:
        where = ", ".join(dict.fromkeys(recipe.where(f"ppo.{f}") for f in ("minibatch_size", "rollout_batch_size")))
        raise RecipeError(f"{where}: ppo.minibatch_size ({minibatch}) must divide "
                          f"ppo.rollout_batch_size ({rollout}): each PPO epoch splits a rollout into minibatches",
                          {"ppo.rollout_batch_size": f"minibatch_size {minibatch} must divide it"})


def validate(stage: Stage, recipe_path: str, overrides: list[str], refs_ok: bool = False) -> Recipe:
    """Everything that can be checked without loading torch or a model; raises RecipeError.

    `refs_ok`: a stage reference (`@sft`) is what a pipeline will fill in, not an error (`rlhf check`)."""
    if stage not in RUNNERS:
        raise RecipeError(f"stage {stage!r} has no trainer yet (available: {', '.join(RUNNERS)})")
    recipe = load_recipe(recipe_path, overrides, stage)
    section = recipe.stage(stage)
    _check_sources_distinct(recipe, stage)
    _check_minibatches(recipe, stage)
    model_field = f"{stage}.model.path" if section.model is not None else "model.path"
    paths = [(model_field, recipe.stage_model(stage).path, "model")]
    if getattr(section, "reward_model", None) is not None:
        paths.append((f"{stage}.reward_model", section.reward_model, "reward model"))
    for field in ("data", "prompts"):
        for i, source in enumerate(getattr(section, field, [])):
            paths.append((f"{stage}.{field}.{i}.path", source.path, "data"))
    # Under `rlhf launch` the launcher asked the hub and read the data moments ago: every rank asking again
    # would be N more network calls and N more reads for nothing.
    launched = os.environ.get(LAUNCHED_ENV) == "1"
    for field, path, kind in paths:
        if path in STAGE_REFS and refs_ok:
            continue
        if path in STAGE_REFS:
            raise RecipeError(
                f"{recipe.where(field)}: {field}: {path!r} is the {STAGE_REFS[path]} stage's export, which only "
                f"`rlhf pipeline` knows; to run the {stage} stage alone give --set {field}=FOLDER",
                {field: "a pipeline's stage reference"})
        local = Path(path).expanduser()
        try:
            local.exists()
        except OSError as err:  # a path too long for the file system, say
            raise RecipeError(f"{recipe.where(field)}: {field}: {path[:80]!r}…: {err.strerror}",
                              {field: err.strerror or "unusable path"}) from None
        # The shipped tiny recipe reads the demo's files: where they are missing, say what writes them.
        demo = ("; `rlhf demo init demo` writes the tiny demo's model and data there"
                if local.parts[:1] == ("demo",) and not Path("demo").exists() else "")
        if looks_local(path) and not local.exists():
            raise RecipeError(f"{recipe.where(field)}: {field}: {path!r} does not exist{demo}",
                              {field: "does not exist"})
        if not local.exists() and not launched:
            from engine.hub import hub_problem

            problem = hub_problem(path, "dataset" if kind == "data" else "model")
            if problem is not None:
                raise RecipeError(f"{recipe.where(field)}: {field}: {path!r} {problem}{demo}", {field: problem})
        if kind != "data" and local.exists():
            # The policy and the SFT model write answers: a reward model's trunk would train under a fresh head.
            answering = kind == "model" and stage in ("sft", "ppo")
            problem = model_folder_problem(path, "answering model" if answering else kind)
            if problem is not None:
                raise RecipeError(f"{recipe.where(field)}: {field}: {path!r} {problem}", {field: problem})
    if stage == "ppo":
        from engine.knobs import check_knobs

        check_knobs()
    _check_depth(stage, recipe)
    _check_epochs_count(stage, recipe, overrides)
    if not launched:
        from engine.data.check import check_stage_data

        check_stage_data(stage, recipe)
    problem = function_spec_problem(section.reward_fn) if getattr(section, "reward_fn", None) else None
    if problem:
        field = f"{stage}.reward_fn"
        # The field's own line (the form's): the reason, without the module's path
        raise RecipeError(f"{recipe.where(field)}: {field}: {problem}", {field: problem.rsplit(": ", 1)[-1]})
    if getattr(section, "init_value_from_rm", False):
        from engine.lineage import check_value_init

        warning = check_value_init(recipe.stage_model(stage).path, section.reward_model,
                                   recipe.where(f"{stage}.init_value_from_rm"))
        if warning and os.environ.get("RANK", "0") == "0":
            log.warning(warning)
    return recipe


def _check_epochs_count(stage: Stage, recipe: Recipe, overrides: list[str]) -> None:
    """Epochs given on the command line (or the launch form) where the recipe's max_steps decides the length:
    ignored without a word, the run would train as long as before."""
    train = getattr(recipe.stage(stage), "train", None)
    if train is None or train.max_steps <= 0:
        return
    for item in overrides:
        if item.partition("=")[0].strip() in ("train.epochs", f"{stage}.train.epochs"):
            field = f"{stage}.train.epochs"
            raise RecipeError(f"--set {item}: {field} counts for nothing while {stage}.train.max_steps is "
                              f"{train.max_steps} ({recipe.where(f'{stage}.train.max_steps')}): steps decide the "
                              f"run's length; add --set {stage}.train.max_steps=-1 to train by epochs",
                              {field: f"ignored while max_steps is {train.max_steps}"})


def _check_sources_distinct(recipe: Recipe, stage: Stage) -> None:
    """A source listed twice, or a split asked of a file, is refused for a new run; a resume continues the
    run as it was recorded."""
    section = recipe.stage(stage)
    if section.resume_from_checkpoint is not None:  # a recorded run: resumed, or (false) started over
        return
    field = f"{stage}.{'prompts' if stage == 'ppo' else 'data'}"
    sources = getattr(section, field.split(".")[1])
    for i, source in enumerate(sources):
        if source.split != "train" and Path(source.path).suffix.lower() in DATA_SUFFIXES:
            # Read whole whatever it says: a `split: test` meant to hold records out would train on them
            where = f"{field}.{i}.split"
            raise RecipeError(f"{recipe.where(where)}: {where}: {source.path} is a file, read whole: a file has no "
                              "splits (split names one of a hub data set or a data set folder; SFT and RM hold "
                              "records out by train.eval_ratio)", {where: "a file has no splits"})
    repeated = repeated_source(sources)
    if repeated is not None:
        i, j = repeated
        raise RecipeError(f"{recipe.where(f'{field}.{j}.path')}: {field}.{j}.path: {sources[j].path} is "
                          f"{field}.{i}'s source too: its records would train twice; to count a source more, give "
                          f"it a weight (2 = every record twice)",
                          {f"{field}.{i}.path": "listed twice", f"{field}.{j}.path": "listed twice"})


def _check_depth(stage: Stage, recipe: Recipe) -> None:
    """The layers a stage trains against its model's layer count, read from its config.json: the model
    refuses them only once it has loaded, after the run was registered (PPO: k and k_v below it)."""
    from engine.estimate import EstimateError, load_shape, resolve_reference

    section = recipe.stage(stage)
    path = recipe.stage_model(stage).path
    if path in STAGE_REFS:  # a pipeline's own export (`@sft`, `validate` let it through): that stage's model's shape
        path = resolve_reference(recipe, path)
        if path in STAGE_REFS:  # references that go round in a circle: the pipeline's own check names them
            return
    try:
        layers = load_shape(path, f"{stage}.model.path").layers
    except EstimateError:  # no config to read (a hub model not cached): the model checks it when it loads
        return
    if stage == "ppo":
        problem = section.too_deep_for(layers, path)
    elif section.num_layers_unfrozen > layers:
        problem = ("num_layers_unfrozen", f"{section.num_layers_unfrozen}, but the model {path!r} has {layers} "
                                          "layers (-1 trains them all)")
    else:
        problem = None
    if problem:
        field, why = f"{stage}.{problem[0]}", problem[1]
        limit = "below" if stage == "ppo" else "at most"
        raise RecipeError(f"{recipe.where(field)}: {field}: {why}",
                          {field: f"must be {limit} the model's {layers} layers"})


def run_stage(stage: Stage, recipe_path: str, overrides: list[str], db_path: str | None = None,
              checked: Recipe | None = None) -> tuple[int, str]:
    """Validate (unless `checked`, what `validate` already returned), register (unless a launcher did),
    train. Returns (run id, final status)."""
    recipe = checked if checked is not None else validate(stage, recipe_path, overrides)
    module, name = RUNNERS[stage].split(":")
    runner = getattr(importlib.import_module(module), name)
    from transformers import set_seed

    with tracked_run(db_path or default_db_path(), stage, recipe, recipe_path, overrides) as handle:
        if stop_seen():  # a stop while the run registered: it ends here, before anything loads
            raise StopRequested()
        if os.environ.get("RANK", "0") == "0":
            _warn_if_disk_short(recipe, stage, handle.output_dir)
        set_seed(recipe.seed)
        runner(recipe, handle)
    return handle.run_id, handle.status


def _warn_if_disk_short(recipe: Recipe, stage: Stage, folder: Path) -> None:
    """Said at the start, not found at a save days in."""
    import torch

    from engine.disk_estimate import disk_warning
    from engine.estimate import Parallel

    kind = ("zero" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else
            "fsdp" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else "single")
    parallel = Parallel(kind, int(os.environ.get("WORLD_SIZE", "1")))
    line = disk_warning(recipe, stage, folder, parallel, torch.cuda.is_available())
    if line:
        log.warning(line)


def configure_logging() -> None:
    # Every rank writes to the one train.log: the others' lines say which they are, and their dataset
    # progress bars (drawn on one line with rank 0's) are left out.
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {f'[rank {rank}] ' if rank else ''}%(levelname)s %(name)s: "
        "%(message)s", stream=sys.stderr, force=True
    )
    # A line per judge call otherwise; torch's INFO is its compiler's internals (FakeTensor cache stats at exit).
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.train")
    parser.add_argument("stage", choices=sorted(RUNNERS))
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--db", default=None)
    args = parser.parse_args(argv)
    from engine.procs import register_rank

    register_rank()
    configure_logging()
    try:
        _, status = run_stage(args.stage, args.recipe, args.overrides, args.db)
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return exit_code_of(status)  # a diverged run too is no success to chain on from


if __name__ == "__main__":
    sys.exit(main())
