"""One whole PPO iteration at a named shape, phase by phase: the new paths against the old ones, same run.

An iteration: sample a response to every prompt (generate), score it with the reward model (reward), score
the rollout with the hydra (policy, reference and value in one forward), then `--epochs` passes of
minibatch updates (update: forward + backward; optimizer step timed apart). Random weights at the shape;
every response is exactly --response-tokens long (no eos), so both paths do the same work.

  new   the engine's decode (engine/generation.py: on CUDA its BLOOM steps replay as CUDA graphs), the
        trunk kept by the decoder as it samples (--trunk score: by the scoring forward), so the scoring
        forward and each update run only the top k / k_v layers and the heads,
        and BLOOM's attention and GELU on fused kernels (engine/bloom_kernels.py; --kernels transformers
        keeps transformers' own, to measure what the fused ones buy)
  old   transformers' `generate`, the trunk recomputed in every update forward, transformers' kernels

    python benchmarks/ppo_iteration.py                                   # CPU smoke shape
    python benchmarks/ppo_iteration.py --device cuda --shape bloomz-7b1-mt --prompts 512 --baseline-prompts 64

Where fewer prompts than 1,024 run, the per-1,024 columns are computed from the measured phases (each phase
is linear in the prompt count: decode chunks, scoring and update minibatches) and are labelled so.
Decode is also given as a share of the HBM roofline: every decode step must read the decoder layers (bf16),
the float32 LM head and the KV cache written so far (bf16), once; --bandwidth sets the memory bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, vocab
    "cpu-small": (128, 4, 4, 1000),
    "bloom-560m": (1024, 24, 16, 250880),
    "bloomz-7b1-mt": (4096, 30, 32, 250880),
}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, by a word of the device name


def build(args: argparse.Namespace):
    """(hydra, reward model, optimizer): frozen parts bf16 on CUDA (float32 on a CPU), trainable float32."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM, BloomForSequenceClassification

    from engine.ppo.hydra import Hydra

    hidden, layers, heads, vocab = SHAPES[args.shape]
    frozen = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0)

    def make(cls, cfg):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(frozen)
        try:
            with torch.device(args.device):
                return cls(cfg).eval()
        finally:
            torch.set_default_dtype(previous)

    reward = make(BloomForSequenceClassification,
                  BloomConfig(**{**config.to_dict(), "num_labels": 1, "id2label": {0: "score"}}))
    reward.requires_grad_(False)
    hydra = Hydra(make(BloomForCausalLM, config), args.k, args.k_v, train_head=True).eval()
    value = {id(p) for p in hydra.value_branch_parameters()}
    trainable = [p for p in hydra.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if id(p) not in value]},
                                   {"params": [p for p in trainable if id(p) in value]}], lr=1e-7,
                                  fused=args.device == "cuda")  # as the trainer
    return hydra, reward, optimizer


class Clock:
    """Seconds per phase. On CUDA, events recorded on the stream at each phase's end, read once at the end:
    no host synchronisation inside the loops (the trainer has none either, and one per minibatch would leave
    the GPU idle while Python prepares the next); the time between two phases goes to the later one, so
    the phases add up to the iteration."""

    def __init__(self, device: str):
        self.device, self.marks, self.seconds = device, [], {}

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch

        if self.device != "cuda":
            t0 = time.perf_counter()
            yield
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return
        if not self.marks:
            self.marks.append((None, torch.cuda.Event(enable_timing=True)))
            self.marks[-1][1].record()
        yield
        self.marks.append((name, torch.cuda.Event(enable_timing=True)))
        self.marks[-1][1].record()

    def totals(self) -> dict[str, float]:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self.marks = self.marks[-1:]
        return self.seconds


def generate(hydra, ids, mask, args: argparse.Namespace, new: bool):
    """(the rollout's ids, the trunk the decoder kept or None)."""
    import torch
    from transformers import GenerationConfig

    from engine.generation import Engine, Sampling, row_seeds

    sampling = Sampling(max_new_tokens=args.response_tokens, temperature=1.0, seed=1)
    engine = Engine(hydra.policy, SimpleNamespace(eos_token_id=-1, pad_token_id=0), attention=args.attention)
    capture = hydra.trunk_layers if new and args.trunk == "decoder" else ()
    if args.chunk == "auto":  # as the trainer's rollouts with chunk_size: auto
        args.chunk_rows, capture = engine.plan(ids.shape[1], ids.shape[1] + args.response_tokens, ids.shape[0],
                                               capture)
        print(f"chunk auto: {args.chunk_rows} prompts per decode batch, trunk kept by the "
              f"{'decoder' if capture else 'scoring forward'}", flush=True)
    chunk = args.chunk_rows
    if new:  # as engine/ppo/rollout.py
        out = engine.generate_chunked(ids, mask, sampling, row_seeds(1, range(ids.shape[0]), ids.device), chunk,
                                      capture)
        return out.input_ids, out.trunk
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.response_tokens,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0, repetition_penalty=1.0)
    parts = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], chunk):
            parts.append(hydra.policy.generate(input_ids=ids[start : start + chunk],
                                               attention_mask=mask[start : start + chunk], generation_config=config))
    return torch.cat(parts), None


def iteration(hydra, reward, optimizer, prompts, args: argparse.Namespace, new: bool) -> dict[str, float]:
    import torch

    from engine.ppo import core
    from engine.ppo.hydra import Trunk

    device = args.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    clock = Clock(device)
    mask = torch.ones_like(prompts)
    prompt = prompts.shape[1]
    with clock.phase("generate"), autocast:
        ids, kept = generate(hydra, prompts, mask, args, new)
    full_mask = torch.ones_like(ids)
    tokens = ids[:, prompt:]
    rmask = torch.ones_like(tokens, dtype=torch.float32)
    keep = tokens.shape[1] + 1
    minibatches = [torch.arange(s, min(s + args.score_batch, len(ids)), device=device)
                   for s in range(0, len(ids), args.score_batch)]
    with clock.phase("reward"), torch.no_grad(), autocast:
        scores = torch.cat([reward(input_ids=ids[idx], attention_mask=full_mask[idx]).logits[:, 0].float()
                            for idx in minibatches])
    with clock.phase("score"), torch.no_grad(), autocast:  # after the reward model, as the trainer
        decoded = hydra.trunk_from(kept.join(device)) if kept is not None else None  # as the trainer
        parts = []
        for idx in minibatches:
            out = hydra(ids[idx], full_mask[idx], with_values=True, with_ref=True, logits_to_keep=keep,
                        keep_trunk=new and decoded is None, trunk=decoded.rows(idx) if decoded is not None else None)
            parts.append((core.logprobs_of(out.logits, tokens[idx], drop_last=True),
                          core.logprobs_of(out.ref_logits, tokens[idx], drop_last=True),
                          out.values[:, prompt - 1 : -1].float(), out.trunk))
        old_logprobs, ref_logprobs, old_values = (torch.cat(p) for p in list(zip(*parts))[:3])
        trunk = decoded if decoded is not None else Trunk.cat([p[3] for p in parts]) if new else None
        del parts, out, kept  # as the trainer: the joined trunk cache only
    rewards = core.shaped_rewards((old_logprobs - ref_logprobs) * rmask, rmask, scores, 0.05)
    advantages, returns = core.gae(old_values, rewards, rmask, 1.0, 0.95)
    advantages = core.whiten(advantages, rmask)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        order = torch.randperm(len(ids), generator=generator).to(device)
        for idx in order.split(args.minibatch):
            with clock.phase("update"), autocast:
                out = hydra(ids[idx], full_mask[idx], with_values=True, logits_to_keep=keep,
                            trunk=trunk.rows(idx) if trunk is not None else None)
                logprobs = core.logprobs_of(out.logits, tokens[idx], drop_last=True)
                pg, _ = core.policy_loss(logprobs, old_logprobs[idx], advantages[idx], rmask[idx], 0.2)
                vf, _ = core.value_loss(out.values[:, prompt - 1 : -1].float(), old_values[idx], returns[idx],
                                        rmask[idx], 0.2)
                optimizer.zero_grad(set_to_none=True)
                (pg + 0.1 * vf).backward()
            with clock.phase("optimizer step"):
                torch.nn.utils.clip_grad_norm_([p for p in hydra.parameters() if p.requires_grad], 1.0)
                optimizer.step()
    return clock.totals()


def roofline_seconds(hydra, rows: int, args: argparse.Namespace) -> float:
    """The least time a decode of `rows` prompts can take: per step, the decoder layers in bf16, the head
    in float32 and the KV cache so far in bf16, read once, at the given bandwidth."""
    from engine.models import decoder_layers

    hidden, layers, _, vocab = SHAPES[args.shape]
    layer_bytes = sum(p.numel() for p in decoder_layers(hydra.lm).parameters()) * 2 + vocab * hidden * 4
    total = 0.0
    for start in range(0, rows, args.chunk_rows):
        batch = min(args.chunk_rows, rows - start)
        for step in range(args.response_tokens):
            total += layer_bytes + 2 * layers * batch * (args.prompt_tokens + step) * hidden * 2
    return total / args.bandwidth


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=None, help="default: 1024 on CUDA, 16 on a CPU")
    parser.add_argument("--baseline-prompts", type=int, default=None, help="prompts for the old paths")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 256 on CUDA, 16 on a CPU")
    parser.add_argument("--response-tokens", type=int, default=None, help="default: 256 on CUDA, 16 on a CPU")
    parser.add_argument("--chunk", default=None,
                        help="prompts per decode batch, or auto: as many as free memory holds (default 128 / 8)")
    parser.add_argument("--minibatch", type=int, default=None, help="sequences per update (default 16 / 4)")
    parser.add_argument("--score-batch", type=int, default=None,
                        help="sequences per scoring and reward forward (default: the minibatch)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--k-v", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s (default: by the GPU's name)")
    parser.add_argument("--paths", choices=["both", "new", "old"], default="both")
    parser.add_argument("--attention", choices=["sdpa", "bmm"], default="sdpa", help="the BLOOM decoder's")
    parser.add_argument("--kernels", choices=["fused", "transformers"], default="fused",
                        help="the new path's BLOOM attention and GELU in whole-sequence forwards")
    parser.add_argument("--trunk", choices=["decoder", "score"], default="decoder",
                        help="the new path's trunk cache: kept by the decoder as it samples (the trainer's way), "
                             "or computed and kept by the scoring forward")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    for name, gpu, cpu in (("prompts", 1024, 16), ("prompt_tokens", 256, 16), ("response_tokens", 256, 16),
                           ("chunk", 128, 8), ("minibatch", 16, 4)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    args.baseline_prompts = args.baseline_prompts or args.prompts
    if args.chunk != "auto":
        args.chunk = int(args.chunk)
    args.chunk_rows = args.chunk if args.chunk != "auto" else 1  # auto: chosen at the first decode
    args.score_batch = args.score_batch or args.minibatch
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    bandwidth_given = args.bandwidth is not None
    if args.bandwidth is None:
        args.bandwidth = next((bw for word, bw in BANDWIDTH.items() if word in device_name), 0.1e12)

    from engine.bloom_kernels import use_fused_kernels

    torch.manual_seed(0)
    hydra, reward, optimizer = build(args)
    vocab = SHAPES[args.shape][3]
    paths = {"both": ["new", "old"], "new": ["new"], "old": ["old"]}[args.paths]
    warm = argparse.Namespace(**{**vars(args), "response_tokens": 4, "epochs": 1})
    results = {}
    for path in paths:
        fused = path == "new" and args.kernels == "fused"
        use_fused_kernels(hydra, fused)
        use_fused_kernels(reward, fused)
        iteration(hydra, reward, optimizer, torch.randint(1, vocab, (2, args.prompt_tokens), device=args.device),
                  warm, path == "new")  # warm-up: kernels, allocator, optimizer state
        count = args.prompts if path == "new" else args.baseline_prompts
        prompts = torch.randint(1, vocab, (count, args.prompt_tokens), device=args.device)
        if cuda and path == "new" and args.trunk == "decoder":
            # The pinned host block of the kept trunk (engine.generation.Engine.generate_chunked), as the
            # trainer has it from its second iteration on: the host caching allocator keeps a freed block,
            # and pinning 2 GiB anew takes about a second.
            from engine.generation import kept_trunk_numel

            torch.empty(kept_trunk_numel(len(hydra.trunk_layers), count, args.prompt_tokens, args.response_tokens,
                                         SHAPES[args.shape][0]), dtype=torch.float32, pin_memory=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = iteration(hydra, reward, optimizer, prompts, args, path == "new")
        peak = torch.cuda.max_memory_allocated() if cuda else None
        results[path] = (count, seconds, peak)

    print(f"PPO iteration, {args.shape} shape (k={args.k}, k_v={args.k_v}, trainable head) on {device_name}, "
          f"torch {torch.__version__}: prompts {args.prompt_tokens} + responses {args.response_tokens} tokens, "
          f"decode batches of {args.chunk_rows}{' (auto)' if args.chunk == 'auto' else ''}, "
          f"scoring batches of {args.score_batch}, "
          f"minibatches of {args.minibatch}, {args.epochs} epochs")
    from engine.head import split_available

    split = cuda and split_available("cuda")
    print("; ".join(f"{p}: {results[p][0]} prompts measured" for p in paths) + f"; LM heads: "
          f"{'split bf16 (engine/head.py)' if split else 'float32'}; AdamW {'fused' if cuda else 'foreach'}; "
          f"decoder attention {args.attention}; new path's BLOOM kernels {args.kernels}; new path's trunk "
          f"kept by the {'decoder' if args.trunk == 'decoder' else 'scoring forward'}\n")
    phases = ["generate", "score", "reward", "update", "optimizer step"]
    head = " | ".join(f"{p} (s, measured)" for p in paths)
    per = " | ".join(f"{p} per 1,024 prompts (s{'' if results[p][0] == 1024 else ', computed'})" for p in paths)
    print(f"| phase | {head} | {per} |" + (" new vs old |" if len(paths) == 2 else ""))
    print("|---|" + "---:|" * (2 * len(paths) + (len(paths) == 2)))
    for phase in [*phases, "total"]:
        cells, scaled = [], []
        for p in paths:
            count, seconds, _ = results[p]
            value = sum(seconds.values()) if phase == "total" else seconds.get(phase, 0.0)
            cells.append(f"{value:.2f}")
            scaled.append(value * 1024 / count)
        line = f"| {phase} | {' | '.join(cells)} | {' | '.join(f'{s:.1f}' for s in scaled)} |"
        if len(paths) == 2:
            line += f" {scaled[1] / scaled[0]:.2f}x |" if scaled[0] else " - |"
        print(line)
    print()
    for p in paths:
        count, seconds, peak = results[p]
        tokens = count * args.response_tokens
        roof = roofline_seconds(hydra, count, args)
        memory = f", peak memory {peak / 2**30:.2f} GiB" if peak is not None else ""
        line = f"{p}: decode {tokens / seconds['generate']:,.0f} tokens/s"
        if cuda or bandwidth_given:
            line += f" = {roof / seconds['generate']:.1%} of the HBM roofline ({roof:.2f} s at " \
                    f"{args.bandwidth / 1e12:.2f} TB/s)"
        print(line + memory)


if __name__ == "__main__":
    main()
