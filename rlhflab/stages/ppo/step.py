"""The PPO step (§3.5, App. C.4): rollout, scoring, KL-shaped rewards, GAE, PPO epochs.

The environment is a contextual bandit: an episode is one prompt, one sampled response,
one reward-model score, and the end. Per token the policy also pays β·log(π/π_SFT) to the
frozen SFT model; the value function starts from the reward model; PPO-ptx adds
γ·(pretraining log-likelihood) to the same loss and the same optimizer step.

One PPO step (`ppo_step`) reads top to bottom:
  1. sample queries        4. score (reward model)        7. update the KL controller
  2. respond (KV cache)     5. KL-shaped rewards, GAE      8. log
  3. old and ref logprobs  6. PPO epochs over minibatches (+ptx)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhflab.generation import sample
from rlhflab.models import (
    entropy_from_logits,
    keep_last,
    position_ids,
    reward_scores,
    token_logprobs,
    token_values,
)
from rlhflab.stages.ppo import core as ppo_core
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.ppo.core import (
    gae,
    kl_shaped_rewards,
    lm_loss,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from rlhflab.stages.ppo.run import Run
from rlhflab.text import pad_left
from rlhflab.training import PhaseTimer, autocast


@dataclass
class Rollout:
    """One batch of episodes and everything PPO needs from them (B episodes, Q + R tokens)."""

    query_responses: torch.Tensor  # (B, Q+R) left-padded query, then response, then pad
    attention_mask: torch.Tensor  # (B, Q+R) 1 on real tokens
    mask: torch.Tensor  # (B, R)   1 on response tokens up to and including eos
    logprobs: torch.Tensor  # (B, R)   log π_old(a|s) at the sampling temperature
    values: torch.Tensor  # (B, R)   V_old(s), the value before each response token
    advantages: torch.Tensor  # (B, R)   whitened GAE advantages
    returns: torch.Tensor  # (B, R)   advantages + values (before whitening)

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


# --------------------------------------------------------------------------- forwards


def policy_logprobs(policy, query_responses, attention_mask, R: int, temperature: float):
    """log π(response tokens) at `temperature`, from one forward over query+response.

    Only the R positions that predict response tokens reach the LM head (logits_to_keep),
    and no full-vocabulary log-softmax is kept. -> logprobs (B, R), logits (B, R, V)
    """
    out = policy(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        **keep_last(policy, R + 1),
    )
    logits = out.logits[:, -R - 1 : -1]  # position t predicts response token t
    return token_logprobs(logits, query_responses[:, -R:], temperature), logits


def response_values(value_model, query_responses, attention_mask, R: int) -> torch.Tensor:
    """V(s_t) at the state before each response token.  (B, R)"""
    return token_values(value_model, query_responses, attention_mask)[:, -R - 1 : -1]


def score(reward_model, query_responses, attention_mask) -> torch.Tensor:
    """r_θ(x, y) for each episode, read at the last real token (eos when emitted).  (B,)"""
    return reward_scores(reward_model, query_responses, attention_mask)


@dataclass
class TrainForward:
    """The training forward of one minibatch, graph attached: (B, R) each."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor  # (B,) mean over response tokens, detached


def train_forward(run: Run, qr: torch.Tensor, am: torch.Tensor, mask: torch.Tensor) -> TrainForward:
    """log π and V of a minibatch from the models being trained (gradients kept)."""
    cfg, R = run.config, mask.shape[1]
    logprobs, logits = policy_logprobs(run.policy, qr, am, R, cfg.temperature)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), mask, dim=1)
    return TrainForward(logprobs, response_values(run.value_model, qr, am, R), entropy)


@torch.no_grad()
def _rollout_forwards(
    run: Run, qr: torch.Tensor, am: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, head: TrainForward
) -> dict[str, torch.Tensor]:
    """Old logprobs/values, ref logprobs and scores of every episode, in minibatch chunks.

    The rows `first` (the update's first minibatch) take their old logprobs and values from
    `head`, that minibatch's own training forward: same parameters, same rows, so it need not
    run twice. The other rows go through the same function in chunks of the minibatch size,
    so with lr = 0 the PPO ratio is exactly 1 on every minibatch.
    """
    cfg, R, B = run.config, mask.shape[1], qr.shape[0]
    rest = torch.ones(B, dtype=torch.bool, device=qr.device)
    rest[first] = False
    rest = rest.nonzero().squeeze(1)
    rows, parts = [first], [(head.logprobs.detach(), head.values.detach(), head.entropy)]
    for i in range(0, rest.shape[0], cfg.minibatch_size):
        idx = rest[i : i + cfg.minibatch_size]
        f = train_forward(run, qr[idx], am[idx], mask[idx])
        rows.append(idx)
        parts.append((f.logprobs, f.values, f.entropy))
    order = torch.empty(B, dtype=torch.long, device=qr.device)
    order[torch.cat(rows)] = torch.arange(B, device=qr.device)  # back to the batch's row order
    out = {k: torch.cat(v)[order] for k, v in zip(("logprobs", "values", "entropy"), zip(*parts))}
    ref, scores = [], []
    for i in range(0, B, cfg.minibatch_size):
        q, a = qr[i : i + cfg.minibatch_size], am[i : i + cfg.minibatch_size]
        ref.append(policy_logprobs(run.ref_policy, q, a, R, cfg.temperature)[0])
        scores.append(score(run.reward_model, q, a))
    return {**out, "ref_logprobs": torch.cat(ref), "scores": torch.cat(scores)}


# --------------------------------------------------------------------------- the PPO step


def ppo_step(run: Run, step: int) -> dict[str, float]:
    """One PPO iteration on batch_size fresh episodes; returns the step's metrics.

    bf16 autocast covers forwards only, one context per phase or minibatch: autocast
    caches each weight's bf16 copy until its context exits, so a context spanning an
    optimizer step would feed the next minibatch the weights from before it.
    """
    cfg, timer = run.config, PhaseTimer(run.device)
    gen = torch.Generator(device=run.device).manual_seed(_step_seed(cfg.run.seed, step))

    # 1. sample queries (a contextual bandit: each episode is one prompt, §3.5)
    queries = [run.queries[i] for i in run.prompt_stream.take(cfg.batch_size)]
    # 2. respond, batched with the KV cache
    with timer("generate"), autocast(run.device, cfg.train.precision):
        g = sample(
            run.policy,
            queries,
            pad_id=run.pad_id,
            eos_id=run.eos_id,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            generator=gen,
            force_length=cfg.force_length,
        )
    orders = _minibatch_orders(cfg, step, g.mask.device)
    with timer("score"), autocast(run.device, cfg.train.precision):
        qr, am = _join(run, queries, g)
        # 3. old logprobs and values, ref logprobs (same temperature); 4. RM scores. The
        # update's first minibatch runs its training forward now and keeps it: its output
        # at these parameters is the old logprobs and values of those rows.
        first = orders[0][: cfg.minibatch_size]
        head = train_forward(run, qr[first], am[first], g.mask[first])
        fw = _rollout_forwards(run, qr, am, g.mask, first, head)
        scores = fw["scores"] + cfg.no_eos_penalty * (~g.ended).float()  # an offset, not in §3.5
        # 5. KL-shaped per-token rewards (§3.5 eq. 2) → GAE → whitened advantages
        rewards, kl = kl_shaped_rewards(scores, fw["logprobs"], fw["ref_logprobs"], g.mask, run.kl_ctl.value)
        advantages, returns = gae(rewards, fw["values"], g.mask, cfg.gamma, cfg.lam)
        rollout = Rollout(qr, am, g.mask, fw["logprobs"], fw["values"], whiten(advantages, g.mask), returns)
    # 6. PPO epochs over minibatches, the ptx term in the same loss (PPO-ptx)
    with timer("update"):
        finite = run.guard.check(rewards.sum() + rollout.advantages.sum())
        train_stats = ppo_epochs(run, rollout, step, orders, head) if finite else {"ppo/skipped": 1.0}
    del head  # its graph, when the step was skipped
    # 7. update the KL controller (a no-op for fixed β)
    kl_coef = run.kl_ctl.value
    if finite:
        run.kl_ctl.update(float(kl.sum(1).mean()), cfg.batch_size)
    # 8. log
    return {
        "step": step,
        "episodes": step * cfg.batch_size,
        "lr": _lr(cfg, step),
        **_rollout_metrics(g, fw, scores, kl, kl_coef, rollout),
        **train_stats,
        **timer.metrics(cfg.batch_size, int(g.mask.sum())),
    }


def _join(run: Run, queries: list[list[int]], g) -> tuple[torch.Tensor, torch.Tensor]:
    """query_responses (B, Q+R): left-padded queries, then responses; and their mask."""
    q_ids, q_mask = (t.to(run.device) for t in pad_left(queries, run.pad_id))
    return torch.cat([q_ids, g.responses], 1), torch.cat([q_mask, g.mask], 1)


def _rollout_metrics(g, fw, scores, kl, kl_coef: float, rollout: Rollout) -> dict[str, float]:
    mask = rollout.mask
    return {
        "objective/rm_score": float(fw["scores"].mean()),  # r_θ alone
        "objective/scores": float(scores.mean()),  # with the no-eos offset
        "objective/kl": float(kl.sum(1).mean()),  # nats per response
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": float((-kl_coef * kl).sum(1).mean()),
        "objective/entropy": float(fw["entropy"].mean()),  # nats per token
        "ppo/returns/mean": float(masked_mean(rollout.returns, mask)),
        "ppo/val/mean": float(masked_mean(rollout.values, mask)),
        # log π at sampling vs in the training forward: ~1e-6 unless temperatures differ
        "ppo/policy/rollout_logprob_gap": float(((g.logprobs - rollout.logprobs) * mask).abs().max()),
        "response/length": float(mask.sum(1).float().mean()),
        "response/eos_rate": float(g.ended.float().mean()),
    }


def _minibatch_orders(cfg: PPOConfig, step: int, device: torch.device) -> list[torch.Tensor]:
    """One shuffled order of the batch's rows per PPO epoch, drawn from the step's seed."""
    gen = torch.Generator().manual_seed(_step_seed(cfg.run.seed, step) + 1)
    return [torch.randperm(cfg.batch_size, generator=gen).to(device) for _ in range(cfg.ppo_epochs)]


def ppo_epochs(
    run: Run, rollout: Rollout, step: int, orders: list[torch.Tensor], head: TrainForward | None = None
) -> dict[str, float]:
    """ppo_epochs passes over the batch in shuffled minibatches; one optimizer step each.

    `head`, when given, is the first minibatch's training forward, already run.
    """
    cfg = run.config
    _set_lr(run.optimizer, _lr(cfg, step))
    B, stats = rollout.mask.shape[0], []
    for order in orders:
        for i in range(0, B, cfg.minibatch_size):
            mb = rollout.select(order[i : i + cfg.minibatch_size])
            ptx = run.ptx_batch(cfg.minibatch_size) if run.ptx is not None else None
            stats.append(train_minibatch(run, mb, ptx, head))
            head = None
    return _reduce(stats)


def train_minibatch(run: Run, mb: Rollout, ptx, forward: TrainForward | None = None) -> dict:
    """loss → backward → (non-finite? skip) → clip → Adam step → EMA."""
    cfg, opt = run.config, run.optimizer
    with autocast(run.device, cfg.train.precision):  # its own: bf16 weights as the last step left them
        loss, stats = minibatch_loss(run.policy, run.value_model, mb, ptx, cfg, forward)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norms = [_grad_norm(params, cfg.train.max_grad_norm) for params in (run.policy_params, run.value_params)]
    stats.update({"ppo/policy/grad_norm": norms[0], "ppo/val/grad_norm": norms[1]})
    if not run.guard.ok(torch.stack([loss.detach(), *norms]), []):  # one sync, not one per tensor
        opt.zero_grad(set_to_none=True)
        return {"skipped": True}  # its stats may be NaN: keep them out of the step's means
    opt.step()
    if run.ema is not None:
        ppo_core.ema_update(run.ema, run.policy, cfg.ema_decay)
    return stats


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (non-finite if any gradient is); clipped to max_norm when set."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def minibatch_loss(policy, value_model, mb: Rollout, ptx, cfg: PPOConfig, forward: TrainForward | None = None):
    """pg_loss + vf_coef·vf_loss + γ·ptx_nll: one loss, one backward, one step (§3.5 eq. 2).

    `ptx` is (input_ids, attention_mask) of pretraining texts, or None for plain PPO;
    `forward` the minibatch's training forward when it has already run.
    """
    R = mb.mask.shape[1]
    if forward is not None:
        logprobs, values = forward.logprobs, forward.values
    else:
        logprobs, _ = policy_logprobs(policy, mb.query_responses, mb.attention_mask, R, cfg.temperature)
        values = response_values(value_model, mb.query_responses, mb.attention_mask, R)
    pg_loss, pg = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.clip_range)
    vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip_range)
    loss = pg_loss + cfg.vf_coef * vf_loss
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/loss/value": vf_loss.detach(),
        **{f"ppo/policy/{k}": v for k, v in pg.items()},
        **{f"ppo/val/{k}": v for k, v in vf.items()},
    }
    if ptx is not None:
        ptx_loss = ptx_nll(policy, *ptx)
        loss = loss + cfg.ptx_coef * ptx_loss  # PPO-ptx: same loss, same step (App. C.4)
        stats["ppo/loss/ptx"] = ptx_loss.detach()
    stats["ppo/loss/total"] = loss.detach()
    return loss, stats


def ptx_nll(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of right-padded pretraining texts (T = 1)."""
    out = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    logprobs = token_logprobs(out.logits[:, :-1], input_ids[:, 1:])  # (N, T-1)
    return lm_loss(logprobs, attention_mask[:, 1:])


# --------------------------------------------------------------------------- helpers


def _lr(cfg: PPOConfig, step: int) -> float:
    """Constant LR after a linear warm-up from lr/10 over warmup_steps (App. C.4)."""
    if cfg.warmup_steps == 0:
        return cfg.train.lr
    return cfg.train.lr * (0.1 + 0.9 * min(1.0, (step - 1) / cfg.warmup_steps))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _step_seed(seed: int, step: int) -> int:
    # Each step draws its own seed, so a resumed run samples exactly what it would have.
    return (seed * 1_000_003 + step * 7919) % (2**63)


def _reduce(stats: list[dict]) -> dict[str, float]:
    """Per-minibatch stats -> step metrics: means, except ratio min/max and the skip count."""
    out = {"ppo/skipped_minibatches": float(sum(1 for s in stats if "skipped" in s))}
    for key in dict.fromkeys(k for s in stats for k in s if k != "skipped"):
        vals = torch.stack([s[key].float() for s in stats if key in s])
        reduce = {"ratio_min": torch.min, "ratio_max": torch.max}.get(key.rsplit("/", 1)[-1], torch.mean)
        out[key] = float(reduce(vals))
    return out
