"""The arithmetic of PPO for RLHF, as small pure functions (no models, no I/O).

Shapes: B episodes, R response positions. `mask` (B, R) is 1 on response tokens up to
and including eos and 0 after it; every masked mean, the KL and the losses ignore
the 0 positions. `scores` (B,) are reward-model outputs; `rewards` (B, R) are the
per-token KL-shaped rewards built from them (§3.5, eq. 2).
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (all of them when dim is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population (biased) variance over the masked positions, as lm-human-preferences."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; 0 where mask is 0.

    shift_mean=False keeps the mean (only rescales), as lm-human-preferences does for
    rewards.
    """
    if mask is None:
        mask = torch.ones_like(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# --------------------------------------------------------------------------- rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, R) response mask (0 for an empty row).  (B,)"""
    R = mask.shape[-1]
    idx = torch.arange(R, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, 0).max(-1).values


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -β·(log π - log π_SFT) at every token, plus the score at the last.

    §3.5 eq. 2: the bandit's reward r_θ(x, y) arrives once, at the end of the response;
    the KL penalty is paid per token (Stiennon et al. 2020).
    Returns (rewards (B, R), kl (B, R)), both 0 after eos.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m  # (B, R)
    rewards = -kl_coef * kl
    rewards = rewards.scatter_add(1, last_index(mask)[:, None], scores.to(rewards.dtype)[:, None])
    return rewards * m, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the response tokens.

    The episode ends after the last real token, so V beyond it is 0 (App. C.4: γ = 1,
    λ = 0.95). Returns (advantages, returns = advantages + values), both (B, R), 0 after eos.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    R = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


# --------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over response tokens.

    Stats (detached tensors): clipfrac, approxkl (½·E[(log ratio)²]), ratio min/max/mean.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(losses, clipped), mask)
    with torch.no_grad():
        live = mask.bool()
        stats = {
            "clipfrac": masked_mean((clipped > losses).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_min": torch.where(live, ratio, torch.inf).amin(),
            "ratio_max": torch.where(live, ratio, -torch.inf).amax(),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """½·max((V - G)², (V_clip - G)²) with V_clip = V_old ± clip_range, over response tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = (values - returns) ** 2
    losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((losses_clipped > losses).float(), mask),
            "error": masked_mean(losses, mask),
        }
    return loss, stats


def lm_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per real token: the pretraining term of PPO-ptx (eq. 2)."""
    return -masked_mean(logprobs, mask)


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """β stays where it is set (the paper: β = 0.02, §3.5 / App. C.4)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    `current_kl` is the mean over episodes of the summed per-token KL; `n_steps` the
    episodes it was measured on.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (App. C.4: 0.992)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
