"""A BLOOM decode step of the engine's own: a static KV cache, and on CUDA the whole step (every layer, the
float32 head and the sampler) replayed as one CUDA graph.

Why: at bloomz-7b1 shape and batch 64 a decode step streams ~5 ms worth of weights and cache from HBM, but
`generate` spends ~55 ms per step (11 % of the roofline, measured on an H200): the launch of about a
thousand kernels and the Python of the transformers forward (cache objects, mask and ALiBi building) at
every token. Neither a static cache alone (transformers' StaticCache: 2.4x slower, it streams the whole
cache and keeps the overhead) nor `torch.compile(mode="reduce-overhead")` inside `generate` (its CUDA graph
outputs are overwritten by the next replay) removes it. Here the step is plain tensor code with no host
synchronisation, so it is captured once per batch and replayed; the next token, its log-prob and the
finished flags are written into buffers inside the graph, so the host only replays.

Numerics follow the model's whole-sequence forward under CUDA autocast (transformers' BLOOM on the fused
kernels of engine/bloom_kernels.py): matmuls in the compute dtype, layer norms and the residual stream in
float32, softmax in float32, GELU as one kernel, the LM head in float32 (as PPO scores). Float32
trainable linear weights are cast once per decoder to the compute dtype, which is what autocast would cast
them to at every step, and LoRA adapters are merged into that copy; frozen weights are used as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.bloom_kernels import MASKED, gelu
from engine.estimate import TRUNK_RING as RING
from engine.head import mm32, split, split_available


def supports(lm: nn.Module) -> bool:
    """A BLOOM causal LM this decoder reproduces exactly (plain LoRA adapters included)."""
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) != "bloom" or getattr(config, "apply_residual_connection_post_layernorm",
                                                                   False):
        return False
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        return False
    for module in lm.modules():
        if any(getattr(module, "use_dora", {}).values()):
            return False
    return True


@dataclass
class _Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps)


def _norm(module: nn.Module) -> _Norm:
    return _Norm(module.weight.detach().float(), module.bias.detach().float(), module.eps)


Adapter = tuple[torch.Tensor, torch.Tensor, float]  # LoRA's A [r, in] and B [out, r], and its scale
Linear = tuple[torch.Tensor, torch.Tensor | None, tuple[Adapter, ...]]


def _linear(module: nn.Module, dtype: torch.dtype, merge: bool = False) -> Linear:
    """(weight, bias, adapters) in `dtype`: the tensors themselves when they already are, else a copy.

    A peft LoRA layer with its adapters on keeps them beside its weight, computed as its own forward does
    (x A^T B^T, scaled, added to x W^T). Merged into a bf16 weight, every update smaller than half the
    weight's rounding step (most of an early PPO update: ~6e-5 at |W| ~ 0.02) would round away, and the
    rollouts would come from a policy that PPO's scoring forward never computes. `merge`: into the weight
    (the head, applied once a step), as are adapters that are not a plain product (DoRA)."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach()
    adapters: list[Adapter] = []
    if base is not module and not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if merge or module.use_dora.get(name) or getattr(module, "fan_in_fan_out", False):
                weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)
            else:
                adapters.append((module.lora_A[name].weight.detach().to(dtype),
                                 module.lora_B[name].weight.detach().to(dtype), float(module.scaling[name])))
    bias = None if base.bias is None else base.bias.detach().to(dtype)
    return weight.to(dtype), bias, tuple(adapters)


class _SplitHead:
    """The decoder's LM head: the weight split once per decoder (see engine/head.py), the hidden state at
    every step. A decode step is bound by the weights it reads: the three significant products (x_high W_high,
    x_low W_high, x_high W_low) are one product that reads each part of the weight once, 4 bytes a weight
    instead of 6 as three products (at bloomz-7b1, 2 GB less a step): [x_high | x_high] over [x_low | 0],
    rows stacked, times [W_high | W_low], the two halves of the result added."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        high, low = split(weight)
        self.weight = (high if low is None else torch.cat([high, low], 1)).t()  # [in or 2 in, out]
        self.stacked = low is not None
        self.bias = bias

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        high, low = split(hidden)
        x = torch.cat([high, high], 1) if self.stacked else high
        if low is not None:
            x = torch.cat([x, torch.cat([low, torch.zeros_like(low)], 1) if self.stacked else low])
        out = mm32(x, self.weight)
        if low is not None:
            rows = hidden.shape[0]
            out = out[:rows] + out[rows:]
        return out if self.bias is None else out + self.bias


def _split_head(head: nn.Module, compute_dtype: torch.dtype) -> _SplitHead | None:
    """A split head where it pays and works: bf16 compute on CUDA. Split from the head as it is: a bf16 head
    is its own high part (no remainder to read at every step, and no float32 copy of it made)."""
    own = getattr(head, "base_layer", head).weight
    if compute_dtype != torch.bfloat16 or not _split_pays(own.device):
        return None
    weight, bias, _ = _linear(head, own.dtype, merge=True)
    return _SplitHead(weight, None if bias is None else bias.float())


def _split_pays(device: torch.device) -> bool:
    # Off CUDA the bf16 x bf16 -> float32 products run on float32 operands: a float32 head is as exact there.
    return device.type == "cuda" and split_available(str(device))


@dataclass
class _Layer:
    ln1: _Norm
    qkv: Linear
    dense: Linear
    ln2: _Norm
    up: Linear
    down: Linear


def _apply(x: torch.Tensor, linear: Linear) -> torch.Tensor:
    weight, bias, adapters = linear
    x = x.to(weight.dtype)
    out = F.linear(x, weight, bias)
    for a, b, scale in adapters:
        out = out + F.linear(F.linear(x, a), b) * scale
    return out




class BloomDecoder:
    """The weights of one BLOOM model, ready to decode. Build it when the weights are final for a while
    (once per PPO rollout): trainable weights are copied at build time."""

    ATTENTION = ("sdpa", "bmm")

    def __init__(self, lm: nn.Module, compute_dtype: torch.dtype, attention: str = "sdpa"):
        """`attention`: "sdpa" (one fused kernel per layer, the default) or "bmm" (BLOOM's own formulation:
        scores, softmax, weighted sum); both read each cached key and value once per step. Measured at
        bloomz-7b1 shape, batch 128, on an H200 (benchmarks/results_h200.md): 14.4 ms per decode step with
        SDPA, 15.5 ms with bmm (CUDA graphs both), 51 % and 47 % of the HBM roofline."""
        if attention not in self.ATTENTION:
            raise ValueError(f"attention: {attention!r} is not one of {self.ATTENTION}")
        self.attention = attention
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        body = base.base_model
        self.dtype = compute_dtype
        self.heads = body.num_heads
        self.head_dim = base.config.hidden_size // self.heads
        self.embedding = body.word_embeddings.weight.detach()
        self.embedding_norm = _norm(body.word_embeddings_layernorm)
        self.layers = [
            _Layer(_norm(b.input_layernorm), _linear(b.self_attention.query_key_value, compute_dtype),
                   _linear(b.self_attention.dense, compute_dtype), _norm(b.post_attention_layernorm),
                   _linear(b.mlp.dense_h_to_4h, compute_dtype), _linear(b.mlp.dense_4h_to_h, compute_dtype))
            for b in body.h
        ]
        self.final_norm = _norm(body.ln_f)
        head = base.get_output_embeddings()
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.split_head = _split_head(head, compute_dtype)
        # the float32 copy only where the head is a float32 product
        self.head = _linear(head, torch.float32, merge=True) if self.split_head is None else None

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              capture: tuple[int, ...] = (), sink: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> "Batch":
        return Batch(self, input_ids, attention_mask, max_new_tokens, capture, sink)


class Batch:
    """One left-padded batch being decoded: its KV cache, key mask and ALiBi for the whole answer length.

    `capture`: layer indices whose input (the float32 residual stream, as transformers' BLOOM hands it to
    the layer under autocast) is kept for every position fed; the PPO scoring forward then starts at those
    layers instead of recomputing the frozen trunk (engine/ppo/hydra.py). `kept[i]` = (the prompt's [B, P,
    hidden], the answer's in blocks of RING positions [blocks, B, RING, hidden]), in tensors that `sink(shape)`
    gives (pinned host memory for a rollout on CUDA) or on the device. The prefill copies each slice of rows'
    prompt out as it goes; a step writes its position into a ring of RING positions on the device, copied
    out whole when full (`flush`): on the GPU a row costs RING positions, not the whole answer's (8 MiB a
    row at 7b1 shape, 512 tokens, which would cost the decode batch rows). `fed`: answer positions written.
    """

    def __init__(self, decoder: BloomDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, capture: tuple[int, ...] = (),
                 sink: Callable[[tuple[int, ...]], torch.Tensor] | None = None):
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        self.d = decoder
        rows, prompt = input_ids.shape
        self.rows, self.prompt, self.length = rows, prompt, prompt + max_new_tokens
        device = input_ids.device
        # Response positions are all real tokens (a finished row keeps decoding, masked later), so the key
        # mask and ALiBi of the whole answer are known now and never change.
        self.valid = torch.cat([attention_mask.bool(), torch.ones(rows, max_new_tokens, dtype=torch.bool,
                                                                  device=device)], 1)
        alibi = build_alibi_tensor(self.valid.long(), decoder.heads, torch.float32).to(decoder.dtype)
        self.alibi = alibi.view(rows, decoder.heads, 1, self.length)
        self.key_index = torch.arange(self.length, device=device)
        shape = (len(decoder.layers), rows, decoder.heads, self.length, decoder.head_dim)
        # Zeros, not garbage: the graph's attention reads the not-yet-written keys too (masked to weight 0,
        # which a NaN bit pattern would turn into NaN).
        self.keys = torch.zeros(shape, dtype=decoder.dtype, device=device)
        self.values = torch.zeros(shape, dtype=decoder.dtype, device=device)
        self.input_ids = input_ids
        width = decoder.heads * decoder.head_dim
        blocks = -(-max_new_tokens // RING)

        def on_device(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        take = sink or on_device
        self.ring = {i: on_device((rows, RING, width)) for i in sorted(set(capture))}
        self.kept = {i: (take((rows, prompt, width)), take((blocks, rows, RING, width))) for i in self.ring}
        self.fed = 0

    def flush(self, fed: int) -> None:
        """`fed` answer positions are written: copy the ring out into their block (after the step that wrote
        them, in stream order; the next step waits for it). A block's positions past `fed` are stale."""
        block = (fed - 1) // RING
        for i, ring in self.ring.items():
            self.kept[i][1][block].copy_(ring, non_blocking=True)
        self.fed = fed

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, span: int, part: slice = slice(None),
               prefill: bool = False) -> torch.Tensor:
        """Final-norm hidden state (float32) of the last of `ids` [B, T], placed at `positions` [T];
        attention reads keys [0, span). `ids` are the batch's rows `part`; `prefill`: they are the prompts."""
        d = self.d
        rows, count = ids.shape
        heads, dim = d.heads, d.head_dim
        keys, values = self.keys[:, part], self.values[:, part]  # views: writes land in the batch's cache
        h = d.embedding_norm(F.embedding(ids, d.embedding))
        # ALiBi and the causal/padding mask as one additive bias, in the compute dtype (as autocast hands
        # BLOOM's ALiBi to its attention); a large finite negative, not -inf: a padding row that sees no
        # key must stay finite, or its NaN would reach the real rows through 0 x NaN.
        allowed = self.valid[part, None, None, :span] & (self.key_index[:span] <= positions[:, None])
        masked = torch.where(allowed, 0.0, MASKED)  # [B, 1, T, span] float32
        sdpa = d.attention == "sdpa"
        if sdpa:
            bias = (self.alibi[part, :, :, :span].float() + masked).to(d.dtype)
        else:
            alibi = self.alibi[part, :, :, :span].reshape(rows * heads, 1, span)
        for i, layer in enumerate(d.layers):
            if i in self.ring:
                if prefill:
                    self.kept[i][0][part].copy_(h, non_blocking=True)
                else:
                    self.ring[i][part].index_copy_(1, (positions - self.prompt) % RING, h)
            qkv = _apply(layer.ln1(h), layer.qkv).view(rows, count, heads, 3, dim)
            q, k, v = (qkv[..., j, :].transpose(1, 2) for j in range(3))  # [B, H, T, D]
            keys[i].index_copy_(2, positions, k)
            values[i].index_copy_(2, positions, v)
            if sdpa:
                context = F.scaled_dot_product_attention(q, keys[i, :, :, :span], values[i, :, :, :span],
                                                         attn_mask=bias, scale=d.scale)
            else:  # as BLOOM computes it under autocast: bf16 scores with ALiBi, float32 softmax
                flat_keys = keys[i].view(rows * heads, self.length, dim)[:, :span]
                flat_values = values[i].view(rows * heads, self.length, dim)[:, :span]
                scores = torch.baddbmm(alibi, q.reshape(rows * heads, count, dim), flat_keys.transpose(1, 2),
                                       beta=1.0, alpha=d.scale)
                weights = torch.softmax(scores.view(rows, heads, count, span).float() + masked, dim=-1)
                context = torch.bmm(weights.to(d.dtype).view(rows * heads, count, span), flat_values)
                context = context.view(rows, heads, count, dim)
            context = context.transpose(1, 2).reshape(rows, count, heads * dim)
            h = h + _apply(context, layer.dense)
            h = h + _apply(gelu(_apply(layer.ln2(h), layer.up)), layer.down)
        return d.final_norm(h[:, -1])

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, span: int, part: slice = slice(None),
               prefill: bool = False) -> torch.Tensor:
        hidden = self.hidden(ids, positions, span, part, prefill)
        if self.d.split_head is not None:
            return self.d.split_head(hidden)
        return _apply(hidden, self.d.head)

    def prefill(self, rows: int | None = None) -> torch.Tensor:
        """Logits [B, V] (float32) of the token after each prompt, `rows` prompts at a time (default:
        engine.estimate.PREFILL_TOKENS prompt tokens): a layer over a whole wide batch's prompts at once
        would hold ~11 GB of working tensors at 7b1 shape for 256 prompts of 256 tokens, room the decode
        batch can have instead."""
        from engine.estimate import prefill_rows

        rows = rows or prefill_rows(self.rows, self.prompt)
        positions = torch.arange(self.prompt, device=self.input_ids.device)
        if rows >= self.rows:
            return self.logits(self.input_ids, positions, self.prompt, prefill=True)
        out = None
        for start in range(0, self.rows, rows):
            part = slice(start, start + rows)
            logits = self.logits(self.input_ids[part], positions, self.prompt, part, prefill=True)
            if out is None:
                out = logits.new_empty(self.rows, logits.shape[-1])
            out[part] = logits
        return out


class Stepper:
    """Runs the decode loop of one batch: the first token from the prefill, then one step per token, each
    step `choose(logits, step) -> (token, its log-prob)`, written into [B, R] buffers.

    With `static`, attention reads the keys up to the end of the current span bucket (SPAN tokens; the
    not-yet-written ones masked), so a step's shapes change once per bucket; on CUDA each step is then a
    CUDA graph replay: one graph per bucket, the first step of a bucket eager (the warm-up of its shapes),
    the next one captured. All graphs of a batch share one memory pool (they are replayed in the order they
    were captured, never at once). Without `static` each step runs eagerly over exactly the filled keys.
    `static` on a CPU runs the bucketed steps eagerly: what the graphs replay, testable without a GPU.
    """

    SPAN = 64

    def __init__(self, batch: Batch, max_new_tokens: int, eos: int,
                 choose: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], static: bool):
        self.b, self.total, self.eos, self.choose = batch, max_new_tokens, eos, choose
        device = batch.input_ids.device
        self.tokens = torch.zeros(batch.rows, max_new_tokens, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch.rows, max_new_tokens, dtype=torch.float32, device=device)
        self.finished = torch.zeros(batch.rows, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # the token being chosen
        self.static = static
        self.use_graphs = static and device.type == "cuda"
        self.graphs: dict[int, Any] = {}
        self.warmed: set[int] = set()
        if self.use_graphs:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        self.done = 0  # tokens chosen so far

    def _record(self, logits: torch.Tensor) -> None:
        token, logprob = self.choose(logits, self.step)
        self.tokens.index_copy_(1, self.step, token.unsqueeze(1))
        self.logprobs.index_copy_(1, self.step, logprob.unsqueeze(1))
        self.finished |= token == self.eos
        self.step += 1

    def _next(self, span: int) -> None:
        """Feed the newest token (at position prompt + step - 1) and choose the one after it."""
        b = self.b
        last = self.tokens.index_select(1, self.step - 1)
        self._record(b.logits(last, b.prompt + self.step - 1, span))

    def _advance(self) -> None:
        self._step()
        self.done += 1
        if self.b.ring and (self.done - 1) % RING == 0:  # answer positions [0, done - 1) fed: a ring's worth
            self.b.flush(self.done - 1)

    def finish(self) -> None:
        """Copy out the kept trunk's last, partly written ring (the decode ended)."""
        if self.b.ring and self.done - 1 > self.b.fed:
            self.b.flush(self.done - 1)

    def _step(self) -> None:
        need = self.b.prompt + self.done  # keys [0, need) hold the prompt and every token so far
        if not self.static:
            self._next(need)
            return
        span = min(self.b.length, -(-need // self.SPAN) * self.SPAN)
        if not self.use_graphs:
            self._next(span)
            return
        # Warm-up, capture and replay run on a stream of their own (capture cannot use the default one);
        # the caller's stream waits for each step.
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            graph = self.graphs.get(span)
            if graph is None and span in self.warmed:
                graph = self.graphs[span] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    self._next(span)  # recorded, not run: the replay below runs it
            if graph is not None:
                graph.replay()
            else:
                self._next(span)
                self.warmed.add(span)
        caller.wait_stream(self.stream)

    def __iter__(self) -> Iterator[int]:
        """Advance one token at a time; yields the number of tokens chosen (the caller reads the buffers)."""
        self._record(self.b.prefill())
        self.done = 1
        yield 1
        while self.done < self.total:
            self._advance()
            yield self.done

    def run(self, check_every: int = 16) -> int:
        """Decode to the end (or until every row finished, checked every `check_every` tokens, the only
        host synchronisation); returns the number of tokens chosen."""
        for done in self:
            if done % check_every == 0 and bool(self.finished.all()):
                break
        return self.done
