"""Scores for rollouts: the reward model of the RM stage, or any `reward_fn(prompts, responses)`."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from engine.template import Conversation, render_prompt, tokenize_pair


class Scorer(Protocol):
    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor: ...


class RewardModelScorer:
    """A sequence-classification reward model; pairs are tokenized exactly as in RM training."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16, dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer

        from engine.head import float32_head
        from engine.models import inference_model

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # "auto": each tensor as saved, the RM stage's float32 top layers and head over its bf16 trunk
        self.model = inference_model(path, device, dtype or "auto", reward=True)
        self.pad = self.model.config.pad_token_id
        if self.pad is None:
            raise ValueError(f"{path}: the reward model's config has no pad_token_id")
        self.device = device
        self.batch_size = batch_size
        # As the RM stage trained it: a bf16 trunk under bf16 autocast (the float32 layers above it compute
        # under autocast too, never cast to bf16 as a whole), the head in float32 accuracy.
        self.autocast = any(p.dtype == torch.bfloat16 for p in self.model.parameters())
        head = getattr(self.model, "score", None)
        if type(head) is torch.nn.Linear:  # another architecture's head, or a wrapped one, computes as it is
            float32_head(head)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        ids = [tokenize_pair(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        # Batches of similar lengths: each is padded only to its own longest pair, so a rollout of short
        # and long answers does not pay for the longest one in every batch.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores = torch.empty(len(ids), device=self.device)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = len(ids[rows[0]])
            batch = torch.tensor([ids[i] + [self.pad] * (width - len(ids[i])) for i in rows], device=self.device)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows], device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=batch, attention_mask=mask).logits
            scores[torch.tensor(rows, device=self.device)] = logits[:, 0].float()
        return scores


class FunctionScorer:
    """`fn(prompts, responses) -> list[float]` on rendered prompt texts, e.g. a rule or a judge client.
    `name`: its `module:function`, for what a score that cannot be used says."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], device: torch.device,
                 name: str = "reward_fn"):
        self.fn = fn
        self.device = device
        self.name = name

    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        from engine.run import RunFailed

        # The user's function's own mistakes end the run with a line that names it (a traceback from the
        # trainer sent the reader to the PPO code).
        scores = self.fn([render_prompt(p) for p in prompts], list(responses))
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError) as err:
            raise RunFailed(f"reward_fn {self.name} returned {type(scores).__name__} where a number per response "
                            f"was expected: {err}") from None
        if len(scores) != len(responses):
            raise RunFailed(f"reward_fn {self.name} returned {len(scores)} scores for {len(responses)} responses")
        return torch.tensor(scores, device=self.device)  # a nan or inf: the divergence guard names the reward
