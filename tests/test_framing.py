"""A checkpoint or model folder is judged whole from its files' framing, before anything loads them."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.framing import missing_shards, safetensors_damage, torch_file_damage
from engine.run import damage


def test_a_safetensors_file_is_whole_only_at_the_exact_length_its_header_names(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(8, 8)}, str(path))
    assert safetensors_damage(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole + b"\0")  # longer than its header says: the loader refuses it too
    with pytest.raises(Exception, match="incomplete metadata"):
        load_file(str(path))
    assert "holds 329 bytes, its header says 328" in safetensors_damage(path)
    path.write_bytes(whole[:100])
    assert "holds 100 bytes" in safetensors_damage(path) or "no complete header" in safetensors_damage(path)
    path.write_bytes(b"\xff" * 4)
    assert "no readable header" in safetensors_damage(path)


def test_a_torch_file_is_whole_only_with_its_directory_and_every_entry_inside_it(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": torch.arange(1000)}, path)
    assert torch_file_damage(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-30])  # the end of its directory gone
    assert "not a whole torch file" in torch_file_damage(path)
    path.write_bytes(whole)
    os.chmod(path, 0)
    if not os.access(path, os.R_OK):  # root reads anything
        assert "cannot be read (Permission denied)" in torch_file_damage(path)


def test_a_checkpoint_missing_its_weights_or_a_shard_or_a_state_file_is_damaged(tmp_path):
    sft = tmp_path / "checkpoint-4"
    sft.mkdir()
    (sft / "trainer_state.json").write_text("{}")
    assert damage(sft) == "its weights is missing"
    save_file({"w": torch.ones(2)}, str(sft / "model-00001-of-00002.safetensors"))
    (sft / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert damage(sft) == "model.safetensors.index.json names model-00002-of-00002.safetensors, which is not there"
    assert missing_shards(sft / "model.safetensors.index.json") == damage(sft)
    save_file({"w": torch.ones(2)}, str(sft / "model-00002-of-00002.safetensors"))
    assert damage(sft) is None
    lora = tmp_path / "checkpoint-5"
    lora.mkdir()
    (lora / "trainer_state.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(lora / "adapter_model.safetensors"))
    assert damage(lora) is None  # a LoRA run's checkpoint holds its adapter only
    zero3 = tmp_path / "checkpoint-7"
    (zero3 / "global_step7").mkdir(parents=True)
    (zero3 / "trainer_state.json").write_text("{}")
    assert damage(zero3) is None  # DeepSpeed ZeRO-3 without a gathered copy: its weights in global_step7/
    assert damage(tmp_path / "checkpoint-9") == "it is not there (moved aside meanwhile?)"

    ppo = tmp_path / "checkpoint-6"
    (ppo / "policy").mkdir(parents=True)
    (ppo / "ppo_state.json").write_text("{}")
    for name in ("branches.pt", "optimizer.pt"):
        torch.save({}, ppo / name)
    assert damage(ppo) == "rank_0.pt is missing"
    torch.save({}, ppo / "rank_0.pt")
    assert damage(ppo) == "policy's weights is missing"
    save_file({"w": torch.ones(2)}, str(ppo / "policy" / "model.safetensors"))
    assert damage(ppo) is None
    size = (ppo / "policy" / "model.safetensors").stat().st_size
    with (ppo / "policy" / "model.safetensors").open("r+b") as f:
        f.truncate(size - 4)
    assert f"model.safetensors holds {size - 4:,} bytes" in damage(ppo)  # its policy folder is read too
