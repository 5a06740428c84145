"""The one generation engine: PPO rollouts, the BELLE evaluation and the chat pane all decode through it.

It owns the decode loop instead of calling `model.generate`, for two reasons. Sampling must be exactly
what the recipe says: `generate` fills every field the caller leaves unset from the checkpoint's own
`generation_config.json` (a repetition penalty, `top_k: 50`, a minimum length...), so a rollout would be
drawn from a distribution other than the one PPO scores. And sampling must not depend on how prompts are
batched: each row draws its uniforms from a counter-based hash of (its own seed, step), so a prompt gets
the same answer alone, in a chunk of 8 or in a batch of 128, and both chat panes see the same noise.

Sampling is by inverse CDF over the filtered, tempered distribution: exact, one uniform per row per step.
Log-probabilities of the sampled tokens are those of the model at the sampling temperature, in float32 (what
PPO scores).

Two decode paths, one semantics: BLOOM models (the recipe's) decode through `engine.bloom_decoder` (a
static cache and, on CUDA, the whole step replayed as a CUDA graph: `generate`'s per-step overhead was
~90 % of a 7b1 decode step); any other architecture through the transformers forward with its own cache.
`RLHF_DECODE=transformers` forces the second path, `RLHF_DECODE=eager` the first without CUDA graphs (to
compare, or to rule either out).

transformers' continuous batching (`generate_batch`, a paged cache) was the other candidate. It cannot serve
BLOOM (transformers 5.24): BLOOM's attention is its own ALiBi `baddbmm`, not an attention-interface function
the paged cache can replace, and its forward asks the `PagedAttentionCache` for `get_seq_length`, which it
lacks, so every request fails with no tokens (tests/test_generation.py keeps this checked).
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from engine.head import head_fp32
from engine.knobs import decode_path
from engine.pieces import Piece

_M32 = 0xFFFFFFFF
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. Every field is explicit: nothing comes from a checkpoint's defaults."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generated:
    """A batch of answers: left-padded prompts followed by right-padded responses."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_length: int  # P
    response_mask: torch.Tensor  # [B, R] float: 1 on generated tokens up to and including the first eos
    logprobs: torch.Tensor  # [B, R] float32: log p(token) at the sampling temperature, 0 on padding
    trunk: KeptTrunk | None = None  # with `capture`

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]


@dataclass
class KeptTrunk:
    """The inputs of some decoder layers (float32) at every position of a batch of answers, kept by the BLOOM
    decoder as it fed them (`Engine.generate`'s `capture`, engine.bloom_decoder.Batch), chunk by chunk, and
    laid out as `concat` lays out the answers only on `join`: the whole rollout's trunk (8 GiB for 1,024 rows
    of 512 tokens at 7b1 shape) waits in host memory after a CUDA decode, GPU memory that the next decode
    batches, the reward model and a baseline's decode can use until the scoring forward needs it. Zero where
    nothing was fed: the last position of the longest answer, and the padding `concat` adds."""

    # One per chunk, in row order: (prompt length P, P + answer width, answer positions fed, layer ->
    # (prompt [rows, P, hidden], answer in blocks [blocks, rows, RING, hidden]))
    parts: list[tuple[int, int, int, dict[int, tuple[torch.Tensor, torch.Tensor]]]]

    def join(self, device: torch.device | str) -> dict[int, torch.Tensor]:
        """Layer -> [B, P + R, hidden] on `device`, as `concat` lays out the chunks' answers."""
        prompt = max(p for p, _, _, _ in self.parts)
        width = prompt + max(n - p for p, n, _, _ in self.parts)
        joined = {}
        for layer in self.parts[0][3]:
            rows = sum(kept[layer][0].shape[0] for _, _, _, kept in self.parts)
            out = torch.zeros(rows, width, self.parts[0][3][layer][0].shape[-1], dtype=torch.float32, device=device)
            row = 0
            for p, n, fed, kept in self.parts:
                head, blocks = kept[layer]
                count = head.shape[0]
                # Host to device in stream order after the copies out (each a contiguous piece: no wait).
                out[row : row + count, prompt - p : prompt] = head.to(device, non_blocking=True)
                answer, ring = min(fed, n - p), blocks.shape[2]
                for start in range(0, answer, ring):  # a block at a time: one block's temporary on the device
                    block = blocks[start // ring].to(device, non_blocking=True)
                    end = min(answer, start + ring)
                    out[row : row + count, prompt + start : prompt + end] = block[:, : end - start]
                row += count
            joined[layer] = out
        return joined


def kept_trunk_numel(layers: int, rows: int, prompt_tokens: int, max_new_tokens: int, hidden: int) -> int:
    """Float32 elements of the host block that holds a rollout's kept trunk (`Engine.generate_chunked`): every
    row's prompt and its answer in whole blocks of the decoder's ring."""
    from engine.bloom_decoder import RING

    return layers * rows * (prompt_tokens + -(-max_new_tokens // RING) * RING) * hidden


class _HostBlock:
    """One pinned host block handed out in consecutive pieces (a rollout's kept trunk: one allocation, which
    the host caching allocator keeps for the next rollout, instead of one per chunk in size classes)."""

    def __init__(self, numel: int):
        self.block = torch.empty(numel, dtype=torch.float32, pin_memory=True)
        self.used = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        piece = self.block[self.used : self.used + count].view(shape)
        self.used += count
        return piece


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 lanes holding values below 2^32; every product stays below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1] per row, a function of (row seed, step) only. `step`: an int, or a one-element
    tensor (inside a CUDA graph, where the step lives on the device)."""
    steps = torch.full_like(seeds, step) if isinstance(step, int) else step.expand_as(seeds)
    key = _hash32((seeds & _M32) ^ _hash32(steps * 0x9E3779B1 & _M32))
    key = _hash32(key ^ (seeds >> 32) & _M32)
    return (key.double() + 1.0) / 4294967296.0


def row_seeds(base: int, keys: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-row seeds from a base seed and a stable key per row (a prompt's index, an item's id)."""
    k = torch.tensor([int(x) & _M32 for x in keys], dtype=torch.int64, device=device)
    mixed = _hash32(k ^ _hash32(torch.full_like(k, base & _M32)))
    return mixed | (_hash32(mixed ^ 0x5BD1E995) & 0x7FFFFFFF) << 32


def pick(logits: torch.Tensor, sampling: Sampling, seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The next token of each row from float32 logits [B, V]."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass strictly above each token: keep while it is < top_p
        ordered = ordered.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return inverse_cdf(probs, uniforms(seeds, step).to(probs.device))


def token_logprob(logits: torch.Tensor, token: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """log p of each row's token ([B, V] float32 logits, [B] tokens) at the sampling temperature: the
    distribution it was drawn from (top-k/p's cut aside), as PPO's scoring forward computes it."""
    scores = logits if sampling.greedy or sampling.temperature == 1 else logits / sampling.temperature
    return scores.gather(-1, token.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, -1)


CDF_BLOCK = 1024


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token of each row whose cumulative probability reaches u x the row's total ([B, V] -> [B]),
    in float64. Over a large vocabulary in two levels: the block holding it (block sums), then the token
    inside that block. A float64 cumulative sum over the whole row (250,880 words at bloomz-7b1) wrote and
    re-read 8 bytes a word for every row at every decode step (3 % of a decode step on an H200); this
    reads the probabilities once."""
    rows, vocab = probs.shape
    u = u.unsqueeze(-1)
    if vocab <= CDF_BLOCK:
        cdf = probs.double().cumsum(-1)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=vocab - 1)
    blocks = -(-vocab // CDF_BLOCK)
    padded = F.pad(probs, (0, blocks * CDF_BLOCK - vocab)).view(rows, blocks, CDF_BLOCK)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)
    target = u * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target).clamp(max=blocks - 1)  # its sum is > 0: target > 0
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inner = padded.gather(1, block.unsqueeze(-1).expand(rows, 1, CDF_BLOCK)).squeeze(1).double().cumsum(-1)
    # The block's own cumulative sum may end a rounding below its block sum: never search past it (padding).
    rest = torch.minimum(target - before, inner[:, -1:])
    token = block * CDF_BLOCK + torch.searchsorted(inner, rest).clamp(max=CDF_BLOCK - 1)
    return token.squeeze(-1).clamp(max=vocab - 1)


class Engine:
    """Decode with one causal LM (a Hugging Face model, possibly under a peft wrapper)."""

    def __init__(self, model: Any, tokenizer: Any, fast: bool | None = None, graph: bool | None = None,
                 attention: str = "sdpa"):
        """`fast`: decode through the BLOOM decoder (default: whenever the model is one and RLHF_DECODE is
        not `transformers`). `graph`: replay its steps as CUDA graphs (default: on CUDA); on a CPU, True runs
        the very steps the graphs would replay, eagerly. `attention`: the BLOOM decoder's (see BloomDecoder).

        The fast path copies the trainable weights when it first decodes: make a new Engine when they
        change (once per PPO rollout)."""
        from engine import bloom_decoder

        self.model = model
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
        params = inspect.signature(self._lm.base_model.forward).parameters
        self._positions = "position_ids" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        choice = decode_path()
        if fast is None:
            fast = choice != "transformers"
        if graph is None and choice == "eager":
            graph = False
        self.fast = fast and bloom_decoder.supports(self._lm)
        self.graph = graph
        self.attention = attention
        self._decoder: Any = None

    @contextmanager
    def _decoding(self) -> Iterator[None]:
        """Autocast off for the BLOOM decoder, which casts for itself: built first, in the compute dtype of
        autocast as the caller set it (a float32 model sampled under bf16 autocast decodes in bf16, as PPO
        scores it)."""
        self._bloom()
        with torch.autocast(self.device.type, enabled=False):
            yield

    def _bloom(self) -> Any:
        """The BLOOM decoder, built on first use in the compute dtype of that moment (autocast's, if on)."""
        if self._decoder is None:
            from engine.bloom_decoder import BloomDecoder

            device = self.device.type
            on = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if on else self._lm.get_input_embeddings().weight.dtype
            self._decoder = BloomDecoder(self.model, dtype, self.attention)
        return self._decoder

    def _stepper(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
                 seeds: torch.Tensor, capture: tuple[int, ...] = (), sink: Any = None) -> Any:
        from engine.bloom_decoder import Stepper

        batch = self._bloom().batch(input_ids, attention_mask, sampling.max_new_tokens, capture, sink)
        seeds = seeds.to(input_ids.device)
        static = self.graph if self.graph is not None else input_ids.device.type == "cuda"
        def choose(logits: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            token = pick(logits, sampling, seeds, step)
            return token, token_logprob(logits, token, sampling)

        return Stepper(batch, sampling.max_new_tokens, self.eos, choose, static)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # A decode batch holds per row, beside the weights: the keys and values of every layer for the whole
    # answer, and one step's float32 logits over the vocabulary with the sampler's working copies of them;
    # and the prefill's working tensors (engine.estimate's formula): per row through transformers, for one
    # slice of rows in the BLOOM decoder. Sized to fill engine.estimate.DECODE_FREE_SHARE of the free memory.
    SAMPLER_COPIES = 6

    def _prefill_bytes(self, rows: int, prompt_tokens: int) -> int:
        from engine.estimate import bloom_prefill_bytes

        config = self._lm.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        return bloom_prefill_bytes(rows, prompt_tokens, config.hidden_size, heads, self._width())

    def _width(self) -> int:
        """Bytes of a cached key or value: the decoder's dtype once built, else what the forward would use."""
        if self._decoder is not None:
            return self._decoder.dtype.itemsize
        half = (torch.is_autocast_enabled(self.device.type)
                or self._lm.get_input_embeddings().weight.dtype != torch.float32)
        return 2 if half else 4

    def row_bytes(self, prompt_tokens: int, total_tokens: int, captured: int = 0) -> int:
        """Bytes one more row of a decode batch costs (`prompt_tokens` prefilled, `total_tokens` cached),
        keeping the inputs of `captured` layers (the BLOOM decoder's ring of RING float32 positions each;
        the rest waits in host memory: `generate_chunked`)."""
        from engine.bloom_decoder import RING

        config = self._lm.config
        layers, hidden = config.num_hidden_layers, config.hidden_size
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        kv_width = (getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
        row = 2 * layers * kv_width * total_tokens * self._width() + self.SAMPLER_COPIES * config.vocab_size * 4
        if not self.fast:
            return row + self._prefill_bytes(1, prompt_tokens)
        return row + captured * RING * hidden * 4

    def fixed_bytes(self, prompt_tokens: int, limit: int) -> int:
        """Bytes a decode batch costs whatever its width: the BLOOM decoder's prefill slice."""
        from engine.estimate import prefill_rows

        return self._prefill_bytes(prefill_rows(limit, prompt_tokens), prompt_tokens) if self.fast else 0

    def rows_that_fit(self, prompt_tokens: int, total_tokens: int, limit: int, captured: int = 0) -> int:
        """How many prompts to decode at once: as many as the free accelerator memory holds (the weights of
        a decode step are read once for the whole batch, so a wider batch is nearly free per token), at
        most `limit`; a multiple of 8 when above 8. Off CUDA, `limit`."""
        if self.device.type != "cuda":
            return limit
        if self.fast:  # its copies of the trainable weights and split head (~4 GB at 7b1) are not free memory
            self._bloom()  # as generate builds it, in the caller's autocast dtype
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # cached
        return self.rows_for(free, prompt_tokens, total_tokens, limit, captured)

    def plan(self, prompt_tokens: int, total_tokens: int, limit: int,
             capture: tuple[int, ...] = ()) -> tuple[int, tuple[int, ...]]:
        """(decode batch, layers to capture) for `chunk_size: auto`: `rows_that_fit`, and the capture kept
        only where it costs no decode batch (engine.estimate.trunk_costs_a_batch)."""
        from engine.estimate import trunk_costs_a_batch

        rows = self.rows_that_fit(prompt_tokens, total_tokens, limit)
        if not capture or not self.fast:
            return rows, ()
        keeping = self.rows_that_fit(prompt_tokens, total_tokens, limit, len(set(capture)))
        return (rows, ()) if trunk_costs_a_batch(rows, keeping, limit) else (keeping, tuple(capture))

    def rows_for(self, free_bytes: int, prompt_tokens: int, total_tokens: int, limit: int, captured: int = 0) -> int:
        from engine.estimate import DECODE_FREE_SHARE, decode_rows

        return decode_rows(int(free_bytes * DECODE_FREE_SHARE), self.fixed_bytes(prompt_tokens, limit),
                           self.row_bytes(prompt_tokens, total_tokens, captured), limit)

    def encode(self, prompts: Sequence[str], max_prompt_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask; a prompt longer than `max_prompt_length` keeps its end."""
        tok = self.tokenizer
        side, trunc = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, truncation=max_prompt_length is not None,
                      max_length=max_prompt_length)
        finally:
            tok.padding_side, tok.truncation_side = side, trunc
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask from token-id lists (a conversation tokenized piece by piece, as in
        training)."""
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + list(r) for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        """The next-token logits in float32, and the cache. The transformer runs as it is (bf16 under
        autocast); the LM head runs in float32 outside autocast, as PPO's scoring forward does, so a
        rollout samples from the very distribution PPO scores."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._positions:
            kwargs["position_ids"] = positions
        out = self._lm.base_model(**kwargs)
        logits = head_fp32(self._lm.get_output_embeddings(), out.last_hidden_state[:, -1])
        return logits, getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    @torch.no_grad()
    def next_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the token after each left-padded row: what the first sampling step draws from."""
        return self._forward(input_ids, attention_mask, _positions(attention_mask), None)[0]

    @torch.no_grad()
    def steps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, seeds: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (tokens [B], their log-probs [B], finished [B]) once per decode step.

        A finished row keeps decoding (its tokens are masked by the caller) so the batch keeps its shape.
        """
        if self.fast:
            with self._decoding():
                stepper = self._stepper(input_ids, attention_mask, sampling, seeds)
                for done in stepper:
                    column = done - 1
                    yield stepper.tokens[:, column], stepper.logprobs[:, column], stepper.finished.clone()
                    if bool(stepper.finished.all()):
                        return
            return
        mask = attention_mask
        positions = _positions(mask)
        logits, cache = self._forward(input_ids, mask, positions, None)
        last = positions[:, -1:]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(sampling.max_new_tokens):
            token = pick(logits, sampling, seeds, step)
            logprob = token_logprob(logits, token, sampling)
            finished = finished | (token == self.eos)
            yield token, logprob, finished
            if bool(finished.all()) or step + 1 == sampling.max_new_tokens:
                return
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            logits, cache = self._forward(token.unsqueeze(-1), mask, last, cache)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
        seeds: torch.Tensor | None = None, capture: tuple[int, ...] = (), sink: Any = None,
    ) -> Generated:
        """Answer a left-padded batch; `seeds` per row (default: derived from `sampling.seed` and the row).

        `capture`: decoder layers whose inputs to keep for every position (`Generated.trunk`), which the
        BLOOM decoder computes anyway; through transformers nothing is kept (`trunk` stays None). `sink(shape)`:
        where to keep it (engine.bloom_decoder.Batch). Without one it is all on the device, which `row_bytes`
        does not count: `generate_chunked` gives a rollout on CUDA pinned host memory."""
        if seeds is None:
            seeds = row_seeds(sampling.seed, range(input_ids.shape[0]))
        kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        fed = 0
        if self.fast:
            with torch.no_grad(), self._decoding():
                stepper = self._stepper(input_ids, attention_mask, sampling, seeds, tuple(capture), sink)
                done = stepper.run()
                stepper.finish()
            response, logprobs = stepper.tokens[:, :done], stepper.logprobs[:, :done]
            kept, fed = stepper.b.kept, stepper.b.fed
        else:
            tokens, lps = [], []
            for token, logprob, _ in self.steps(input_ids, attention_mask, sampling, seeds):
                tokens.append(token)
                lps.append(logprob)
            response, logprobs = torch.stack(tokens, dim=1), torch.stack(lps, dim=1).float()
        is_eos = response == self.eos
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        # The fast path notices that every row finished only every few tokens: drop the columns past the
        # longest answer, so both paths give the same shape.
        width = int((~after_eos).any(0).nonzero().max()) + 1 if (~after_eos).any() else response.shape[1]
        response, logprobs, after_eos = response[:, :width], logprobs[:, :width], after_eos[:, :width]
        response = response.masked_fill(after_eos, self.pad_id)
        response_mask = (~after_eos).float()
        prompt = input_ids.shape[1]
        trunk = KeptTrunk([(prompt, prompt + width, fed, kept)]) if kept else None
        return Generated(
            input_ids=torch.cat([input_ids, response], dim=1),
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            prompt_length=input_ids.shape[1],
            response_mask=response_mask,
            logprobs=logprobs * response_mask,
            trunk=trunk,
        )

    def generate_chunked(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, seeds: torch.Tensor,
        chunk: int, capture: tuple[int, ...] = (),
    ) -> Generated:
        """`generate` over a left-padded batch `chunk` rows at a time, each chunk's left padding trimmed to its
        own longest prompt, joined by `concat`. On CUDA the kept trunk goes to one pinned host block for the
        whole rollout as it is decoded (`KeptTrunk`)."""
        sink = None
        if capture and self.fast and input_ids.device.type == "cuda":
            numel = kept_trunk_numel(len(set(capture)), *input_ids.shape, sampling.max_new_tokens,
                                     self._lm.config.hidden_size)
            try:
                sink = _HostBlock(numel).take
            except RuntimeError as err:  # host memory that cannot be pinned: the scoring forward computes it
                log.warning("no pinned host memory for the decoder's trunk (%.1f GiB): the scoring forward "
                            "computes it instead (%s)", numel * 4 / 2**30, err)
                capture = ()
        parts = []
        for start in range(0, input_ids.shape[0], chunk):
            mask = attention_mask[start : start + chunk]
            first = int(mask.any(0).nonzero()[0])  # left padding only as wide as this chunk's longest prompt
            ids, mask = input_ids[start : start + chunk, first:], mask[:, first:]
            parts.append(self.generate(ids, mask, sampling, seeds[start : start + chunk], capture, sink))
        return concat(parts, self.pad_id)

    def stream(self, prompt: str | Sequence[int], sampling: Sampling, cancelled: Any = None) -> Iterator[Piece]:
        """One answer as it is decoded (for the chat pane): a Piece per new stretch of text, then a last
        Piece (`final`) with the whole answer decoded at once, which is what a transcript keeps. Ends at
        eos, at the length limit or when `cancelled()` turns true. `prompt`: text, or token ids.

        Each piece decodes only the last few tokens (the window since the last piece), so the cost of a
        token does not grow with the answer; a piece waits while the window ends in half a character.
        """
        ids, mask = self.encode([prompt]) if isinstance(prompt, str) else self.left_pad([prompt])
        seeds = row_seeds(sampling.seed, [0])
        produced: list[int] = []
        prefix, read = 0, 0  # the window: tokens [prefix, read) were shown, [read, ...) are new
        finish = "length"
        for token, _, finished in self.steps(ids, mask, sampling, seeds):
            if int(token[0]) == self.eos:
                finish = "eos"
                break
            if cancelled is not None and cancelled():
                finish = "cancelled"
                break
            produced.append(int(token[0]))
            before = self.tokenizer.decode(produced[prefix:read], skip_special_tokens=True)
            after = self.tokenizer.decode(produced[prefix:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                yield Piece(after[len(before):], len(produced))
                prefix, read = read, len(produced)
            if bool(finished[0]):
                break
        yield Piece(self.tokenizer.decode(produced, skip_special_tokens=True), len(produced), final=True,
                    finish=finish)

    def decode(self, generated: Generated) -> list[str]:
        """Answer texts, without the one space the chat template puts before an answer."""
        texts = self.tokenizer.batch_decode(generated.response_ids, skip_special_tokens=True)
        return [t[1:] if t.startswith(" ") else t for t in texts]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as `generate` numbers them (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def concat(parts: Sequence[Generated], pad_id: int) -> Generated:
    """One batch from chunks: prompts left-padded to the longest, responses right-padded to the longest (their
    kept trunks too, on `KeptTrunk.join`)."""
    prompt_len = max(p.prompt_length for p in parts)
    response_len = max(p.response_mask.shape[1] for p in parts)
    ids, masks, rmasks, lps = [], [], [], []
    for p in parts:
        left, right = prompt_len - p.prompt_length, response_len - p.response_mask.shape[1]
        pad = torch.nn.functional.pad
        prompt_ids, response_ids = p.input_ids[:, : p.prompt_length], p.response_ids
        ids.append(torch.cat([pad(prompt_ids, (left, 0), value=pad_id),
                              pad(response_ids, (0, right), value=pad_id)], 1))
        prompt_mask = p.attention_mask[:, : p.prompt_length]
        rmask = pad(p.response_mask, (0, right))
        masks.append(torch.cat([pad(prompt_mask, (left, 0)), rmask.long()], 1))
        rmasks.append(rmask)
        lps.append(pad(p.logprobs, (0, right)))
    trunk = KeptTrunk([x for p in parts for x in p.trunk.parts]) if all(p.trunk is not None for p in parts) else None
    return Generated(torch.cat(ids), torch.cat(masks), prompt_len, torch.cat(rmasks), torch.cat(lps), trunk)
