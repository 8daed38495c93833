"""PPO over more than one process (`torchrun ... -m rlhflab ppo`, rlhflab.distributed).

A run's maths does not change with its number of processes W:

- Sampling. A step's global batch of `batch_size` episodes is cut into chunks of
  `rollout_chunk` episodes, each sampled in its own `generation.sample` call with its own
  generator, seeded from (run.seed, step, chunk). Rank r samples chunks r, r+W, r+2W, ...
  A 1-process run samples the same chunks with the same seeds, so a run's rollouts are the
  same at any W. rollout_chunk 0 is one chunk per rank (the fewest, largest calls), and
  chunk 0's seed is the step's own: a 1-process run then samples as it always did, but a
  run's draws depend on W.
- Statistics. Advantage whitening, the KL controller's input, the NaN guard's decisions
  and every logged metric are over the global batch: sums and counts all-reduced, never
  means of per-rank means. Every rank holds the same numbers and takes the same decisions.
- Minibatches. Every rank draws the same shuffled orders over the global batch and trains
  on the episodes of each minibatch it holds. Its per-token mean loss is scaled by
  n_r·W / N (its n_r of the minibatch's N response tokens; the ptx term likewise over its
  share of the minibatch's pretraining texts), so the gradient DDP or FSDP averages over
  ranks is the 1-process minibatch's. A rank that holds none of a minibatch trains on a
  stand-in episode weighted 0: every rank runs every forward and backward. The gradient
  clip is by the global norm (DDP: the averaged gradients; FSDP: DTensors' norms).
- FSDP. The policy's and the value model's forwards are collectives. Sampling (whose
  number of decoding steps differs between ranks) and the rollout's old log-probs and
  values run inside `gathered`: every rank all-gathers the whole model once, and its
  forwards are then its own.

Policy and value model train through `distributed.wrap` (DDP or FSDP2, train.parallel);
the reference and the reward model are frozen and replicated on every rank.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as tdist

from rlhflab.distributed import DUMP_ENV, Dist, local, resolve_parallel, unwrap
from rlhflab.errors import InputError
from rlhflab.stages.ppo import core

# --------------------------------------------------------------------------- which episodes


def chunk_size(config, dist: Dist) -> int:
    """Episodes per sampling call: rollout_chunk, or (0) batch_size / W."""
    return config.rollout_chunk or config.batch_size // dist.world_size


def chunk_seed(step_seed: int, chunk: int) -> int:
    """The seed of chunk `chunk` of a step; chunk 0's is the step's own."""
    return (step_seed + 1_000_033 * chunk) % (2**63)


def my_chunks(n_chunks: int, dist: Dist) -> list[int]:
    """The chunks this rank samples: r, r+W, r+2W, ..."""
    return list(range(dist.rank, n_chunks, dist.world_size))


def positions(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(batch_size,) this rank's row of each global episode, -1 where another rank holds it."""
    where = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
    where[rows] = torch.arange(rows.shape[0], device=rows.device)
    return where


def part(episodes: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, float]:
    """(this rank's rows of the global minibatch `episodes`, the factor on its mean loss).

    `tokens` (batch_size,) holds every episode's response tokens (`global_lengths`): the
    factor n_r·W / N needs no collective. One process: `episodes` itself and 1.0.
    """
    if not dist.enabled:
        return episodes, 1.0
    rows = where[episodes]
    mine = rows >= 0
    n, total = float(tokens[episodes[mine]].sum()), float(tokens[episodes].sum())
    if not bool(mine.any()):
        return torch.zeros(1, dtype=torch.long, device=rows.device), 0.0  # a stand-in, weighted 0
    return rows[mine], n * dist.world_size / total


def ptx_part(ptx: tuple[torch.Tensor, torch.Tensor], dist: Dist) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """This rank's contiguous share of a minibatch's pretraining texts (every rank drew the
    same ones) and the factor on its per-token mean NLL (a stand-in text weighted 0 when
    it has none)."""
    if not dist.enabled:
        return ptx, 1.0
    ids, mask = ptx
    rows = dist.shard(list(range(ids.shape[0])))
    per_text = mask[:, 1:].sum(1).double()  # the tokens each text's NLL averages over
    if not rows:
        return (ids[:1], mask[:1]), 0.0
    n, total = float(per_text[rows].sum()), float(per_text.sum())
    return (ids[rows], mask[rows]), n * dist.world_size / total


def global_lengths(mask: torch.Tensor, rows: torch.Tensor, batch_size: int, dist: Dist) -> torch.Tensor:
    """(batch_size,) response tokens of every episode of the global batch, on every rank."""
    out = torch.zeros(batch_size, dtype=torch.float64, device=mask.device)
    out[rows] = mask.sum(1).double()
    return dist.all_reduce(out)


# --------------------------------------------------------------------------- statistics


def global_max(values: list[float], dist: Dist) -> list[float]:
    """The largest of the ranks' values, element by element."""
    if not dist.enabled or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def whiten(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """core.whiten over the masked positions of every rank's episodes (two passes: the
    global mean, then the global variance about it). One process: core.whiten itself."""
    if not dist.enabled:
        return core.whiten(x, mask)
    m = mask.to(x.dtype)
    s, n = dist.sum([float((x * m).sum()), float(m.sum())])
    mean = s / max(n, 1.0)
    var = dist.sum(float((((x - mean) ** 2) * m).sum())) / max(n, 1.0)
    return (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, dtype=x.dtype)) * m


def global_means(sums: dict[str, float], counts: dict[str, float], dist: Dist) -> dict[str, float]:
    """{key: Σ_ranks sums[key] / Σ_ranks counts[key]}, in one all-reduce."""
    keys = sorted(sums)
    total = dist.sum([sums[k] for k in keys] + [counts[k] for k in keys])
    n = len(keys)
    return {k: total[i] / total[n + i] if total[n + i] else 0.0 for i, k in enumerate(keys)}


def global_minibatch_stats(stats: list[dict], dist: Dist, vf_coef: float, ptx_coef: float) -> list[dict]:
    """Each minibatch's stats over the whole minibatch, from every rank's part of it.

    A rank's entry holds its part's means, its `_tokens` (response tokens) and
    `_ptx_tokens`: a mean becomes Σ mean·weight / Σ weight (the ptx loss weighted by
    pretraining tokens, the rest by response tokens); ratio_min / ratio_max the extreme
    over ranks; the grad norms are global already (the same on every rank); the total
    loss is rebuilt from the global parts. One sum and one max all-reduce for the whole
    step. One process: the stats as they are.
    """
    if not dist.enabled:
        return [{k: v for k, v in s.items() if not k.startswith("_")} for s in stats]
    sums, extremes, plans = [], [], []
    for s in stats:
        plan = []  # (key, "sum" | "max", index, sign)
        live = s.get("_tokens", 0) > 0  # a stand-in episode counts nowhere
        for key, value in s.items():
            leaf = key.rsplit("/", 1)[-1]
            if key.startswith("_") or key in ("skipped", "ppo/loss/total"):
                continue
            if leaf in ("ratio_min", "ratio_max", "grad_norm"):
                sign = -1.0 if leaf == "ratio_min" else 1.0
                plan.append((key, "max", len(extremes), sign))
                extremes.append(sign * float(value) if live or leaf == "grad_norm" else -float("inf"))
            else:
                w = float(s["_ptx_tokens"] if key == "ppo/loss/ptx" else s["_tokens"])
                plan.append((key, "sum", len(sums), 1.0))
                sums += [float(value) * w if w else 0.0, w]
        plans.append(plan)
    total, top = dist.sum(sums), global_max(extremes, dist)
    out = []
    for s, plan in zip(stats, plans):
        if "skipped" in s:  # every rank skipped it: the NaN guard decides for all
            out.append({"skipped": True})
            continue
        row = {}
        for key, kind, j, sign in plan:
            value = sign * top[j] if kind == "max" else (total[j] / total[j + 1] if total[j + 1] else 0.0)
            row[key] = torch.tensor(value)
        loss = row["ppo/loss/policy"] + vf_coef * row["ppo/loss/value"]
        row["ppo/loss/total"] = loss + ptx_coef * row["ppo/loss/ptx"] if "ppo/loss/ptx" in row else loss
        out.append(row)
    return out


# --------------------------------------------------------------------------- FSDP


@contextlib.contextmanager
def gathered(*models: torch.nn.Module):
    """Each FSDP-wrapped model (distributed.wrap's root) whole on every rank for the block:
    one all-gather per FSDP unit on entry, then every forward is local, so ranks may run
    different numbers of them (sampling). Resharded on exit to wrap's defaults (blocks
    reshard after forward, the root does not). DDP or one process: nothing happens."""
    from torch.distributed.fsdp import FSDPModule

    units = [(root, m) for root in models for m in root.modules() if isinstance(m, FSDPModule)]
    for _, m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for root, m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)


def norm_value(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP's is a replicated DTensor)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


# --------------------------------------------------------------------------- checks


def check_parallel(config, dist: Dist) -> str:
    """Refuse what more than one process does not run, before any model loads; return
    the parallel mode ('none', 'ddp' or 'fsdp')."""
    mode = resolve_parallel(config.train.parallel, dist)
    if not dist.enabled:
        return mode
    W, B = dist.world_size, config.batch_size
    chunk = config.rollout_chunk or B // W
    if not config.rollout_chunk and B % W:
        raise InputError(
            f"batch_size {B} does not split over {W} processes; choose a multiple of {W} "
            "or set rollout_chunk (episodes per sampling call)",
            field="batch_size",
        )
    if B // chunk < W:
        raise InputError(
            f"{B // chunk} chunks of {chunk} episodes leave some of the {W} processes without episodes; "
            "lower rollout_chunk",
            field="rollout_chunk",
        )
    if mode == "fsdp" and config.ema_decay is not None:
        raise InputError(
            "ema_decay is not supported with train.parallel=fsdp (the average would need the full "
            "weights on every rank); use train.parallel=ddp",
            field="ema_decay",
        )
    if mode == "fsdp" and config.lora_r:
        raise InputError(
            "lora_r is not supported with train.parallel=fsdp (adapters are small: use train.parallel=ddp)",
            field="lora_r",
        )
    return mode


# --------------------------------------------------------------------------- test hook


def dump_step(models: dict[str, torch.nn.Module], step: int, dist: Dist) -> None:
    """Test hook (tests/test_distributed_ppo.py): with RLHFLAB_TEST_DUMP_DIR set, each rank
    writes the parameters it holds (its shards under FSDP) after each step to
    <dir>/step<k>/rank<r>.safetensors."""
    where = os.environ.get(DUMP_ENV)
    if not where:
        return
    from safetensors.torch import save_file

    tensors = {}
    for name, model in models.items():
        for key, p in unwrap(model).named_parameters():
            tensors[f"{name}.{key}"] = local(p).detach().cpu().contiguous()
    path = Path(where) / f"step{step}"
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / f"rank{dist.rank}.safetensors"))
