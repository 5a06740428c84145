"""Rollouts: the policy's answers to rendered prompts, sampled through the generation engine in chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.generation import Engine, KeptTrunk, Sampling, row_seeds
from engine.template import Conversation, render_prompt


@dataclass
class Rollout:
    prompts: list[Conversation]
    input_ids: torch.Tensor  # [B, P + R]: left-padded prompt, then the response padded on the right
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_length: int  # P
    response_mask: torch.Tensor  # [B, R] float: 1 on generated tokens up to and including the first eos
    responses: list[str]
    logprobs: torch.Tensor | None = None  # [B, R] float32: the sampler's log p of each token (tempered)
    trunk: KeptTrunk | None = None  # with `capture`, where the decoder kept it (Generated.trunk)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def cut_short(self, eos_token_id: int) -> torch.Tensor:
        """[B] float: 1 where max_new_tokens ended the answer before its EOS."""
        ended = ((self.response_ids == eos_token_id) & (self.response_mask > 0)).any(dim=1)
        return (~ended).float()


def sampling_of(settings: Any, seed: int) -> Sampling:
    """The recipe's sampling settings (a PPOStage), every field explicit."""
    return Sampling(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                    top_k=settings.top_k, top_p=settings.top_p, seed=seed)


@torch.no_grad()
def generate(
    policy: Any, tokenizer: Any, prompts: Sequence[Conversation], settings: Any, keys: Sequence[int], seed: int,
    capture: tuple[int, ...] = (),
) -> Rollout:
    """Sample one response per prompt, `settings.chunk_size` prompts per decode batch (the KV cache of a
    whole 128-prompt rollout of a 7B model may not fit beside its training state); "auto": as many as
    the accelerator's free memory holds (on an H200 at 7b1 shape, batches of 256 instead of 128 took the
    generate phase from 43.7 to 33.5 s per 1,024 prompts).

    `keys`: a stable number per prompt (its position in the prompt stream): with `seed` it fixes the
    prompt's sampling noise, so the answer does not depend on the chunking or on the other prompts.
    `capture`: decoder layers whose inputs the rollout keeps (`Engine.generate`); with "auto", only where
    keeping them costs no decode batch (`Engine.plan`).
    """
    engine = Engine(policy, tokenizer)
    sampling = sampling_of(settings, seed)
    texts = [render_prompt(p) for p in prompts]
    all_ids, all_mask = engine.encode(texts, settings.max_prompt_length)  # tokenized once, chunked below
    chunk = settings.chunk_size
    if chunk == "auto":
        longest = all_ids.shape[1]
        chunk, capture = engine.plan(longest, longest + settings.max_new_tokens, len(texts), capture)
    batch = engine.generate_chunked(all_ids, all_mask, sampling, row_seeds(seed, keys, all_ids.device), chunk,
                                    capture)
    return Rollout(list(prompts), batch.input_ids, batch.attention_mask, batch.prompt_length, batch.response_mask,
                   engine.decode(batch), batch.logprobs, batch.trunk)
