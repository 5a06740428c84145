from pathlib import Path

import pytest

from engine.config import RecipeError, load_recipe
from tests.conftest import REPO, TINY


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_recipes_validate():
    tiny = load_recipe(TINY)
    assert tiny.sft is not None and tiny.rm is not None and tiny.ppo is not None
    seed = load_recipe(REPO / "configs" / "bloomz-7b1-mt.yaml")
    assert seed.model.path == "bigscience/bloomz-7b1-mt"
    assert seed.ppo.num_layers_unfrozen == 2 and seed.ppo.value_layers == 2


def test_overrides_are_typed_and_stage_relative():
    recipe = load_recipe(TINY, ["sft.train.lr=1e-5", "train.max_steps=7", "rm.num_layers_unfrozen=1",
                                "sft.packing=true", "sft.data.0.weight=2"], stage="sft")
    assert recipe.sft.train.lr == 1e-5
    assert recipe.sft.train.max_steps == 7  # `train.max_steps` is taken relative to the stage being run
    assert recipe.rm.num_layers_unfrozen == 1
    assert recipe.sft.packing is True
    assert recipe.sft.data[0].weight == 2.0


def test_unknown_field_is_named_with_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  path: m\nsft:\n  data:\n    - {path: d.jsonl}\n  train:\n    lrr: 1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:8: sft.train.lrr: unknown field; did you mean 'lr'?" in str(err.value)


def test_an_unknown_field_names_the_nearest_field_of_its_own_section(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  path: m\nsft:\n  data:\n    - {path: d.jsonl, wieght: 2}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["sft.train.max_step=3", "sft.zzz=1", "sft.lr=1e-5"])
    message = str(err.value)
    assert "sft.lr: unknown field; did you mean 'train.lr'?" in message  # a section down, not 'lora'
    assert "sft.data.0.wieght: unknown field; did you mean 'weight'?" in message  # inside a list item
    assert "sft.train.max_step: unknown field; did you mean 'max_steps'?" in message  # from --set
    assert "sft.zzz: unknown field (check the spelling)" in message  # nothing near: no guess


def test_wrong_value_is_named_with_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  path: m\nsft:\n  data:\n    - {path: d.jsonl, weight: -1}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}:6: sft.data.0.weight" in message and "greater than 0" in message
    assert err.value.fields == {"sft.data.0.weight": "Input should be greater than 0"}  # for a form's field


def test_belle_is_no_format_name_and_an_evaluation_takes_one_subset(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  path: m\nsft:\n  data:\n    - path: d.jsonl\n")
    with pytest.raises(RecipeError, match="sft.data.0.format: BELLE's records .* are in the alpaca format"):
        load_recipe(path, ["sft.data=[{path: d.jsonl, format: belle}]"])
    # Refused by the pipeline's evaluation after hours of training: here, before its first stage
    with pytest.raises(RecipeError, match="eval.per_class: give limit or per_class, not both"):
        load_recipe(path, ["eval={eval_dir: e, limit: 5, per_class: 2}"])


def test_missing_field_and_bad_override_are_named(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(RecipeError, match=r"model: required field is missing"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"--set sft.train.lr=fast: sft.train.lr: Input should be a valid number"):
        load_recipe(TINY, ["sft.train.lr=fast"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(TINY, ["sft.train.lr"])


def test_structural_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: not valid YAML"):
        load_recipe(write(tmp_path, "name: x\n  model: 1\n"))
    with pytest.raises(RecipeError, match="has no 'ppo' section"):
        load_recipe(write(tmp_path, "name: x\nmodel: {path: m}\n"), stage="ppo")
    with pytest.raises(RecipeError, match=r"value_layers \(1\) must be >= num_layers_unfrozen \(2\)"):
        load_recipe(TINY, ["ppo.num_layers_unfrozen=2", "ppo.value_layers=1"])
    with pytest.raises(RecipeError, match="lora and num_layers_unfrozen cannot be combined"):
        load_recipe(TINY, ["sft.lora={r: 4}", "sft.num_layers_unfrozen=1"])
    # A section's error names the --set items its message names, not every --set of the section
    with pytest.raises(RecipeError,
                       match=r"\n  --set ppo.num_layers_unfrozen=99 \(.*tiny.yaml:\d+\): ppo: value_layers"):
        load_recipe(TINY, ["ppo.lr=1e-5", "ppo.num_layers_unfrozen=99", "ppo.top_p=0.9"])

    # LoRA freezes the head: an explicit train_head true beside it trained nothing and said nothing
    with pytest.raises(RecipeError, match=r"--set ppo.train_head=true \(.*tiny.yaml:\d+\): ppo: "
                                          r"train_head: true cannot be combined with lora"):
        load_recipe(TINY, ["ppo.lora={r: 4}", "ppo.train_head=true"])
    assert load_recipe(TINY, ["ppo.lora={r: 4}"]).ppo.trains_head is False
    assert load_recipe(TINY, ["ppo.lora={r: 4}", "ppo.train_head=false"]).ppo.trains_head is False
    assert load_recipe(TINY).ppo.trains_head is True
    assert load_recipe(TINY, ["ppo.train_head=false"]).ppo.trains_head is False
    # YAML's true is 1 to pydantic: `--set ppo.steps=true` trained one step
    with pytest.raises(RecipeError, match="--set ppo.steps=true: ppo.steps: true is not a number"):
        load_recipe(TINY, ["ppo.steps=true"])
    with pytest.raises(RecipeError, match="ppo.max_grad_norm: false is not a number"):
        load_recipe(TINY, ["ppo.max_grad_norm=false"])
    assert load_recipe(TINY, ["ppo.resume_from_checkpoint=true"]).ppo.resume_from_checkpoint is True
    # A key given twice: YAML keeps the last one silently, and a tuned value is lost unseen.
    twice = "name: x\nmodel: {path: m}\nsft:\n  train:\n    lr: 3.0e-3\n    epochs: 1\n    lr: 1.0e-5\n"
    with pytest.raises(RecipeError, match=r"recipe.yaml:7: sft.train.lr: given twice \(first at line 5\)"):
        load_recipe(write(tmp_path, twice))


def test_every_local_path_is_recorded_absolute_resume_from_checkpoint_too(tmp_path, monkeypatch):
    """What runs.db records must work from any directory: a relative resume_from_checkpoint of any stage
    was left relative (the loop fixed only the last stage's, and only when an eval section was there)."""
    from engine.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "3" / "checkpoint-8").mkdir(parents=True)
    recipe = load_recipe(TINY, ["sft.resume_from_checkpoint=runs/3/checkpoint-8",
                                "rm.resume_from_checkpoint=runs/3/checkpoint-8"])
    fixed = with_absolute_paths(recipe)
    for stage in ("sft", "rm"):
        assert fixed.stage(stage).resume_from_checkpoint == str(tmp_path / "runs" / "3" / "checkpoint-8")


def test_a_reward_fn_is_found_without_running_its_module(tmp_path, monkeypatch):
    """Validation (in the console's process too) finds the module where the trainer will import it, the
    current directory included, and runs none of it."""
    import sys

    from engine.config import function_spec_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards_here.py").write_text("raise SystemExit('imported at validation')\n"
                                                 "def score(prompts, responses):\n    return [0.0] * len(prompts)\n"
                                                 "scaled = make_scorer(2.0)\n")
    assert function_spec_problem("my_rewards_here:score") is None
    assert function_spec_problem("my_rewards_here:scaled") is None  # any name the file binds
    assert "my_rewards_here" not in sys.modules and str(tmp_path) not in sys.path
    assert "no module named 'not_here_at_all'" in function_spec_problem("not_here_at_all:score")
    # A name the file never binds is refused before a run registers (the trainer's import failed after).
    assert "my_rewards_here (" in function_spec_problem("my_rewards_here:scroe") and \
        "defines no 'scroe'" in function_spec_problem("my_rewards_here:scroe")
    # Where the source cannot tell, the trainer's import will.
    (tmp_path / "star.py").write_text("from my_rewards_here import *\n")
    (tmp_path / "lazy.py").write_text("def __getattr__(name):\n    return len\n")
    (tmp_path / "made.py").write_text("import sys\nsys.modules[__name__].score = len\n")
    assert function_spec_problem("star:score") is None and function_spec_problem("lazy:anything") is None
    assert function_spec_problem("made:score") is None
    # the trainer imports a local file before an installed module of its name (the standard library's `this`,
    # which nothing imports); so does the check
    (tmp_path / "this.py").write_text("def score(prompts, responses):\n    return [0.0] * len(prompts)\n")
    assert function_spec_problem("this:score") is None
    # What the source shows cannot score, said before a run registers (each failed its run after the model
    # loaded, one only after a whole rollout): a syntax error, a value, a function of other arguments.
    (tmp_path / "bad.py").write_text("notcallable = 3\n\ndef one(responses):\n    return []\n\n"
                                     "def three(prompts, responses, judge):\n    return []\n\n"
                                     "def fine(prompts, responses, weight=1.0, **extra):\n    return []\n\n"
                                     "def spread(*args):\n    return []\n\n"
                                     "if True:\n    guarded = 3\nelse:\n    def guarded(p, r):\n        return []\n")
    bad = tmp_path / "bad.py"
    assert function_spec_problem("bad:notcallable") == f"reward_fn 'bad:notcallable': {bad}:1: notcallable is an " \
        "int, not a function"
    assert function_spec_problem("bad:one").startswith(f"reward_fn 'bad:one': {bad}:3: one(responses) cannot be "
                                                       "called as one(prompts, responses)")
    assert f"{bad}:6: three(prompts, responses, judge) cannot be called" in function_spec_problem("bad:three")
    assert function_spec_problem("bad:fine") is None and function_spec_problem("bad:spread") is None
    assert function_spec_problem("bad:guarded") is None  # bound under an if: the import will tell
    (tmp_path / "unset.py").write_text("score = None\n")
    assert function_spec_problem("unset:score").endswith("unset.py:1: score is None, not a function")
    # A placeholder a set-up function (`global`) or a star import replaces: the source cannot tell.
    (tmp_path / "later.py").write_text("score = None\n\ndef _setup():\n    global score\n    score = len\n\n"
                                       "_setup()\n")
    (tmp_path / "starred.py").write_text("score = None\nfrom my_rewards_here import *\n")
    assert function_spec_problem("later:score") is None and function_spec_problem("starred:score") is None
    (tmp_path / "broken.py").write_text("def score(prompts, responses)\n    return []\n")
    assert function_spec_problem("broken:score") == \
        f"reward_fn 'broken:score': {tmp_path / 'broken.py'}:1: SyntaxError: expected ':'"


def test_a_reward_module_in_the_launch_folder_is_recorded_by_its_path(tmp_path, monkeypatch):
    """A run launched beside its rw_mod.py recorded `rw_mod:score`, and its resume from another folder failed
    ("no module named 'rw_mod'"): the recorded recipe names the file, which loads from anywhere, with the
    files beside it importable as they were."""
    from engine.config import function_spec_problem, import_function, with_absolute_paths

    launched = tmp_path / "launched"
    launched.mkdir()
    (launched / "rw_helpers.py").write_text("BONUS = 2.0\n")
    (launched / "rw_mod.py").write_text("from rw_helpers import BONUS\n\n"
                                        "def score(prompts, responses):\n    return [BONUS] * len(responses)\n")
    monkeypatch.chdir(launched)
    recipe = load_recipe(TINY, ["ppo.reward_fn=rw_mod:score"], "ppo")
    recorded = with_absolute_paths(recipe).ppo.reward_fn
    assert recorded == f"{launched / 'rw_mod.py'}:score"
    assert with_absolute_paths(load_recipe(TINY, [], "ppo")).ppo.reward_fn == "engine.demo.rewards:correct_answer"
    monkeypatch.chdir(tmp_path)  # the resume, elsewhere
    assert function_spec_problem(recorded) is None
    assert import_function(recorded)(["p"], ["r", "s"]) == [2.0, 2.0]
    assert "no such file" in function_spec_problem(f"{tmp_path / 'gone.py'}:score")


def test_a_reward_module_in_the_current_folder_imports_under_the_rlhf_script(tmp_path, monkeypatch):
    """`rlhf train` (a console script: its own folder first on sys.path, not the current one) registered the
    run and then failed "No module named 'rw_here'", which `rlhf check` had found."""
    import sys

    from engine.config import function_spec_problem, import_function

    (tmp_path / "rw_here.py").write_text("def score(prompts, responses):\n    return [1.5] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "rw_here", raising=False)
    assert function_spec_problem("rw_here:score") is None
    assert import_function("rw_here:score")(["p"], ["r"]) == [1.5]


def test_a_stage_field_given_for_the_whole_recipe_names_the_stages_that_have_it():
    """`--set train.lr=…` on a pipeline (no stage to take it relative to): the error says where it goes."""
    with pytest.raises(RecipeError, match=r"train: unknown field here; a stage's: sft.train or rm.train"):
        load_recipe(TINY, ["train.lr=1e-4"])
    # Another stage's setting: said so (it said "check the spelling" of a name spelt right).
    with pytest.raises(RecipeError, match=r"rm.lora: the rm stage has no such setting \(sft and ppo have it\)"):
        load_recipe(TINY, ["rm.lora.r=4"])
    with pytest.raises(RecipeError, match=r"sft.reward_fn: the sft stage has no such setting \(ppo has it\)"):
        load_recipe(TINY, ["sft.reward_fn=x:y"])



def test_a_section_given_as_one_value_says_where_its_fields_go(tmp_path):
    """`--set ppo.model=runs/2/final` got pydantic's 'a valid dictionary or instance of ModelSpec'."""
    with pytest.raises(RecipeError, match="ppo.model: a section, not a value: its fields go below it, e.g. "
                                          "ppo.model.path=runs/2/final"):
        load_recipe(TINY, ["ppo.model=runs/2/final"])


def test_a_warm_up_on_a_constant_schedule_is_refused_where_it_is_set():
    """transformers' constant schedule reads no warm-up: the rate was the peak from the first step."""
    with pytest.raises(RecipeError, match=r"--set ppo.warmup_steps=3 \(.*tiny.yaml:\d+\): ppo: warmup_steps 3 with "
                                          r"lr_scheduler constant.*use constant_with_warmup"):
        load_recipe(TINY, ["ppo.warmup_steps=3"])
    with pytest.raises(RecipeError, match=r"sft.train: warmup_ratio 0.1 with lr_scheduler constant"):
        load_recipe(TINY, ["sft.train.warmup_ratio=0.1"])
    recipe = load_recipe(TINY, ["ppo.warmup_steps=3", "ppo.lr_scheduler=constant_with_warmup",
                                "sft.train.warmup_ratio=0.1", "sft.train.lr_scheduler=constant_with_warmup"])
    assert recipe.ppo.warmup_steps == 3 and recipe.sft.train.warmup_ratio == 0.1


def test_a_kl_target_with_no_coefficient_to_adapt_is_refused():
    with pytest.raises(RecipeError, match=r"init_kl_coef 0 with target_kl 1.0: .*stays 0"):
        load_recipe(TINY, ["ppo.init_kl_coef=0"])
    assert load_recipe(TINY, ["ppo.init_kl_coef=0", "ppo.target_kl=null"]).ppo.init_kl_coef == 0

