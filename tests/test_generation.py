"""The generation engine on the tiny demo model: exact sampling, batching invariance, greedy = generate."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import load_recipe
from engine.generation import Engine, Sampling, concat, pick, row_seeds
from engine.ppo.hydra import Hydra
from engine.ppo.rollout import generate as rollout
from engine.template import Turn, render_prompt
from tests.conftest import TINY

QUESTIONS = ["What is 2 plus 3?", "Name a colour.", "Say hello.", "What is 7 minus 4?", "Count to three.",
             "Is the sky blue?", "What is 1 plus 1?", "Give me a word."]


@pytest.fixture(scope="module")
def tiny(demo_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    return model, tokenizer


def prompts(n=len(QUESTIONS)):
    return [render_prompt([Turn("user", q)]) for q in QUESTIONS[:n]]


def test_greedy_answers_equal_plain_generate(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    ids, mask = engine.encode(prompts())
    ours = engine.generate(ids, mask, Sampling(max_new_tokens=12, temperature=0))
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    width = ours.input_ids.shape[1]
    padded = torch.nn.functional.pad(theirs, (0, width - theirs.shape[1]), value=tokenizer.pad_token_id)
    expected = padded[:, :width].masked_fill(padded[:, :width] == tokenizer.eos_token_id, -1)
    got = ours.input_ids.masked_fill(ours.input_ids == tokenizer.eos_token_id, -1)
    # Both stop a row at its eos; after it generate pads with pad, we do too.
    assert torch.equal(got[:, ids.shape[1]:], expected[:, ids.shape[1]:])


def test_pick_samples_the_tempered_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    seeds = row_seeds(7, range(20000))
    for sampling, allowed in [
        (Sampling(temperature=1.0), 5), (Sampling(temperature=0.5), 5),
        (Sampling(top_k=2), 2), (Sampling(top_p=0.6), 2),
    ]:
        tokens = pick(logits, sampling, seeds, step=0)
        counts = torch.bincount(tokens, minlength=5).double() / len(tokens)
        scores = logits[0] / sampling.temperature
        if sampling.top_k:
            scores[sampling.top_k:] = float("-inf")
        if sampling.top_p < 1:
            scores[2:] = float("-inf")  # p = 0.61, 0.22: the first two tokens reach 0.6
        expected = torch.softmax(scores.double(), -1)
        assert (counts[allowed:] == 0).all()
        assert torch.allclose(counts, expected, atol=0.015), (sampling, counts, expected)


def test_the_two_level_inverse_cdf_picks_what_one_cumulative_sum_picks():
    """Over a vocabulary wider than a block the token is found block first; it is the token a float64
    cumulative sum over the whole row gives, and never one of probability 0 (top-k cuts, padding)."""
    from engine.generation import CDF_BLOCK, inverse_cdf, uniforms

    torch.manual_seed(0)
    vocab = 5 * CDF_BLOCK + 123
    logits = torch.randn(3000, vocab) * 4
    logits[:1000, : vocab // 2] = float("-inf")  # half the row impossible
    logits[1000:2000, vocab - 3 :] = 30.0  # mass at the very end, in the partly padded block
    logits[2000:] = logits[2000:].masked_fill(torch.rand(1000, vocab) < 0.999, float("-inf"))  # a few tokens
    logits[2000:, 7] = 0.0  # at least one
    probs = torch.softmax(logits, -1)
    u = uniforms(row_seeds(3, range(3000)), 0)
    u[:10] = 1.0  # the top of the range
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u.unsqueeze(-1) * cdf[:, -1:])).squeeze(-1).clamp(max=vocab - 1)
    got = inverse_cdf(probs, u)
    assert (got != expected).sum() <= 1  # float64 rounding may differ at a boundary, about once in 1e13
    assert (probs.gather(-1, got.unsqueeze(-1)) > 0).all()
    # u landing exactly on block boundaries: uniform probabilities make every cumulative sum exact.
    flat = torch.full((5, 4 * CDF_BLOCK), 1.0 / (4 * CDF_BLOCK))
    on_edges = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.25 + 2.0**-12], dtype=torch.float64)
    picked = inverse_cdf(flat, on_edges)
    assert picked.tolist() == [CDF_BLOCK - 1, 2 * CDF_BLOCK - 1, 3 * CDF_BLOCK - 1, 4 * CDF_BLOCK - 1, CDF_BLOCK]


def _with_generation_defaults(src, dst, defaults):
    shutil.copytree(src, dst)
    config = json.loads((dst / "generation_config.json").read_text())
    config.update(defaults)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


def test_a_checkpoints_generation_defaults_never_reach_the_rollout(tiny, demo_dir, tmp_path):
    """A checkpoint whose generation_config asks for top-k 50, a repetition penalty, a minimum length and
    banned words: rollouts sample from the distribution PPO scores all the same."""
    model, tokenizer = tiny
    loud = _with_generation_defaults(demo_dir / "model", tmp_path / "loud", {
        "top_k": 50, "repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_new_tokens": 16,
        "temperature": 0.3, "suppress_tokens": [tokenizer.eos_token_id], "bad_words_ids": [[5], [6]],
    })
    loud_model = AutoModelForCausalLM.from_pretrained(loud).eval()
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 16, "temperature": 3.0, "top_k": 0})
    convs = [[Turn("user", QUESTIONS[i % 8])] for i in range(64)]
    keys = list(range(64))
    plain = rollout(model, tokenizer, convs, stage, keys, seed=3)
    other = rollout(loud_model, tokenizer, convs, stage, keys, seed=3)
    assert torch.equal(plain.input_ids, other.input_ids)
    # top_k 0 means no top-k: at a high temperature the tiny model's 1,024 tokens are nearly uniform,
    # and far more than 50 distinct tokens come out of one position.
    first = plain.response_ids[:, 0]
    assert len(set(first.tolist())) > 50
    assert ((plain.response_ids[:, 1:] == 5) | (plain.response_ids[:, 1:] == 6)).any()  # "banned" words appear


def test_chunked_rollouts_equal_one_chunk(tiny):
    model, tokenizer = tiny
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 10, "chunk_size": 64})
    convs = [[Turn("user", QUESTIONS[i % 8] + " " * (i % 3))] for i in range(12)]
    whole = rollout(model, tokenizer, convs, stage, list(range(100, 112)), seed=5)
    chunked = rollout(model, tokenizer, convs, stage.model_copy(update={"chunk_size": 5}),
                      list(range(100, 112)), seed=5)
    assert chunked.responses == whole.responses
    assert torch.equal(chunked.response_mask, whole.response_mask)
    assert torch.allclose(chunked.logprobs, whole.logprobs, atol=1e-5)
    alone = rollout(model, tokenizer, convs[3:4], stage, [103], seed=5)  # a prompt's answer is its own
    assert alone.responses == whole.responses[3:4]
    auto = rollout(model, tokenizer, convs, stage.model_copy(update={"chunk_size": "auto"}), list(range(100, 112)),
                   seed=5)  # the recipes' default: off CUDA, the whole rollout at once
    assert auto.responses == whole.responses


def test_auto_chunks_take_what_the_free_memory_holds(tiny):
    """`chunk_size: auto` on a GPU: rows = (80 % of the free memory - the prefill's slice) over a row's bytes
    (its KV cache for the whole answer, the sampler's logits), in steps of 8, in batches of even width."""
    from engine.estimate import DECODE_FREE_SHARE, bloom_prefill_bytes
    from engine.generation import Engine

    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    config = model.config
    row = engine.row_bytes(256, 512)
    kv = 2 * config.num_hidden_layers * config.hidden_size * 512 * 4  # float32 on a CPU
    sampler = Engine.SAMPLER_COPIES * config.vocab_size * 4
    assert row == kv + sampler
    assert engine.row_bytes(256, 1024) - row == kv  # twice the tokens, twice the cache
    # The trunk the decoder keeps for the scoring forward: a ring of float32 layer inputs per layer on the
    # device (the rest waits in host memory).
    assert engine.row_bytes(256, 512, captured=2) - row == 2 * 64 * config.hidden_size * 4
    fixed = engine.fixed_bytes(256, 1024)  # the BLOOM decoder prefills 8,192 prompt tokens at a time
    assert fixed == bloom_prefill_bytes(32, 256, config.hidden_size, config.n_head, 4)
    assert engine.fixed_bytes(256, 20) == bloom_prefill_bytes(20, 256, config.hidden_size, config.n_head, 4)

    def free_for(rows: float, limit: int = 1024) -> int:
        return int((rows * row + engine.fixed_bytes(256, limit)) / DECODE_FREE_SHARE) + 1

    assert engine.rows_for(free_for(100), 256, 512, limit=1024) == 96  # in steps of 8
    assert engine.rows_for(free_for(99.9), 256, 512, limit=1024) == 96
    assert engine.rows_for(free_for(100, 48), 256, 512, limit=48) == 48
    assert engine.rows_for(free_for(100), 256, 512, limit=120) == 64  # 60 + 60 (rounded up), not 96 + 24
    assert engine.rows_for(free_for(100), 256, 512, limit=1000) == 96  # 11 batches of 91 rounded up to 8
    assert engine.rows_for(free_for(13.5), 256, 512, limit=64) == 13  # below 16 rows, not rounded to 8
    assert engine.rows_for(free_for(13.5, 20), 256, 512, limit=20) == 10
    assert engine.rows_for(0, 256, 512, limit=64) == 1
    assert engine.rows_that_fit(256, 512, 37) == 37  # off CUDA: the whole rollout
    # Through transformers the prefill runs over the whole batch: a cost per row, nothing fixed.
    plain = Engine(model, tokenizer, fast=False)
    assert plain.fixed_bytes(256, 1024) == 0
    assert plain.row_bytes(256, 512) == row + bloom_prefill_bytes(1, 256, config.hidden_size, config.n_head, 4)
    assert plain.row_bytes(256, 512, captured=2) == plain.row_bytes(256, 512)  # transformers keeps none
    assert plain.plan(256, 512, 37, capture=(2, 3)) == (37, ())
    assert engine.plan(256, 512, 37, capture=(2, 3)) == (37, (2, 3))  # off CUDA nothing costs a batch


def test_sampled_logprobs_are_those_the_scoring_forward_gives(demo_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2).eval()
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 10, "temperature": 0.7})
    convs = [[Turn("user", q)] for q in QUESTIONS]
    batch = rollout(hydra.policy, tokenizer, convs, stage, list(range(8)), seed=1)
    with torch.no_grad():
        out = hydra(batch.input_ids, batch.attention_mask, with_values=False,
                    logits_to_keep=batch.response_ids.shape[1] + 1)
    from engine.ppo.core import logprobs_of

    scored = logprobs_of(out.logits[:, :-1], batch.response_ids, temperature=0.7) * batch.response_mask
    assert scored.dtype == batch.logprobs.dtype == torch.float32
    assert torch.allclose(scored, batch.logprobs, atol=1e-5)


def test_ppo_scores_rollouts_at_the_temperature_they_were_sampled_at(demo_dir):
    """The trainer's log-probs (the ratio's old ones, the reference's for the KL) are of the distribution the
    rollouts were drawn from. Scored untempered, tokens sampled at 0.7 by a policy that had spread made the
    KL estimate log p - log p_ref negative at every step: the KL penalty became a bonus for moving away."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from engine.ppo.trainer import PPOTrainer

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2).eval()
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 10, "temperature": 0.7})
    batch = rollout(hydra.policy, tokenizer, [[Turn("user", q)] for q in QUESTIONS], stage, list(range(8)), seed=1)
    trainer = SimpleNamespace(stage=stage, accelerator=Accelerator(cpu=True))  # what _forward reads of its trainer
    with torch.no_grad():
        logprobs, ref, _, _ = PPOTrainer._forward(trainer, hydra, batch, with_ref=True)
    mask = batch.response_mask
    assert torch.allclose(logprobs * mask, batch.logprobs, atol=1e-5)
    assert torch.allclose(ref * mask, logprobs * mask, atol=1e-6)  # the policy is the reference yet: KL 0
    untempered = hydra(batch.input_ids, batch.attention_mask, with_values=False,
                       logits_to_keep=batch.response_ids.shape[1] + 1).logits.detach()
    from engine.ppo.core import logprobs_of

    assert not torch.allclose(logprobs_of(untempered[:, :-1], batch.response_ids) * mask, logprobs * mask, atol=1e-3)


@pytest.mark.parametrize("static", [False, True])
def test_the_decoder_keeps_the_trunk_the_scoring_forward_computes(demo_dir, monkeypatch, static):
    """The inputs of layers L-k and L-k_v that the BLOOM decoder keeps while it samples a chunked rollout
    (prefill in slices, static steps across span buckets) are the scoring forward's, at every position that
    a later position or a scored logit reads: the prompt's real tokens and each answer up to its eos."""
    from engine.bloom_decoder import Stepper

    monkeypatch.setattr(Stepper, "SPAN", 8)
    monkeypatch.setattr("engine.estimate.PREFILL_TOKENS", 20)  # slices of a few prompts
    monkeypatch.setattr("engine.bloom_decoder.RING", 5)  # the ring copied out several times, and a part of it
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2).eval()
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 24, "temperature": 1.0, "top_k": 6,
                                                    "chunk_size": 3})
    convs = [[Turn("user", q)] for q in QUESTIONS]
    monkeypatch.setenv("RLHF_DECODE", "" if static else "eager")
    # The untrained demo model seldom says eos: make eos a token that ends answers at different lengths.
    answers = rollout(hydra.policy, tokenizer, convs, stage, list(range(8)), seed=3).response_ids

    def lengths_if_eos(token: int) -> set[int]:
        return {int((row == token).nonzero()[0]) + 1 if (row == token).any() else len(row) for row in answers}

    eos = next(t for t in answers[0, 2:].tolist() if len(lengths_if_eos(t)) > 1 and min(lengths_if_eos(t)) > 2)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    batch = rollout(hydra.policy, tokenizer, convs, stage, list(range(8)), seed=3, capture=hydra.trunk_layers)
    kept = batch.trunk.join("cpu")
    assert sorted(kept) == list(hydra.trunk_layers) == [model.config.n_layer - 2, model.config.n_layer - 1]
    assert len(batch.trunk.parts) == 3  # a chunk each, laid out as concat lays out the answers only on join
    decoded = hydra.trunk_from(kept)
    with torch.no_grad():
        scored = hydra(batch.input_ids, batch.attention_mask, with_ref=True, keep_trunk=True).trunk
    fed = batch.attention_mask.bool().clone()
    fed[:, -1] = False  # the last token chosen is never fed to the decoder
    lengths = batch.response_mask.sum(1)
    assert lengths.min() < lengths.max() == batch.response_ids.shape[1]  # answers that end early, and one that not
    for got, want in ((decoded.policy, scored.policy), (decoded.value, scored.value)):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.allclose(got[fed], want[fed], atol=1e-5)
        assert got.isfinite().all()  # the padding too: a NaN there would reach real rows through 0 x NaN
    assert (decoded.policy[:, -1] == 0).all()
    plain = rollout(hydra.policy, tokenizer, convs, stage, list(range(8)), seed=3)
    assert plain.trunk is None and plain.responses == batch.responses  # keeping it changes no answer


def test_streaming_gives_the_greedy_answer_piece_by_piece(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    sampling = Sampling(max_new_tokens=12, temperature=0)
    pieces = list(engine.stream(prompts(1)[0], sampling))
    ids, mask = engine.encode(prompts(1))
    whole = engine.decode(engine.generate(ids, mask, sampling))[0]
    assert pieces[-1].final and pieces[-1].text.lstrip(" ") == whole and not any(p.final for p in pieces[:-1])
    assert len(pieces) > 2 and "".join(p.text for p in pieces[:-1]).lstrip(" ") == whole


def test_concat_pads_prompts_left_and_responses_right(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    a = engine.generate(*engine.encode(prompts(2)), Sampling(max_new_tokens=3, temperature=0))
    b = engine.generate(*engine.encode(["USER: a long prompt that is longer than the others\nASSISTANT:"]),
                        Sampling(max_new_tokens=6, temperature=0))
    both = concat([a, b], engine.pad_id)
    assert both.prompt_length == max(a.prompt_length, b.prompt_length)
    assert both.response_mask.shape == (3, max(a.response_mask.shape[1], b.response_mask.shape[1]))
    assert torch.equal(both.response_ids[:2, : a.response_mask.shape[1]], a.response_ids)
    assert (both.attention_mask.sum(1)[:2] == a.attention_mask.sum(1)).all()


def test_under_bf16_rollouts_sample_from_the_float32_distribution_ppo_scores(demo_dir):
    """A bf16 trunk under bf16 autocast: the sampler draws from float32 logits, the very ones the scoring
    forward computes (bf16 logits of magnitude ~20 would be off by rounding quanta of up to 0.125)."""
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model").to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2).eval()
    with torch.no_grad():
        hydra.lm.get_output_embeddings().weight.mul_(40.0)
    engine = Engine(hydra.policy, tokenizer)
    ids, mask = engine.encode(prompts())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sampled_from = engine.next_logits(ids, mask)
        scored = hydra(ids, mask, with_values=False, logits_to_keep=1).logits[:, -1]
    assert sampled_from.dtype == torch.float32 and sampled_from.abs().max() > 8
    assert torch.allclose(sampled_from, scored, atol=1e-4)
    assert (sampled_from - sampled_from.to(torch.bfloat16).float()).abs().max() > 1e-2  # not bf16 values


SAMPLED = Sampling(max_new_tokens=40, temperature=1.3, top_k=40, top_p=0.95, seed=11)


def _both_paths(model, tokenizer, sampling, **fast_options):
    out = []
    for fast in (True, False):
        engine = Engine(model, tokenizer, fast=fast, **(fast_options if fast else {}))
        assert engine.fast is fast
        out.append(engine.generate(*engine.encode(prompts()), sampling))
    return out


@pytest.mark.parametrize("static,attention", [(False, "sdpa"), (True, "sdpa"), (True, "bmm")])
def test_the_bloom_decoder_equals_the_transformers_forward(tiny, monkeypatch, static, attention):
    """Same tokens and log-probs from the decoder's own step as from the transformers forward with its
    cache; `static` runs the bucketed steps a CUDA graph replays (small buckets, so answers cross many)."""
    from engine.bloom_decoder import Stepper

    monkeypatch.setattr(Stepper, "SPAN", 8)
    model, tokenizer = tiny
    for sampling in (Sampling(max_new_tokens=40, temperature=0), SAMPLED):
        fast, slow = _both_paths(model, tokenizer, sampling, graph=static, attention=attention)
        assert torch.equal(fast.input_ids, slow.input_ids) and fast.response_mask.sum(1).max() > 16
        assert torch.allclose(fast.logprobs, slow.logprobs, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "bmm"])
def test_a_prefill_in_slices_of_rows_fills_the_same_cache_and_gives_the_same_answers(tiny, monkeypatch, attention):
    """The decoder prefills a wide batch a slice of rows at a time (its working tensors are a slice's, not
    the batch's): the same logits and KV cache as the whole batch at once, and so the same answers."""
    from engine import estimate
    from engine.bloom_decoder import BloomDecoder

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, fast=True, attention=attention)
    ids, mask = engine.encode(prompts())
    decoder = BloomDecoder(model, torch.float32, attention)
    with torch.no_grad():
        whole, sliced = decoder.batch(ids, mask, 8), decoder.batch(ids, mask, 8)
        expected = whole.prefill()
        got = sliced.prefill(rows=3)  # 3 + 3 + 2 rows, the first slice's prompts are not the longest
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    prompt = ids.shape[1]
    assert torch.allclose(sliced.keys[:, :, :, :prompt], whole.keys[:, :, :, :prompt], atol=1e-5, rtol=0)
    assert torch.allclose(sliced.values[:, :, :, :prompt], whole.values[:, :, :, :prompt], atol=1e-5, rtol=0)
    assert not sliced.keys[:, :, :, prompt:].any()  # nothing written past the prompts

    sampling = Sampling(max_new_tokens=24, temperature=0)
    at_once = engine.generate(ids, mask, sampling)
    monkeypatch.setattr(estimate, "PREFILL_TOKENS", 3 * prompt)  # Engine's prefills: 3 rows at a time
    assert estimate.prefill_rows(len(ids), prompt) == 3
    in_slices = Engine(model, tokenizer, fast=True, attention=attention).generate(ids, mask, sampling)
    assert torch.equal(in_slices.input_ids, at_once.input_ids)
    assert torch.allclose(in_slices.logprobs, at_once.logprobs, atol=1e-5)


def test_the_bloom_decoder_merges_lora_adapters_and_honours_them_switched_off(demo_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    plain = Engine(model, tokenizer).generate(*Engine(model, tokenizer).encode(prompts()), SAMPLED)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"],
                                                  init_lora_weights=False))
    for _, module in peft_model.named_modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    fast, slow = _both_paths(peft_model, tokenizer, SAMPLED)
    assert torch.equal(fast.input_ids, slow.input_ids) and torch.allclose(fast.logprobs, slow.logprobs, atol=1e-5)
    assert not torch.equal(fast.input_ids, plain.input_ids)  # the adapters do change the answers
    with peft_model.disable_adapter():
        off = Engine(peft_model, tokenizer).generate(*Engine(model, tokenizer).encode(prompts()), SAMPLED)
    assert torch.equal(off.input_ids, plain.input_ids)


def test_the_decoder_shares_frozen_weights_and_snapshots_trainable_ones_once(demo_dir):
    """Under bf16 autocast: the bf16 trunk is used as it is (no copy), the float32 trainable layers are cast
    once (what autocast would do at every step), the head is float32; sampled log-probs are the scoring
    forward's up to CPU autocast's bf16 layer norms (a CUDA autocast runs them in float32, as the decoder)."""
    from engine.bloom_decoder import BloomDecoder
    from engine.ppo.core import logprobs_of

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model").to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    hydra = Hydra(model, num_layers_unfrozen=1, value_layers=2).eval()
    decoder = BloomDecoder(hydra.policy, torch.bfloat16)
    blocks = hydra.lm.transformer.h
    assert decoder.layers[0].qkv[0].data_ptr() == blocks[0].self_attention.query_key_value.weight.data_ptr()
    top = blocks[-1].self_attention.query_key_value.weight
    assert top.dtype == torch.float32 and decoder.layers[-1].qkv[0].dtype == torch.bfloat16
    assert decoder.layers[-1].qkv[0].data_ptr() != top.data_ptr() and decoder.head[0].dtype == torch.float32
    stage = load_recipe(TINY).ppo.model_copy(update={"max_new_tokens": 10, "temperature": 0.7})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batch = rollout(hydra.policy, tokenizer, [[Turn("user", q)] for q in QUESTIONS], stage, list(range(8)), 1)
        out = hydra(batch.input_ids, batch.attention_mask, with_values=False,
                    logits_to_keep=batch.response_ids.shape[1] + 1)
    scored = logprobs_of(out.logits[:, :-1], batch.response_ids, temperature=0.7) * batch.response_mask
    assert batch.logprobs.dtype == torch.float32
    assert (scored - batch.logprobs).abs().max() < 0.15


def test_a_decode_step_has_no_host_synchronisation(tiny):
    """What a CUDA graph needs (checkable on a CPU): the whole step, sampler included, traces as one graph
    with no break (no `.item()`, no branch on a tensor's value, no host copies)."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, graph=True)
    ids, mask = engine.encode(prompts(4))
    stepper = engine._stepper(ids, mask, SAMPLED, row_seeds(0, range(4)))
    steps = iter(stepper)
    next(steps), next(steps)
    compiled = torch.compile(lambda: stepper._next(stepper.b.length), fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled()
    assert stepper.step.item() == 3 and (stepper.tokens[:, 2] != 0).any()


def test_the_split_head_has_float32_accuracy_forward_and_backward():
    """The split-bf16 head (CUDA under bf16 autocast; the decoder's and training's) against float64: far
    closer than bf16 logits (steps of 0.125 at magnitude 16-32), for a float32 head and for a bf16 one, and
    its gradients are bf16 products accumulated in float32, as autocast's for any other trainable layer.
    (Off CUDA the bf16 x bf16 products run on float32 operands: exact, as on the tensor cores.)"""
    from engine.bloom_decoder import _SplitHead
    from engine.head import _SplitLinear

    torch.manual_seed(0)
    hidden = torch.randn(16, 64) * 3
    for weight in (torch.randn(500, 64), torch.randn(500, 64).to(torch.bfloat16)):
        exact = hidden.double() @ weight.double().t()
        assert exact.abs().max() > 16
        for split in (_SplitHead(weight, None)(hidden), _SplitLinear.apply(hidden, weight, None)):
            assert split.dtype == torch.float32 and (split.double() - exact).abs().max() < 2e-3
        assert (hidden.bfloat16().double() @ weight.double().t() - exact).abs().max() > 2e-2
    from engine.head import split_weight_cat

    weight = torch.randn(500, 64)
    assert torch.equal(split_weight_cat(weight, rows=64), split_weight_cat(weight))  # row blocks: the same

    x = hidden.clone().requires_grad_(True)
    w = torch.randn(500, 64, requires_grad=True)
    b = torch.randn(500, requires_grad=True)
    upstream = torch.randn(16, 500)
    (_SplitLinear.apply(x, w, b) * upstream).sum().backward()
    split_grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (torch.nn.functional.linear(x, w, b) * upstream).sum().backward()
    for got, want in zip(split_grads, (x.grad, w.grad, b.grad)):
        assert got.dtype == torch.float32
        assert (got - want).norm() < 1e-2 * want.norm()  # bf16 operands: ~2^-9 each
    for t in (x, w):  # and they are the bf16 product's, not the float32 one's
        t.grad = None
    xb, wb = x.detach().bfloat16().float().requires_grad_(True), w.detach().bfloat16().float().requires_grad_(True)
    (torch.nn.functional.linear(xb, wb) * upstream.bfloat16().float()).sum().backward()
    assert torch.allclose(split_grads[0], xb.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(split_grads[1], wb.grad, rtol=1e-5, atol=1e-5)


def test_continuous_batching_still_cannot_serve_bloom():
    """Why the engine has a decoder of its own for BLOOM (engine/generation.py's docstring): transformers'
    `generate_batch` fails every BLOOM request. Should a transformers upgrade make it work, this fails, and
    the paged path is to be measured against the engine's (benchmarks/generate.py)."""
    from transformers import BloomConfig, BloomForCausalLM, GenerationConfig

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)).eval()
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=63)
    try:
        outputs = model.generate_batch([[5, 6, 7], [8, 9]], generation_config=config)
    except Exception as error:  # a refusal up front is the same answer
        outputs = {"error": error}
    assert not any(getattr(out, "generated_tokens", None) for out in outputs.values())


def test_the_decoder_splits_a_bf16_head_as_it_is_and_a_float32_one_in_two(demo_dir, monkeypatch):
    """A bf16 head (chat, evaluation, the reference's decode) is its own high part: the decoder reads 2
    bytes a weight at every step, and no float32 copy of it is made. Before, the head was widened to float32
    first and split into [high | zeros]: twice the head's memory and traffic (2 GB a step at bloomz-7b1).
    The split is CUDA's; here the same code runs on float32 products."""
    from engine import bloom_decoder
    from engine.bloom_decoder import BloomDecoder

    monkeypatch.setattr(bloom_decoder, "_split_pays", lambda device: True)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model").to(torch.bfloat16).eval()
    head = model.get_output_embeddings().weight
    decoder = BloomDecoder(model, torch.bfloat16)
    assert decoder.head is None and not decoder.split_head.stacked
    assert decoder.split_head.weight.dtype == torch.bfloat16 and decoder.split_head.weight.numel() == head.numel()
    hidden = torch.randn(4, head.shape[1]) * 3
    exact = hidden.double() @ head.double().t()
    assert (decoder.split_head(hidden).double() - exact).abs().max() < 2e-3 * exact.abs().max()

    hydra = Hydra(AutoModelForCausalLM.from_pretrained(demo_dir / "model").to(torch.bfloat16), num_layers_unfrozen=1,
                  value_layers=2, train_head=True)  # a trained head: float32, split into high and remainder
    trained = BloomDecoder(hydra.policy, torch.bfloat16)
    assert trained.split_head.stacked and trained.split_head.weight.shape == (head.shape[1] * 2, head.shape[0])


def test_a_float32_model_sampled_under_bf16_autocast_decodes_in_bf16(tiny):
    """`precision: bf16` over a float32 model: PPO scores under bf16 autocast, so the decoder samples in
    bf16 too (and keeps a bf16 cache). Before, it was built inside its own autocast-off region and always
    took the weights' float32."""
    model, tokenizer = tiny
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        engine = Engine(model, tokenizer)
        engine.generate(*engine.encode(prompts(2)), Sampling(max_new_tokens=3))
    assert engine.fast and engine._decoder.dtype == torch.bfloat16
    plain = Engine(model, tokenizer)
    plain.generate(*plain.encode(prompts(2)), Sampling(max_new_tokens=3))
    assert plain._decoder.dtype == torch.float32


def test_the_decoder_computes_each_lora_layer_as_the_scoring_forward_does(demo_dir):
    """LoRA over a bf16 model, adapters as small as early PPO makes them (|ΔW| ~ 3e-5, under half of bf16's
    step at |W| ~ 0.02): each adapted linear of the decoder gives, bit for bit, what peft's forward gives
    under bf16 autocast (the base product, then the adapter's added). Merged into the bf16 weight (before),
    the rounding of W + ΔW changed a third of the outputs: the rollouts came from another policy than the
    one PPO scores."""
    from peft import LoraConfig

    from engine.bloom_decoder import BloomDecoder, _apply, _linear

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model", dtype=torch.bfloat16)
    hydra = Hydra(model, 2, 2, lora=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
    torch.manual_seed(0)
    adapted = [m for m in hydra.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    for module in adapted:
        torch.nn.init.normal_(module.lora_B["default"].weight, std=5e-5)
    decoder = BloomDecoder(hydra.policy, torch.bfloat16)
    linears = [lin for layer in decoder.layers for lin in (layer.qkv, layer.dense, layer.up, layer.down)]
    assert sum(len(lin[2]) for lin in linears) == len(adapted) == 8  # the top 2 layers' four linears
    merged_differ = 0
    for module in adapted:
        x = torch.randn(16, module.base_layer.in_features)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = module(x)
        with torch.no_grad():
            assert torch.equal(_apply(x, _linear(module, torch.bfloat16)), want)
            merged_differ += (_apply(x, _linear(module, torch.bfloat16, merge=True)) != want).float().mean().item()
    assert merged_differ / len(adapted) > 0.1
