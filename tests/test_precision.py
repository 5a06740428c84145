"""The precision policy: a bf16 model trains with float32 master weights (SFT and RM, through the real
command), and a recipe that cannot train that way is refused before anything is registered."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import RecipeError, load_recipe
from tests.conftest import RLHF, TINY
from tests.helpers import assert_disk_estimate, metric, run_row

# bf16 weights, lr 1e-5: a bf16 weight of ~0.02 moves in steps of ~6e-5, so a pure-bf16 AdamW update of
# ~1e-5 rounds away; with float32 masters every weight with a gradient moves.
BF16 = ["model.dtype=bfloat16", "train.lr=1e-5", "train.max_steps=3", "train.logging_steps=1", "train.eval_ratio=0",
        "num_layers_unfrozen=2", "train.lr_scheduler=constant"]


def _train(stage: str, overrides: list[str]) -> int:
    # A process of its own: accelerate fixes the mixed precision once per process.
    done = subprocess.run([*RLHF, "train", stage, str(TINY), *sum((["--set", o] for o in overrides), [])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return 1


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_bf16_model_moves_every_trainable_weight(workdir, stage):
    run_id = _train(stage, [*BF16, "train.save_steps=3"])
    assert run_row(run_id)["status"] == "done" and len(metric(run_id, "loss")) == 3
    # The disk estimate's float32 trained and bf16 frozen weights are what the checkpoint and export hold
    folder = Path(run_row(run_id)["output_dir"])
    assert_disk_estimate(stage, [*BF16, "train.save_steps=3"], folder / "checkpoint-3", folder / "final")
    trained = load_file(Path(run_row(run_id)["output_dir"]) / "final" / "model.safetensors")
    base = {k: v.to(torch.bfloat16) for k, v in load_file(workdir / "demo" / "model" / "model.safetensors").items()}
    trainable = [k for k in trained if k.startswith(("transformer.h.2.", "transformer.h.3.", "transformer.ln_f"))]
    if stage == "rm":
        # The final norm's bias adds the same vector to chosen and rejected: it cancels in r_c - r_r and
        # never has a gradient under the pairwise loss.
        trainable.remove("transformer.ln_f.bias")
    assert len(trainable) > 10
    moved = total = 0
    for name in trainable:
        assert trained[name].dtype == torch.float32, name  # float32 masters, saved as they are
        changed = (trained[name] != base[name].float()).sum().item()
        assert changed > 0.5 * trained[name].numel(), name  # no tensor stuck (a few entries may get no gradient)
        moved, total = moved + changed, total + trained[name].numel()
    assert moved / total > 0.99, moved / total
    for name in [k for k in trained if k.startswith(("transformer.h.0.", "transformer.h.1."))]:
        assert trained[name].dtype == torch.bfloat16 and torch.equal(trained[name], base[name]), name
    # Its config names float32: a plain from_pretrained gives the trained weights, not them rounded to bf16
    final = Path(run_row(run_id)["output_dir"]) / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    loaded = dict(auto.from_pretrained(final).named_parameters())
    assert all(torch.equal(loaded[name], trained[name]) for name in trainable)


def test_fp32_precision_with_a_half_model_is_refused():
    with pytest.raises(RecipeError, match=r"sft.train.precision: fp32 with a bfloat16 model"):
        load_recipe(TINY, ["model.dtype=bfloat16", "sft.train.precision=fp32"])
    with pytest.raises(RecipeError, match=r"ppo.precision: fp32 with a float16 model"):
        load_recipe(TINY, ["model.dtype=float16", "ppo.precision=fp32"])
    load_recipe(TINY, ["model.dtype=bfloat16"])  # auto follows the model's dtype


def test_auto_precision_follows_a_half_model():
    from engine.models import precision_flags

    recipe = load_recipe(TINY, ["model.dtype=bfloat16"])
    assert precision_flags("auto", recipe.model) == {"bf16": True, "fp16": False}
    assert precision_flags("auto", recipe.model.model_copy(update={"dtype": "float32"}))["bf16"] is False


def test_ppo_scores_with_the_reward_model_as_it_was_trained(workdir):
    """A bf16-trunk RM saved with float32 top layers and head (as the bloomz recipe trains it): PPO's scorer
    (and the RM judge) loads each tensor as stored and runs it under bf16 autocast as the RM stage did, its
    head in float32. Before, the config's one dtype cast the whole model to bf16 (the trained float32 layers
    rounded, no autocast), and every reward landed on bf16's grid."""
    from engine.ppo.rewards import RewardModelScorer
    from engine.template import Turn

    run_id = _train("rm", BF16)
    final = Path(run_row(run_id)["output_dir"]) / "final"
    saved = load_file(final / "model.safetensors")
    scorer = RewardModelScorer(str(final), torch.device("cpu"))
    params = dict(scorer.model.named_parameters())
    for name, tensor in saved.items():
        if name in params:
            assert params[name].dtype == tensor.dtype and torch.equal(params[name], tensor), name
    assert params["score.weight"].dtype == torch.float32
    assert params["transformer.h.0.self_attention.dense.weight"].dtype == torch.bfloat16

    questions = ["What is the capital of France?", "Write a short poem about rain.", "2 + 2 = ?", "Say hi."]
    answers = ["Paris.", "Rain falls softly on the quiet town.", "4", "Hello there, nice to meet you!"]
    prompts = [(Turn("user", q),) for q in questions]
    scores = scorer(prompts, answers)
    assert scores.dtype == torch.float32 and (scores != scores.bfloat16().float()).any()  # not on bf16's grid
    from engine.template import tokenize_pair

    # One at a time, unpadded: the same, up to the bf16 trunk's rounding in kernels of other shapes.
    for prompt, answer, score in zip(prompts, answers, scores.tolist()):
        ids = torch.tensor([tokenize_pair(scorer.tokenizer, prompt, answer)])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            own = scorer.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()
        assert score == pytest.approx(own, abs=2e-3 * max(1.0, abs(own)))

    # Weights that are not safetensors (a .bin export, a Hub model) load as from_pretrained gives them: the
    # config's one dtype (float32: the export names it for its float32 parts), nothing restored on top.
    binary = final.parent / "as-bin"
    shutil.copytree(final, binary)
    (binary / "model.safetensors").unlink()
    torch.save(saved, binary / "pytorch_model.bin")
    fallback = RewardModelScorer(str(binary), torch.device("cpu"))
    assert {p.dtype for p in fallback.model.parameters()} == {torch.float32} and not fallback.autocast
    again = fallback(prompts, answers)
    assert again.dtype == torch.float32 and torch.isfinite(again).all()
    assert torch.allclose(again, scores, atol=0.05 * max(1.0, scores.abs().max().item()))  # bf16-rounded layers


def test_a_float32_head_under_bf16_autocast_keeps_its_names_and_float32_accuracy():
    """The reward model's scalar head (RM training, PPO's scorer): float32 output accurate to float32 under
    bf16 autocast, gradients to its weight and its input, and the same state dict (saves and loads as is)."""
    from engine.head import float32_head

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1, bias=False)
    keys = list(head.state_dict())
    float32_head(head)
    assert list(head.state_dict()) == keys
    hidden = (torch.randn(8, 64) * 4).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(hidden)
    exact = hidden.double() @ head.weight.double().t()
    assert out.dtype == torch.float32 and (out.double() - exact).abs().max() < 1e-5
    assert (out - out.bfloat16().float()).abs().max() > 0  # not bf16 values
    out.sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None
    with pytest.raises(TypeError, match="a plain Linear"):
        float32_head(torch.nn.Embedding(4, 4))
