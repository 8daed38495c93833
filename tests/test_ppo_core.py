"""PPO arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.stages.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    ema_update,
    gae,
    kl_shaped_rewards,
    last_index,
    lm_loss,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_masked_mean_ignores_masked_positions():
    x, m = t([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 2.0])


def test_whiten_matches_hand_values():
    x, m = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    # mean 2, population variance 2/3 over the three real positions; the 4th is zeroed.
    s = math.sqrt(2 / 3 + 1e-8)
    assert whiten(x, m).tolist()[0] == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], abs=1e-6)
    assert whiten(x, m, shift_mean=False).tolist()[0] == pytest.approx([-1 / s + 2, 2.0, 1 / s + 2, 0.0], abs=1e-6)
    w = whiten(torch.randn(4, 7) * 5 + 3)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert w.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_gae_undiscounted_matches_hand_values():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # A2 = 1 - 0.7 = 0.3; A1 = (0.7 - 0.6) + 0.95·0.3 = 0.385; A0 = 0.1 + 0.95·0.385
    assert adv.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0], abs=1e-6)


def test_gae_with_discount_and_lambda():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # δ2 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04; γλ = 0.45
    assert adv.tolist()[0] == pytest.approx([0.04 + 0.45 * 0.165, 0.03 + 0.45 * 0.3, 0.3], abs=1e-6)


def test_gae_episode_ends_at_eos():
    # Position 2 is after eos: its reward and value (9s) must not leak into the advantages.
    rewards, values, m = t([[0.0, 1.0, 9.0]]), t([[0.5, 0.6, 9.0]]), t([[1, 1, 0]])
    adv, ret = gae(rewards, values, m, gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.95 * 0.4, 0.4, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.98, 1.0, 0.0], abs=1e-6)


def test_kl_shaped_rewards_keep_score_apart_from_per_token_kl():
    scores = t([2.0, -1.0])
    logprobs = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -2.0, -2.0], [-2.0, -1.0, -5.0]])
    m = t([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref, m, kl_coef=0.1)
    assert torch.equal(kl, t([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    # −β·kl at every token; the score lands on the last real token (eos), nothing after it.
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1 + 2.0])
    assert rewards.tolist()[1] == pytest.approx([-0.1, -1.0, 0.0])
    assert last_index(m).tolist() == [2, 1]


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 4)
    new = torch.log(t([[1.5, 0.5, 1.1, 1.5]])).requires_grad_()
    adv, m = t([[1.0, -1.0, 2.0, -1.0]]), torch.ones(1, 4)
    loss, stats = policy_loss(new, old, adv, m, clip_range=0.2)
    # per token max(−A·r, −A·clip(r)): [−1.2, 0.8, −2.2, 1.5]; tokens 0 and 1 are clipped.
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 + 1.5) / 4, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0  # clipped tokens pass no gradient
    assert new.grad[0, 2] != 0 and new.grad[0, 3] != 0


def test_policy_loss_ratio_is_exactly_one_when_logprobs_match():
    lp = torch.randn(3, 5)
    loss, stats = policy_loss(lp, lp.clone(), torch.randn(3, 5), torch.ones(3, 5))
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["approxkl"].item() == 0.0


def test_value_loss_is_clipped_around_the_old_value():
    values, old, returns = t([[0.5, 0.1]]), t([[0.0, 0.0]]), t([[1.0, -1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # V_clip = [0.2, 0.1]; max((V−G)², (V_clip−G)²) = [0.64, 1.21]; ½·mean
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_lm_loss_is_mean_token_nll():
    assert lm_loss(t([[-1.0, -3.0, -7.0]]), t([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_kl_controllers():
    fixed = FixedKLController(0.02)
    fixed.update(100.0, 64)
    assert fixed.value == 0.02
    ada = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 100)  # error clipped to +0.2: ×(1 + 0.2·100/10000)
    assert ada.value == pytest.approx(0.1 * 1.002)
    ada.update(5.4, 1000)  # error −0.1: ×(1 − 0.1·1000/10000)
    assert ada.value == pytest.approx(0.1 * 1.002 * 0.99)
    again = AdaptiveKLController(1.0, 6.0, 10000)
    again.load_state_dict(ada.state_dict())
    assert again.value == ada.value


def test_ema_update():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    ema_update(ema, model, decay=0.9)
    assert ema.weight.tolist()[0] == pytest.approx([0.1, 0.1])
    ema_update(ema, model, decay=0.9)
    assert ema.bias.item() == pytest.approx(0.19)
