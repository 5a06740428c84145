import math

import pytest
import torch

from engine.ppo.core import KLController, RunningMoments, gae, policy_loss, shaped_rewards, value_loss, whiten


def test_gae_matches_a_hand_computation():
    values = torch.tensor([[0.5, 1.0, 2.0, 9.0]])
    rewards = torch.tensor([[0.0, 1.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding: its value and reward are ignored
    gamma, lam = 0.9, 0.5
    d2 = 3.0 + gamma * 0.0 - 2.0  # last real token: nothing after it
    d1 = 1.0 + gamma * 2.0 - 1.0
    d0 = 0.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 2.0, 0.0]]))


def test_rewards_are_the_kl_penalty_plus_the_score_on_the_last_real_token():
    log_ratio = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = shaped_rewards(log_ratio, mask, torch.tensor([2.0, -1.0]), kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25, 0.25 - 1.0, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.55]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert stats["policy/approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    masked, _ = policy_loss(new, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), cliprange=0.2)
    assert masked.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, stats = value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.5)
    # token 0: clipped value 1.5 -> max((2-3)^2, (1.5-3)^2) = 2.25; token 1: within the clip -> 1.21
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.21) / 2)
    assert stats["values/clipfrac"].item() == pytest.approx(0.5)
    assert stats["values/values_error"].item() == pytest.approx((1.0 + 1.21) / 2)


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)


def test_adaptive_kl_moves_toward_its_target_and_fixed_does_not():
    high = KLController(0.1, target=1.0, horizon=100)
    high.update(current_kl=5.0, n_steps=10)  # KL too high: the penalty grows, by at most 20 % x n/horizon
    assert high.value == pytest.approx(0.1 * 1.02)
    low = KLController(0.1, target=1.0, horizon=100)
    low.update(current_kl=0.9, n_steps=10)
    assert low.value == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    fixed = KLController(0.1)
    fixed.update(current_kl=5.0, n_steps=10)
    assert fixed.value == 0.1


def test_a_resumed_kl_coefficient_is_the_recipes_where_it_changed():
    adapted = KLController(0.05, target=6.0)
    adapted.update(current_kl=12.0, n_steps=100)
    saved = adapted.state_dict()
    same = KLController(0.05, target=6.0)
    same.load_state_dict(saved)
    assert same.value == adapted.value != 0.05  # it goes on where it was
    changed = KLController(0.2, target=6.0)
    changed.load_state_dict(saved)
    assert changed.value == 0.2  # an --allow-change resume set a new start
    old = KLController(0.2, target=6.0)
    old.load_state_dict({"value": adapted.value})  # a checkpoint from before `init` was saved
    assert old.value == adapted.value
    fixed = KLController(0.2)
    fixed.load_state_dict({"value": 0.05})  # fixed: the recipe's, whatever was saved
    assert fixed.value == 0.2


def test_running_moments_match_the_whole_sample():
    torch.manual_seed(0)
    xs = torch.randn(300) * 3 + 2
    moments = RunningMoments()
    for chunk in xs.split(64):
        moments.update(chunk)
    assert moments.mean == pytest.approx(xs.mean().item(), rel=1e-4)
    assert moments.std == pytest.approx(xs.std().item(), rel=1e-3)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std


def test_token_logprobs_and_their_gradient_are_log_softmaxs():
    """One [B, T, V] gradient tensor instead of three, the same numbers: against log_softmax + gather, on a
    sliced (non-contiguous) view as the trainer passes it, and by finite differences in float64."""
    from engine.ppo.core import _TokenLogprob, logprobs_of

    torch.manual_seed(0)
    full = (torch.randn(3, 9, 50) * 5).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 8))
    weights = torch.randn(3, 8)
    want = full[:, :-1].log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()
    expected = full.grad.clone()
    for got in (logprobs_of(full[:, :-1], tokens), logprobs_of(full, tokens, drop_last=True)):
        full.grad = None
        assert torch.allclose(got, want, atol=1e-5)
        (got * weights).sum().backward()
        assert torch.allclose(full.grad, expected, atol=1e-6)
        assert (full.grad[:, -1] == 0).all()
    small = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    picked = torch.tensor([[1, 6, 0], [3, 3, 2]])
    for drop_last in (False, True):
        used = picked if drop_last else torch.cat([picked, picked[:, :1]], 1)
        for t in (1.0, 0.7, 1.6):
            assert torch.autograd.gradcheck(lambda x: _TokenLogprob.apply(x, used, drop_last, t), (small,))


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_token_logprobs_at_a_temperature_are_those_of_the_tempered_softmax(t):
    """What rollouts sampled at temperature t are drawn from: log_softmax(logits / t), its gradient too."""
    from engine.ppo.core import logprobs_of

    torch.manual_seed(1)
    full = (torch.randn(3, 9, 50) * 5).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 8))
    weights = torch.randn(3, 8)
    want = (full[:, :-1] / t).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()
    expected, full.grad = full.grad.clone(), None
    got = logprobs_of(full, tokens, drop_last=True, temperature=t)
    assert torch.allclose(got, want, atol=1e-5)
    (got * weights).sum().backward()
    assert torch.allclose(full.grad, expected, atol=1e-6)
