"""PPO's pure pieces, trlx style: masked statistics, whitening, GAE, the clipped losses, KL control,
running reward moments. Small functions of tensors, so tests can check them against hand-computed values.

Shapes: [B, R] over response tokens, `mask` 1 on real tokens and 0 on padding after the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, distributed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over the masked entries, across ranks when `distributed`."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if distributed:
        stats = _all_reduce_sum(stats)
    total, total_sq, count = stats
    mean = total / count.clamp(min=1)
    var = (total_sq / count.clamp(min=1) - mean**2) * count / (count - 1).clamp(min=1)
    return mean.to(x.dtype), var.clamp(min=0).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, distributed: bool = False) -> torch.Tensor:
    mean, var = masked_mean_var(x, mask, distributed)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    The value after the last real token is 0 (the episode ends there).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < length else 0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def shaped_rewards(log_ratio: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: −β·(log π − log π_ref) on every response token, plus the sequence's score on
    its last real token."""
    rewards = -kl_coef * log_ratio * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    return rewards


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: max(-A r, -A clip(r, 1 ± ε)), averaged over real tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 max((v − R)², (clip(v, v_old ± ε) − R)²), averaged over real tokens."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {
            "values/clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask),
            "values/values_error": masked_mean(unclipped_error, mask),
        }
    return loss, stats


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, drop_last: bool = False,
                temperature: float = 1.0) -> torch.Tensor:
    """log p(token) in float32: the token's logit minus the logsumexp (no [B, T, V] log-softmax copy).
    `drop_last`: the logits have one position more than the tokens, the last, which predicts nothing here;
    its gradient is zero, written in the same tensor as the others' (a slice would pad a second one).
    `temperature`: of softmax(logits / temperature), the distribution rollouts are sampled from. Scored
    untempered, tokens drawn at 0.7 made the KL estimate log p - log p_ref negative as the policy spread
    (its samples are the tempered distribution's): the KL penalty paid the policy to move away."""
    return _TokenLogprob.apply(logits.float(), tokens, drop_last, float(temperature))


class _TokenLogprob(torch.autograd.Function):
    """logit[token] - logsumexp(logits), whose gradient onehot(token) - softmax is made in ONE [B, T, V]
    tensor. Through autograd, logsumexp's and gather's gradients were two such tensors and their sum a
    third (and slicing off the last position a fourth): at bloomz-7b1 shape each is 4 GB of float32 per
    16 x 256 response tokens."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, drop_last: bool,
                temperature: float) -> torch.Tensor:
        used = logits[..., :-1, :] if drop_last else logits
        if temperature == 1.0:
            lse = torch.logsumexp(used, dim=-1)
        else:  # row by row: logits / temperature whole would be a second [B, T, V] tensor
            lse = torch.stack([torch.logsumexp(row / temperature, dim=-1) for row in used.unbind(0)])
        ctx.save_for_backward(logits, lse, tokens)
        ctx.drop_last, ctx.temperature = drop_last, temperature
        return used.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) / temperature - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, lse, tokens = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        out = torch.empty_like(logits)
        used, target = (logits[..., :-1, :], out[..., :-1, :]) if ctx.drop_last else (logits, out)
        # d/dlogits of logit[token] / t - logsumexp(logits / t): (onehot(token) - softmax(logits / t)) / t
        grad = grad / ctx.temperature
        if ctx.temperature == 1.0:
            torch.sub(used, lse.unsqueeze(-1), out=target)
        else:
            torch.div(used, ctx.temperature, out=target)
            target.sub_(lse.unsqueeze(-1))
        target.exp_().mul_(-grad.unsqueeze(-1))
        target.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        if ctx.drop_last:
            out[..., -1, :] = 0
        return out, None, None, None


class KLController:
    """Fixed coefficient, or trlx's adaptive one (Ziegler et al.): move toward `target` over `horizon`."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value = init
        self.init = init
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "init": self.init}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The saved coefficient, unless the recipe's `init_kl_coef` changed since (a resume that set it
        starts from it). A fixed coefficient is the recipe's always; an adaptive one saved before `init` was
        keeps its value (what it started from is not known)."""
        if self.target is None or ("init" in state and float(state["init"]) != self.init):
            return
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of rewards across steps (and ranks), for reward scaling."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-24

    def update(self, xs: torch.Tensor, distributed: bool = False) -> tuple[float, float]:
        """Fold in a batch; returns the batch's own (mean, std)."""
        ones = torch.ones_like(xs)
        mean, var = masked_mean_var(xs, ones, distributed)
        n = float(_all_reduce_sum(torch.tensor(float(xs.numel()), device=xs.device)) if distributed else xs.numel())
        batch_var = float(var) * (n - 1) / n if n > 1 else 0.0  # population variance for the merge
        delta = float(mean) - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total
        return float(mean), math.sqrt(float(var))

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
