"""BLOOM's fused kernels (engine/bloom_kernels.py) compute what transformers' own BLOOM computes."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.bloom_kernels import use_fused_kernels


def _pair(**config):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    stock = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=64, n_layer=3, n_head=4, pad_token_id=0,
                                         **config)).eval()
    fused = copy.deepcopy(stock)
    assert use_fused_kernels(fused) == 2 * 3  # an attention and a GELU per layer
    return stock, fused


def _batch():
    """Left-padded rows of different lengths: pad queries see no key at all (a fully masked row)."""
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("use_cache", [False, True])
def test_float32_logits_and_gradients_equal_transformers(use_cache):
    stock, fused = _pair()
    ids, mask = _batch()
    real = mask.bool()
    outs = []
    for model in (stock, fused):
        model.train()
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        logits[real].logsumexp(-1).sum().backward()
        outs.append(logits.detach())
    assert not torch.isnan(outs[1]).any()
    assert torch.allclose(outs[0][real], outs[1][real], atol=1e-5)
    for (name, a), b in zip(stock.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bf16_is_no_less_accurate_than_transformers_and_never_nan():
    """Under CPU bf16 autocast with float32 weights the mask's float32 minimum meets a bf16 bias (-inf
    unless clamped: NaN in every pad row, then everywhere); with bf16 weights, bf16 throughout."""
    stock, fused = _pair()
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        exact = copy.deepcopy(fused).double()(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            errors = [(m(input_ids=ids, attention_mask=mask).logits.double() - exact) for m in (stock, fused)]
        half = [(copy.deepcopy(m).bfloat16()(input_ids=ids, attention_mask=mask).logits.double() - exact)
                for m in (stock, fused)]
    for err_stock, err_fused in (errors, half):
        assert not torch.isnan(err_fused).any()
        assert err_fused[real].abs().max() <= err_stock[real].abs().max() * 1.05
        assert err_fused[real].abs().max() < 0.1  # bf16 rounding, not a different function


def test_greedy_generation_with_a_cache_equals_transformers():
    stock, fused = _pair()
    ids, mask = _batch()
    with torch.no_grad():
        a = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        b = fused.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)


def test_swapping_is_idempotent_reversible_and_leaves_weights_and_folders_alone(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    stock, fused = _pair()
    assert use_fused_kernels(fused) == 0
    assert stock.state_dict().keys() == fused.state_dict().keys()
    fused.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(again.transformer.h[0].self_attention) is type(stock.transformer.h[0].self_attention)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), stock.state_dict().values()))
    assert use_fused_kernels(fused, fused=False) == 6
    assert type(fused.transformer.h[0].self_attention) is type(stock.transformer.h[0].self_attention)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    assert use_fused_kernels(llama) == 0


def test_hydra_branches_and_lora_adapters_run_on_the_fused_kernels():
    """Copies the hydra makes (reference and value layers) keep the fused classes; peft's LoRA layers inside
    the fused attention are called as before (the adapters change the output)."""
    from peft import LoraConfig

    from engine.ppo.hydra import Hydra

    stock, fused = _pair()
    ids, mask = _batch()
    real = mask.bool()
    outs = []
    for model in (stock, fused):
        torch.manual_seed(2)  # the value head's initial weights
        hydra = Hydra(model, 1, 2, train_head=True)
        with torch.no_grad():
            outs.append(hydra(ids, mask, with_values=True, with_ref=True))
    fused_types = {type(m).__name__ for m in hydra.modules()}
    assert {"FusedBloomAttention", "FusedBloomGelu"} <= fused_types and "BloomAttention" not in fused_types
    for name in ("logits", "ref_logits", "values"):
        assert torch.allclose(getattr(outs[0], name)[real], getattr(outs[1], name)[real], atol=1e-5), name

    _, fused = _pair()
    lora = Hydra(fused, 1, 1, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    for name, param in lora.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    with torch.no_grad():
        out = lora(ids, mask, with_values=False, with_ref=True)
    assert not torch.allclose(out.logits[real], out.ref_logits[real], atol=1e-3)


def test_the_loaders_give_fused_models(tmp_path):
    from engine.config import ModelSpec
    from engine.models import inference_model, load_causal_lm, load_reward_trunk

    stock, _ = _pair()
    stock.save_pretrained(tmp_path / "m")
    for model in (load_causal_lm(ModelSpec(path=str(tmp_path / "m"), dtype="float32")),
                  load_reward_trunk(ModelSpec(path=str(tmp_path / "m"), dtype="float32"), 0),
                  inference_model(str(tmp_path / "m"), "cpu"),
                  inference_model(str(tmp_path / "m"), "cpu", reward=True)):
        assert type(model.transformer.h[0].self_attention).__name__ == "FusedBloomAttention"
        assert type(model.transformer.h[0].mlp.gelu_impl).__name__ == "FusedBloomGelu"


def test_the_bias_stays_far_from_overflow_in_bf16():
    """CPU's SDPA happens to give 0 for a row of -inf; CUDA's kernels need not (and scale the scores first),
    so a masked entry is MASKED, whatever the mask's dtype, and the rest is ALiBi exactly."""
    from engine.bloom_kernels import MASKED, _bias

    alibi = -torch.rand(2 * 4, 1, 6)
    for dtype in (torch.float32, torch.bfloat16):
        mask = torch.zeros(2, 1, 6, 6, dtype=dtype)
        mask[0, :, :3] = torch.finfo(dtype).min  # three pad queries see nothing
        bias = _bias(alibi.to(dtype), mask, 2, 4, 6, torch.bfloat16)
        assert bias.dtype == torch.bfloat16 and bias.shape == (2, 4, 6, 6)
        assert torch.isfinite(bias.float() * 2).all() and bias.min() >= MASKED * 1.01
        assert (bias[0, :, :3] < -1e29).all()
        assert torch.equal(bias[1], alibi.view(2, 4, 1, 6)[1].expand(4, 6, 6).to(torch.bfloat16))


def test_a_fused_model_pickles_whole(tmp_path):
    _, fused = _pair()
    torch.save(fused, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert type(again.transformer.h[0].self_attention).__name__ == "FusedBloomAttention"


def test_one_bias_per_forward_that_dies_with_it():
    import weakref

    from engine.bloom_kernels import shared_bias

    alibi, mask = -torch.rand(2 * 4, 1, 6), torch.zeros(2, 1, 6, 6)
    first = shared_bias(alibi, mask, 2, 4, 6, torch.float32)
    assert shared_bias(alibi, mask, 2, 4, 6, torch.float32) is first  # the next layer's
    assert shared_bias(alibi, mask.clone(), 2, 4, 6, torch.float32) is not first  # another mask: another bias
    gone = weakref.ref(shared_bias(alibi, mask, 2, 4, 6, torch.float32))
    del first, alibi
    assert gone() is None  # at once: no reference cycle waits for the collector while GPU memory is tight
