"""The engine's decode paths on a GPU: do they agree, and where does a decode step's time go?

1. Agreement (float32, then bf16 under autocast with a hydra's float32 trainable layers): the same prompts
   through transformers' forward (`RLHF_DECODE=transformers`), the BLOOM decoder stepping eagerly, and the
   BLOOM decoder replaying CUDA graphs: share of identical tokens, largest log-prob difference, and the
   largest difference between the sampled tokens' log-probs and the scoring forward's (what PPO uses).
2. Where the time goes (the profiler): wall time per decode step and the share of it the GPU spends in
   kernels, for `generate`, the eager decoder and the graphed decoder, at --shape and --batch.
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


def profile_steps(model, batch: int, steps: int, device: str, breakdown: list[str]) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import GenerationConfig

    from engine.generation import Engine, Sampling

    vocab = model.config.vocab_size
    ids, mask = prompts(batch, vocab, device, width=256)
    sampling = Sampling(max_new_tokens=steps, temperature=1.0)
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    runs = {
        "generate": lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config),
        "decoder, eager": lambda: Engine(model, TOKENIZER, graph=False).generate(ids, mask, sampling),
        "decoder, CUDA graphs": lambda: Engine(model, TOKENIZER, graph=True).generate(ids, mask, sampling),
    }
    rows = []
    for name, run in runs.items():
        with torch.no_grad():
            run()  # warm-up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
        events = prof.key_averages()
        kernels = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
        rows.append(f"| {name} | {wall / steps * 1e3:.2f} | {kernels / steps * 1e3:.2f} | {kernels / wall:.0%} |")
        if name == "decoder, eager":
            top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:10]
            breakdown.extend(f"| {e.key[:70]} | {e.self_device_time_total / 1e3 / steps:.3f} | "
                             f"{e.self_device_time_total / 1e6 / kernels:.0%} |" for e in top)
    return rows


def head_products(device: str) -> list[str]:
    import torch

    from engine.bloom_decoder import _SplitHead

    torch.manual_seed(0)
    weight = torch.randn(250880, 4096, device=device) * 0.02
    split = _SplitHead(weight, None)
    rows = []
    for count in (128, 16 * 257):
        hidden = torch.randn(count, 4096, device=device) * 4
        exact = hidden[:64].double() @ weight.double().t()
        ways = {"float32": lambda: hidden @ weight.t(), "split bf16": lambda: split(hidden),
                "bf16": lambda: (hidden.bfloat16() @ split.high.t()).float()}
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

    if device == "cuda":
        del model, hydra
        big = model_of(args.shape, device, torch.bfloat16)
        print(f"\nWhere a decode step's time goes: {args.shape} (bf16), batch {args.batch}, prompts 256 tokens, "
              f"{args.steps} sampled tokens (profiler: kernel time on the GPU)\n")
        print("| path | wall ms per step | GPU kernel ms per step | GPU busy |\n|---|---:|---:|---:|")
        breakdown: list[str] = []
        print("\n".join(profile_steps(big, args.batch, args.steps, device, breakdown)))
        print("\nThe eager decoder's kernels (what a graph replays), per step\n")
        print("| kernel | ms per step | share |\n|---|---:|---:|")
        print("\n".join(breakdown))
        del big
        torch.cuda.empty_cache()
        print("\nLM head products, 4096 x 250,880 (largest logit about 16)\n")
        print("| rows | product | ms | largest error vs float64 |\n|---:|---|---:|---:|")
        print("\n".join(head_products(device)))


if __name__ == "__main__":
    main()
