"""BLOOM's whole-sequence forward (scoring, the reward model, training) on fused kernels.

transformers' BLOOM (5.24) has no attention interface: every layer computes its attention eagerly (the
scores in the compute dtype, the mask added, a float32 [batch, heads, T, T] softmax, a cast back, a
product) and its MLP's GELU as nine elementwise kernels written in Python, each reading and writing the
[tokens, 4 x hidden] activation. At bloomz-7b1 shape those passes over memory are several seconds of every
7B forward over a PPO rollout, while the matrix products themselves run near the tensor cores' rate.

`use_fused_kernels` swaps, in place, each BloomAttention for one that computes the same attention with
`scaled_dot_product_attention` (ALiBi and the mask as one additive bias), and each BloomGelu for torch's
tanh GELU (one kernel, the same formula; torch computes it in float32 inside, where BLOOM's Python rounds
nine times in bf16). Weights, state dicts, saved folders and peft adapters are untouched; a model without
BLOOM layers is left as it is. The engine's own decode step (engine/bloom_decoder.py) uses the same GELU,
so the rollout's log-probabilities and the scoring forward's are computed alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomGelu

# What a masked score becomes: finite in bf16 and float32 with room to spare. BLOOM's mask holds the dtype's
# minimum, which becomes -inf in a narrower dtype, or once a kernel scales scores (CUDA's memory-efficient
# attention works in base 2), and a row of -inf (a left pad's query sees no key) is NaN there, which the
# next layer spreads to every row through 0 x NaN.
MASKED = -1e30


def gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh approximation of GELU, as one kernel."""
    return F.gelu(x, approximate="tanh")


def use_fused_kernels(model: nn.Module, fused: bool = True) -> int:
    """Give every BLOOM attention and GELU inside `model` (copies and branches included) the fused
    forward, or with `fused=False` transformers' own back; returns how many modules changed (0 for a model
    that is not BLOOM, or already as asked)."""
    swaps = {BloomAttention: FusedBloomAttention, BloomGelu: FusedBloomGelu}
    if not fused:
        swaps = {new: old for old, new in swaps.items()}
    changed = 0
    for module in model.modules():
        swap = swaps.get(type(module))
        if swap is not None:
            module.__class__ = swap  # same attributes, same parameters: only forward differs
            changed += 1
    return changed


class FusedBloomAttention(BloomAttention):
    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                attention_mask: torch.Tensor | None, layer_past: Any = None, use_cache: bool = False,
                output_attentions: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
            return super().forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                   use_cache=use_cache, output_attentions=output_attentions, **kwargs)
        batch, length, _ = hidden_states.shape
        query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, T, D] views
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        bias = shared_bias(alibi, attention_mask, batch, self.num_heads, key.shape[2], query.dtype)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=self.inv_norm_factor,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        output = F.dropout(self.dense(context), p=self.hidden_dropout, training=self.training) + residual
        return output, None


class FusedBloomGelu(BloomGelu):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


def shared_bias(alibi: torch.Tensor, mask: torch.Tensor | None, batch: int, heads: int, keys: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The bias of one forward, made by its first layer and reused by every other: BLOOM hands all its
    layers the same ALiBi and mask tensors (so do the hydra's branches, from what they captured). It is
    kept on the ALiBi tensor itself, so it lives exactly as long as that forward's ALiBi; training saves it
    for backward once, not once per layer (at 2,048 tokens and 32 heads, 256 MiB a sequence per layer)."""
    kept = getattr(alibi, "_fused_bias", None)
    if kept is not None and kept[0] is mask and kept[1] == dtype:
        return kept[2]
    bias = _bias(alibi, mask, batch, heads, keys, dtype)
    alibi._fused_bias = (mask, dtype, bias)
    return bias


def _bias(alibi: torch.Tensor, mask: torch.Tensor | None, batch: int, heads: int, keys: int,
          dtype: torch.dtype) -> torch.Tensor:
    """ALiBi ([B*H, 1, K]) plus BLOOM's additive causal/padding mask ([B, 1, Q, K], its masked entries
    raised to MASKED first, H times fewer than the bias's) as one [B, H, Q, K] bias in the query's dtype."""
    bias = alibi.view(batch, heads, 1, keys)
    if mask is not None:
        bias = bias + mask.clamp(min=MASKED)
    return bias.to(dtype)
