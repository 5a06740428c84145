"""Typed recipes: YAML in, validated pydantic models out, with dotted `--set` overrides.

A recipe describes one pipeline (a base model and its SFT, reward-model and PPO stages). Every error
names the file, the dotted field, the line where YAML put it, and what was wrong, and is raised before
any model or data set is loaded.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

STAGES = ("sft", "rm", "ppo")


def a_run_of(stage: str) -> str:
    """`an SFT run`, `a PPO run`, `an evaluation run`: a stage as a message names it."""
    return {"sft": "an SFT run", "rm": "an RM run", "ppo": "a PPO run", "eval": "an evaluation run"}.get(
        stage, f"a {stage} run")
Stage = Literal["sft", "rm", "ppo"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, field and line.

    `fields` maps each offending dotted field to its problem, so a form can show it on the field.
    """

    def __init__(self, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.fields = dict(fields or {})


class RecipeSource:
    """Where each field of a loaded recipe came from: a line of its file, or a --set override."""

    def __init__(self, path: Path, lines: dict[tuple[str, ...], int], origin: dict[str, str]):
        self.path = path
        self.lines = lines
        self.origin = origin  # dotted key -> "--set key=value"

    def locate(self, field: str, message: str = "") -> str:
        for key, override in self.origin.items():
            if field == key or field.startswith(key + "."):
                return override
        probe = tuple(field.split(".")) if field else ()
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        where = f"{self.path}:{line}" if line else str(self.path)
        # A whole section's problem (two fields that disagree) is also the doing of any --set inside it: of
        # those its message names, where it names any (not every --set of the section).
        inside = [(key, override) for key, override in self.origin.items() if field and key.startswith(field + ".")]
        named = [override for key, override in inside
                 if any(re.search(rf"\b{re.escape(part)}\b", message) for part in key[len(field) + 1:].split("."))]
        blamed = named or [override for _, override in inside]
        return ", ".join(blamed) + f" ({where})" if blamed else where


def _types_in(annotation: Any) -> set[Any]:
    """The classes an annotation admits (through unions, Optional, Annotated; not Literal's values)."""
    if isinstance(annotation, type):
        return {annotation}
    return {t for arg in get_args(annotation) if not isinstance(arg, (str, int, float)) for t in _types_in(arg)}


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes true for 1 in a number field: `--set ppo.steps=true` trained one step.
        if isinstance(value, bool) and info.field_name:
            admits = _types_in(cls.model_fields[info.field_name].annotation)
            if bool not in admits and admits & {int, float}:
                raise ValueError(f"{str(value).lower()} is not a number")
        return value


class ModelSpec(_Section):
    path: str = Field(min_length=1, description="Hub id or local folder of a causal LM (Hugging Face format).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on a CUDA device that supports it, else float32."
    )
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint.")


class DataSource(_Section):
    path: str = Field(min_length=1, description="Local .json/.jsonl/.parquet file or folder, or a hub data set id.")
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "preference", "hh", "prompt"
    ] = Field("auto", description="Record format; auto detects it per record from the keys.")
    weight: float = Field(
        1.0, gt=0, description="Share in the mixture: 1 = every record once, 0.5 = a seeded half, 2 = twice."
    )
    split: str = Field("train", description="Split to read when the source goes through `datasets`.")
    limit: int | None = Field(None, gt=0, description="Read at most this many records from the source.")

    @field_validator("format", mode="before")
    @classmethod
    def _belle_is_alpaca(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "belle":  # the data set, not a format
            raise ValueError("BELLE's records (instruction, input, output) are in the alpaca format: write alpaca")
        return value


def repeated_source(sources: list[DataSource]) -> tuple[int, int] | None:
    """(i, j) where source j reads the records source i reads (the same local file, or the same hub data
    set and split), else None. Listed twice, a source trains twice, as a weight of 2 does on purpose: mostly
    a source added again by hand, or through the launch form's data field, without noticing."""
    seen: dict[tuple[str, str], int] = {}
    for j, source in enumerate(sources):
        path = os.path.normpath(os.path.expanduser(source.path))
        key = (path, "" if looks_local(source.path) or Path(path).exists() else source.split)  # a file has no splits
        if key in seen:
            return seen[key], j
        seen[key] = j
    return None


class LoraSpec(_Section):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: int = Field(16, gt=0, description="Adapter scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )


def _not_zero(value: int) -> int:
    if value == 0:
        raise ValueError("0 would train nothing: give a number of steps, or -1 to derive them from epochs")
    return value


class TrainArgs(_Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (ignored when max_steps > 0).")
    max_steps: Annotated[int, Field(ge=-1), AfterValidator(_not_zero)] = Field(
        -1, description="Optimizer steps to run; -1 = derive from epochs.")
    batch_size: int = Field(8, gt=0, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    max_length: int = Field(
        512, gt=8, description="Tokens per sequence; longer ones are truncated (SFT) or dropped (RM)."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    save_steps: int = Field(500, gt=0, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints.")
    eval_ratio: float = Field(0.0, ge=0, lt=1, description="Share of records held out for evaluation.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: at each save).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: auto = bf16 on a CUDA device that supports it, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")

    @model_validator(mode="after")
    def _warmup_has_a_schedule(self) -> TrainArgs:
        if self.warmup_ratio > 0 and self.lr_scheduler == "constant":
            raise ValueError(f"warmup_ratio {self.warmup_ratio} with lr_scheduler constant: a constant schedule "
                             "has no warm-up (the peak rate from the first step); use constant_with_warmup")
        return self


class SFTStage(_Section):
    model: ModelSpec | None = Field(None, description="Model to fine-tune; default: the recipe's model.")
    data: list[DataSource] = Field(min_length=1, description="Instruction/chat sources, mixed by weight.")
    train: TrainArgs = Field(default_factory=TrainArgs, description="Optimisation settings.")
    packing: bool = Field(False, description="Pack several conversations into each max_length sequence.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of the full model.")
    num_layers_unfrozen: int = Field(-1, ge=-1, description="Train only the top N decoder layers; -1 = all.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint folder, or true for the newest one in this run's folder (false: a "
                          "recorded run started over from its first step; a resume sets it).")

    @model_validator(mode="after")
    def _lora_or_freeze(self) -> SFTStage:
        if self.lora is not None and self.num_layers_unfrozen != -1:
            raise ValueError("lora and num_layers_unfrozen cannot be combined: LoRA already freezes the base")
        return self


class RMStage(_Section):
    model: ModelSpec | None = Field(None, description="Trunk to train as reward model; default: the recipe's model.")
    data: list[DataSource] = Field(min_length=1, description="Preference sources (prompt/chosen/rejected or HH).")
    train: TrainArgs = Field(
        default_factory=lambda: TrainArgs(eval_ratio=0.1), description="Optimisation settings."
    )
    num_layers_unfrozen: int = Field(-1, ge=-1, description="Train only the top N decoder layers (+ head); -1 = all.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint folder, or true for the newest one in this run's folder (false: a "
                          "recorded run started over from its first step; a resume sets it).")


class PPOStage(_Section):
    """Hydra PPO settings, in trlx's vocabulary."""

    model: ModelSpec | None = Field(None, description="Policy to start from (the SFT output); default: the recipe's.")
    reward_model: str | None = Field(None, description="Reward model folder (the RM output).")
    reward_fn: str | None = Field(
        None, description="Instead of a reward model: `module:function(prompts, responses) -> scores` (or "
        "`path/to/module.py:function`; a run records a module of its launch folder so)."
    )
    prompts: list[DataSource] = Field(min_length=1, description="Prompt sources for rollouts.")
    num_layers_unfrozen: int = Field(2, ge=1, description="k: top layers trained in the policy branch.")
    value_layers: int = Field(2, ge=1, description="k_v: top layers copied into the value branch.")
    init_value_from_rm: bool = Field(False, description="Start the value branch from the reward model's top layers.")
    train_head: bool | None = Field(
        None, description="Train the policy's LM head (a tied one is untied); false keeps it frozen and shared. "
        "Default: true, and false with lora (adapters only: the head stays frozen)."
    )
    lora: LoraSpec | None = Field(
        None, description="LoRA on the top k layers: policy = adapters on, reference = off; the head is frozen."
    )
    steps: int = Field(100, gt=0, description="PPO steps (one rollout + its optimisation each).")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts per rollout, per process.")
    minibatch_size: int = Field(8, gt=0, description="Sequences per PPO minibatch (it divides rollout_batch_size).")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout.")
    lr: float = Field(1e-6, gt=0, description="Learning rate of the policy and value branches.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Schedule over `steps`.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up (not with constant).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    init_kl_coef: float = Field(0.05, ge=0, description="Initial KL penalty coefficient.")
    target_kl: float | None = Field(6.0, gt=0, description="Adaptive KL target; null = fixed coefficient.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL controller horizon.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip.")
    vf_coef: float = Field(1.0, ge=0, description="Value loss weight.")
    score_baseline: Literal["none", "reference"] = Field(
        "none", description="reference: subtract the score of the reference's own answer (one per prompt)."
    )
    scale_reward: Literal["running", "ref"] | None = Field(
        "running", description="Divide scores by their running std, or by the std of the first rollout."
    )
    cliprange_reward: float = Field(10.0, gt=0, description="Clip scaled scores to ± this.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of an answer max_new_tokens cut before its end (scored "
        "as if finished otherwise: the reward reads the text as given); null = none.")
    value_warmup_steps: int = Field(0, ge=0, description="First steps train only the value branch.")
    max_prompt_length: int = Field(256, gt=0, description="Prompt tokens kept (from the end).")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per response.")
    chunk_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Prompts per decode batch, bounding a rollout's KV cache; auto: as many as the "
        "accelerator's free memory holds (a wider batch reads the weights once for more rows)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision.")
    save_steps: int = Field(50, gt=0, description="Save a full-state checkpoint every N steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints.")
    samples_per_step: int = Field(4, ge=0, description="Rollout samples kept in runs.db each step.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint folder, or true for the newest one in this run's folder (false: a "
                          "recorded run started over from its first step; a resume sets it).")

    @model_validator(mode="after")
    def _check(self) -> PPOStage:
        if self.value_layers < self.num_layers_unfrozen:
            raise ValueError(
                f"value_layers ({self.value_layers}) must be >= num_layers_unfrozen ({self.num_layers_unfrozen})"
            )
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if self.init_value_from_rm and self.reward_model is None:
            raise ValueError("init_value_from_rm needs reward_model")
        if self.init_kl_coef == 0 and self.target_kl is not None:
            raise ValueError(f"init_kl_coef 0 with target_kl {self.target_kl}: the adaptive controller scales the "
                             "coefficient, which stays 0; set target_kl: null for no KL penalty, or a positive "
                             "init_kl_coef")
        if self.warmup_steps > 0 and self.lr_scheduler == "constant":
            raise ValueError(f"warmup_steps {self.warmup_steps} with lr_scheduler constant: a constant schedule has "
                             "no warm-up (the peak rate from the first step); use constant_with_warmup")
        if self.lora is not None and self.train_head:
            raise ValueError("train_head: true cannot be combined with lora: LoRA trains its adapters only and the "
                             "head stays frozen; drop train_head (or train the full top layers without lora)")
        return self

    def too_deep_for(self, layers: int, model: str) -> tuple[str, str] | None:
        """(field, why) where k or k_v reaches `model`'s `layers` layers: the hydra shares a frozen trunk
        below its top k and k_v layers, so k <= k_v < layers (validation alone cannot know the model's depth)."""
        for field, value in (("value_layers", self.value_layers), ("num_layers_unfrozen", self.num_layers_unfrozen)):
            if value >= layers:
                return field, (f"{value}, but the model {model!r} has {layers} layers (the hydra shares a frozen "
                               f"trunk below its top k and k_v layers: k <= k_v < {layers})")
        return None

    @property
    def trains_head(self) -> bool:
        """Whether the policy's LM head trains: as set, else unless LoRA is on."""
        return self.train_head if self.train_head is not None else self.lora is None


class EvalStage(_Section):
    """The pipeline's last stage: its checkpoints answer the BELLE questions and a judge scores them."""

    eval_dir: str = Field(min_length=1, description="Folder with BELLE's eval_set.json and eval_prompt.json.")
    checkpoints: list[Literal["sft", "ppo"]] = Field(
        ["sft", "ppo"], min_length=1, description="Whose exports answer: the SFT model, the PPO policy, or both.")
    judge: Literal["rm", "openai"] = Field(
        "rm", description="rm: the pipeline's own reward model scores offline; openai: an OpenAI-compatible endpoint.")
    judge_url: str | None = Field(None, description="Base URL of the OpenAI-compatible endpoint (judge: openai).")
    judge_model: str | None = Field("gpt-3.5-turbo", description="The judge model at that endpoint (BELLE's).")
    judge_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")
    concurrency: int = Field(8, gt=0, description="Judge calls in flight (judge: openai).")
    judge_retries: int = Field(5, ge=0, description="Tries after a judge call's first failure (judge: openai).")
    judge_timeout: float = Field(120.0, gt=0, description="Seconds one judge call may take (judge: openai).")
    limit: int | None = Field(None, gt=0, description="Only the first N questions.")
    per_class: int | None = Field(None, gt=0, description="Only the first N questions of each class.")
    max_new_tokens: int = Field(512, gt=0, description="Answer length limit.")
    batch_size: int = Field(16, gt=0, description="Questions answered per decode batch.")

    @field_validator("per_class")
    @classmethod
    def _one_subset(cls, per_class: int | None, info: ValidationInfo) -> int | None:
        if per_class is not None and info.data.get("limit") is not None:  # `rlhf eval belle` refuses the pair
            raise ValueError("give limit or per_class, not both (the first N questions, or the first N of each "
                             "class)")
        return per_class


# In a pipeline, a stage's input named by the stage that makes it, never by a run number.
STAGE_REFS = {"@sft": "sft", "@rm": "rm"}


class Recipe(_Section):
    name: str = Field(description="Short name shown in the run table.")
    model: ModelSpec = Field(description="Base model of the pipeline.")
    seed: int = Field(42, description="Seed for data mixing, initialisation and sampling.")
    strict_data: bool = Field(False, description="A malformed data record is an error instead of being skipped.")
    output_root: str = Field("runs", description="Folder under which each run gets runs/<id>/.")
    sft: SFTStage | None = None
    rm: RMStage | None = None
    ppo: PPOStage | None = None
    eval: EvalStage | None = None
    _source: RecipeSource | None = PrivateAttr(None)

    def where(self, field: str) -> str:
        """`file:line` (or the `--set` item) that gave `field`, for error messages."""
        return self._source.locate(field) if self._source is not None else field

    def stage(self, stage: Stage) -> SFTStage | RMStage | PPOStage:
        section = getattr(self, stage)
        if section is None:
            raise RecipeError(f"{self.where('')}: recipe {self.name!r} has no '{stage}' section")
        return section

    def stage_model(self, stage: Stage) -> ModelSpec:
        section = self.stage(stage)
        return section.model or self.model


class _DuplicateKey(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def _node_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path of a YAML document to its 1-based line, so errors can point at it."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                child = (*path, str(key.value))
                line = key.start_mark.line + 1
                same = (key.tag, str(key.value))  # `1` and "1" are two keys
                if same in seen:  # YAML lets the last one win, silently: a tuned value lost unseen
                    raise _DuplicateKey(line, f"{'.'.join(child)}: given twice (first at line {seen[same]})")
                seen[same] = lines[child] = line
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(item: str, stage: Stage | None = None) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", typed value). Values are read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sft.train.lr=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        # A stage reference (`@sft`) is a string, though YAML would want it quoted.
        value = raw if raw in STAGE_REFS else yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {item!r}: value is not valid YAML ({err})") from None
    glued = _glued_key(value)
    if glued is not None:
        name, rest = glued.split(":", 1)
        raise RecipeError(f"--set {item!r}: {glued!r} reads as one key with no value: in YAML's {{...}} a key needs "
                          f"a space after its colon ({name}: {rest})")
    # A key that is not a recipe field is taken relative to the stage being run: `train.lr` = `sft.train.lr`.
    if stage is not None and key.split(".")[0] not in Recipe.model_fields:
        key = f"{stage}.{key}"
    return key, value


def _glued_key(value: Any) -> str | None:
    """A mapping key that holds a colon and has no value: `{path:x.jsonl}` is YAML for {"path:x.jsonl": None}."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key.strip(":"):
                return key
            found = _glued_key(item)
            if found is not None:
                return found
    if isinstance(value, list):
        return next((key for key in map(_glued_key, value) if key is not None), None)
    return None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), stage: Stage | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the file, field and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    try:
        data = yaml.safe_load(text)
        lines = _node_lines(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except _DuplicateKey as err:
        raise RecipeError(f"{path}:{err.line}: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name, model, sft, rm, ppo)")

    origin: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item, stage)
        try:
            _set_dotted(data, key, value)
        except (ValueError, IndexError, TypeError):
            raise RecipeError(f"--set {item!r}: {key} does not address a field of {path}",
                              {key: "not a field of this recipe"}) from None
        origin[key] = f"--set {item}"

    source = RecipeSource(path, lines, origin)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _describe(err, source) from None
    recipe._source = source
    _check_precision(recipe)
    if stage is not None:
        recipe.stage(stage)
    return recipe


def _check_precision(recipe: Recipe) -> None:
    """A half-precision model trains only under autocast: its trainable parts are float32 masters and its
    frozen parts stay half, and without autocast the two would meet in one matmul."""
    for stage in STAGES:
        section = getattr(recipe, stage)
        if section is None:
            continue
        field = f"{stage}.train.precision" if stage in ("sft", "rm") else f"{stage}.precision"
        precision = section.train.precision if stage in ("sft", "rm") else section.precision
        dtype = recipe.stage_model(stage).dtype
        if precision == "fp32" and dtype in ("bfloat16", "float16"):
            raise RecipeError(
                f"{recipe.where(field)}: {field}: fp32 with a {dtype} model: its frozen weights stay {dtype} and "
                "its trainable ones float32, which needs autocast; use precision bf16 or auto, or dtype float32",
                {field: f"fp32 with a {dtype} model"},
            )


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that `loc` (a pydantic error location) points into; None where the path leaves the
    recipe's models."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list: the list's own type was already unwrapped below
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _section_type(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _nearest_field(loc: tuple, name: str) -> str | None:
    """What an unknown field `name` at `loc` most likely meant: the same name one section down
    (`sft.lr` for `sft.train.lr`), else the closest spelling among the section's own fields."""
    model = _model_at(loc)
    if model is None:
        return None
    for field, info in model.model_fields.items():
        inner = _section_type(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and name in inner.model_fields:
            return f"{field}.{name}"
    near = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return near[0] if near else None


def _section_type(annotation: Any) -> Any:
    """The model class inside `X | None`, `list[X]` or `Annotated[X, …]`, or the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _describe(err: ValidationError, source: RecipeSource) -> RecipeError:
    problems = []
    fields: dict[str, str] = {}
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            near = _nearest_field(e["loc"][:-1], str(e["loc"][-1]))
            message = f"unknown field; did you mean {near!r}?" if near else "unknown field (check the spelling)"
            stages = {"sft": SFTStage, "rm": RMStage, "ppo": PPOStage}
            owners = [stage for stage, section in stages.items()
                      if len(e["loc"]) == 1 and e["loc"][0] in section.model_fields]
            if owners:  # `--set train.lr=…` on a whole recipe (a pipeline, a check without --stage)
                message = f"unknown field here; a stage's: {' or '.join(f'{o}.{field}' for o in owners)}"
            if len(e["loc"]) == 2 and e["loc"][0] in stages and not near:  # `rm.lora`: another stage's setting
                others = [s for s, section in stages.items() if e["loc"][1] in section.model_fields]
                if others:
                    have = "has" if len(others) == 1 else "have"
                    message = f"the {e['loc'][0]} stage has no such setting ({' and '.join(others)} {have} it)"
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] == "model_type" and isinstance(e.get("input"), str):
            # `model: runs/2/final`, `--set ppo.model=PATH`: a section given as one value
            message = f"a section, not a value: its fields go below it, e.g. {field}.path={e['input']}" \
                if field.endswith("model") else "a section, not a value: its fields go below it"
        elif e["type"] == "value_error":  # a validator's own sentence, without pydantic's "Value error, "
            message = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else message
        problems.append(f"{source.locate(field, message)}: {field or '(top level)'}: {message}")
        fields.setdefault(field, message)
    return RecipeError("invalid recipe\n  " + "\n  ".join(problems), fields)


def recipe_to_json(recipe: Recipe) -> str:
    return recipe.model_dump_json(indent=None)


DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")


def looks_local(path: str) -> bool:
    """A path that can only mean a local file or folder: a hub id is `name` or `owner/name`, so anything
    else is local, and so is `owner/name` where `owner` is a folder here (`demo/nomodel` beside `demo/`)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in DATA_SUFFIXES:
        return True
    return "/" in path and Path(path.split("/")[0]).is_dir()


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with every local path made absolute (hub ids stay as they are): what runs.db records,
    so that the run resumes from any working directory exactly as it was launched."""
    def fix(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() or looks_local(path) else path

    data = recipe.model_dump()
    data["output_root"] = str(Path(data["output_root"] or ".").expanduser().resolve())  # always a local folder
    for section in [data, *(data[s] for s in STAGES if data.get(s))]:
        if section.get("model"):
            section["model"]["path"] = fix(section["model"]["path"])
        for field in ("data", "prompts"):
            for source in section.get(field) or []:
                source["path"] = fix(source["path"])
        if section.get("reward_model"):
            section["reward_model"] = fix(section["reward_model"])
        if section.get("reward_fn"):
            section["reward_fn"] = local_function_spec(section["reward_fn"])
        if isinstance(section.get("resume_from_checkpoint"), str):
            section["resume_from_checkpoint"] = fix(section["resume_from_checkpoint"])
    if data.get("eval"):
        data["eval"]["eval_dir"] = fix(data["eval"]["eval_dir"])
    fixed = Recipe.model_validate(data)
    fixed._source = recipe._source
    return fixed


def function_spec_problem(spec: str) -> str | None:
    """Why `module:function` cannot be found, without running the module (validation runs in the console's
    process too, which must not import what a reward module imports); None if its module is there and its
    source binds the name (or cannot tell). The current directory is searched first, as the trainer
    (`python -m engine.train`) searches it."""
    import importlib.util

    module, _, name = spec.rpartition(":")
    if not module or not name:
        return f"reward_fn {spec!r}: expected module:function"
    if module.endswith(".py"):  # a module file named by its path (as a run's recorded recipe names a local one)
        origin: str | None = str(Path(module).expanduser())
        if not Path(origin).is_file():
            return f"reward_fn {spec!r}: no such file {module}"
    else:
        added = os.getcwd() not in sys.path
        if added:  # first, as `python -m` puts it: a local file of an installed module's name is the one imported
            sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(module)
        except Exception as err:  # a parent package that fails to import, a malformed name
            return f"reward_fn {spec!r}: {type(err).__name__}: {err}"
        finally:
            if added:
                sys.path.remove(os.getcwd())
        if found is None:
            return f"reward_fn {spec!r}: no module named {module!r}"
        origin = found.origin
    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_bytes(), filename=origin)
    except SyntaxError as err:  # the trainer's import would fail on it after the run registered
        return f"reward_fn {spec!r}: {origin}:{err.lineno}: SyntaxError: {err.msg}"
    except (OSError, ValueError, RecursionError, MemoryError):  # the trainer's import will say
        return None
    names = _bound_names(tree)
    if names is None:  # bound in ways the source cannot show: the trainer's import will tell
        return None
    if name not in names:
        return f"reward_fn {spec!r}: {module} ({origin}) defines no {name!r}"
    return _not_a_scorer(tree, name, f"reward_fn {spec!r}: {origin}")


def local_function_spec(spec: str) -> str:
    """`module:function` of a module file in the current directory, named by the file's absolute path (what
    a run records: its resume, started from another directory, finds the file); any other spec as it is."""
    module, _, name = spec.rpartition(":")
    local = Path(f"{module}.py")
    if module and name and module.isidentifier() and local.is_file():
        return f"{local.resolve()}:{name}"
    return spec


def _not_a_scorer(tree: ast.Module, name: str, where: str) -> str | None:
    """Why the module's `name`, as its source binds it at its top level once and plainly, cannot be called
    as `name(prompts, responses)`: a value that is no function (`score = 3`), or a function that takes
    another number of arguments (found after a whole rollout, as a TypeError). None where the source
    cannot tell (decorated, bound twice, made by a call)."""
    bound = [node for node in tree.body if name in _top_level_names(node)]
    rebound = any(isinstance(node, ast.Global) and name in node.names for node in ast.walk(tree))
    if len(bound) != 1 or rebound:  # a function's `global score` may bind it anew when it runs
        return None
    node = bound[0]
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
        kind = type(node.value.value).__name__
        what = "None" if node.value.value is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        return f"{where}:{node.lineno}: {name} is {what}, not a function"
    if not isinstance(node, ast.FunctionDef) or node.decorator_list:
        return None
    args = node.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    keyword_only = [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    if required > 2 or (positional < 2 and args.vararg is None) or keyword_only:
        return (f"{where}:{node.lineno}: {name}({ast.unparse(args)}) cannot be called as {name}(prompts, responses): a "
                "reward function takes the rendered prompts and the responses, and returns one score each")
    return None


def _top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    # Anything else (if, for, try, with, ...) may bind it too: counted as a binding the check cannot read.
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _bound_names(tree: ast.Module) -> set[str] | None:
    """The names a Python source file binds anywhere in it (more than its top level), read without running
    it; None where that cannot be told: `import *`, a module __getattr__, names made through
    globals(), vars(), locals(), setattr, exec, eval, a __dict__ or sys.modules."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        elif isinstance(node, ast.Name) and node.id in ("globals", "vars", "locals", "setattr", "exec", "eval"):
            return None
        elif isinstance(node, ast.Attribute) and node.attr in ("__dict__", "modules"):
            return None
    return None if "__getattr__" in names else names


def import_function(spec: str) -> Callable[..., Any]:
    """`package.module:function` (or `/path/to/module.py:function`) -> the function."""
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(f"reward_fn {spec!r}: expected module:function")
    if not module.endswith(".py") and os.getcwd() not in sys.path:
        # The current directory first, as validation found it and as `python -m` has it: the `rlhf` script's
        # own folder is first on its path instead, and a module beside the recipe was not found there.
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(_module_file(module) if module.endswith(".py") else importlib.import_module(module), name)
    except (ImportError, AttributeError, OSError) as err:
        raise ValueError(f"reward_fn {spec!r}: {err}") from None
    if not callable(function):
        raise ValueError(f"reward_fn {spec!r}: {module}.{name} is a {type(function).__name__}, not a function")
    return function


def _module_file(path: str) -> Any:
    """The module a file holds, imported as its own name with its folder first on sys.path: as it was when
    the run started in that folder (its imports of files beside it resolve the same)."""
    import importlib.util

    file = Path(path).expanduser().resolve()
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    if file.stem in sys.modules and getattr(sys.modules[file.stem], "__file__", None) == str(file):
        return sys.modules[file.stem]
    found = importlib.util.spec_from_file_location(file.stem, file)
    if found is None or found.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(found)
    sys.modules[file.stem] = module
    found.loader.exec_module(module)
    return module
