import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.ppo.hydra import Hydra


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bloom":  # ALiBi, tied head
        return BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=32, n_layer=4, n_head=4)).eval()
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,  # rotary
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    return ids, mask


def train_a_little(hydra: Hydra, steps: int = 3) -> None:
    params = [p for p in hydra.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids, mask = batch()
    for _ in range(steps):
        out = hydra(ids, mask, with_values=True)
        loss = out.logits.float().logsumexp(-1).mean() + out.values.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_trunk_once_matches_three_separate_forwards(kind):
    model = tiny(kind)
    original = copy.deepcopy(model)
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2)
    train_a_little(hydra)  # the policy and value branches now differ from the reference
    ids, mask = batch()
    with torch.no_grad():
        out = hydra(ids, mask, with_values=True, with_ref=True)
        policy = model(input_ids=ids, attention_mask=mask).logits
        reference = original(input_ids=ids, attention_mask=mask).logits
        # The value branch as a whole model: the original with its top k_v layers and norm replaced.
        value_model = copy.deepcopy(original)
        layers = value_model.base_model.h if kind == "bloom" else value_model.base_model.layers
        for i, layer in enumerate(hydra.value_layers):
            layers[len(layers) - 2 + i] = layer
        if kind == "bloom":
            value_model.base_model.ln_f = hydra.value_norm
        else:
            value_model.base_model.norm = hydra.value_norm
        hidden = value_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        values = hydra.value_head(hidden).squeeze(-1)
    keep = mask.bool()
    assert torch.allclose(out.logits[keep], policy[keep], atol=1e-5)
    assert torch.allclose(out.ref_logits[keep], reference[keep], atol=1e-5)
    assert torch.allclose(out.values[keep], values[keep], atol=1e-5)
    assert not torch.allclose(out.logits[keep], out.ref_logits[keep], atol=1e-3)


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_what_trains_and_what_never_changes(kind):
    model = tiny(kind)
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2)
    before = {name: p.detach().clone() for name, p in hydra.named_parameters(remove_duplicate=False)}
    ids, mask = batch()
    with torch.no_grad():
        start = hydra(ids, mask, with_ref=True)
    assert torch.equal(start.logits, start.ref_logits)  # step 0: KL to the reference is exactly 0
    train_a_little(hydra)
    after = dict(hydra.named_parameters(remove_duplicate=False))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    layer = "transformer.h" if kind == "bloom" else "model.layers"
    assert not {n for n in changed if n.startswith("ref_")}  # the reference never changes
    trunk = {n for n in before if n.startswith(f"policy.{layer}.") and not n.startswith(f"policy.{layer}.3.")}
    assert trunk and not trunk & changed  # nor does the trunk, embeddings included
    assert not {n for n in changed if "embed" in n}
    assert {n for n in before if n.startswith(f"policy.{layer}.3.") and n.endswith("weight")} <= changed
    assert {n for n in before if n.startswith("value_") and n.endswith("weight")} <= changed
    assert "policy.lm_head.weight" in changed  # the policy's head trains (a tied one is untied for it)
    if kind == "bloom":  # tied: the reference head is the frozen embedding matrix itself, not a copy
        assert hydra.ref_head.weight is hydra.policy.get_input_embeddings().weight
    policy_storage = {p.data_ptr() for p in hydra.policy.parameters()}
    value_params = [*hydra.value_layers.parameters(), *hydra.value_norm.parameters(), *hydra.value_head.parameters()]
    assert not policy_storage & {p.data_ptr() for p in value_params}  # the value branch shares nothing


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_as_reference_is_the_reference_branch_and_puts_everything_back(kind):
    model = tiny(kind)
    hydra = Hydra(model, num_layers_unfrozen=2, value_layers=2)
    train_a_little(hydra)
    ids, mask = batch()
    with torch.no_grad():
        out = hydra(ids, mask, with_ref=True)
        with hydra.as_reference() as reference:
            swapped = reference(input_ids=ids, attention_mask=mask).logits
            assert reference.generate(ids[1:2], max_new_tokens=3, do_sample=False).shape == (1, 12)
        after = hydra(ids, mask).logits
    keep = mask.bool()
    assert torch.allclose(swapped[keep], out.ref_logits[keep], atol=1e-5)
    assert torch.equal(after, out.logits)
    assert any(p.requires_grad for p in hydra.policy.get_output_embeddings().parameters())


def test_a_frozen_shared_head_when_asked():
    model = tiny("bloom")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=1, train_head=False)
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embeddings is hydra.ref_head.weight
    assert not embeddings.requires_grad


def test_layer_counts_are_checked():
    for k, k_v in [(0, 1), (2, 1), (1, 4), (4, 4)]:
        with pytest.raises(ValueError, match="1 <= num_layers_unfrozen"):
            Hydra(tiny("bloom"), k, k_v)


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_exported_policy_loads_plainly_and_matches(tmp_path, kind):
    hydra = Hydra(tiny(kind), num_layers_unfrozen=2, value_layers=2)
    train_a_little(hydra)
    hydra.policy.save_pretrained(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, hydra(ids, mask).logits, atol=1e-6)


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_lora_mode_shares_everything_but_the_adapters(kind, tmp_path):
    from peft import LoraConfig

    model = tiny(kind)
    original = copy.deepcopy(model)
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2, lora=LoraConfig(r=4, lora_alpha=8,
                                                                              target_modules="all-linear"))
    trainable = {n for n, p in hydra.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if "lora_" in n}
    assert adapters and all(".3." in n for n in adapters)  # adapters on the top layer only: the trunk is shared
    assert trainable - adapters == {n for n in trainable if n.startswith("value_")}
    # Adapters start at zero: policy == reference; after training the reference still is the base model.
    ids, mask = batch()
    with torch.no_grad():
        start = hydra(ids, mask, with_ref=True)
    assert torch.equal(start.logits, start.ref_logits)
    lora_b = [p for n, p in hydra.named_parameters() if "lora_B" in n]
    train_a_little(hydra)
    assert all(p.abs().sum() > 0 for p in lora_b)  # the adapters get gradients and move
    with torch.no_grad():
        for p in lora_b:  # ...then move them far, so that policy and reference differ clearly
            p.normal_(0, 0.5)
        out = hydra(ids, mask, with_ref=True, with_values=True)
        reference = original(input_ids=ids, attention_mask=mask).logits
        with hydra.as_reference() as ref_model:
            swapped = ref_model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(out.ref_logits[keep], reference[keep], atol=1e-5)
    assert torch.allclose(swapped[keep], reference[keep], atol=1e-5)
    assert (out.logits[keep] - reference[keep]).abs().max() > 1e-2
    hydra.export(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits[keep], out.logits[keep], atol=1e-5)
    # Resume: a fresh hydra on the base model takes the adapters and the value branch back.
    again = Hydra(copy.deepcopy(original), 1, 2, lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    again.load_branch_state(hydra.branch_state())
    with torch.no_grad():
        restored = again(ids, mask, with_values=True)
    assert torch.allclose(restored.logits, out.logits, atol=1e-6) and torch.allclose(restored.values, out.values)


@pytest.mark.parametrize("kind", ["bloom", "llama"])
def test_scoring_is_float32_under_bf16_autocast(kind):
    """A bf16 trunk under bf16 autocast: log-probs, reference log-probs and values come out in float32,
    equal (to 1e-5) to the heads computed in float64 from the same final hidden states; not rounded to
    bf16's 0.125 steps."""
    from engine.ppo.core import logprobs_of

    model = tiny(kind).to(torch.bfloat16)
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2)
    with torch.no_grad():
        hydra.lm.get_output_embeddings().weight.mul_(40.0)  # logits of magnitude ~16-32, as in real models
    ids, mask = batch()
    keep = 4
    captured = {}
    norm = hydra.lm.base_model.ln_f if kind == "bloom" else hydra.lm.base_model.norm
    norm.register_forward_hook(lambda m, a, out: captured.setdefault("hidden", out))
    hydra.value_norm.register_forward_hook(lambda m, a, out: captured.setdefault("value_hidden", out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = hydra(ids, mask, with_values=True, with_ref=True, logits_to_keep=keep)
    assert out.logits.dtype == out.ref_logits.dtype == out.values.dtype == torch.float32
    tokens = ids[:, -keep + 1:]
    got = logprobs_of(out.logits[:, :-1], tokens)
    assert got.dtype == torch.float32
    hidden = captured["hidden"][:, -keep:].double()
    exact = (hidden @ hydra.lm.get_output_embeddings().weight.double().T)[:, :-1].log_softmax(-1)
    expected = exact.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.logits.abs().max() > 8
    assert torch.allclose(got.double(), expected, atol=1e-5)
    values = (captured["value_hidden"].double() @ hydra.value_head.weight.double().T).squeeze(-1)
    assert torch.allclose(out.values.double(), values, atol=1e-5)


@pytest.mark.parametrize("kind,k,k_v,lora", [("bloom", 1, 2, False), ("llama", 2, 2, False), ("bloom", 1, 3, True)])
def test_a_cached_trunk_gives_the_uncached_forward_and_gradients(kind, k, k_v, lora):
    """The update forward from the trunk kept by the scoring forward: same logits, values and gradients
    as the full forward, on rows picked out of the scored batch (as a shuffled minibatch is)."""
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None
    hydra = Hydra(tiny(kind), num_layers_unfrozen=k, value_layers=k_v, lora=config)
    train_a_little(hydra)  # branches apart from the trunk's copy
    ids, mask = batch()
    with torch.no_grad():
        kept = hydra(ids, mask, with_ref=True, keep_trunk=True).trunk
    assert (kept.value is kept.policy) == (k == k_v)
    rows = torch.tensor([2, 0])
    grads = []
    for trunk in (None, kept.rows(rows)):
        hydra.zero_grad()
        out = hydra(ids[rows], mask[rows], logits_to_keep=5, trunk=trunk)
        (out.logits.logsumexp(-1).mean() + out.values.pow(2).mean()).backward()
        grads.append((out, {n: p.grad.clone() for n, p in hydra.named_parameters() if p.requires_grad}))
    (full, full_grads), (cached, cached_grads) = grads
    assert torch.allclose(full.logits, cached.logits, atol=1e-6)
    assert torch.allclose(full.values, cached.values, atol=1e-6)
    assert full_grads.keys() == cached_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=1e-6), name
    # Scoring from a trunk (the decoder's): the reference branch too.
    with torch.no_grad():
        full = hydra(ids[rows], mask[rows], with_ref=True, logits_to_keep=5)
        cached = hydra(ids[rows], mask[rows], with_ref=True, logits_to_keep=5, trunk=kept.rows(rows))
    assert cached.ref_logits is not None and torch.allclose(full.ref_logits, cached.ref_logits, atol=1e-6)
    assert not torch.allclose(cached.ref_logits, cached.logits, atol=1e-3)  # the branches apart
    assert decoder_layers_intact(hydra)


def decoder_layers_intact(hydra: Hydra) -> bool:
    from engine.models import decoder_layers

    return len(decoder_layers(hydra.lm)) == hydra.num_layers


@pytest.mark.parametrize("lora", [False, True])
def test_a_bf16_hydras_export_loads_plainly_with_its_small_update(tmp_path, lora):
    """A bf16 trunk, float32 trained parts: moved by less than bf16's step (a PPO update is small), the
    export loaded with a plain `from_pretrained` still holds the move (its config names float32; LoRA merges
    into float32). Named bf16 and merged in bf16, the load rounded it away."""
    import json

    from peft import LoraConfig

    model = tiny("bloom").to(torch.bfloat16)
    base = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2,
                  lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None)
    target = "transformer.h.3.self_attention.query_key_value.weight"
    with torch.no_grad():
        if lora:
            module = next(m for n, m in hydra.policy.named_modules()
                          if n.endswith("h.3.self_attention.query_key_value"))
            module.lora_B["default"].weight.normal_(0, 1e-4)
            delta = module.get_delta_weight("default").float()
        else:
            trained = dict(hydra.policy.named_parameters())[target]
            assert trained.dtype == torch.float32
            delta = torch.full_like(trained, 1e-5)
            trained.add_(delta)
    rounded = (base[target] + delta).bfloat16().float()
    assert delta.abs().max() < 1e-3 and (rounded == base[target]).float().mean() > 0.5  # mostly lost in bf16
    hydra.export(tmp_path / "policy")
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["dtype"] == "float32"
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "policy").named_parameters())
    assert loaded[target].dtype == torch.float32
    assert torch.allclose(loaded[target] - base[target], delta, atol=1e-7, rtol=1e-3)
    trunk = "transformer.h.0.self_attention.query_key_value.weight"
    assert torch.equal(loaded[trunk], base[trunk])  # the frozen trunk as it was
