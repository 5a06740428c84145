"""The disk a recipe's runs fill: its parts follow the recipe, the whole is checked against the free space
before a run starts. That the figures are the bytes real saves write is checked where the training tests
save (tests/helpers.py assert_disk_estimate: bf16 SFT and RM, LoRA SFT, bf16 and LoRA PPO)."""

from __future__ import annotations

import logging

import pytest

from engine.config import load_recipe
from engine.disk_estimate import StageDisk, disk_lines, estimate_disk, pipeline_peak
from tests.conftest import REPO, TINY

BLOOMZ = REPO / "configs" / "bloomz-7b1-mt.yaml"


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def by_stage(recipe, stages=None) -> dict[str, StageDisk]:
    return {d.stage: d for d in estimate_disk(recipe, stages)}


def test_a_checkpoint_holds_what_trains_and_its_optimizer(no_hub_cache):
    full = by_stage(load_recipe(BLOOMZ))
    lora = by_stage(load_recipe(BLOOMZ, ["sft.lora={r: 8}", "ppo.lora={r: 8}"]))
    # All of bloomz-7b1 trains in SFT: float32 masters and AdamW's two float32 moments, 12 bytes a weight
    sft = full["sft"].checkpoint
    assert sft["AdamW's 2 moments (float32)"] == 2 * sft["weights (trained float32)"] == 8 * 7_069_016_064
    # LoRA's checkpoints hold adapters and their moments, a small share of the full ones; its export merges
    # them into the whole model in the load dtype (bf16 here: half the float32 masters)
    assert lora["sft"].checkpoint_bytes < 0.01 * full["sft"].checkpoint_bytes
    assert abs(lora["sft"].export - full["sft"].export / 2) < 2 ** 20
    assert lora["ppo"].checkpoint_bytes < 0.2 * full["ppo"].checkpoint_bytes
    # The RM trains its top 8 layers: a bf16 frozen bottom, so a checkpoint far under SFT's
    assert full["rm"].checkpoint_bytes < 0.4 * full["sft"].checkpoint_bytes
    assert full["ppo"].kept == 3  # save_total_limit


def test_the_kept_count_follows_the_limit_and_the_saves(workdir):
    few = by_stage(load_recipe(TINY, ["sft.train.max_steps=5", "sft.train.save_steps=2"]), ["sft"])["sft"]
    assert (few.saves, few.kept) == (3, 3)  # steps 2, 4 and the last
    # three saves under a limit of 3: never a fourth beside them, only the export after
    assert few.peak == 3 * few.checkpoint_bytes + few.export
    capped = by_stage(load_recipe(TINY, ["sft.train.max_steps=50", "sft.train.save_steps=2"]), ["sft"])["sft"]
    assert (capped.saves, capped.kept) == (25, 3)
    assert capped.peak == 4 * capped.checkpoint_bytes  # the next one is written before the oldest goes
    unknown = by_stage(load_recipe(TINY, ["sft.train.save_total_limit=null"]), ["sft"])["sft"]
    assert unknown.kept is None and unknown.peak is None and "every save is kept" in unknown.notes[0]
    assert pipeline_peak([few, unknown]) is None


def test_the_pipeline_peak_counts_what_earlier_stages_left():
    def stage(name: str, checkpoint: int, export: int, kept: int) -> StageDisk:
        return StageDisk(name, {"weights": checkpoint}, export, kept, kept + 1)  # more saves than kept

    big_first = [stage("sft", 100, 40, 2), stage("rm", 10, 5, 2)]
    # during SFT: 2 kept + 1 being written; during the RM: SFT's 240 left + 2 kept + 1 being written
    assert pipeline_peak(big_first) == max(300, 240 + 30)
    small_first = [stage("sft", 10, 5, 2), stage("ppo", 100, 40, 3)]
    assert pipeline_peak(small_first) == 25 + 400


def test_the_estimate_says_where_and_whether_it_fits(workdir):
    recipe = load_recipe(TINY, ["ppo.steps=1000000000000", "ppo.save_steps=1", "ppo.save_total_limit=null"])
    lines = disk_lines(estimate_disk(recipe), recipe.output_root)
    assert lines[0].startswith(f"disk: checkpoints and exports in {recipe.output_root} (")
    assert "DOES NOT FIT" in lines[-1] and "1000000000000 saves" in "\n".join(lines)
    lines = disk_lines(estimate_disk(load_recipe(TINY)), recipe.output_root)
    assert lines[-1].endswith(", fits")


def test_a_run_whose_files_would_not_fit_is_warned_at_its_start(workdir, caplog):
    from engine.train import _warn_if_disk_short

    never = ["ppo.steps=1000000000000", "ppo.save_steps=1", "ppo.save_total_limit=null"]
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        _warn_if_disk_short(load_recipe(TINY, never, "ppo"), "ppo", workdir)
    [record] = caplog.records
    assert "ppo's checkpoints and export need up to" in record.message
    assert f"and {workdir} has" in record.message and "lower ppo.save_total_limit" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        _warn_if_disk_short(load_recipe(TINY, [], "ppo"), "ppo", workdir)
        _warn_if_disk_short(load_recipe(TINY, ["sft.train.save_total_limit=null"], "sft"), "sft", workdir)
    assert caplog.records == []  # fits; and a count not known here is not guessed at


def test_a_resumed_runs_checkpoints_on_disk_are_not_asked_for_again(workdir, caplog):
    """The start warning compared the whole peak with the free space, which a resumed run's own checkpoints
    already took: it warned of room the run had."""
    import shutil

    from engine.disk_estimate import estimate_disk
    from engine.train import _warn_if_disk_short

    free = shutil.disk_usage(workdir).free
    one = estimate_disk(load_recipe(TINY, [], "ppo"), ["ppo"])[0].checkpoint_bytes
    steps = (free + 2 ** 41) // one + 1  # every save kept: 2 TiB more than the disk has
    many = [f"ppo.steps={steps}", "ppo.save_steps=1", "ppo.save_total_limit=null"]
    folder = workdir / "runs" / "7"
    folder.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        _warn_if_disk_short(load_recipe(TINY, many, "ppo"), "ppo", folder)
    assert len(caplog.records) == 1
    caplog.clear()
    with open(folder / "optimizer.pt", "wb") as fh:  # 4 TiB of holes: what the run wrote before its stop
        fh.truncate(2 ** 42)
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        _warn_if_disk_short(load_recipe(TINY, many, "ppo"), "ppo", folder)
    assert caplog.records == []


def test_a_save_that_leaves_less_free_than_it_took_warns_of_the_next(tmp_path):
    from engine.disk_estimate import after_save

    checkpoint = tmp_path / "checkpoint-50"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"x" * 1000)
    assert after_save(checkpoint, 50, 50, "ppo.save_total_limit") is None
    with open(checkpoint / "optimizer.pt", "wb") as fh:  # 8 TiB of holes: larger than any disk here, on none
        fh.truncate(2 ** 43)
    line = after_save(checkpoint, 50, 50, "ppo.save_total_limit")
    assert line is not None and f"{tmp_path} has" in line and "checkpoint-50 took 8192.00 GiB" in line
    assert "the next save (step 100) will not fit" in line
    assert after_save(checkpoint, 50, 50, "ppo.save_total_limit", last=True) is None  # the export is smaller

