"""`rlhf check --estimate`: the memory model against real objects (CPU) and measured GPU peaks.

(a) On the tiny demo model: parameter, gradient and optimizer-state items equal the byte counts of the objects
    the trainers build, and a layer's activations equal what autograd saves (float32, counted by hooks).
(b) On an H200: the peaks benchmarks/ppo_bench.py and benchmarks/ppo_iteration.py measured, within 15 %, from
    the same item-by-item model (only what each harness holds differently is described, nothing fitted).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import LoraSpec, ModelSpec, load_recipe
from engine.estimate import (
    GIB,
    EstimateError,
    Parallel,
    PPOSetup,
    Shape,
    bloom_prefill_bytes,
    estimate_recipe,
    estimate_setup,
    load_shape,
    parallel_from_config,
    parse_size,
    ppo_estimate,
    shape_from_config,
    stage_setup,
)
from tests.conftest import REPO, RLHF, TINY

BLOOMZ = REPO / "configs" / "bloomz-7b1-mt.yaml"
ACCEL = REPO / "configs" / "accelerate"


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache: the laptop with no model downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def items(estimate) -> dict[str, int]:
    return {item.key: item.bytes for item in estimate.items}


# -- parameter counts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_bloom_parameter_count_is_the_real_models(tied):
    from transformers import BloomConfig, BloomForCausalLM, BloomForSequenceClassification

    config = BloomConfig(vocab_size=1000, hidden_size=96, n_layer=3, n_head=4, tie_word_embeddings=tied)
    shape = shape_from_config(config.to_dict(), "tiny", "test")
    assert shape.arch == "bloom" and shape.tied is tied
    model = BloomForCausalLM(config)
    assert shape.total("lm") == sum(p.numel() for p in model.parameters())
    assert shape.layer == sum(p.numel() for p in model.transformer.h[0].parameters())
    classifier = BloomForSequenceClassification(BloomConfig(**{**config.to_dict(), "num_labels": 1}))
    assert shape.total("score") == sum(p.numel() for p in classifier.parameters())


def test_bloom_config_keys_of_the_hub_and_the_built_in_table_agree():
    # The hub's bloom configs name the width n_embed; the table has bloomz-7b1-mt's public values.
    shape = shape_from_config({"model_type": "bloom", "n_embed": 4096, "n_layer": 30, "num_attention_heads": 32,
                               "vocab_size": 250880}, "bloomz", "test")
    table = load_shape("bigscience/bloomz-7b1-mt", "model.path")
    assert (shape.hidden, shape.layers, shape.heads, shape.vocab) == (4096, 30, 32, 250880)
    assert shape.total() == table.total() == 7_069_016_064  # bloomz-7b1's 7.07 B


@pytest.mark.parametrize("tied", [True, False])
def test_llama_style_parameter_count_is_the_real_models(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    shape = shape_from_config(config.to_dict(), "llama", "test")
    assert shape.arch == "llama" and shape.kv_heads == 2
    assert shape.total() == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


# -- (a) the tiny model on CPU: weights, gradients and optimizer state are the real objects' -------------------

def _step(model, trainable, autocast: bool, **kwargs):
    """One AdamW step on a made-up loss, as the trainers' optimizers take it."""
    import torch

    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(4, 1000, (2, 12))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        out = model(ids, torch.ones_like(ids), **kwargs) if kwargs else model(input_ids=ids)
    loss = out.logits.float().mean() + (out.values.float().mean() if kwargs.get("with_values") else 0)
    loss.backward()
    optimizer.step()
    return optimizer


def _real_bytes(model, optimizer) -> dict[str, int]:
    import torch

    unique = {id(p): p for p in model.parameters()}
    trainable = [p for p in unique.values() if p.requires_grad]
    # AdamW's state per tensor: exp_avg and exp_avg_sq, and a 0-dim step counter (not per weight, not counted).
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "trainable": sum(p.numel() * p.element_size() for p in trainable),
        "frozen": sum(p.numel() * p.element_size() for p in unique.values() if not p.requires_grad),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head", ["train_head", "frozen_head", "lora"])
def test_ppo_items_are_the_hydras_bytes(workdir, dtype, head):
    from engine.models import load_causal_lm, lora_config
    from engine.ppo.hydra import Hydra

    head_set = {"train_head": "ppo.train_head=true", "frozen_head": "ppo.train_head=false", "lora": "ppo.lora={r: 4}"}
    sets = [f"model.dtype={dtype}", head_set[head]]
    recipe = load_recipe(TINY, sets)
    setup = stage_setup(recipe, "ppo", Parallel(cpu=True), cuda=False)
    estimate = items(estimate_setup(setup))
    stage = recipe.stage("ppo")
    # As engine/ppo/trainer.py builds it.
    hydra = Hydra(load_causal_lm(recipe.stage_model("ppo")), stage.num_layers_unfrozen, stage.value_layers,
                  stage.trains_head, lora_config(stage.lora) if stage.lora is not None else None)
    trainable = [p for p in hydra.parameters() if p.requires_grad]
    real = _real_bytes(hydra, _step(hydra, trainable, dtype == "bfloat16", with_values=True, logits_to_keep=5))
    assert real["trainable"] == estimate["params_policy"] + estimate["params_value"]
    assert real["frozen"] == estimate["params_frozen"] + estimate.get("reference", 0)
    assert real["grads"] == estimate["grads"]
    assert real["optimizer"] == estimate["optimizer"]
    # The decoder's own copies in bf16 (the trainable top layers', LoRA's adapters; of a float32 model
    # sampled under bf16 autocast, every layer's)
    if dtype == "float32":
        estimate = items(estimate_setup(stage_setup(load_recipe(TINY, [*sets, "ppo.precision=bf16"]), "ppo",
                                                    Parallel(cpu=True), cuda=False)))
    import torch

    from engine.bloom_decoder import BloomDecoder

    decoder = BloomDecoder(hydra.policy, torch.bfloat16)
    shared = {p.data_ptr() for p in hydra.parameters()}
    tensors = [t for layer in decoder.layers for lin in (layer.qkv, layer.dense, layer.up, layer.down)
               for t in (lin[0], lin[1], *[x for adapter in lin[2] for x in adapter[:2]]) if t is not None]
    copied = sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in shared)
    assert copied == estimate["decoder_copies"]


@pytest.mark.parametrize("dtype, unfrozen, lora", [
    ("float32", -1, False), ("bfloat16", -1, False), ("bfloat16", 2, False), ("bfloat16", -1, True),
])
def test_sft_items_are_the_models_bytes(workdir, dtype, unfrozen, lora):
    from peft import get_peft_model

    from engine.models import freeze_bottom_layers, keep_fp32_masters, load_causal_lm, lora_config

    sets = [f"model.dtype={dtype}", f"sft.num_layers_unfrozen={unfrozen}"] + (["sft.lora={r: 4}"] if lora else [])
    recipe = load_recipe(TINY, sets)
    estimate = items(estimate_setup(stage_setup(recipe, "sft", Parallel(cpu=True), cuda=False)))
    # As engine/sft.py prepares it (and trl wraps it in peft for LoRA).
    stage = recipe.stage("sft")
    model = load_causal_lm(recipe.stage_model("sft"))
    freeze_bottom_layers(model, stage.num_layers_unfrozen)
    if lora:
        model = get_peft_model(model, lora_config(stage.lora))
    else:
        keep_fp32_masters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    real = _real_bytes(model, _step(model, trainable, dtype == "bfloat16"))
    assert real["trainable"] == estimate["params_trainable"]
    assert real["frozen"] == estimate.get("params_frozen", 0)
    assert real["grads"] == estimate["grads"] and real["optimizer"] == estimate["optimizer"]


@pytest.mark.parametrize("unfrozen", [-1, 2])
def test_reward_model_items_are_the_models_bytes(workdir, unfrozen):
    from engine.models import freeze_bottom_layers, keep_fp32_masters, load_reward_trunk

    recipe = load_recipe(TINY, ["model.dtype=bfloat16", f"rm.num_layers_unfrozen={unfrozen}"])
    estimate = items(estimate_setup(stage_setup(recipe, "rm", Parallel(cpu=True), cuda=False)))
    model = load_reward_trunk(recipe.stage_model("rm"), pad_token_id=3)  # as engine/reward.py
    freeze_bottom_layers(model, unfrozen)
    keep_fp32_masters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    real = _real_bytes(model, _step(model, trainable, True))
    assert real["trainable"] == estimate["params_trainable"] and real["frozen"] == estimate.get("params_frozen", 0)
    assert real["grads"] == estimate["grads"] and real["optimizer"] == estimate["optimizer"]


def test_a_trainable_layers_activations_are_what_autograd_saves(workdir):
    """Float32 on CPU, counted by saved-tensor hooks (weights aside): exactly the per-token and per-sequence
    bytes of the model. (Under CUDA autocast the layer norms run in float32, which CPU autocast does not do;
    that mode is checked by the GPU peaks below.)"""
    import torch

    from engine.models import decoder_layers, freeze_bottom_layers, load_causal_lm

    shape = load_shape("demo/model", "model.path")
    model = load_causal_lm(ModelSpec(path="demo/model", dtype="float32"))
    freeze_bottom_layers(model, 2)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    saved: dict[int, dict[int, int]] = {}
    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda module, args, i=index: current.__setitem__(0, i))
        layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, None))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in weights:
            saved.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, length = 3, 40
    ids = torch.randint(4, 1000, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)  # as trl and the hydra
    own = batch * length * shape.saved_per_token("fp32") + batch * shape.saved_per_sequence("fp32", length)
    shared = batch * shape.shared_per_sequence("fp32", length)
    assert sorted(saved) == [2, 3]  # the frozen bottom layers keep nothing
    assert [sum(saved[i].values()) for i in (2, 3)] == [own + shared, own + shared]
    # The attention bias is one tensor, made by the first layer, kept by both: counted once.
    (common,) = set(saved[2]) & set(saved[3])
    assert shared > 0 and saved[2][common] == shared


def test_activations_grow_with_batch_and_length_and_checkpointing_lowers_them(workdir):
    recipe = load_recipe(TINY)
    base = stage_setup(recipe, "sft", Parallel())
    act = lambda setup: items(estimate_setup(setup))["activations"]  # noqa: E731
    assert act(replace(base, sequences=8)) < act(replace(base, sequences=16)) < act(replace(base, sequences=32))
    assert act(replace(base, length=64)) < act(replace(base, length=128)) < act(replace(base, length=256))
    assert act(replace(base, checkpointing=True)) < act(base)
    assert act(replace(base, unfrozen=1)) < act(replace(base, unfrozen=3)) < act(base)


# -- (b) peaks measured on an H200 -------------------------------------------------------------------------

def bench_setup(shape_name: str, setup: str, head: str = "fp32", before_d1de133_fixes: bool = False) -> PPOSetup:
    """What benchmarks/ppo_bench.py runs for (shape, set-up) on CUDA, read from its _build and ppo_step: bf16
    frozen parts and a bf16 reward model of the same shape, float32 trainable branches under bf16 autocast,
    k = k_v = 2 (its defaults), the head trained in "hydra" and frozen in "hydra-frozen-head"; the whole batch
    scored in one forward, no rollout decoding and no trunk cache (every update runs the whole model); torch's
    default AdamW (foreach: a float32 temporary per weight at the step); log-probs taken inside its autocast
    region; and its loop keeps the scoring forward's `out` alive into the first update's forward and the last
    minibatch's logits through the optimizer step."""
    from benchmarks.ppo_bench import SHAPES

    hidden, layers, heads, vocab, batch, prompt, response, minibatch = SHAPES[shape_name]
    # Measured with transformers' eager BLOOM attention (ppo_bench builds its models from configs).
    shape = Shape(name=shape_name, arch="bloom", hidden=hidden, layers=layers, heads=heads, vocab=vocab,
                  fused=False)
    return PPOSetup(shape=shape, load_bytes=2, compute="bf16", k=2, k_v=2, train_head=setup == "hydra",
                    reward=shape, reward_bytes=2, rollout=batch, minibatch=minibatch, score_batch=batch,
                    prompt=prompt, response=response, generate=False, trunk_cache=False, optimizer="foreach",
                    head=head, held_outputs=True, logprobs_in_autocast=True,
                    split_out_of_place=before_d1de133_fixes, before_fused_head=True)


# benchmarks/results_h200.md, first table: peak memory of one PPO step, NVIDIA H200, measured 2026-11-26 at
# commit ac407c8, when the LM heads still ran under autocast (bf16 logits, log-probs through a float32
# log_softmax); the float32 heads came with 176c622. Rerun with those heads put back on the same card
# (2026-11-27) the benchmark gave these four figures again to the hundredth.
RESULTS_H200_GIB = {
    ("bloom-560m", "hydra"): 13.05,
    ("bloom-560m", "hydra-frozen-head"): 8.74,
    ("bloomz-7b1-mt", "hydra"): 62.88,
    ("bloomz-7b1-mt", "hydra-frozen-head"): 45.65,
}
# The same benchmark with the float32 heads (engine/head.py: float32 logits, split bf16 products), NVIDIA
# H200, torch 2.11.0+cu130, transformers 5.24.0, 2026-11-27, at d1de133: `python benchmarks/ppo_bench.py
# --device cuda --steps 3`, its peak memory column.
CURRENT_H200_GIB = {
    ("bloom-560m", "hydra"): 14.81,
    ("bloom-560m", "hydra-frozen-head"): 10.68,
    ("bloomz-7b1-mt", "hydra"): 68.39,
    ("bloomz-7b1-mt", "hydra-frozen-head"): 47.03,
}


@pytest.mark.parametrize("case", sorted(RESULTS_H200_GIB))
def test_ppo_bench_peaks_of_results_h200(case):
    estimate = ppo_estimate(bench_setup(*case, head="autocast"))
    assert estimate.peak / GIB == pytest.approx(RESULTS_H200_GIB[case], rel=0.15)


@pytest.mark.parametrize("case", sorted(CURRENT_H200_GIB))
def test_ppo_bench_peaks_with_the_float32_heads_at_d1de133(case):
    estimate = ppo_estimate(bench_setup(*case, before_d1de133_fixes=True))
    assert estimate.peak / GIB == pytest.approx(CURRENT_H200_GIB[case], rel=0.15)


# After the split products were added in place and the trunk parts freed (9dd5f5b), the same benchmark on the
# same card (2026-11-27, `ppo_bench.py --one SETUP --shape bloomz-7b1-mt --steps 2`): its peak is elsewhere
# (the backward's logits), so the hydra's is unchanged; the frozen head's scoring peak fell by 0.25 GiB.
NOW_H200_GIB = {("bloomz-7b1-mt", "hydra"): 68.39, ("bloomz-7b1-mt", "hydra-frozen-head"): 46.78}


@pytest.mark.parametrize("case", sorted(NOW_H200_GIB))
def test_ppo_bench_peaks_with_the_products_added_in_place(case):
    estimate = ppo_estimate(bench_setup(*case))
    assert estimate.peak / GIB == pytest.approx(NOW_H200_GIB[case], rel=0.15)


def test_ppo_iteration_with_auto_decode_batches_on_an_h200():
    """benchmarks/ppo_iteration.py --chunk auto at 9dd5f5b + the 70 % rule (H200, 2026-11-27): 256 prompts,
    chunk auto took 208 rows, peak 118.52 GiB, no out-of-memory (at 80 % of the free memory it ran out)."""
    shape = Shape(name="bloomz-7b1-mt", arch="bloom", hidden=4096, layers=30, heads=32, vocab=250880,
                  fused=False)
    setup = PPOSetup(shape=shape, load_bytes=2, compute="bf16", k=2, k_v=2, reward=shape, reward_bytes=2,
                     rollout=256, minibatch=16, score_batch=16, prompt=256, response=256, chunk=208,
                     held_outputs=True, logprobs_in_autocast=True, before_fused_head=True, decoder_trunk=False)
    estimate = ppo_estimate(setup)
    assert estimate.peak_moment == "rollout: decoding"
    assert estimate.peak / GIB == pytest.approx(118.52, rel=0.15)


# benchmarks/results_h200.md, fourth pass (the code of today): benchmarks/ppo_iteration.py at the
# bloomz-7b1-mt shape, 256 prompts of 256 + 256 tokens, minibatches of 16, a rollout decoded and a trunk cache
# as the trainer does; (decode batch, scoring batch) -> peak GiB.
PPO_ITERATION_H200_GIB = {(128, 16): 95.40, (256, 32): 132.41}


@pytest.mark.parametrize("chunk, score_batch", sorted(PPO_ITERATION_H200_GIB))
def test_ppo_iteration_peaks_of_results_h200(chunk, score_batch):
    shape = Shape(name="bloomz-7b1-mt", arch="bloom", hidden=4096, layers=30, heads=32, vocab=250880,
                  fused=False)
    # Like the trainer (fused AdamW, trunk cache, decoder), but its loop keeps the last scoring output and the
    # last update's output referenced, and takes the scoring log-probs under autocast.
    setup = PPOSetup(shape=shape, load_bytes=2, compute="bf16", k=2, k_v=2, reward=shape, reward_bytes=2,
                     rollout=256, minibatch=16, score_batch=score_batch, prompt=256, response=256, chunk=chunk,
                     held_outputs=True, logprobs_in_autocast=True, split_out_of_place=True, trunk_parts_held=True,
                     before_fused_head=True, decoder_trunk=False)
    estimate = ppo_estimate(setup)
    assert estimate.peak_moment == "rollout: decoding"
    assert estimate.peak / GIB == pytest.approx(PPO_ITERATION_H200_GIB[chunk, score_batch], rel=0.15)


# `rlhf train sft` itself (engine.train.run_stage, trl's SFTTrainer) at the bloom-560m shape: random bf16 weights
# saved as a model folder with the demo's tokenizer, the demo's SFT data packed into sequences of 512 tokens,
# batch 4, 3 steps; torch.cuda.max_memory_allocated around run_stage in the same process. NVIDIA H200, torch
# 2.11.0+cu130, transformers 5.24.0, trl 1.16.0, 2026-11-27. Gradient checkpointing -> peak GiB.
SFT_H200_GIB = {False: 11.94, True: 9.36}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_peaks_measured_on_an_h200(checkpointing):
    from engine.estimate import TrainSetup

    shape = Shape(name="bloom-560m", arch="bloom", hidden=1024, layers=24, heads=16, vocab=250880,
                  fused=False)
    setup = TrainSetup(stage="sft", shape=shape, load_bytes=2, compute="bf16", sequences=4, length=512,
                       checkpointing=checkpointing)
    estimate = estimate_setup(setup)
    assert estimate.peak / GIB == pytest.approx(SFT_H200_GIB[checkpointing], rel=0.15)


# -- the recipe's stages ------------------------------------------------------------------------------------

def test_bloomz_recipe_on_a_laptop_without_the_model(no_hub_cache):
    estimates = {e.stage: e for e in estimate_recipe(load_recipe(BLOOMZ))}
    assert sorted(estimates) == ["ppo", "rm", "sft"]
    ppo = items(estimates["ppo"])
    # KV cache of one decode chunk: (256 + 256) tokens x 30 layers x keys and values, bf16, a prompt; the
    # recipe's chunk_size auto takes 80 % of the memory free when decoding starts (the decoder built), less
    # the prefill's slice of 32 prompts, in steps of 8.
    assert ppo["kv_cache"] == 64 * 512 * 30 * 2 * 4096 * 2
    assert ppo["prefill"] == bloom_prefill_bytes(32, 256, 4096, 32, 2)
    setup = stage_setup(load_recipe(BLOOMZ), "ppo", Parallel())
    plain = replace(setup, decoder_trunk=False)
    at = {n: ppo_estimate(replace(plain, chunk=n)).total("rollout: decoding") for n in (32, 40)}
    per_row = (at[40] - at[32]) // 8
    assert per_row == 512 * 30 * 2 * 4096 * 2 + 3 * 250880 * 4  # its KV cache and a step's split logits
    free = 80 * GIB - (1 << 30) - (at[32] - 32 * per_row - ppo["prefill"])
    assert 64 * per_row <= 0.8 * free - ppo["prefill"] < 72 * per_row
    # Keeping the trunk while decoding adds a ring of 64 float32 layer inputs per row on the GPU (the rest
    # waits in host memory): 64 rows still fit, so the decoder keeps it for the scoring forward.
    keeping = ppo_estimate(replace(setup, chunk=40)).total("rollout: decoding") - at[40]
    assert keeping == 40 * 64 * 4096 * 4
    assert 64 * (per_row + 64 * 4096 * 4) <= 0.8 * free - ppo["prefill"]
    assert ppo["decode_trunk"] == 64 * 64 * 4096 * 4 and any("the decoder keeps the trunk" in n
                                                              for n in estimates["ppo"].notes)
    (fixed,) = estimate_recipe(load_recipe(BLOOMZ, ["ppo.chunk_size=32"]), ["ppo"])
    assert items(fixed)["kv_cache"] == 32 * 512 * 30 * 2 * 4096 * 2
    # Logits of a scoring minibatch: 16 x 257 positions x the vocabulary, float32; the reference head's split
    # products, added in place, make two more beside the policy's.
    assert ppo["logits_ref"] == 3 * 16 * 257 * 250880 * 4
    assert ppo["reward_model"] == (7_069_016_064 + 4096) * 2  # the trunk (tied: no LM head) + a scalar head
    sft = estimates["sft"]
    assert not sft.fits and sft.largest.key == "optimizer"
    assert any("LoRA" in a and "(fits)" in a for a in sft.advice)
    assert all("chunk_size" not in a and "train_head" not in a for a in sft.advice)
    assert estimates["rm"].fits and not estimates["rm"].advice
    text = "\n".join(estimates["ppo"].table())
    assert "built-in table" in text and "reward model" in text and "reference branch" in text


def test_ppo_advice_is_ppos_own(no_hub_cache):
    (ppo,) = estimate_recipe(load_recipe(BLOOMZ), ["ppo"], gpu_memory=parse_size("60GiB"))
    assert not ppo.fits and ppo.advice
    text = "\n".join(ppo.advice)
    assert "ppo.train_head=false" in text and "ppo.lora" in text and "ZeRO" not in text
    assert "gradient_checkpointing" not in text


def test_zero_and_fsdp_shard_the_training_stages(no_hub_cache):
    recipe = load_recipe(BLOOMZ)
    (single,) = estimate_recipe(recipe, ["sft"])
    zero2 = parallel_from_config(str(ACCEL / "zero2.yaml"), None)
    zero3 = parallel_from_config(str(ACCEL / "zero3.yaml"), None)
    fsdp = parallel_from_config(str(ACCEL / "fsdp.yaml"), 4)
    assert (zero2.kind, zero2.zero_stage, zero2.gpus) == ("zero", 2, 8) and fsdp.gpus == 4
    trainable = 7_069_016_064
    (two,) = estimate_recipe(recipe, ["sft"], zero2)
    (three,) = estimate_recipe(recipe, ["sft"], zero3)
    (full,) = estimate_recipe(recipe, ["sft"], fsdp)
    # ZeRO: bf16 weights; float32 masters and two moments (12 bytes a weight) split over 8 GPUs; ZeRO-2 also
    # splits the bf16 gradients, ZeRO-3 the weights too.
    assert items(two)["optimizer"] == trainable * 12 // 8 and items(two)["grads"] == trainable * 2 // 8
    assert items(two)["params"] == trainable * 2 and items(three)["params"] == trainable * 2 // 8
    assert items(full)["params"] == trainable * 4 // 4  # FSDP: the whole model float32, split
    assert three.peak < two.peak < single.peak and three.fits and not single.fits
    (ppo,) = estimate_recipe(recipe, ["ppo"], zero3)
    assert ppo.parallel.kind == "ddp" and any("data parallelism only" in n for n in ppo.notes)


def test_shapes_from_a_folder_the_hub_cache_or_nowhere(workdir, tmp_path, monkeypatch):
    local = load_shape("demo/model", "model.path")
    assert (local.hidden, local.layers, local.heads) == (64, 4, 4) and local.source.endswith("config.json")
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--bigscience--bloom-560m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({**json.loads((Path("demo/model") / "config.json").read_text()),
                                                      "hidden_size": 128}))
    (cache / "models--bigscience--bloom-560m" / "refs").mkdir()
    (cache / "models--bigscience--bloom-560m" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cached = load_shape("bigscience/bloom-560m", "model.path")
    assert cached.hidden == 128 and "cache" in cached.source  # the cache wins over the built-in table
    assert load_shape("bigscience/bloomz-7b1-mt", "model.path").source == "built-in table"
    with pytest.raises(EstimateError, match=r"ppo.model.path: 'someone/unknown-model' is not a local model folder"):
        load_shape("someone/unknown-model", "ppo.model.path")
    with pytest.raises(EstimateError, match=r"model.path: 'demo/missing' does not exist"):
        load_shape("demo/missing", "model.path")


def test_sizes_and_accelerate_configs():
    assert parse_size("80GiB") == parse_size("80") == parse_size("80G") == 80 * GIB
    assert parse_size("141GB") == 141 * 10**9 and parse_size("24000MiB") == 24000 * 2**20
    for bad in ("lots", "-1GiB", "0", ""):
        with pytest.raises(EstimateError, match="--gpu-memory"):
            parse_size(bad)
    assert parallel_from_config(str(ACCEL / "gpu.yaml"), None).kind == "single"
    assert parallel_from_config(str(ACCEL / "ddp.yaml"), None).gpus == 8
    assert parallel_from_config(str(ACCEL / "cpu.yaml"), None).cpu
    assert parallel_from_config(str(ACCEL / "cpu_ddp.yaml"), None).describe() == "CPU, 2 processes"  # not processs
    assert parallel_from_config(None, 4).kind == "ddp"
    with pytest.raises(EstimateError, match="nope.yaml: file not found"):
        parallel_from_config("nope.yaml", None)


# -- the command ------------------------------------------------------------------------------------------

def test_check_estimate_prints_every_stage_without_torch(no_hub_cache):
    code = ("import sys\nfrom engine.cli import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, "check", str(BLOOMZ), "--estimate"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    for title in ("sft (SFT)", "rm (reward model)", "ppo (hydra PPO)"):
        assert title in done.stdout
    assert "KV cache: 64 prompts x 512 tokens x 30 layers" in done.stdout and "built-in table" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--estimate", "--gpu-memory", "lots"], "--gpu-memory 'lots'"),
    (["--estimate", "--accelerate-config", "missing.yaml"], "--accelerate-config missing.yaml: file not found"),
    (["--estimate", "--set", "ppo.model.path=nobody/nothing", "--stage", "ppo"], "ppo.model.path: 'nobody/nothing'"),
    (["--estimate", "--set", "ppo.value_layers=40", "--stage", "ppo"], "ppo.value_layers"),
    (["--gpus", "2"], "go with --estimate"),
])
def test_check_estimate_bad_input_is_one_line_and_exit_2(no_hub_cache, capsys, argv, message):
    from engine.cli import main

    assert main(["check", str(BLOOMZ), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_check_estimate_of_an_unknown_stage_is_refused():
    done = subprocess.run([*RLHF, "check", str(BLOOMZ), "--estimate", "--stage", "dpo"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'dpo'" in done.stderr


def test_check_estimate_with_zero3_prints_the_sharded_figures(no_hub_cache, capsys):
    from engine.cli import main

    assert main(["check", str(BLOOMZ), "--estimate", "--stage", "sft", "--accelerate-config",
                 str(ACCEL / "zero3.yaml"), "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed ZeRO-3 over 8 GPUs" in out and "1/8 per GPU" in out and "fits" in out


def test_lora_of_an_unknown_module_names_the_field(no_hub_cache):
    recipe = load_recipe(BLOOMZ, ["ppo.lora={target_modules: [q_proj]}"])
    with pytest.raises(EstimateError, match="ppo.lora.target_modules: q_proj"):
        estimate_recipe(recipe, ["ppo"])
    ok = stage_setup(load_recipe(BLOOMZ), "ppo", Parallel())
    assert estimate_setup(replace(ok, lora=LoraSpec(target_modules=["query_key_value"]))).peak > 0


def test_the_decoder_keeps_the_trunk_only_where_it_costs_no_decode_batch():
    from engine.estimate import trunk_costs_a_batch

    assert not trunk_costs_a_batch(264, 256, 1024)  # 4 batches of 256 either way (the H200 at 1,024 prompts)
    assert trunk_costs_a_batch(64, 56, 128)  # 2 batches of 64 against 3 (the seed recipe on 80 GiB)
    assert not trunk_costs_a_batch(64, 64, 64)

