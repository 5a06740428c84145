import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import RecipeError, load_recipe
from engine.models import load_tokenizer
from engine.sft import build_datasets
from engine.store import Store
from engine.template import Turn, render_prompt
from engine.train import run_stage
from tests.conftest import TINY
from tests.helpers import assert_disk_estimate, metric, run_row


def test_only_assistant_tokens_carry_labels(workdir):
    """The dataset the trainer actually trains on: labels are the ids on answers and -100 elsewhere."""
    from trl import SFTConfig, SFTTrainer

    recipe = load_recipe(TINY)
    tokenizer = load_tokenizer(recipe.model)
    dataset, _, _ = build_datasets(tokenizer, recipe.sft, seed=0)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path)
    args = SFTConfig(output_dir=str(workdir / "o"), report_to="none", max_length=192, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    checked = 0
    by_ids = {tuple(r["input_ids"]): r["assistant_masks"] for r in dataset}
    for row in trainer.train_dataset:
        mask = by_ids[tuple(row["input_ids"])]
        expected = [t if m else -100 for t, m in zip(row["input_ids"], mask)]
        assert row["labels"] == expected
        text = tokenizer.decode([t for t in row["labels"] if t != -100])
        assert text.startswith(" ") and text.endswith("</s>")  # answers only, each closed by </s>
        assert "USER:" not in text and "ASSISTANT:" not in text and "A chat between" not in text
        checked += 1
    assert checked == len(dataset) > 90


def test_sft_loss_falls_and_the_export_reloads_and_generates(workdir):
    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=24", "train.logging_steps=1", "train.save_steps=12"])
    run = run_row(run_id)
    assert run["status"] == "done" and run["step"] == 24 and run["total_steps"] == 24
    losses = [v for _, v in metric(run_id, "loss")]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert [s for s, _ in metric(run_id, "mean_token_accuracy")] == list(range(1, 25))
    assert not metric(run_id, "train_runtime") and not metric(run_id, "train_loss")  # the summary: train.log's
    assert "'train_runtime'" in (Path(run["output_dir"]) / "train.log").read_text(encoding="utf-8")
    from console.metric_meanings import meaning
    from engine.store import Store

    with Store(os.environ["RLHF_DB"]) as store:  # the help screen says what each logged curve means
        logged = {row["name"] for row in store.metrics_since(0, run_id)}
    assert [name for name in logged if meaning(name) is None] == []

    final = Path(run["output_dir"]) / "final"
    assert (final / "model.safetensors").is_file() and (workdir / "runs" / str(run_id) / "checkpoint-12").is_dir()
    card = (final.parent / "README.md").read_text(encoding="utf-8")  # the run's own card, not trl's Hub card
    assert f"run {run_id}: sft" in card and str((workdir / "demo" / "model").resolve()) in card and "None" not in card
    assert f"`rlhf train sft --resume-run {run_id} --db {Path(os.environ['RLHF_DB']).resolve()}`" in card
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.use_cache  # as the base model's: the Trainer's training setting stayed out of it
    # Its chat template is the one it trained on: a server reading it renders the recipe's prompt; so does
    # a checkpoint's, which is a model folder too
    question = [{"role": "user", "content": "What is 2 plus 3?"}]
    for folder in (final.parent / "checkpoint-12", final):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True) == \
            render_prompt([Turn("user", "What is 2 plus 3?")]), folder
    prompt = tok(render_prompt([Turn("user", "What is 2 plus 3?")]), return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    trained = load_file(final / "model.safetensors")
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_a_resume_that_changes_the_rate_and_the_decay_trains_with_them(workdir):
    """The optimizer's and scheduler's saved state carried the old rate and decay over an `--allow-change`
    resume's (the record said changed, every step ran at the old rate)."""
    start = ["train.max_steps=2", "train.save_steps=2", "train.logging_steps=1", "train.lr=1e-3",
             "train.lr_scheduler=constant"]
    run_id, _ = run_stage("sft", str(TINY), start)
    os.environ["RLHF_RUN_ID"] = str(run_id)
    try:
        run_stage("sft", str(TINY), [*start, "train.max_steps=4", "train.lr=1e-5", "train.weight_decay=0.25",
                                     "resume_from_checkpoint=true"])
    finally:
        del os.environ["RLHF_RUN_ID"]
    assert [v for _, v in metric(run_id, "learning_rate")] == [1e-3, 1e-3, 1e-5, 1e-5]
    saved = torch.load(Path(run_row(run_id)["output_dir"]) / "checkpoint-4" / "optimizer.pt", weights_only=False)
    # group 0 decays; group 1 (biases and norms) never does
    assert [(g["lr"], g["weight_decay"]) for g in saved["param_groups"]] == [(1e-5, 0.25), (1e-5, 0.0)]


def test_frozen_bottom_layers_do_not_change(workdir):
    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=3", "num_layers_unfrozen=1"])
    trained = load_file(Path(run_row(run_id)["output_dir"]) / "final" / "model.safetensors")
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    for name, value in base.items():
        top = name.startswith("transformer.h.3.") or name.startswith("transformer.ln_f")
        assert torch.equal(trained[name], value) != top, name


def test_lora_exports_a_plain_merged_model(workdir):
    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=3", "lora={r: 4, alpha: 8}", "train.lr=0.05"])
    final = Path(run_row(run_id)["output_dir"]) / "final"
    assert not (final / "adapter_config.json").exists()
    trained = load_file(final / "model.safetensors")
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    assert set(trained) == set(base)  # no lora_A/lora_B left: adapters are merged
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert changed and all(".h." in k for k in changed)
    AutoModelForCausalLM.from_pretrained(final)
    assert_disk_estimate("sft", ["train.max_steps=3", "lora={r: 4, alpha: 8}", "train.lr=0.05"],
                         final.parent / "checkpoint-3", final)
    # Its checkpoints' adapters name their base model absolutely: `demo/model` loaded from no other directory.
    adapters = list(Path(run_row(run_id)["output_dir"]).glob("checkpoint-*/adapter_config.json"))
    base_model = str((workdir / "demo" / "model").resolve())
    assert adapters and all(json.loads(a.read_text())["base_model_name_or_path"] == base_model
                            for a in adapters), [a.read_text() for a in adapters]


def test_packing_fills_each_sequence(workdir):
    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=3", "packing=true", "train.max_length=256",
                                          "train.logging_steps=1", "train.eval_ratio=0"])
    assert run_row(run_id)["status"] == "done"
    # 16 rows of 256 tokens per step; unpacked, the demo's conversations average well under 100 tokens.
    assert metric(run_id, "num_tokens")[0][1] >= 0.9 * 16 * 256
    losses = [v for _, v in metric(run_id, "loss")]
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_trains(workdir):
    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=2", "train.gradient_checkpointing=true",
                                          "train.eval_ratio=0"])
    assert run_row(run_id)["status"] == "done" and len(metric(run_id, "loss")) == 2


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_resume_after_a_hard_kill_redoes_the_lost_steps_once(workdir):
    """Steps logged after the newest checkpoint (a SIGKILL, an OOM) are redone on resume, not doubled."""
    import os

    from engine.store import Store

    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=4", "train.logging_steps=1", "train.save_steps=3"])
    # As if killed after logging step 4 but before its checkpoint landed.
    shutil.rmtree(workdir / "runs" / str(run_id) / "checkpoint-4")
    os.environ["RLHF_RUN_ID"] = str(run_id)
    heard, ours = _Records(), _Records()
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addHandler(heard)
    logging.getLogger("engine.run").addHandler(ours)
    level = logging.getLogger("engine.run").level
    logging.getLogger("engine.run").setLevel(logging.INFO)
    try:
        again, status = run_stage("sft", str(TINY), ["train.max_steps=6", "train.logging_steps=1",
                                                     "train.save_steps=3", "resume_from_checkpoint=true"])
    finally:
        del os.environ["RLHF_RUN_ID"]
        trainer_log.removeHandler(heard)
        logging.getLogger("engine.run").removeHandler(ours)
        logging.getLogger("engine.run").setLevel(level)
    assert (again, status) == (run_id, "done")
    # Which checkpoint it took is said, as PPO says it.
    assert f"resumed from {workdir / 'runs' / str(run_id) / 'checkpoint-3'} at step 3" in ours.messages, ours.messages
    # The checkpoint holds the tied head once: the resume ties it again, without a warning of lost weights.
    assert not [m for m in heard.messages if "missing keys" in m], heard.messages
    assert [s for s, _ in metric(run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    with Store(os.environ["RLHF_DB"]) as store:
        rows = store.metrics_since(0, run_id=run_id)
        saved = store.checkpoints(run_id)
    assert sorted(r["run_seq"] for r in rows) == list(range(1, len(rows) + 1))
    # The step-4 rows (its checkpoint and its export) described the lost steps: gone with them; every path
    # is absolute, so a resume from another directory keeps them (it prunes rows whose folder is gone).
    assert 4 not in [c["step"] for c in saved] and {c["step"] for c in saved} == {3, 6}
    assert all(Path(c["path"]).is_absolute() and Path(c["path"]).exists() for c in saved), saved
    assert run_row(run_id)["status"] == "done" and run_row(run_id)["step"] == 6


def test_a_bad_resume_path_fails_the_run(workdir):
    with pytest.raises(RecipeError, match="not a checkpoint folder"):
        run_stage("sft", str(TINY), ["resume_from_checkpoint=nowhere"])
    assert run_row(1)["status"] == "failed" and "not a checkpoint folder" in run_row(1)["error"]


def test_a_damaged_newest_checkpoint_is_passed_over_and_an_older_one_can_be_named(workdir, capsys):
    """A power loss can leave a checkpoint with its marker written and a weight file short. The resume
    continues from the newest whole checkpoint, and a checkpoint named with --set is taken as given: it is
    where to continue from, not a change to the run."""
    import os

    from engine.cli import main
    from engine.run import damage, resume_recipe

    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=6", "train.logging_steps=1", "train.save_steps=3"])
    folder = workdir / "runs" / str(run_id)
    older, newest = folder / "checkpoint-3", folder / "checkpoint-6"
    assert damage(older) is None and damage(newest) is None
    weights = newest / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert "model.safetensors holds" in damage(newest)
    cut = workdir / "cut"
    shutil.copytree(older, cut)
    with (cut / "optimizer.pt").open("r+b") as f:
        f.truncate(1000)
    assert "optimizer.pt" in damage(cut)

    db = os.environ["RLHF_DB"]
    with pytest.raises(RecipeError, match=r"checkpoint-6 is damaged: model.safetensors holds [\d,]+ bytes"):
        resume_recipe(db, run_id, "sft", [f"sft.resume_from_checkpoint={newest}", "train.max_steps=8"], True)
    _, overrides, change = resume_recipe(db, run_id, "sft", [f"resume_from_checkpoint={older}", "train.max_steps=8"],
                                         allow_change=True)
    assert overrides[-1] == f'sft.resume_from_checkpoint="{older}"'
    assert "resume_from_checkpoint" not in change["overrides"]
    assert json.loads(change["config"])["sft"]["resume_from_checkpoint"] is None

    elsewhere = workdir / "elsewhere" / "checkpoint-3"
    shutil.copytree(older, elsewhere)
    with pytest.raises(RecipeError, match=r"resumes only from the checkpoints in its own folder"):
        resume_recipe(db, run_id, "sft", [f"resume_from_checkpoint={elsewhere}", "train.max_steps=8"], True)
    with Store(db) as store:  # as if it had failed at its end: what is left to train is judged from step 3
        store.update_run(run_id, status="failed")
    resume_recipe(db, run_id, "sft", [], allow_change=False)  # not "nothing is left": checkpoint-6 is damaged
    with Store(db) as store:
        store.update_run(run_id, status="done")

    assert main(["train", "sft", "--resume-run", str(run_id), "--set", "train.max_steps=8", "--allow-change"]) == 0
    said = capsys.readouterr().err
    assert said.count("checkpoint-6 is damaged (model.safetensors holds") == 1
    assert "set aside as abandoned-checkpoint-6" in said
    assert [s for s, _ in metric(run_id, "loss")] == [1, 2, 3, 4, 5, 6, 7, 8]  # 4-6 redone from step 3, once
    assert run_row(run_id)["status"] == "done" and run_row(run_id)["step"] == 8
    assert damage(folder / "abandoned-checkpoint-6") is not None and damage(folder / "checkpoint-6") is None


def test_a_resume_sets_aside_the_checkpoints_past_its_own_so_that_the_next_resume_continues_this_stretch(workdir):
    """Resumed from checkpoint-4 with a newer checkpoint-6 and a save cut short at checkpoint-10 in the
    folder, the run stops at step 5. Left in place, checkpoint-6 (of the stretch given up) is what the next
    resume picks, the newest by number: it would skip step 6 of this stretch and train on weights it
    abandoned. They are renamed aside instead, kept whole, and the next resume continues from step 5."""
    import os

    from engine.cli import main
    from engine.run import checkpoints_in

    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=6", "train.logging_steps=1", "train.save_steps=2"])
    folder = workdir / "runs" / str(run_id)
    cut = folder / "checkpoint-10"
    cut.mkdir()
    (cut / "config.json").write_text("{}")  # the save died before its weights and its trainer_state.json
    with Store(os.environ["RLHF_DB"]) as store:
        store.update_run(run_id, status="stopped")  # stopped after step 6, say, to go on from step 4

    assert main(["train", "sft", "--resume-run", str(run_id), "--set", f"resume_from_checkpoint={folder}/checkpoint-4",
                 "--set", "train.max_steps=5", "--set", "train.save_steps=1", "--allow-change"]) == 0
    assert sorted(p.name for p in folder.glob("abandoned-*")) == ["abandoned-checkpoint-10", "abandoned-checkpoint-6"]
    assert (folder / "abandoned-checkpoint-6" / "trainer_state.json").is_file()  # kept whole: nothing deleted
    assert checkpoints_in(folder, "trainer_state.json")[-1].name == "checkpoint-5"

    assert main(["train", "sft", "--resume-run", str(run_id), "--set", "train.max_steps=7", "--allow-change"]) == 0
    assert [s for s, _ in metric(run_id, "loss")] == [1, 2, 3, 4, 5, 6, 7]  # 5 trained once, then 6 and 7 from it


def test_a_resume_saves_logs_and_evaluates_at_the_intervals_it_was_given(workdir):
    """`--allow-change --set train.save_steps=1` on a resume was recorded and ignored: the trainer took its
    intervals from the checkpoint's trainer_state.json, and the run saved no checkpoint where it was told."""
    from engine.cli import main

    run_id, _ = run_stage("sft", str(TINY), ["train.max_steps=2", "train.logging_steps=2", "train.save_steps=2"])
    folder = workdir / "runs" / str(run_id)
    assert main(["train", "sft", "--resume-run", str(run_id), "--set", "train.max_steps=5", "--set",
                 "train.save_steps=1", "--set", "train.logging_steps=1", "--allow-change"]) == 0
    assert sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) == [3, 4, 5]  # the newest 3 kept
    assert [s for s, _ in metric(run_id, "loss")][-3:] == [3, 4, 5]
