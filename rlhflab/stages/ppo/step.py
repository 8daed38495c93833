"""The PPO step (§3.5, App. C.4): rollout, scoring, KL-shaped rewards, GAE, PPO epochs.

The environment is a contextual bandit: an episode is one prompt, one sampled response,
one reward-model score, and the end. Per token the policy also pays β·log(π/π_SFT) to the
frozen SFT model; the value function starts from the reward model; PPO-ptx adds
γ·(pretraining log-likelihood) to the same loss and the same optimizer step.

One PPO step (`ppo_step`) reads top to bottom:
  1. sample queries        4. score (reward model)        7. update the KL controller
  2. respond (KV cache)     5. KL-shaped rewards, GAE      8. log
  3. old and ref logprobs  6. PPO epochs over minibatches (+ptx)

Under torchrun every rank runs the same step on the episodes it holds of the global
batch, and every statistic is global (parallel.py says how, and why the maths stays the
1-process run's).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.nn.parallel import DistributedDataParallel

from rlhflab.device import autocast, reading_last
from rlhflab.distributed import Forward, unwrap
from rlhflab.generation import Generation, sample
from rlhflab.models import (
    entropy_from_logits,
    keep_last,
    position_ids,
    reward_scores,
    token_logprobs,
    token_values,
)
from rlhflab.stages.ppo import core as ppo_core
from rlhflab.stages.ppo import parallel
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.ppo.core import (
    gae,
    kl_shaped_rewards,
    lm_loss,
    masked_mean,
    policy_loss,
    value_loss,
)
from rlhflab.stages.ppo.run import Run
from rlhflab.text import pad_left
from rlhflab.training import PhaseTimer


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
    episodes: torch.Tensor | None = None  # (B,) each row's index in the step's global batch

    def select(self, idx: torch.Tensor, trim: bool = False) -> Rollout:
        """The rows `idx`; with `trim`, without the padding columns they all share (`cut`)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        out = Rollout(**{k: v[idx] if v is not None else None for k, v in parts.items()})
        if not trim:
            return out
        cols, r = cut(out.attention_mask, out.mask)
        per_token = {k: getattr(out, k)[:, :r] for k in ("mask", "logprobs", "values", "advantages", "returns")}
        return Rollout(out.query_responses[:, cols], out.attention_mask[:, cols], **per_token, episodes=out.episodes)


def cut(attention_mask: torch.Tensor, mask: torch.Tensor) -> tuple[slice, int]:
    """(the columns of query_responses, the response width) that rows of left-padded queries
    and right-padded responses (mask: (B, R)) need: from the longest query's first token to
    the longest response's last. Every column cut is padding in every row."""
    R = mask.shape[1]
    Q = attention_mask.shape[1] - R
    q, r = int(attention_mask[:, :Q].sum(1).max()), max(1, int(mask.sum(1).max()))
    return slice(Q - q, Q + r), r


# --------------------------------------------------------------------------- forwards


def policy_logprobs(policy, query_responses, attention_mask, R: int, temperature: float):
    """log π(response tokens) at `temperature`, from one forward over query+response.

    Only the R + 1 last positions run the last block (`reading_last`) and the R that
    predict response tokens reach the LM head (logits_to_keep); no full-vocabulary
    log-softmax is kept. -> logprobs (B, R), logits (B, R, V)
    """
    with reading_last(unwrap(policy), R + 1):
        out = policy(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
            **keep_last(unwrap(policy), R + 1),
        )
    logits = out.logits[:, -R - 1 : -1]  # position t predicts response token t
    return token_logprobs(logits, query_responses[:, -R:], temperature), logits


def response_values(value_model, query_responses, attention_mask, R: int) -> torch.Tensor:
    """V(s_t) at the state before each response token.  (B, R)

    `value_model`: the model itself, or the Run's `value_train` (token_values through the
    root forward of distributed.wrap: DDP's or FSDP's). The last block runs at the last
    R + 1 positions only (`reading_last`)."""
    with reading_last(unwrap(value_model), R + 1):
        if isinstance(value_model, (Forward, DistributedDataParallel)):
            values = value_model(query_responses, attention_mask)
        else:
            values = token_values(value_model, query_responses, attention_mask)
    return values[:, -R - 1 : -1]


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
    """log π and V of a minibatch from the models being trained (gradients kept), through
    their DDP / FSDP wrappers."""
    cfg, R = run.config, mask.shape[1]
    logprobs, logits = policy_logprobs(run.policy_train, qr, am, R, cfg.temperature)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), mask, dim=1)
    return TrainForward(logprobs, response_values(run.value_train, qr, am, R), entropy)


@torch.no_grad()
def _rollout_forwards(
    run: Run, qr: torch.Tensor, am: torch.Tensor, mask: torch.Tensor, groups: list[torch.Tensor], head: TrainForward
) -> dict[str, torch.Tensor]:
    """Old logprobs/values, ref logprobs and scores of every episode, (B, R) or (B,).

    `groups` are this rank's rows of the update's first-epoch minibatches, in order (any
    may be empty); the first takes its old logprobs and values from `head`, that
    minibatch's own training forward: same parameters, same rows, so it need not run twice.
    With length buckets (config.length_buckets) the minibatches keep their rows through every
    epoch and each group runs trimmed (`cut`), as the update will run it; otherwise the rows
    go in chunks of the minibatch size at the batch's width. Either way every row's old
    forward is the computation its update forward repeats, so with lr = 0 the PPO ratio is
    exactly 1 on every minibatch. The reference and reward forwards run on the same groups,
    trimmed the same way.
    """
    cfg, R, B = run.config, mask.shape[1], qr.shape[0]
    trim = cfg.length_buckets
    if not trim:  # random minibatches: the first, then the rest in index order at full width
        rest = torch.ones(B, dtype=torch.bool, device=qr.device)
        rest[groups[0]] = False
        rest = rest.nonzero().squeeze(1)
        groups = [groups[0]] + [rest[i : i + cfg.minibatch_size] for i in range(0, rest.shape[0], cfg.minibatch_size)]
    rows, inputs, parts = [], [], []
    with parallel.gathered(run.policy_train, run.value_train):  # FSDP: local forwards, any number per rank
        for j, idx in enumerate(groups):
            if not idx.numel():
                continue
            rows.append(idx)
            inputs.append(_inputs(qr, am, mask, idx, trim))
            f = head if j == 0 else train_forward(run, *inputs[-1])
            parts.append((_widen(f.logprobs.detach(), R), _widen(f.values.detach(), R), f.entropy))
    order = torch.empty(B, dtype=torch.long, device=qr.device)
    order[torch.cat(rows)] = torch.arange(B, device=qr.device)  # back to the batch's row order
    out = {k: torch.cat(v)[order] for k, v in zip(("logprobs", "values", "entropy"), zip(*parts))}
    ref, scores = [], []
    for q, a, m in inputs:
        ref.append(_widen(policy_logprobs(run.ref_policy, q, a, m.shape[1], cfg.temperature)[0], R))
        scores.append(score(run.reward_model, q, a))
    return {**out, "ref_logprobs": torch.cat(ref)[order], "scores": torch.cat(scores)[order]}


def _inputs(qr: torch.Tensor, am: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, trim: bool):
    """(query_responses, attention_mask, mask) of rows `idx`, trimmed (`cut`) or whole."""
    qr, am, mask = qr[idx], am[idx], mask[idx]
    if not trim:
        return qr, am, mask
    cols, r = cut(am, mask)
    return qr[:, cols], am[:, cols], mask[:, :r]


def _widen(x: torch.Tensor, R: int) -> torch.Tensor:
    """(b, r) per-token values back to the batch's width R (zeros past r: masked anyway)."""
    return torch.nn.functional.pad(x, (0, R - x.shape[1])) if x.shape[1] < R else x


# --------------------------------------------------------------------------- the PPO step


def ppo_step(run: Run, step: int) -> dict[str, float]:
    """One PPO iteration on batch_size fresh episodes; returns the step's metrics.

    bf16 autocast covers forwards only, one context per phase or minibatch: autocast
    caches each weight's bf16 copy until its context exits, so a context spanning an
    optimizer step would feed the next minibatch the weights from before it.
    """
    cfg, timer, dist = run.config, PhaseTimer(run.device), run.dist

    # 1. sample queries (a contextual bandit: each episode is one prompt, §3.5); every rank
    # draws the same global batch and keeps its chunks of it
    queries = [run.queries[i] for i in run.prompt_stream.take(cfg.batch_size)]
    # 2. respond, batched with the KV cache
    with timer("generate"), autocast(run.device, cfg.train.precision):
        episodes, g = respond(run, queries, step)
    lengths = torch.tensor([len(q) for q in queries], dtype=torch.float64, device=g.mask.device)
    queries = [queries[i] for i in episodes.tolist()]
    where = parallel.positions(episodes, cfg.batch_size)
    tokens = parallel.global_lengths(g.mask, episodes, cfg.batch_size, dist)
    orders = _minibatch_orders(cfg, step, g.mask.device, lengths + tokens)
    with timer("score"), autocast(run.device, cfg.train.precision):
        qr, am = _join(run, queries, g, dist.max(max(map(len, queries))))
        # 3. old logprobs and values, ref logprobs (same temperature); 4. RM scores. The
        # update's first minibatch runs its training forward now and keeps it: its output
        # at these parameters is the old logprobs and values of those rows.
        groups = [
            _mine(orders[0][i : i + cfg.minibatch_size], where, tokens, dist)
            for i in range(0, cfg.batch_size, cfg.minibatch_size)
        ]
        first = parallel.part(orders[0][: cfg.minibatch_size], where, tokens, dist)[0]
        head = train_forward(run, *_inputs(qr, am, g.mask, first, cfg.length_buckets))
        fw = _rollout_forwards(run, qr, am, g.mask, groups, head)
        scores = fw["scores"] + cfg.no_eos_penalty * (~g.ended).float()  # an offset, not in §3.5
        # 5. KL-shaped per-token rewards (§3.5 eq. 2) → GAE → advantages whitened over the global batch
        rewards, kl = kl_shaped_rewards(scores, fw["logprobs"], fw["ref_logprobs"], g.mask, run.kl_ctl.value)
        advantages, returns = gae(rewards, fw["values"], g.mask, cfg.gamma, cfg.lam)
        whitened = parallel.whiten(advantages, g.mask, dist)
        rollout = Rollout(qr, am, g.mask, fw["logprobs"], fw["values"], whitened, returns, episodes)
    # 6. PPO epochs over minibatches, the ptx term in the same loss (PPO-ptx)
    with timer("update"):
        finite = run.guard.check(rewards.sum() + rollout.advantages.sum())  # on every rank's
        train_stats = ppo_epochs(run, rollout, step, orders, head) if finite else {"ppo/skipped": 1.0}
    del head  # its graph, when the step was skipped
    # 7. update the KL controller (a no-op for fixed β) with the global batch's mean KL
    kl_coef = run.kl_ctl.value
    metrics = _rollout_metrics(g, fw, scores, kl, kl_coef, rollout, dist)
    if finite:
        run.kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
    # 8. log
    return {
        "step": step,
        "episodes": step * cfg.batch_size,
        "lr": _lr(cfg, step),
        **metrics,
        **train_stats,
        **_time_metrics(timer, cfg.batch_size, float(tokens.sum()), dist),
    }


def respond(run: Run, queries: list[list[int]], step: int) -> tuple[torch.Tensor, Generation]:
    """Sample this rank's chunks of the global batch (parallel.py): each chunk in one call,
    with the generator of (run.seed, step, chunk). Returns (the episodes' indices in the
    batch (B_r,), their Generation, every part padded to the longest response of any rank).
    """
    cfg, dist = run.config, run.dist
    size = parallel.chunk_size(cfg, dist)
    seed, parts, episodes = _step_seed(cfg.run.seed, step), [], []
    with parallel.gathered(run.policy_train):  # FSDP: decoding steps differ between ranks
        for c in parallel.my_chunks(cfg.batch_size // size, dist):
            gen = torch.Generator(device=run.device).manual_seed(parallel.chunk_seed(seed, c))
            rows = list(range(c * size, (c + 1) * size))
            parts.append(
                sample(
                    run.policy,
                    [queries[i] for i in rows],
                    pad_id=run.pad_id,
                    eos_id=run.eos_id,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    generator=gen,
                    force_length=cfg.force_length,
                )
            )
            episodes += rows
    R = dist.max(max(p.mask.shape[1] for p in parts))

    def cat(name: str, fill) -> torch.Tensor:
        xs = [getattr(p, name) for p in parts]
        return torch.cat([torch.nn.functional.pad(x, (0, R - x.shape[1]), value=fill) for x in xs])

    ended = torch.cat([p.ended for p in parts])
    g = Generation(cat("responses", run.pad_id), cat("logprobs", 0.0), cat("mask", 0), ended)
    return torch.tensor(episodes, device=g.mask.device), g


def _join(run: Run, queries: list[list[int]], g, Q: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """query_responses (B, Q+R): left-padded queries (to at least Q tokens: the longest of
    any rank's), then responses; and their mask."""
    q_ids, q_mask = (t.to(run.device) for t in pad_left(queries, run.pad_id))
    if Q > q_ids.shape[1]:
        q_ids = torch.nn.functional.pad(q_ids, (Q - q_ids.shape[1], 0), value=run.pad_id)
        q_mask = torch.nn.functional.pad(q_mask, (Q - q_mask.shape[1], 0), value=0)
    return torch.cat([q_ids, g.responses], 1), torch.cat([q_mask, g.mask], 1)


def _rollout_metrics(g, fw, scores, kl, kl_coef: float, rollout: Rollout, dist) -> dict[str, float]:
    """The rollout's metrics over the global batch: sums and counts over every rank's."""
    mask = rollout.mask
    n, tokens = float(mask.shape[0]), float(mask.sum())
    per_episode = {
        "objective/rm_score": fw["scores"],  # r_θ alone
        "objective/scores": scores,  # with the no-eos offset
        "objective/kl": kl.sum(1),  # nats per response
        "objective/non_score_reward": (-kl_coef * kl).sum(1),
        "objective/entropy": fw["entropy"],  # nats per token
        "response/length": mask.sum(1).float(),
        "response/eos_rate": g.ended.float(),
    }
    sums = {k: float(v.sum()) for k, v in per_episode.items()}
    counts = dict.fromkeys(sums, n)
    for key, x in (("ppo/returns/mean", rollout.returns), ("ppo/val/mean", rollout.values)):
        sums[key], counts[key] = float((x * mask).sum()), tokens
    out = parallel.global_means(sums, counts, dist)
    # log π at sampling vs in the training forward: ~1e-6 unless temperatures differ
    gap = float(((g.logprobs - rollout.logprobs) * mask).abs().max())
    out["ppo/policy/rollout_logprob_gap"] = parallel.global_max([gap], dist)[0]
    return {"objective/kl_coef": kl_coef, **out}


def _time_metrics(timer: PhaseTimer, episodes: int, tokens: float, dist) -> dict[str, float]:
    """Phase times of the slowest rank; episodes and generated tokens of the global batch."""
    names = sorted(timer.times)
    slowest = dict(zip(names, parallel.global_max([timer.times[k] for k in names], dist)))
    total = max(sum(slowest.values()), 1e-9)
    return {
        **{f"time/{k}_s": v for k, v in slowest.items()},
        "time/step_s": total,
        "time/episodes_per_s": episodes / total,
        "time/generated_tokens_per_s": tokens / max(slowest.get("generate", 0), 1e-9),
    }


def _minibatch_orders(cfg: PPOConfig, step: int, device: torch.device, lengths: torch.Tensor) -> list[torch.Tensor]:
    """One order of the batch's rows per PPO epoch (minibatch i: rows [i·mb, (i+1)·mb)),
    drawn from the step's seed, the same on every rank. Length buckets: the rows sorted by
    `lengths` (query + response tokens of every episode; ties in a seeded order) and cut into
    minibatches, whose order each epoch shuffles. Otherwise a fresh permutation each epoch."""
    gen = torch.Generator().manual_seed(_step_seed(cfg.run.seed, step) + 1)
    B, mb = cfg.batch_size, cfg.minibatch_size
    if not cfg.length_buckets:
        return [torch.randperm(B, generator=gen).to(device) for _ in range(cfg.ppo_epochs)]
    perm = torch.randperm(B, generator=gen)
    buckets = perm[torch.argsort(lengths.cpu()[perm], stable=True)].view(B // mb, mb)
    return [buckets[torch.randperm(B // mb, generator=gen)].reshape(-1).to(device) for _ in range(cfg.ppo_epochs)]


def _mine(episodes: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor, dist) -> torch.Tensor:
    """This rank's rows of a global minibatch (none: empty, not parallel.part's stand-in)."""
    rows, scale = parallel.part(episodes, where, tokens, dist)
    return rows if scale > 0 else rows[:0]


def ppo_epochs(
    run: Run, rollout: Rollout, step: int, orders: list[torch.Tensor], head: TrainForward | None = None
) -> dict[str, float]:
    """ppo_epochs passes over the batch in shuffled minibatches; one optimizer step each.

    `orders` index the global batch; each rank trains on its part of every minibatch
    (parallel.part). `head`, when given, is the first minibatch's training forward, already run.
    """
    cfg, dist = run.config, run.dist
    _set_lr(run.optimizer, _lr(cfg, step))
    where = parallel.positions(rollout.episodes, cfg.batch_size)
    tokens = parallel.global_lengths(rollout.mask, rollout.episodes, cfg.batch_size, dist)
    stats = []
    for order in orders:
        for i in range(0, cfg.batch_size, cfg.minibatch_size):
            rows, scale = parallel.part(order[i : i + cfg.minibatch_size], where, tokens, dist)
            ptx, ptx_scale = None, 1.0
            if run.ptx is not None:  # every rank draws the same texts and trains on its share
                ptx, ptx_scale = parallel.ptx_part(run.ptx_batch(cfg.minibatch_size), dist)
            mb = rollout.select(rows, trim=cfg.length_buckets)
            stats.append(train_minibatch(run, mb, ptx, head, (scale, ptx_scale)))
            head = None
    return _reduce(parallel.global_minibatch_stats(stats, dist, cfg.vf_coef, cfg.ptx_coef))


def train_minibatch(run: Run, mb: Rollout, ptx, forward: TrainForward | None = None, scales=(1.0, 1.0)) -> dict:
    """loss → backward → (non-finite? skip) → clip → Adam step → EMA.

    `scales`: the factors on this rank's RL and ptx losses (parallel.part; 1 in one process).
    """
    cfg, opt = run.config, run.optimizer
    with autocast(run.device, cfg.train.precision):  # its own: bf16 weights as the last step left them
        loss, stats = minibatch_loss(run.policy_train, run.value_train, mb, ptx, cfg, forward, scales)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norms = [_grad_norm(params, cfg.train.max_grad_norm) for params in (run.policy_params, run.value_params)]
    stats.update({"ppo/policy/grad_norm": norms[0], "ppo/val/grad_norm": norms[1]})
    stats.update(_tokens=float(mb.mask.sum()) if scales[0] > 0 else 0.0)
    if ptx is not None:
        stats.update(_ptx_tokens=float(ptx[1][:, 1:].sum()) if scales[1] > 0 else 0.0)
    if not run.guard.ok(torch.stack([stats["ppo/loss/total"], *norms]), []):  # one sync, not one per tensor
        opt.zero_grad(set_to_none=True)
        return {"skipped": True}  # its stats may be NaN: keep them out of the step's means
    opt.step()
    if run.ema is not None:
        ppo_core.ema_update(run.ema, run.policy, cfg.ema_decay)
    return stats


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (non-finite if any gradient is); clipped to max_norm when set."""
    if max_norm is not None:
        return parallel.norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm).detach())
    return parallel.norm_value(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def minibatch_loss(
    policy, value_model, mb: Rollout, ptx, cfg: PPOConfig, forward: TrainForward | None = None, scales=(1.0, 1.0)
):
    """pg_loss + vf_coef·vf_loss + γ·ptx_nll: one loss, one backward, one step (§3.5 eq. 2).

    `ptx` is (input_ids, attention_mask) of pretraining texts, or None for plain PPO;
    `forward` the minibatch's training forward when it has already run. Under torchrun
    the loss to backward is scales[0]·(RL part) + scales[1]·(ptx part) of this rank's
    share (parallel.part); stats["ppo/loss/total"] is the unscaled sum.
    """
    R = mb.mask.shape[1]
    if forward is not None:
        logprobs, values = forward.logprobs, forward.values
    else:
        logprobs, _ = policy_logprobs(policy, mb.query_responses, mb.attention_mask, R, cfg.temperature)
        values = response_values(value_model, mb.query_responses, mb.attention_mask, R)
    pg_loss, pg = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.clip_range)
    vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip_range)
    total = pg_loss + cfg.vf_coef * vf_loss
    loss = total * scales[0]  # × 1.0 in one process: exact
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/loss/value": vf_loss.detach(),
        **{f"ppo/policy/{k}": v for k, v in pg.items()},
        **{f"ppo/val/{k}": v for k, v in vf.items()},
    }
    if ptx is not None:
        ptx_loss = ptx_nll(policy, *ptx)
        total = total + cfg.ptx_coef * ptx_loss  # PPO-ptx: same loss, same step (App. C.4)
        loss = loss + cfg.ptx_coef * ptx_loss * scales[1]
        stats["ppo/loss/ptx"] = ptx_loss.detach()
    stats["ppo/loss/total"] = total.detach()
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
