"""The precision policy: a bf16 model trains with float32 master weights (SFT and RM, through the real
command), and a recipe that cannot train that way is refused before anything is registered."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import RecipeError, load_recipe
from tests.conftest import RLHF, TINY
from tests.helpers import metric, run_row

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
    run_id = _train(stage, BF16)
    assert run_row(run_id)["status"] == "done" and len(metric(run_id, "loss")) == 3
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
