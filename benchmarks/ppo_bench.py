"""The harness behind benchmarks/ppo_memory.py and benchmarks/ppo_speed.py.

One PPO step — score a fixed rollout (policy, reference, value, reward), then one PPO epoch of
minibatch updates with the project's own loss functions — for two set-ups of the same model shape:

  hydra     Hydra(k, k_v) + a reward model: trunk shared, only the top layers and the LM head train
  hydra-frozen-head   the same with the LM head frozen and shared (`ppo.train_head: false`)
  separate  four independent models: policy and value (a full trunk + scalar head) train, reference and
            reward frozen — the usual four-model PPO

Each (shape, set-up) runs in its own process so that peak memory is its own. Random weights: the shape
decides the cost. Generation is left out: both set-ups generate with the same policy model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, layers, heads, vocab, batch, prompt tokens, response tokens, minibatch)
    "cpu-12x512": (512, 12, 8, 32000, 4, 64, 64, 2),
    "bloom-560m": (1024, 24, 16, 250880, 8, 256, 256, 4),
    "bloomz-7b1-mt": (4096, 30, 32, 250880, 8, 256, 256, 2),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(setup: str, shape: str, device: str, k: int, k_v: int):
    """Models of one set-up, built straight on the device (a 7B model initialised on the CPU takes minutes).

    On CUDA every set-up trains the way the trainer does: frozen parts bf16, trainable parts float32
    master weights under bf16 autocast (Hydra casts its branches itself; the separate policy and value
    models are float32 here). On the CPU everything is float32. Every model runs on the fused BLOOM
    kernels the project's loaders give (engine/bloom_kernels.py); the figures in results_h200.md before
    2026-11-27 were taken with transformers' own kernels.
    """
    import torch
    from torch import nn
    from transformers import BloomConfig, BloomForCausalLM, BloomForSequenceClassification

    from engine.bloom_kernels import use_fused_kernels
    from engine.ppo.hydra import Hydra

    hidden, layers, heads, vocab, *_ = SHAPES[shape]
    frozen_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0)
    seq_config = BloomConfig(**{**config.to_dict(), "num_labels": 1})

    def make(cls, cfg, dtype) -> nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cls(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        use_fused_kernels(model)
        return model

    reward = make(BloomForSequenceClassification, seq_config, frozen_dtype).requires_grad_(False)
    if setup.startswith("hydra"):
        base = make(BloomForCausalLM, config, frozen_dtype)
        hydra = Hydra(base, num_layers_unfrozen=k, value_layers=k_v, train_head=setup == "hydra")
        return {"hydra": hydra, "reward": reward}
    policy = make(BloomForCausalLM, config, torch.float32)
    reference = make(BloomForCausalLM, config, frozen_dtype).requires_grad_(False)
    value = make(BloomForSequenceClassification, seq_config, torch.float32)
    return {"policy": policy, "reference": reference, "value": value, "reward": reward}


def _values_of(model, ids, mask):
    # A value model is a trunk + scalar head applied at every position (not only the last token).
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def ppo_step(models: dict, ids, mask, prompt: int, minibatch: int, optimizer) -> None:
    """Score the rollout, then one epoch of minibatch updates; only response positions get logits."""
    import contextlib

    import torch

    from engine.ppo import core

    keep = ids.shape[1] - prompt + 1  # logits for positions P-1 .. L-1, as the trainer asks for
    tokens = ids[:, prompt:]
    rmask = mask[:, prompt:].float()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ids.is_cuda else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        if "hydra" in models:
            out = models["hydra"](ids, mask, with_values=True, with_ref=True, logits_to_keep=keep)
            old_logits, ref_logits, old_values = out.logits, out.ref_logits, out.values.float()
        else:
            old_logits = models["policy"](input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            ref_logits = models["reference"](input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            old_values = _values_of(models["value"], ids, mask)
        old_logprobs = core.logprobs_of(old_logits[:, :-1], tokens)
        ref_logprobs = core.logprobs_of(ref_logits[:, :-1], tokens)
        old_values = old_values[:, prompt - 1:-1]
        scores = models["reward"](input_ids=ids, attention_mask=mask).logits[:, 0].float()
        del old_logits, ref_logits
    rewards = -0.05 * (old_logprobs - ref_logprobs) * rmask
    rewards[:, -1] += scores
    advantages, returns = core.gae(old_values, rewards, rmask, 1.0, 0.95)
    advantages = core.whiten(advantages, rmask)
    for first in range(0, ids.shape[0], minibatch):
        sl = slice(first, first + minibatch)
        with autocast:
            if "hydra" in models:
                out = models["hydra"](ids[sl], mask[sl], with_values=True, logits_to_keep=keep)
                logits, values = out.logits, out.values.float()
            else:
                logits = models["policy"](input_ids=ids[sl], attention_mask=mask[sl], logits_to_keep=keep).logits
                values = _values_of(models["value"], ids[sl], mask[sl])
            logprobs = core.logprobs_of(logits[:, :-1], tokens[sl])
            pg, _ = core.policy_loss(logprobs, old_logprobs[sl], advantages[sl], rmask[sl], 0.2)
            vf, _ = core.value_loss(values[:, prompt - 1:-1], old_values[sl], returns[sl], rmask[sl], 0.2)
        optimizer.zero_grad(set_to_none=True)
        (pg + vf).backward()
        optimizer.step()


def measure(setup: str, shape: str, device: str, k: int, k_v: int, steps: int) -> dict:
    """In this process: build, step, and report peak memory, parameter bytes and step time."""
    import torch

    torch.manual_seed(0)
    base_rss = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    models = _build(setup, shape, device, k, k_v)
    unique = {id(p): p for m in models.values() for p in m.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    trainable = [p for p in unique.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    _, _, _, vocab, batch, prompt, response, minibatch = SHAPES[shape]
    ids = torch.randint(1, vocab, (batch, prompt + response), device=device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, optimizer state)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ppo_step(models, ids, mask, prompt, minibatch, optimizer)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {
        "setup": setup, "shape": shape, "device": device, "param_bytes": param_bytes,
        "trainable_params": sum(p.numel() for p in trainable), "peak_bytes": peak,
        "step_s": statistics.median(times),
    }


SETUPS = ("separate", "hydra", "hydra-frozen-head")


def run_all(shapes: list[str], device: str, k: int, k_v: int, steps: int) -> list[dict[str, dict]]:
    """Each (shape, set-up) in a fresh process; returns {set-up: result} per shape."""
    tables = []
    for shape in shapes:
        row = {}
        for setup in SETUPS:
            cmd = [sys.executable, __file__, "--one", setup, "--shape", shape, "--device", device,
                   "--k", str(k), "--k-v", str(k_v), "--steps", str(steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                reason = "out of memory" if "out of memory" in done.stderr.lower() else done.stderr.strip()[-300:]
                row[setup] = {"setup": setup, "shape": shape, "error": reason}
            else:
                row[setup] = json.loads(done.stdout.strip().splitlines()[-1])
        tables.append(row)
    return tables


def default_shapes(device: str) -> list[str]:
    return ["cpu-12x512"] if device == "cpu" else ["cpu-12x512", "bloom-560m", "bloomz-7b1-mt"]


def main_args(description: str) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), default=None)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--k-v", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.shape = args.shape or default_shapes(args.device)
    return args


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_memory(rows: list[dict[str, dict]]) -> None:
    print("| shape | set-up | parameters | trainable params | peak memory | peak vs separate | params vs separate |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        base = row["separate"]
        for result in row.values():
            if "error" in result:
                print(f"| {result['shape']} | {result['setup']} | {result['error']} | | | | |")
                continue
            ratios = "- | -"
            if result is not base and "error" not in base:
                ratios = (f"{result['peak_bytes'] / base['peak_bytes']:.2f}x | "
                          f"{result['param_bytes'] / base['param_bytes']:.2f}x")
            print(f"| {result['shape']} | {result['setup']} | {gib(result['param_bytes'])} | "
                  f"{result['trainable_params']:,} | {gib(result['peak_bytes'])} | {ratios} |")


def print_speed(rows: list[dict[str, dict]]) -> None:
    print("| shape | set-up | step (s) | vs separate |")
    print("|---|---|---:|---:|")
    for row in rows:
        base = row["separate"]
        for result in row.values():
            if "error" in result:
                print(f"| {result['shape']} | {result['setup']} | {result['error']} | - |")
                continue
            ratio = "-" if result is base or "error" in base else f"{result['step_s'] / base['step_s']:.2f}x"
            print(f"| {result['shape']} | {result['setup']} | {result['step_s']:.3f} | {ratio} |")


if __name__ == "__main__":
    if "--one" not in sys.argv:  # both tables from one measurement (what a GPU lease can afford)
        args = main_args("PPO step memory and time: hydra vs four separate models")
        rows = run_all(args.shape, args.device, args.k, args.k_v, args.steps)
        print(f"PPO step on {args.device}, k={args.k}, k_v={args.k_v}, median of {args.steps} steps\n")
        print_memory(rows)
        print()
        print_speed(rows)
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", choices=SETUPS, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--k-v", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    a = parser.parse_args()
    print(json.dumps(measure(a.one, a.shape, a.device, a.k, a.k_v, a.steps)))
