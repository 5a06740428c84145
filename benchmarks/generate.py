"""Answers/s and tokens/s of the generation engine against transformers' `generate`, same model, same prompts.

Three ways to answer the same questions greedily:
  one-at-a-time   `model.generate` on one prompt at a time (what a naive evaluation loop does)
  generate        `model.generate` on length-sorted batches
  engine          the project's engine (engine/generation.py) on the same batches: on CUDA its BLOOM steps
                  replay as CUDA graphs
and the share of answers identical to one-at-a-time greedy decoding.

    python benchmarks/generate.py                       # CPU: the tiny demo model, the BELLE questions
    python benchmarks/generate.py --device cuda --shape bloomz-7b1-mt --questions 128 --single 2

The prompts are the 1,000 questions of ../shared/belle/eval_set.json (or --belle DIR), in the chat
template, tokenised with the demo tokenizer; at a GPU shape (random weights) the same token ids are spread
over the shape's vocabulary. Every path decodes exactly --max-new-tokens tokens (eos is ignored), so all
paths do the same work. One-at-a-time runs the first --single questions and is scaled per answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, layers, heads, vocab
    "bloom-560m": (1024, 24, 16, 250880),
    "bloomz-7b1-mt": (4096, 30, 32, 250880),
}


def questions(folder: Path, count: int) -> list[str]:
    from engine.belle import load_items
    from engine.template import Turn, render_prompt

    return [render_prompt([Turn("user", item.question)]) for item in load_items(folder, limit=count)]


def build(args: argparse.Namespace):
    """(model, token-id rows) on the device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

    from engine.demo import init_demo

    demo = Path(tempfile.mkdtemp()) / "demo"
    init_demo(demo)
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    rows = [tokenizer(q)["input_ids"][-args.max_prompt_tokens:] for q in questions(args.belle, args.questions)]
    if args.shape == "tiny":
        model = AutoModelForCausalLM.from_pretrained(demo / "model").to(args.device).eval()
        return model, rows
    hidden, layers, heads, vocab = SHAPES[args.shape]
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = BloomForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    spread = vocab // tokenizer.vocab_size
    return model, [[t * spread + 1 for t in row] for row in rows]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain(model, engine, rows: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    import torch
    from transformers import GenerationConfig

    # Every field explicit and neutral: greedy, no eos (all paths decode the same number of tokens).
    config = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, min_new_tokens=0,
                              eos_token_id=None, pad_token_id=0, repetition_penalty=1.0, num_beams=1)
    ids, mask = engine.left_pad(rows)  # the engine's own padding: both paths see the same batch
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def engine_answers(engine, rows: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    from engine.generation import Sampling

    ids, mask = engine.left_pad(rows)
    out = engine.generate(ids, mask, Sampling(max_new_tokens=args.max_new_tokens, temperature=0))
    return out.response_ids.tolist()


def timed(fn, batches: list[list[list[int]]], device: str) -> tuple[float, list[list[int]]]:
    answers: list[list[int]] = []
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        answers.extend(fn(batch))
    sync(device)
    return time.perf_counter() - t0, answers


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--belle", type=Path, default=REPO.parent / "shared" / "belle")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--single", type=int, default=64, help="questions answered one at a time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)

    from engine.generation import Engine

    model, rows = build(args)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # length-sorted batches: little padding
    batches = [[rows[i] for i in order[s : s + args.batch]] for s in range(0, len(order), args.batch)]
    engine = Engine(model, SimpleNamespace(eos_token_id=-1, pad_token_id=0))  # -1: no token ends an answer
    engine_answers(engine, batches[0], args)  # warm-up (allocator, kernels)
    plain(model, engine, batches[0][:2], args)

    single_rows = [rows[i] for i in order[:: max(1, len(order) // args.single)]][: args.single]
    t_single, single = timed(lambda b: plain(model, engine, b, args), [[r] for r in single_rows], args.device)
    t_plain, plain_out = timed(lambda b: plain(model, engine, b, args), batches, args.device)
    t_engine, engine_out = timed(lambda b: engine_answers(engine, b, args), batches, args.device)

    by_row = {id(r): k for k, r in enumerate([r for b in batches for r in b])}
    reference = {by_row[id(r)]: a for r, a in zip(single_rows, single)}
    same = {name: sum(out[k] == a for k, a in reference.items()) / len(reference)
            for name, out in (("generate", plain_out), ("engine", engine_out))}

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"Greedy answers, {args.shape} shape on {name} (torch {torch.__version__}): {len(rows)} BELLE questions, "
          f"{args.max_new_tokens} new tokens each, batches of {args.batch}; one-at-a-time over {len(single_rows)}\n")
    print("| path | answers/s | tokens/s | vs one-at-a-time | same answers as one-at-a-time |")
    print("|---|---:|---:|---:|---:|")
    per_single = len(single_rows) / t_single
    for label, seconds, count, share in (("one-at-a-time generate", t_single, len(single_rows), 1.0),
                                         ("batched generate", t_plain, len(rows), same["generate"]),
                                         ("engine", t_engine, len(rows), same["engine"])):
        rate = count / seconds
        print(f"| {label} | {rate:.2f} | {rate * args.max_new_tokens:,.0f} | {rate / per_single:.1f}x | "
              f"{share:.1%} |")
    print(f"\nengine vs batched generate: {t_plain / t_engine:.2f}x")


if __name__ == "__main__":
    main()
