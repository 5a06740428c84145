"""The engine's decode paths on a GPU: do they agree, and where does a decode step's time go?

1. Agreement (float32, then bf16 under autocast with a hydra's float32 trainable layers): the same prompts
   through transformers' forward (`RLHF_DECODE=transformers`), the BLOOM decoder stepping eagerly, and the
   BLOOM decoder replaying CUDA graphs: share of identical tokens, largest log-prob difference, and the
   largest difference between the sampled tokens' log-probs and the scoring forward's (what PPO uses).
   Then the trunk the decoder keeps for the scoring forward against the one that forward computes itself.
2. Where the time goes: per decode step (prefill excluded) for `generate` and each decoder variant
   (attention sdpa or bmm, CUDA graphs or eager) at --shape and --batch, against the HBM roofline; and the
   eager decoder's kernels per step (the profiler).
3. The LM head at bloomz-7b1 shape (4096 x 250,880) for a decode batch (128 rows) and a scoring minibatch
   (16 x 257 rows): float32 (CUDA cores), split bf16 (the decoder's, tensor cores) and plain bf16 (rounded
   logits): time and largest error against a float64 product.

    python benchmarks/decode_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"small": (256, 4, 4, 4096), "bloom-560m": (1024, 24, 16, 250880), "bloomz-7b1-mt": (4096, 30, 32, 250880)}
TOKENIZER = SimpleNamespace(eos_token_id=-1, pad_token_id=0)


def model_of(shape: str, device: str, dtype):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    hidden, layers, heads, vocab = SHAPES[shape]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
                                                pad_token_id=0)).eval()
    finally:
        torch.set_default_dtype(previous)


def prompts(rows: int, vocab: int, device: str, width: int = 48):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        pad = int(torch.randint(0, width // 2, (1,), generator=g))
        ids[r, :pad], mask[r, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def agreement(policy, scorer, ids, mask, sampling, autocast) -> list[str]:
    import torch

    from engine.generation import Engine
    from engine.ppo.core import logprobs_of

    out = {}
    for name, options in (("transformers", {"fast": False}), ("eager", {"fast": True, "graph": False}),
                          ("graph", {"fast": True, "graph": True})):
        with torch.no_grad(), autocast():
            out[name] = Engine(policy, TOKENIZER, **options).generate(ids, mask, sampling)
    rows = []
    base = out["transformers"]
    for name, g in out.items():
        with torch.no_grad(), autocast():
            logits = scorer(g.input_ids, g.attention_mask, g.response_ids.shape[1] + 1)
        scored = logprobs_of(logits[:, :-1], g.response_ids)
        same = (g.response_ids == base.response_ids).float().mean().item() if g.response_ids.shape == \
            base.response_ids.shape else float("nan")
        first = (g.response_ids != base.response_ids).float().argmax(1)
        diverged = (g.response_ids != base.response_ids).any(1)
        upto = torch.where(diverged, first, torch.full_like(first, g.response_ids.shape[1]))
        cols = torch.arange(g.response_ids.shape[1], device=ids.device)[None, :] < upto[:, None]
        lp_diff = ((g.logprobs - base.logprobs).abs() * cols).max().item()
        rows.append(f"| {name} | {same:.1%} | {lp_diff:.2e} | {(scored - g.logprobs).abs().max().item():.2e} |")
    return rows


def kept_trunk(hydra, ids, mask, sampling, autocast) -> list[str]:
    """The trunk the decoder keeps while sampling (eager steps and CUDA graphs) against the one the scoring
    forward computes for the same rows, and what scoring from each gives: log-probs, reference log-probs and
    values (PPO's old log-probs, KL and advantages come from these)."""
    import torch

    from engine.generation import Engine, row_seeds
    from engine.ppo.core import logprobs_of

    rows = []
    for name, graph in (("eager", False), ("graph", True)):
        with torch.no_grad(), autocast():
            # In chunks of 3 rows (each its own left padding), each chunk's trunk through pinned host memory
            # on CUDA, joined as the trainer joins them.
            g = Engine(hydra.policy, TOKENIZER, fast=True, graph=graph).generate_chunked(
                ids, mask, sampling, row_seeds(sampling.seed, range(ids.shape[0]), ids.device), 3,
                hydra.trunk_layers)
            keep = g.response_ids.shape[1] + 1
            own = hydra(g.input_ids, g.attention_mask, with_ref=True, logits_to_keep=keep, keep_trunk=True)
            kept = hydra.trunk_from(g.trunk.join(ids.device))
            via = hydra(g.input_ids, g.attention_mask, with_ref=True, logits_to_keep=keep, trunk=kept)
        fed = g.attention_mask.bool().clone()
        fed[:, -1] = False  # the last token is never fed
        scale = own.trunk.policy[fed].abs().max().item()
        diff = (kept.policy[fed] - own.trunk.policy[fed]).abs().max().item()
        lp = (logprobs_of(via.logits[:, :-1], g.response_ids) - logprobs_of(own.logits[:, :-1], g.response_ids))
        ref = (logprobs_of(via.ref_logits[:, :-1], g.response_ids)
               - logprobs_of(own.ref_logits[:, :-1], g.response_ids))
        values = (via.values - own.values)[:, g.prompt_length - 1 : -1]
        rows.append(f"| {name} | {diff:.2e} ({diff / scale:.1e} of the largest) | {lp.abs().max().item():.2e} | "
                    f"{ref.abs().max().item():.2e} | {values.abs().max().item():.2e} |")
    return rows


def decode_only(model, batch: int, steps: int, device: str) -> tuple[list[str], list[str]]:
    """Per decode step (prefill excluded: a decode of `steps` tokens minus a decode of one), for `generate`
    and the decoder's variants; and the kernels of the eager decoder's steps (the profiler, prefill
    excluded), for each attention."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import GenerationConfig

    from engine.generation import Engine, Sampling, row_seeds

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    vocab = model.config.vocab_size
    ids, mask = prompts(batch, vocab, device, width=256)

    def plain(n: int):
        config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=n,
                                  min_new_tokens=0, eos_token_id=None, pad_token_id=0)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    def ours(n: int, **options):
        return lambda: Engine(model, TOKENIZER, **options).generate(ids, mask, Sampling(max_new_tokens=n))

    variants = {"generate": lambda n: plain(n)}
    for attention in ("sdpa", "bmm"):
        for graph in (True, False):
            label = f"decoder, {attention}, {'CUDA graphs' if graph else 'eager'}"
            variants[label] = lambda n, a=attention, g=graph: ours(n, attention=a, graph=g)
    hidden, layers, _, _ = (model.config.hidden_size, model.config.n_layer, None, vocab)
    weights = sum(p.numel() for p in model.transformer.h.parameters()) * 2 + vocab * hidden * 4
    kv = sum(2 * layers * batch * (256 + s) * hidden * 2 for s in range(steps)) / steps
    roof_ms = (weights + kv) / BANDWIDTH / 1e-3
    rows = []
    for label, make in variants.items():
        n = steps if label != "generate" else max(2, steps // 2)
        times = {}
        with torch.no_grad():
            for count in (1, n):
                run = make(count)
                run()
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                times[count] = time.perf_counter() - t0
        per_step = (times[n] - times[1]) / (n - 1)
        rows.append(f"| {label} | {per_step * 1e3:.2f} | {times[1] * 1e3:.0f} | {roof_ms / (per_step * 1e3):.0%} |")

    breakdown = []
    field = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    for attention in ("sdpa", "bmm"):
        engine = Engine(model, TOKENIZER, graph=False, attention=attention)
        with torch.no_grad():
            stepper = engine._stepper(ids, mask, Sampling(max_new_tokens=64), row_seeds(0, range(batch)))
            it = iter(stepper)
            for _ in range(8):
                next(it)
            sync()
            with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
                for _ in range(32):
                    next(it)
                sync()
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, field, 0.0), reverse=True)
        total = sum(getattr(e, field, 0.0) for e in events) or 1.0
        breakdown.append(f"| **{attention}: all kernels** | {total / 1e3 / 32:.3f} | 100% |")
        breakdown.extend(f"| {e.key[:80]} | {getattr(e, field) / 1e3 / 32:.3f} | {getattr(e, field) / total:.0%} |"
                         for e in events[:8])
    return rows, breakdown


BANDWIDTH = 4.8e12  # H200; the roofline column assumes it


def head_products(device: str) -> list[str]:
    import torch

    from engine.bloom_decoder import _SplitHead

    torch.manual_seed(0)
    weight = torch.randn(250880, 4096, device=device) * 0.02
    split = _SplitHead(weight, None)
    plain = weight.to(torch.bfloat16).t()
    rows = []
    for count in (128, 16 * 257):
        hidden = torch.randn(count, 4096, device=device) * 4
        exact = hidden[:64].double() @ weight.double().t()
        ways = {"float32": lambda: hidden @ weight.t(), "split bf16": lambda: split(hidden),
                "bf16": lambda: (hidden.bfloat16() @ plain).float()}
        for name, fn in ways.items():
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                out = fn()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 5 * 1e3
            err = (out[:64].double() - exact).abs().max().item()
            rows.append(f"| {count} | {name} | {ms:.2f} | {err:.2e} |")
    return rows


def main() -> None:
    import contextlib

    import torch

    from engine.generation import Sampling
    from engine.ppo.hydra import Hydra

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="bloom-560m", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="the timing sections off CUDA too (a dry run)")
    parser.add_argument("--agreement-only", action="store_true", help="section 1 only, no timing")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"Decode paths on {name}, torch {torch.__version__}\n")
    header = ["| path | tokens equal to transformers' | largest log-prob difference (before any divergence) | "
              "largest difference from the scoring forward |", "|---|---:|---:|---:|"]

    model = model_of("small", device, torch.float32)
    ids, mask = prompts(8, model.config.vocab_size, device)
    sampling = Sampling(max_new_tokens=160, temperature=1.0, top_p=0.9, seed=3)

    def plain_scorer(input_ids, attention_mask, keep):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits.float()

    print("float32, 8 left-padded prompts, 160 sampled tokens (top-p 0.9)\n")
    print("\n".join(header + agreement(model, plain_scorer, ids, mask, sampling, contextlib.nullcontext)))

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    hydra = Hydra(model_of("small", device, torch.bfloat16 if device == "cuda" else torch.float32), 1, 2).eval()

    def hydra_scorer(input_ids, attention_mask, keep):
        return hydra(input_ids, attention_mask, with_values=False, logits_to_keep=keep).logits

    print("\nbf16 trunk under autocast, float32 trainable top layer and head (a PPO policy), same prompts\n")
    print("\n".join(header + agreement(hydra.policy, hydra_scorer, ids, mask, sampling, autocast)))
    print("\nThe trunk the decoder keeps (decode batches of 3 rows) against the scoring forward's (same rollout, "
          "same hydra), and the largest differences of what scoring from each gives\n")
    print("| decoder | trunk (layer L-k input) | log-probs | reference log-probs | values |\n|---|---:|---:|---:|---:|")
    print("\n".join(kept_trunk(hydra, ids, mask, sampling, autocast)))

    if (device == "cuda" or args.profile) and not args.agreement_only:
        del model, hydra
        big = model_of(args.shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
        print(f"\nDecode steps alone (prefill excluded): {args.shape} (bf16, head float32-accurate), batch "
              f"{args.batch}, prompts 256 tokens, {args.steps} sampled tokens; roofline: decoder layers bf16 + head "
              f"4 bytes/param + the KV cache so far, at {BANDWIDTH / 1e12:.1f} TB/s\n")
        print("| path | ms per decode step | prefill + 1 step (ms) | share of the roofline |\n|---|---:|---:|---:|")
        rows, breakdown = decode_only(big, args.batch, args.steps, device)
        print("\n".join(rows))
        print("\nThe eager decoder's kernels per decode step (32 steps profiled after the prefill)\n")
        print("| kernel | ms per step | share |\n|---|---:|---:|")
        print("\n".join(breakdown))
        del big
        if device != "cuda":
            return
        torch.cuda.empty_cache()
        print("\nLM head products, 4096 x 250,880 (largest logit about 16)\n")
        print("| rows | product | ms | largest error vs float64 |\n|---:|---|---:|---:|")
        print("\n".join(head_products(device)))


if __name__ == "__main__":
    main()
