"""Where exports come from, and PPO's check that its value branch starts on features it knows."""

import json
import logging
from pathlib import Path

import pytest

from engine.config import RecipeError, load_recipe
from engine.lineage import LINEAGE_FILE, check_value_init, read_lineage, write_lineage
from engine.train import run_stage, validate
from tests.conftest import TINY
from tests.helpers import run_row


def test_exports_record_their_start_and_ppo_checks_the_reward_models(workdir, caplog):
    sft, _ = run_stage("sft", str(TINY), ["train.max_steps=2", "train.eval_ratio=0", "train.save_steps=1"])
    sft_final = Path(run_row(sft)["output_dir"]) / "final"
    base = str((workdir / "demo" / "model").resolve())
    lineage = read_lineage(str(sft_final))
    assert isinstance(lineage.pop("written"), float)  # when: what an evaluation of the folder records
    assert lineage == {"stage": "sft", "run_id": sft, "start": base, "base": base}
    # A checkpoint is a model too (a policy, a start): it carries the same lineage as the export.
    checkpoint = Path(run_row(sft)["output_dir"]) / "checkpoint-1"
    assert {**read_lineage(str(checkpoint)), "written": 0} == {**read_lineage(str(sft_final)), "written": 0}

    rm_from_base, _ = run_stage("rm", str(TINY), ["train.max_steps=2", "train.eval_ratio=0"])
    rm_from_sft, _ = run_stage("rm", str(TINY), ["train.max_steps=2", "train.eval_ratio=0",
                                                 f"rm.model={{path: {sft_final}}}"])
    exports = {r: str(Path(run_row(r)["output_dir"]) / "final") for r in (rm_from_base, rm_from_sft)}
    assert read_lineage(exports[rm_from_sft])["base"] == base  # the root model, through the SFT export

    ppo = [f"ppo.model={{path: {sft_final}}}", "reward_fn=null", "init_value_from_rm=true"]
    with caplog.at_level(logging.WARNING):
        validate("ppo", str(TINY), [*ppo, f"reward_model={exports[rm_from_sft]}"])
    assert not [r for r in caplog.records if "init_value_from_rm" in r.getMessage()]  # consistent: silent
    with caplog.at_level(logging.WARNING):
        validate("ppo", str(TINY), [*ppo, f"reward_model={exports[rm_from_base]}"])
    assert any("features they never saw" in r.getMessage() and "rm.model.path" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the SFT run's checkpoint as the policy: checked as its export
        validate("ppo", str(TINY), [f"ppo.model={{path: {checkpoint}}}", "reward_fn=null", "init_value_from_rm=true",
                                    f"reward_model={exports[rm_from_base]}"])
    assert any("features they never saw" in r.getMessage() for r in caplog.records)

    ppo_run, _ = run_stage("ppo", str(TINY), ["steps=1", "rollout_batch_size=4", "minibatch_size=4", "max_new_tokens=4",
                                               "save_steps=1"])
    folder = Path(run_row(ppo_run)["output_dir"])
    final, policy = read_lineage(str(folder / "final")), read_lineage(str(folder / "checkpoint-1" / "policy"))
    assert {**final, "written": 0} == {**policy, "written": 0}  # the same lineage, written at each save
    assert final["stage"] == "ppo" and final["run_id"] == ppo_run
    assert final["reward_fn"] == load_recipe(TINY).ppo.reward_fn  # what it was rewarded by


def test_a_reward_model_of_another_base_is_refused(tmp_path):
    policy, rm = tmp_path / "policy", tmp_path / "rm"
    policy.mkdir()
    rm.mkdir()
    write_lineage(policy, "sft", 1, "bigscience/bloomz-7b1-mt")
    write_lineage(rm, "rm", 2, "meta-llama/Llama-2-7b-hf")
    with pytest.raises(RecipeError, match=r"recipe.yaml:9: init_value_from_rm: .*different models"):
        check_value_init(str(policy), str(rm), "recipe.yaml:9")
    (rm / LINEAGE_FILE).unlink()
    assert "cannot check" in check_value_init(str(policy), str(rm), "recipe.yaml:9")
    assert json.loads((policy / LINEAGE_FILE).read_text())["base"] == "bigscience/bloomz-7b1-mt"
