"""Linear heads (LM and value) computed in float32 accuracy, outside autocast.

Under bf16 autocast a logit of magnitude 16-32 moves in steps of 0.125: per-token log-prob noise of ~0.06
nats, larger than what one small PPO update changes, so ratios, clip fractions, KL and values would move in
rounding quanta. So the heads run outside autocast, on a float32 hidden state, giving float32 logits.

On CUDA under bf16 autocast a large head (the LM head: 4096 x 250,880 at bloomz-7b1) is a "split bf16"
product instead of a float32 one: each operand split into a bf16 high part and a bf16 remainder, the three
significant products accumulated in float32 on the tensor cores. Measured on an H200 (benchmarks/
decode_check.py, results_h200.md), for 16 x 257 rows: float32 174 ms, split bf16 45 ms, plain bf16 15 ms;
largest error against a float64 product 1.1e-4, 1.8e-4 and 9.9e-2. The split product is as accurate as the
float32 one to within float32's own accumulation error, at a quarter of its time. The backward products are
plain bf16 ones accumulated in float32, as autocast gives every other trainable layer.
Elsewhere (CPU, float32 or fp16 training) the head is a plain float32 product.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SPLIT_MIN_OUTPUTS = 4096  # below this a head is cheap in float32 (the value head has one output)


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 x bf16 -> float32 product. Off CUDA (tests) the same numbers from float32 operands: the product
    of two bf16 values is exact in float32, and both accumulate in float32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(high, remainder) in bf16 with high + remainder = x to ~2^-16 relative; no remainder for a bf16 x."""
    high = x.to(torch.bfloat16)
    if x.dtype == torch.bfloat16:
        return high, None
    return high, (x - high).to(torch.bfloat16)  # float32 - bf16 is a float32 difference, one kernel


def split_mm(a: tuple[torch.Tensor, torch.Tensor | None], b: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """a @ b in float32 accuracy from split operands (the remainder x remainder term, ~2^-16, dropped)."""
    out = mm32(a[0], b[0])
    # In place: at 16 x 257 rows of a 250,880-word head each product is 4.1 GB, and `out = out + ...` held
    # three of them at once.
    if a[1] is not None:
        out += mm32(a[1], b[0])
    if b[1] is not None:
        out += mm32(a[0], b[1])
    return out


def split_weight_cat(weight: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """[high | high | remainder] of a float32 weight [out, in], bf16 [out, 3 in]: with [x_high | x_low |
    x_high] it gives the three significant products as ONE product, accumulated in float32 on the tensor
    cores and written once. (Three products and two in-place additions write and re-read a [rows, out]
    float32 tensor five times: at 16 x 257 rows of a 250,880-word head, ~50 GB of memory traffic a call.)
    The remainder is taken in row blocks, so the float32 difference is never whole."""
    out, width = weight.shape
    cat = torch.empty(out, 3 * width, dtype=torch.bfloat16, device=weight.device)
    high = cat[:, :width]
    high.copy_(weight)
    cat[:, width : 2 * width].copy_(high)
    for start in range(0, out, rows):
        block = slice(start, start + rows)
        cat[block, 2 * width :].copy_(weight[block] - high[block])
    return cat


@functools.lru_cache(maxsize=None)
def split_available(device: str) -> bool:
    """Whether this device multiplies bf16 into float32 (torch.mm's out_dtype), transposed operands too."""
    try:
        probe = torch.ones(4, 4, dtype=torch.bfloat16, device=device)
        torch.mm(probe.t(), probe, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError):
        return False


class _SplitLinear(torch.autograd.Function):
    """x @ W^T (+ b) as split bf16 products, forward and backward; x float32 [N, in], W [out, in]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if weight.dtype == torch.bfloat16:  # a frozen bf16 head is its own high part: two products
            out = split_mm(split(x), (weight.t(), None))
        else:
            high, low = split(x)
            out = mm32(torch.cat([high, low, high], dim=1), split_weight_cat(weight).t())
        return out if bias is None else out + bias.float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Gradients as every other trainable layer's under bf16 autocast: one bf16 product accumulated in
        # float32. Only the forward needs float32 accuracy (log-probabilities, ratios, KL); a gradient's
        # 2^-9 relative rounding is what mixed-precision training always has, and the two split products
        # more here cost ~15 s of a 7b1 iteration (a third of the update's head).
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad.to(torch.bfloat16)
        if ctx.needs_input_grad[0]:
            grad_x = mm32(g, weight.to(torch.bfloat16))
        if ctx.needs_input_grad[1]:
            grad_w = mm32(g.t(), x.to(torch.bfloat16)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.float().sum(0)
        return grad_x, grad_w, grad_b


def head_fp32(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A linear head in float32 accuracy outside autocast (split bf16 on CUDA under bf16 autocast, for a
    head of at least SPLIT_MIN_OUTPUTS outputs); a bf16 (frozen) weight is widened for the call only."""
    device = hidden.device.type
    bias = getattr(head, "bias", None)
    split_it = (device == "cuda" and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.bfloat16
                and head.weight.shape[0] >= SPLIT_MIN_OUTPUTS and split_available(str(hidden.device)))
    with torch.autocast(device, enabled=False):
        if split_it:
            flat = hidden.float().reshape(-1, hidden.shape[-1])
            return _SplitLinear.apply(flat, head.weight, bias).view(*hidden.shape[:-1], -1)
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), None if bias is None else bias.float())


class _Float32Linear(torch.nn.Linear):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_fp32(self, hidden)


def float32_head(linear: torch.nn.Linear) -> torch.nn.Linear:
    """`linear` computed by `head_fp32` from now on, in place: the same parameters under the same names, so
    what saves, loads or copies it is unchanged. For a reward model's scalar head: under bf16 autocast its
    output lands on a grid of 1/64 at rewards of 2 to 4, and r_chosen - r_rejected, the RM loss and the
    rewards PPO whitens move in those quanta."""
    if type(linear) is not torch.nn.Linear:
        raise TypeError(f"float32_head: a plain Linear, not {type(linear).__name__}")
    linear.__class__ = _Float32Linear
    return linear
