"""BLOOM's whole-sequence forward on the fused kernels (engine/bloom_kernels.py) against transformers' own.

What PPO runs over every rollout at a named shape, random weights, frozen parts in bf16 under bf16
autocast on CUDA (float32 on a CPU), left-padded rows:

  forward          the whole model, no gradients (the scoring forward, the reward model)
  top layers       forward + backward through the top --trainable layers alone, float32 weights under
                   autocast (what each PPO update runs over a cached trunk)

Both kernels run in the same process on the same weights and inputs; the table gives ms per batch, the
matrix products' TFLOP/s, and how far each is from a float32 computation of the same model (largest
difference of the last hidden state over the real tokens); NaN: anywhere in the output or the top layers'
gradients, pad rows included.

    python benchmarks/kernels.py                                    # CPU smoke shape
    python benchmarks/kernels.py --device cuda --shape bloomz-7b1-mt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, vocab
    "cpu-small": (256, 4, 8, 1000),
    "bloom-560m": (1024, 24, 16, 250880),
    "bloomz-7b1-mt": (4096, 30, 32, 250880),
}


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    import torch

    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    import torch
    from transformers import BloomConfig, BloomModel

    from engine.bloom_kernels import use_fused_kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=None, help="rows (default 16 on CUDA, 4 on a CPU)")
    parser.add_argument("--length", type=int, default=None, help="tokens a row (default 512 / 128)")
    parser.add_argument("--trainable", type=int, default=4, help="top layers run with gradients")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    batch = args.batch or (16 if cuda else 4)
    length = args.length or (512 if cuda else 128)
    hidden, layers, heads, vocab = SHAPES[args.shape]
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = BloomModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    ids = torch.randint(1, vocab, (batch, length), device=args.device)
    mask = torch.ones_like(ids)
    for row in range(batch):  # left padding of 0 .. length/4 tokens
        mask[row, : (row * length // 4) // max(batch - 1, 1)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    real = mask.bool()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    # The reference: the same weights in float32, on the fused kernels (the same function as transformers' in
    # float32: tests/test_bloom_kernels.py).
    reference = copy.deepcopy(model).float()
    use_fused_kernels(reference)
    with torch.no_grad():
        exact = reference(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    del reference

    top = copy.deepcopy(model.h[layers - args.trainable :]).float().requires_grad_(True)
    with torch.no_grad(), autocast:
        captured = {}
        handle = model.h[layers - args.trainable].register_forward_pre_hook(
            lambda module, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        handle.remove()
    layer_in = captured["args"][0].detach()

    def forward():
        with torch.no_grad(), autocast:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def top_layers():
        with autocast:
            h = layer_in
            for layer in top:
                h = layer(h, *captured["args"][1:], **captured["kwargs"])[0]
        h[real].float().square().mean().backward()

    rows = []
    for name, fused in (("transformers", False), ("fused", True)):
        use_fused_kernels(model, fused)
        use_fused_kernels(top, fused)
        out = forward()
        error = float((out.float() - exact.float())[real].abs().max())
        top.zero_grad(set_to_none=True)
        top_layers()  # the gradients, pad rows and all, must be numbers too
        nan = bool(torch.isnan(out).any()) or any(bool(torch.isnan(p.grad).any()) for p in top.parameters())
        rows.append((name, timed(forward, args.device, args.repeat), timed(top_layers, args.device, args.repeat),
                     error, nan))
        top.zero_grad(set_to_none=True)

    tokens = batch * length
    per_layer = 2 * 12 * hidden * hidden  # the four linear layers' flops per token, forward
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"BLOOM whole-sequence forward, {args.shape} shape on {device_name}, torch {torch.__version__}: "
          f"{batch} rows x {length} tokens (left-padded), {'bf16 weights under bf16 autocast' if cuda else 'float32'};"
          f" top layers: {args.trainable} float32 layers, forward + backward\n")
    print("| kernels | forward (ms) | matmul TFLOP/s | top layers fwd+bwd (ms) | largest error vs float32 | NaN |")
    print("|---|---:|---:|---:|---:|---|")
    for name, fwd, bwd, error, nan in rows:
        flops = tokens * per_layer * layers / fwd / 1e12
        print(f"| {name} | {fwd * 1e3:.1f} | {flops:.3g} | {bwd * 1e3:.1f} | {error:.2e} | {'yes' if nan else 'no'} |")
    print(f"\nfused vs transformers: forward {rows[0][1] / rows[1][1]:.2f}x, top layers {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
