"""Does the bf16 path learn? SFT, RM and PPO on a bf16 model, through the real `rlhf train` command.

For each run it prints the share of trainable weights that moved after N optimizer steps (float32 master
weights: > 99 %; pure bf16 with lr 1e-5 moves 15-29 %) and the loss at the first and last step.

    python benchmarks/bf16_check.py                      # tiny recipes + a 560m-shaped model (for a GPU)
    python benchmarks/bf16_check.py --big-shape cpu-small  # what the CPU can run in a minute

Runs in a fresh temporary folder; the repository stays clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, layers, heads, vocab
    "bloom-560m": (1024, 24, 16, 250880),
    "cpu-small": (256, 8, 8, 1024),
}


def rlhf(work: Path, *args: str) -> None:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RLHF_DB": str(work / "runs.db"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=work, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{done.stderr[-4000:]}")


def last_run(work: Path) -> dict:
    with sqlite3.connect(work / "runs.db") as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())


def losses(work: Path, run_id: int, name: str) -> list[float]:
    with sqlite3.connect(work / "runs.db") as db:
        rows = db.execute("SELECT value FROM metrics WHERE run_id = ? AND name = ? ORDER BY seq", [run_id, name])
        return [r[0] for r in rows.fetchall()]


def moved(base_dir: Path, trained_dir: Path, trainable) -> tuple[float, int, list[str]]:
    """Share of trainable entries that differ from the bf16 start; count of tensors; trainable dtypes."""
    import torch
    from safetensors.torch import load_file

    base = {k: v.to(torch.bfloat16).float() for k, v in load_file(base_dir / "model.safetensors").items()}
    trained = load_file(trained_dir / "model.safetensors")
    changed = total = 0
    names = [n for n in trained if trainable(n)]
    for name in names:
        start = base.get(name, base.get("transformer.word_embeddings.weight") if name == "lm_head.weight" else None)
        if start is None or start.shape != trained[name].shape:
            continue
        changed += int((trained[name].float() != start).sum())
        total += trained[name].numel()
    dtypes = sorted({str(trained[n].dtype).replace("torch.", "") for n in names})
    return (changed / total if total else float("nan")), len(names), dtypes


def top_layers(layers: int, n: int, extra: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> "callable":
    """The trainable tensors: the top `n` decoder layers, the final norm and `extra`; `skip` those that get
    no gradient by construction (the RM's final-norm bias cancels in r_chosen - r_rejected)."""
    keep = tuple(f"transformer.h.{i}." for i in range(layers - n, layers)) + ("transformer.ln_f.",) + extra
    return lambda name: name.startswith(keep) and name not in skip


def make_model(folder: Path, shape: str, device: str, demo_model: Path) -> None:
    """A bloom model of `shape` with random weights and the demo tokenizer (its ids fit any vocabulary)."""
    import shutil

    import torch
    from transformers import BloomConfig, BloomForCausalLM

    hidden, layers, heads, vocab = SHAPES[shape]
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=3,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = BloomForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--big-shape", default="bloom-560m", choices=sorted(SHAPES))
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {card}")
    work = Path(tempfile.mkdtemp(prefix="bf16_check_"))
    (work / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    rlhf(work, "demo", "init", "demo")
    demo = work / "demo" / "model"
    n = args.steps
    common = ["model.dtype=bfloat16", f"train.max_steps={n}", "train.logging_steps=1", "train.eval_ratio=0",
              f"train.lr={args.lr}", "train.lr_scheduler=constant", "train.save_steps=1000"]
    rows = []

    def record(label: str, stage: str, base: Path, trainable, loss_name: str, started: float) -> None:
        run = last_run(work)
        final = Path(run["output_dir"]) / "final"
        share, count, dtypes = moved(base, final, trainable)
        curve = losses(work, run["id"], loss_name)
        rows.append((label, stage, run["status"], len(curve), share, count, "/".join(dtypes),
                     curve[0] if curve else float("nan"), curve[-1] if curve else float("nan"),
                     time.perf_counter() - started))

    t = time.perf_counter()
    rlhf(work, "train", "sft", "tiny.yaml", *sum((["--set", o] for o in [*common, "num_layers_unfrozen=2"]), []))
    record("tiny", "sft", demo, top_layers(4, 2), "loss", t)
    t = time.perf_counter()
    rlhf(work, "train", "rm", "tiny.yaml", *sum((["--set", o] for o in common), []))
    record("tiny", "rm", demo, top_layers(4, 2, skip=("transformer.ln_f.bias",)), "loss", t)
    ppo = ["model.dtype=bfloat16", f"steps={n}", "lr=1e-6", "rollout_batch_size=16", "save_steps=1000"]
    t = time.perf_counter()
    rlhf(work, "train", "ppo", "tiny.yaml", *sum((["--set", o] for o in ppo), []))
    record("tiny", "ppo", demo, top_layers(4, 1, ("lm_head.weight",)), "losses/total_loss", t)

    big = work / args.big_shape
    make_model(big, args.big_shape, device, demo)
    layers = SHAPES[args.big_shape][1]
    model = [f"model.path={big}", "model.dtype=bfloat16"]
    t = time.perf_counter()
    rlhf(work, "train", "sft", "tiny.yaml", *sum((["--set", o] for o in [
        *common, *model, "num_layers_unfrozen=2", "train.batch_size=4", "train.max_length=128"]), []))
    record(args.big_shape, "sft", big, top_layers(layers, 2), "loss", t)
    t = time.perf_counter()
    rlhf(work, "train", "ppo", "tiny.yaml", *sum((["--set", o] for o in [
        *ppo, *model, "num_layers_unfrozen=2", "value_layers=2", "minibatch_size=4", "max_new_tokens=16"]), []))
    record(args.big_shape, "ppo", big, top_layers(layers, 2, ("lm_head.weight",)), "losses/total_loss", t)

    print(f"\nbf16 model, float32 trainable masters, lr {args.lr} (PPO 1e-6), {n} optimizer steps (PPO: {n} steps "
          "x 4 epochs x 2 minibatches); moved = share of trainable entries that differ from the start\n")
    print("| model | stage | status | steps logged | moved | tensors | trainable dtype | first loss | last loss "
          "| wall (s) |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|")
    for label, stage, status, logged, share, count, dtypes, first, last, wall in rows:
        print(f"| {label} | {stage} | {status} | {logged} | {share:.2%} | {count} | {dtypes} | {first:.4f} | "
              f"{last:.4f} | {wall:.0f} |")
    failed = [r for r in rows if not r[4] > 0.99 or r[2] != "done"]
    print("\nall moved > 99 %" if not failed else f"\nBELOW 99 % or not done: {[(r[0], r[1]) for r in failed]}")
    print(json.dumps({"workdir": str(work)}))


if __name__ == "__main__":
    main()
