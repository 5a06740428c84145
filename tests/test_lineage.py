"""Where exports come from, and PPO's check that its value branch starts on features it knows."""

import json
import logging
from pathlib import Path

import pytest

from engine.config import RecipeError
from engine.lineage import LINEAGE_FILE, check_value_init, read_lineage, write_lineage
from engine.train import run_stage, validate
from tests.conftest import TINY
from tests.helpers import run_row


def test_exports_record_their_start_and_ppo_checks_the_reward_models(workdir, caplog):
    sft, _ = run_stage("sft", str(TINY), ["train.max_steps=2", "train.eval_ratio=0"])
    sft_final = Path(run_row(sft)["output_dir"]) / "final"
    base = str((workdir / "demo" / "model").resolve())
    assert read_lineage(str(sft_final)) == {"stage": "sft", "run_id": sft, "start": base, "base": base}

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
