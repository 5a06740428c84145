"""Rollouts: sample responses from the policy branch (batched, KV cache) for rendered prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.template import Conversation, render_prompt


@dataclass
class Rollout:
    prompts: list[Conversation]
    input_ids: torch.Tensor  # [B, P + R]: left-padded prompt, then the response padded on the right
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_length: int  # P
    response_mask: torch.Tensor  # [B, R] float: 1 on generated tokens up to and including the first eos
    responses: list[str]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]


@torch.no_grad()
def generate(policy: Any, tokenizer: Any, prompts: Sequence[Conversation], settings: Any) -> Rollout:
    """Sample one response per prompt. `settings` carries max_prompt_length, max_new_tokens, temperature,
    top_k and top_p (a PPOStage)."""
    device = next(policy.parameters()).device
    encoded = tokenizer(
        [render_prompt(p) for p in prompts], return_tensors="pt", padding=True, truncation=True,
        max_length=settings.max_prompt_length,
    ).to(device)
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's own defaults (repetition penalty, minimum length, extra stop ids)
    # would sample from a distribution other than the one PPO scores.
    sampling = GenerationConfig(
        do_sample=True,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k or None,
        top_p=settings.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    sequences = policy.generate(**encoded, generation_config=sampling)
    prompt_length = encoded["input_ids"].shape[1]
    response = sequences[:, prompt_length:]
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    response = response.masked_fill(after_eos, tokenizer.pad_token_id)
    response_mask = (~after_eos).float()
    input_ids = torch.cat([encoded["input_ids"], response], dim=1)
    attention_mask = torch.cat([encoded["attention_mask"], response_mask.long()], dim=1)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    # The template puts one space before an answer; the model generates it, the scorers add it back.
    texts = [t[1:] if t.startswith(" ") else t for t in texts]
    return Rollout(list(prompts), input_ids, attention_mask, prompt_length, response_mask, texts)
