"""Launch: a stage (or the whole pipeline), a recipe from configs/, its main fields in a form, validated
before anything starts.

The form only turns the fields you changed into `--set` overrides, so the run's recipe stays the file
plus a short, readable list. Validation is the engine's own (`engine.train.validate`): an error is shown
under the field it names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.validation import Integer, Number
from textual.widgets import Button, Footer, Input, Label, Select, Static

from console.worker_failures import SaysWorkerFailures


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    stages: tuple[str, ...]
    kind: str  # "text", "float", "int", "count" (a whole number, at least 1)


FIELDS = (
    FormField("model", "model", ("sft", "rm", "ppo"), "text"),
    FormField("data", "data (first source)", ("sft", "rm", "ppo"), "text"),
    FormField("lr", "learning rate", ("sft", "rm", "ppo"), "float"),
    FormField("batch", "batch size", ("sft", "rm", "ppo"), "int"),
    FormField("length", "epochs", ("sft", "rm"), "float"),
    FormField("steps", "steps", ("ppo",), "int"),
    FormField("k", "k (policy layers)", ("ppo",), "int"),
    FormField("k_v", "k_v (value layers)", ("ppo",), "int"),
    FormField("processes", "processes", ("sft", "rm", "ppo", "pipeline"), "count"),
)


# "pipeline" runs the stages the recipe has (engine/pipeline.py), as the recipe says, up to the one `through`
# names (`rlhf pipeline --through`): no field of its own.
STAGE_OPTIONS = [("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"), ("pipeline: the recipe's stages in order", "pipeline")]
THROUGH_OPTIONS = [("every stage the recipe has, then eval", "all"), ("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"),
                   ("eval", "eval")]


def recipe_keys(stage: str, has_own_model: bool) -> dict[str, str]:
    """Form field -> dotted recipe key, for a stage."""
    if stage == "pipeline":
        return {}
    keys = {"model": f"{stage}.model.path" if has_own_model else "model.path"}
    if stage == "ppo":
        keys.update(data="ppo.prompts.0.path", lr="ppo.lr", batch="ppo.rollout_batch_size", steps="ppo.steps",
                    k="ppo.num_layers_unfrozen", k_v="ppo.value_layers")
    else:
        keys.update(data=f"{stage}.data.0.path", lr=f"{stage}.train.lr", batch=f"{stage}.train.batch_size",
                    length=f"{stage}.train.epochs")
    return keys


def field_for_error(error_field: str, message: str, keys: dict[str, str]) -> str | None:
    """Which form field a recipe error belongs to (exact key, or a section whose message names it)."""
    for name, key in keys.items():
        if error_field == key:
            return name
    for name, key in keys.items():
        if key.startswith(error_field + ".") and key.rsplit(".", 1)[-1] in message:
            return name
    return None


def _option_for(options: list[tuple[str, str]], path: str) -> str:
    """The option for `path` (a recipe or accelerate config a run used), added when the list lacks it."""
    target = Path(path).resolve()
    for _, value in options:
        if Path(value).resolve() == target:
            return value
    options.append((Path(path).name, str(target)))
    return str(target)


MAX_RECIPES = 40  # in the recipe list: the configs folder's, then those of the newest runs


def _shown_path(path: Path) -> str:
    """A recipe outside the configs folder, as a user would type it: from here, or from ~."""
    for base, shown in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.is_relative_to(base):
            return shown + str(path.relative_to(base))
    return str(path)


def _default_recipe(recipes: list[tuple[str, str]]) -> str | object:
    # The tiny recipe is what a first launch on a CPU box can actually run.
    for name, value in recipes:
        if name == "tiny.yaml":
            return value
    return recipes[0][1] if recipes else Select.NULL


class RecipeLoaded(Message):
    def __init__(self, stage: str, recipe: str, values: dict[str, str], keys: dict[str, str], error: str | None,
                 changed: str = ""):
        """`changed`: how the recipe file differs now from what the run launched again ran with."""
        super().__init__()
        self.stage, self.recipe = stage, recipe
        self.values, self.keys, self.error, self.changed = values, keys, error, changed


class Estimated(Message):
    """The memory estimate's line for the form as it was at request `seq`."""

    def __init__(self, seq: int, text: str, fits: bool | None):
        super().__init__()
        self.seq, self.text, self.fits = seq, text, fits


class Validated(Message):
    def __init__(self, error: str | None, fields: dict[str, str], launch: bool, form: tuple):
        super().__init__()
        self.error, self.fields, self.launch = error, fields, launch
        self.form = form  # (stage, recipe, overrides, accelerate config, through, processes) as validated


def _disk_line(recipe: Any, stages: list[str], parallel: Any) -> tuple[str, bool]:
    """What the stages' checkpoints and exports fill at most, and whether that fits where they go."""
    from engine.disk_estimate import estimate_disk, free_bytes, pipeline_peak
    from engine.estimate import gib

    peak = pipeline_peak(estimate_disk(recipe, stages, parallel))
    if peak is None:
        return "disk: not known (no save_total_limit, and the steps come from epochs)", True
    try:
        folder, free = free_bytes(recipe.output_root)
    except OSError as err:  # the memory line stands on its own
        return f"disk: up to {gib(peak)} of checkpoints and exports (free space not known: {err})", True
    if peak <= free:
        return f"disk: up to {gib(peak)} of checkpoints and exports", True
    return f"disk: up to {gib(peak)} of checkpoints and exports, and {folder} has {gib(free)} free", False


def _flattened(items: list[str]) -> list[str]:
    """`--set` items with a mapping for a value (`ppo.model={"path": ..., "dtype": ...}`) as one item per key
    (`ppo.model.path=...`), so that each can land in its field; values stay YAML (JSON is YAML)."""
    flat = []
    for item in items:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed:
            flat += [f"{key}.{sub}={json.dumps(v)}" for sub, v in parsed.items()]
        else:
            flat.append(item)
    return flat


class LaunchScreen(SaysWorkerFailures, Screen[int | None]):
    DEFAULT_CSS = """
    LaunchScreen #estimate { height: auto; color: $text-muted; padding: 0 1; }
    LaunchScreen #estimate.-too-big { color: $warning; }
    """
    BINDINGS = [
        # q backs out, as on every screen but the runs one (a field being typed in keeps its q).
        Binding("escape,q", "cancel", "Back"),
        Binding("ctrl+s", "launch", "Launch"),
        Binding("ctrl+t", "validate", "Validate"),
    ]

    def __init__(self, configs_dir: Path, from_run: dict[str, Any] | None = None, used: Sequence[str] = ()):
        """`from_run`: a run to launch again with changes: its stage, recipe, overrides and accelerate
        settings fill the form; overrides no field shows are kept as they are (listed on the form). `used`:
        the recipes runs were launched from, newest first: listed after the configs folder's own."""
        super().__init__()
        self.configs_dir = Path(configs_dir)
        self.used = list(used)
        self.loaded: dict[str, str] = {}  # field -> value as in the recipe (unchanged fields add no override)
        self.keys: dict[str, str] = {}
        self._launching = False
        self.from_run = from_run
        self._run_pending = from_run is not None  # its overrides go into the fields once the recipe is loaded
        self.own_model: str | None = None  # `stage.model.path` where the run gave its stage its own model
        self._skipped: frozenset[str] = frozenset()  # fields of the last check that were not even of their type
        self.extra: list[str] = []  # the run's overrides that no field shows
        self._estimate_seq = 0  # the newest estimate asked for: older answers are dropped

    def recipes(self) -> list[Path]:
        return sorted(p for p in self.configs_dir.glob("*.yaml"))

    def accelerate_configs(self) -> list[Path]:
        return sorted((self.configs_dir / "accelerate").glob("*.yaml"))

    def compose(self) -> ComposeResult:
        recipes = [(p.name, str(p)) for p in self.recipes()]
        listed = {Path(value).resolve() for _, value in recipes}
        for path in self.used:  # a user's own recipes live in their project, not in the console's configs/
            if len(listed) >= MAX_RECIPES:
                break
            if not Path(path).is_absolute():  # recorded relative (older runs): to a folder no longer known
                continue
            try:
                resolved = Path(path).resolve()
                if resolved in listed or not resolved.is_file():
                    continue
            except (OSError, RuntimeError):  # another user's folder in a shared runs.db, a symlink loop
                continue
            listed.add(resolved)
            recipes.append((_shown_path(resolved), str(resolved)))
        accel = [(p.name, str(p)) for p in self.accelerate_configs()]
        default_accel = next((v for n, v in accel if n == "cpu.yaml"), accel[0][1] if accel else Select.NULL)
        stage, recipe, title = "sft", _default_recipe(recipes), "[b]New run[/b]"
        run = self.from_run
        if run is not None:
            stage, title = run["stage"], f"[b]Launch run {run['id']} again[/b], with changes"
            recipe = _option_for(recipes, run["recipe"])
            launch = json.loads(run.get("launch") or "{}")
            if launch.get("accelerate_config"):
                default_accel = _option_for(accel, launch["accelerate_config"])
        with VerticalScroll(id="launch-form"):
            yield Static(f"{title}   Tab: next field · ctrl+t validates · ctrl+s launches · Esc closes")
            with Horizontal(classes="row"):
                yield Label("stage", classes="field-label")
                yield Select(STAGE_OPTIONS, value=stage, allow_blank=False, id="stage", compact=True)
            with Horizontal(classes="row"):
                yield Label("recipe", classes="field-label")
                yield Select(recipes, value=recipe, id="recipe", compact=True)
            yield Static("", id="error-recipe", classes="field-error -empty")
            yield Static("", id="recipe-changed", classes="field-error -empty")
            with Horizontal(classes="row field-through"):
                yield Label("through", classes="field-label")
                yield Select(THROUGH_OPTIONS, value="all", allow_blank=False, id="through", compact=True)
            for field in FIELDS:
                validators = {"float": [Number()], "int": [Integer()],
                              "count": [Integer(minimum=1)]}.get(field.kind, [])
                with Horizontal(classes=f"row field-{field.name}"):
                    yield Label(field.label, classes="field-label")
                    yield Input(id=f"field-{field.name}", validators=validators, valid_empty=True, compact=True)
                yield Static("", id=f"error-{field.name}", classes="field-error -empty")
            with Horizontal(classes="row"):
                yield Label("accelerate config", classes="field-label")
                yield Select(accel, value=default_accel, id="accelerate", compact=True)
            yield Static("", id="estimate")
            yield Static("", id="kept-overrides", classes="field-error -empty")
            yield Static("", id="error-general", classes="field-error -empty")
            with Horizontal(classes="buttons"):
                yield Button("Validate (ctrl+t)", id="validate", compact=True)
                yield Button("Launch (ctrl+s)", variant="success", id="launch", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#stage", Select).focus()
        self._stage_changed()

    @property
    def stage(self) -> str:
        return str(self.query_one("#stage", Select).value)

    @property
    def through(self) -> str | None:
        """The pipeline's last stage; None: every stage the recipe has."""
        value = str(self.query_one("#through", Select).value)
        return None if value == "all" else value

    @property
    def recipe(self) -> str | None:
        value = self.query_one("#recipe", Select).value
        return None if value is Select.NULL else str(value)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id in ("stage", "recipe"):
            self._stage_changed()
        elif event.select.id in ("accelerate", "through"):
            self._refresh_estimate()

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.loaded or self.stage == "pipeline":  # a pipeline's form has no recipe values, only processes
            self._refresh_estimate()

    def _stage_changed(self) -> None:
        for field in FIELDS:
            for widget in self.query(f".field-{field.name}"):
                widget.display = self.stage in field.stages
        self.query_one(".field-through").display = self.stage == "pipeline"
        self.clear_errors()
        if self.recipe:
            self.load_recipe(self.stage, self.recipe)

    @work(thread=True, exclusive=True, group="launch-form", exit_on_error=False)
    def load_recipe(self, stage: str, recipe: str) -> None:
        from engine.config import RecipeError, load_recipe

        try:
            loaded = load_recipe(recipe)
            if stage == "pipeline":
                from engine.pipeline import plan

                plan(loaded, None)
                self.post_message(RecipeLoaded(stage, recipe, {}, {}, None))
                return
            section = loaded.stage(stage)
        except Exception as err:  # RecipeError, and anything else: shown on the form, never the console's end
            message = str(err) if isinstance(err, RecipeError) else f"{recipe}: {type(err).__name__}: {err}"
            self.post_message(RecipeLoaded(stage, recipe, {}, recipe_keys(stage, False), message))
            return
        keys = recipe_keys(stage, section.model is not None)
        data = loaded.model_dump()
        values = {}
        for name, key in keys.items():
            node: Any = data
            for part in key.split("."):
                node = node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) \
                    else (node.get(part) if isinstance(node, dict) else None)
                if node is None:
                    break
            values[name] = "" if node is None else str(node)
        self.post_message(RecipeLoaded(stage, recipe, values, keys, None, self._changed_since_run(stage, recipe)))

    def _changed_since_run(self, stage: str, recipe: str) -> str:
        """What of the run launched again its recipe file no longer says (edited since): the form starts
        from the file, so the relaunch would differ from the run where nothing on the form shows it."""
        from console.diff import config_diff, run_config
        from engine.config import load_recipe, recipe_to_json, with_absolute_paths

        run = self.from_run
        if run is None or stage != run["stage"] or not run.get("config") or not run.get("recipe") or \
                Path(recipe).resolve() != Path(run["recipe"]).resolve():
            return ""
        try:
            now = recipe_to_json(with_absolute_paths(load_recipe(recipe, json.loads(run.get("overrides") or "[]"),
                                                                 stage)))
        except Exception:  # noqa: BLE001 - a file that no longer takes the run's overrides: the form says why
            return ""
        rows = [(key, old, new) for key, old, new in config_diff(run_config({"stage": stage, "config": run["config"]}),
                                                                 run_config({"stage": stage, "config": now}))
                if not key.endswith("resume_from_checkpoint")]
        if not rows:
            return ""
        shown = "; ".join(f"{key} {old} -> {new}" for key, old, new in rows[:4])
        more = f" and {len(rows) - 4} more" if len(rows) > 4 else ""
        return (f"{Path(recipe).name} changed since run {run['id']}: {shown}{more} (the launch takes the file as "
                "it is now)")

    def on_recipe_loaded(self, message: RecipeLoaded) -> None:
        if (message.stage, message.recipe) != (self.stage, self.recipe):
            return  # an answer for an earlier choice that arrived late
        previous = self.loaded
        self.loaded, self.keys = message.values, message.keys
        if self.own_model is not None and self.own_model.startswith(f"{message.stage}."):
            self._edit_own_model(self.own_model)
        for field in FIELDS:  # a recipe that failed to load leaves no values behind to become overrides
            if field.name == "processes":
                continue
            box = self.query_one(f"#field-{field.name}", Input)
            if box.value.strip() == previous.get(field.name, ""):  # what the user typed meanwhile stays
                box.value = message.values.get(field.name, "")
            box.placeholder = message.values.get(field.name, "")
        self._error("recipe", message.error or "")
        changed = self.query_one("#recipe-changed", Static)
        changed.update(Text(message.changed))
        changed.set_class(not message.changed, "-empty")
        if self._run_pending and message.error is None:
            self._run_pending = False
            self._fill_from_run()
        self._refresh_estimate()

    def _edit_own_model(self, key: str) -> None:
        """The run gave its stage a model of its own (a pipeline wires the SFT export into ppo.model): the
        model field edits that one, and always says it, since the recipe's model is not the run's."""
        self.keys["model"], self.loaded["model"] = key, ""

    def _fill_from_run(self) -> None:
        """The run's overrides into the fields they belong to; the rest kept as they are."""
        run = self.from_run
        assert run is not None
        items = _flattened([str(item) for item in json.loads(run.get("overrides") or "[]")])
        own_model = f"{run['stage']}.model.path"
        if self.keys.get("model") != own_model and any(i.startswith(own_model + "=") for i in items):
            self.own_model = own_model
            self._edit_own_model(own_model)
        by_key = {key: name for name, key in self.keys.items()}
        self.extra = []
        for item in items:
            key, _, value = item.partition("=")
            name = by_key.get(key) or by_key.get(f"{run['stage']}.{key}")  # `train.lr` means the stage's
            if name is None:
                self.extra.append(str(item))
                continue
            try:  # the form wrote text fields as JSON strings
                parsed = json.loads(value)
                value = parsed if isinstance(parsed, str) else value
            except ValueError:
                pass
            self.query_one(f"#field-{name}", Input).value = value
        processes = json.loads(run.get("launch") or "{}").get("num_processes")
        if processes:
            self.query_one("#field-processes", Input).value = str(processes)
        kept = self.query_one("#kept-overrides", Static)
        kept.update(Text("kept from run {}: {}".format(run["id"], " ".join(self.extra)) if self.extra else ""))
        kept.set_class(not self.extra, "-empty")

    # -- memory estimate -------------------------------------------------------------------------------
    def _refresh_estimate(self) -> None:
        """Ask for the estimate of the form as it is now (cheap: the model's config.json, no torch)."""
        if self.recipe is None:
            return
        self._estimate_seq += 1
        accel = self.query_one("#accelerate", Select).value
        # Judged against this machine's smallest GPU where the sampler sees them; else a size assumed, and said.
        readings = getattr(self.app, "gpu_readings", None) or []
        memory = min((reading.memory_total for reading in readings), default=None)
        none_here = bool(getattr(self.app, "gpu_unavailable", None))  # before the first sample: not yet known
        self.estimate(self._estimate_seq, self.stage, self.recipe, self.overrides(),
                      None if accel is Select.NULL else str(accel), self.processes(), self.through, memory, none_here)

    @work(thread=True, exclusive=True, group="launch-estimate", exit_on_error=False)
    def estimate(self, seq: int, stage: str, recipe: str, overrides: list[str], accel: str | None,
                 processes: int | None, through: str | None, gpu_memory: int | None = None,
                 none_here: bool = False) -> None:
        try:
            from engine.config import load_recipe
            from engine.estimate import DEFAULT_GPU_MEMORY, estimate_recipe, gib, parallel_from_config

            parallel = parallel_from_config(accel, processes)
            assumed = " (assumed: no GPU seen here)" if gpu_memory is None and none_here else ""
            gpu_memory = gpu_memory or DEFAULT_GPU_MEMORY
            if stage == "pipeline":
                from engine.pipeline import plan

                loaded = load_recipe(recipe, overrides)
                trained = [s for s in plan(loaded, through) if s != "eval"]
                if {"rm", "ppo"} <= set(trained) and loaded.ppo.reward_model is None:
                    # The pipeline gives PPO its RM export as the reward model (engine.pipeline.wiring).
                    loaded = load_recipe(recipe, [*overrides, "ppo.reward_model=@rm", "ppo.reward_fn=null"])
                results = estimate_recipe(loaded, trained, parallel, gpu_memory)
                where = "per process on CPU" if parallel.cpu else "per GPU"
                text = "memory: " + " · ".join(f"{r.stage} {gib(r.peak)}" for r in results) + f" {where}"
                too_big = [r.stage for r in results if not r.fits]
                if not parallel.cpu:
                    text += (f", {', '.join(too_big)} does not fit" if too_big else ", each fits") + \
                        f" in {gib(results[0].gpu_memory)}{assumed}"
                disk, disk_fits = _disk_line(loaded, trained, parallel)
                self.post_message(Estimated(seq, f"{text}\n{disk}", not too_big and disk_fits))
                return
            loaded = load_recipe(recipe, overrides, stage)
            (result,) = estimate_recipe(loaded, [stage], parallel, gpu_memory)
            largest = result.largest
            if parallel.cpu:
                text = f"memory: peak {gib(result.peak)} per process on CPU"
            else:
                verdict = "fits" if result.fits else "does not fit"
                text = f"memory: peak {gib(result.peak)} per GPU, {verdict} in {gib(result.gpu_memory)}{assumed}"
            text += f" · largest: {largest.name} ({gib(largest.bytes)})"
            disk, disk_fits = _disk_line(loaded, [stage], parallel)
            self.post_message(Estimated(seq, f"{text}\n{disk}", result.fits and disk_fits))
        except Exception as err:  # the recipe's own errors show on validation; here a short line, never a crash
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self.post_message(Estimated(seq, f"memory: no estimate ({first[:100]})", None))

    def on_estimated(self, message: Estimated) -> None:
        if message.seq != self._estimate_seq:
            return  # the form changed since this was asked for
        widget = self.query_one("#estimate", Static)
        widget.update(Text(message.text))
        widget.set_class(message.fits is False, "-too-big")

    # -- validation ------------------------------------------------------------------------------------
    def overrides(self, skip: frozenset[str] = frozenset()) -> list[str]:
        """The form as --set items; `skip`: fields left out (their values are not even of their type)."""
        kinds = {field.name: field.kind for field in FIELDS}
        items = []
        for name, key in self.keys.items():
            if name in skip:
                continue
            value = self.query_one(f"#field-{name}", Input).value.strip()
            # Empty: the recipe's value (its placeholder shows it), as an empty processes field is the default
            if value and value != self.loaded.get(name, ""):
                # --set values are YAML: a path must stay a string ("run #2.jsonl", "on", "a: b")
                items.append(f"{key}={json.dumps(value) if kinds[name] == 'text' else value}")
        return items + [item for item in self.extra if item not in items]

    def processes(self) -> int | None:
        value = self.query_one("#field-processes", Input).value.strip()
        return int(value) if value.isdigit() else None

    def _error(self, name: str, text: str) -> None:
        widget = self.query_one(f"#error-{name}", Static)
        widget.update(Text(text))  # messages quote paths and values: not markup
        widget.set_class(not text, "-empty")

    def clear_errors(self) -> None:
        for widget in self.query(".field-error"):
            widget.update("")
            widget.add_class("-empty")
        for widget in self.query(Input):
            widget.remove_class("-invalid-field")

    def show_errors(self, error: str | None, fields: dict[str, str]) -> None:
        self.clear_errors()
        if error is None:
            return
        unplaced = not fields
        for error_field, problem in fields.items():
            name = field_for_error(error_field, problem, self.keys)
            if name is None:
                unplaced = True
                continue
            self._error(name, f"↑ {problem}")
            self.query_one(f"#field-{name}", Input).add_class("-invalid-field")
        if unplaced:
            self._error("general", error)

    def _local_errors(self) -> frozenset[str]:
        """The fields whose inputs' own validators fail (a letter in the learning rate, say), marked."""
        bad = set()
        for field in FIELDS:
            widget = self.query_one(f"#field-{field.name}", Input)
            if self.stage not in field.stages or not widget.value:
                continue
            result = widget.validate(widget.value)
            if result is not None and not result.is_valid:
                self._error(field.name, "↑ a whole number, at least 1" if field.kind == "count"
                            else f"↑ not a valid {field.kind}")
                widget.add_class("-invalid-field")
                bad.add(field.name)
        return frozenset(bad)

    @work(thread=True, exclusive=True, group="launch-validate", exit_on_error=False)
    def validate(self, stage: str, recipe: str, overrides: list[str], accel: str | None, through: str | None,
                 processes: int | None, launch: bool) -> None:
        """The checks the launch makes before it registers anything (so a valid form launches)."""
        from engine.config import RecipeError
        from engine.data.records import DataError
        from engine.train import validate

        form = (stage, recipe, overrides, accel, through, processes)
        try:
            if stage == "pipeline":
                from engine.pipeline import check

                if accel is None:
                    raise RecipeError("choose an accelerate config: each stage is launched with it")
                check(recipe, overrides, through, accel, processes)
            else:
                checked = validate(stage, recipe, overrides)
                if accel is not None:
                    from engine.launch import check_launch

                    check_launch(stage, checked, accel, processes)
        except (RecipeError, DataError) as err:
            self.post_message(Validated(str(err), getattr(err, "fields", {}), launch, form))
            return
        except Exception as err:  # an unexpected failure is the form's to show, not the console's end
            self.post_message(Validated(f"validation failed: {type(err).__name__}: {err}", {}, launch, form))
            return
        self.post_message(Validated(None, {}, launch, form))

    def _form(self, skip: frozenset[str] = frozenset()) -> tuple:
        accel = self.query_one("#accelerate", Select).value
        through = self.through if self.stage == "pipeline" else None
        return (self.stage, self.recipe, self.overrides(skip), None if accel is Select.NULL else str(accel),
                through, self.processes())

    def on_validated(self, message: Validated) -> None:
        if message.form != self._form(self._skipped):
            # The form changed while this was checked: what it says is about another form, and a launch
            # waits for the user to press again (never a launch of what was not checked).
            if message.launch:
                self._launching = False
                self.notify("the form changed while it was checked: nothing started; launch again", title="launch")
            return
        self.show_errors(message.error, message.fields)
        if self._skipped:  # every problem at once: the type errors found here, and the recipe's about the rest
            self._local_errors()
            return
        self._refresh_estimate()  # what the check found may have changed since the form asked (a model written)
        if message.error is None and message.launch:
            accel = self.query_one("#accelerate", Select).value
            if accel is Select.NULL:
                self._error("general", "choose an accelerate config")
                self._launching = False
                return
            self.query_one("#launch", Button).disabled = True
            if self.stage == "pipeline":
                self.app.launch_pipeline(self.recipe, self.overrides(), str(accel), self.processes(), self.through)
            else:
                self.app.launch_run(self.stage, self.recipe, self.overrides(), str(accel), self.processes())
            return
        if message.launch:  # a check alone that answers late must not release a launch in flight
            self._launching = False
        if message.error is None and not message.launch:
            self.notify("the recipe is valid", title="validate")

    def launch_failed(self, error: str, fields: dict[str, str]) -> None:
        self._launching = False
        self.query_one("#launch", Button).disabled = False
        self.show_errors(error, fields)

    # -- actions ---------------------------------------------------------------------------------------
    def _check(self, launch: bool) -> None:
        if self._launching:
            return  # one launch per press, however fast the keys come
        self._launching = launch
        self.clear_errors()
        if self.recipe is None:
            self._error("recipe", "no recipe in " + str(self.configs_dir))
            self._launching = False
            return
        self._skipped = self._local_errors()
        if self._skipped:  # never launched, but the rest of the form is still checked
            self._launching = launch = False
        self.validate(*self._form(self._skipped), launch)

    def action_validate(self) -> None:
        self._check(launch=False)

    def action_launch(self) -> None:
        self._check(launch=True)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._check(launch=event.button.id == "launch")
