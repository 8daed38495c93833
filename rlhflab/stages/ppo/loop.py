"""Stage 3: PPO / PPO-ptx against the reward model (§3.5, App. C.4): the run and its CLI.

`train(config)` opens the run (`run.open_run`: every input checked, nothing written),
resumes from <out_dir>/checkpoint when there is one, calls `step.ppo_step` n_steps times,
measures the policy on the validation prompts every eval_every steps, and writes
policy/, value/ (with LoRA merged, and the adapter in adapter/) and summary.json.

    torchrun --nproc_per_node 8 -m rlhflab ppo --config ppo.yaml --train.parallel fsdp

Under torchrun every rank runs this loop on its share of each global batch
(parallel.py); rank 0 alone writes metrics.jsonl, config.yaml, summary.json and the
outputs (the full weights, gathered), measures the validation prompts and shows
progress; checkpoints are sharded and resume on any number of processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhflab import adapters, distributed
from rlhflab.config import add_config_arguments, config_from_args, save_config, validate
from rlhflab.device import autocast
from rlhflab.errors import InputError
from rlhflab.generation import sample
from rlhflab.io import MetricsLog, atomic_dir, read_metrics, write_json
from rlhflab.stages.ppo import parallel
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.ppo.run import Run, open_run
from rlhflab.stages.ppo.step import _join, policy_logprobs, ppo_step, score
from rlhflab.training import progress, resolve_device, set_seed

# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def val_rollout_metrics(run: Run, policy) -> dict[str, float]:
    """RM score, KL to SFT and response length of `policy` on the validation prompts."""
    cfg = run.config
    gen = torch.Generator(device=run.device).manual_seed(cfg.run.seed + 12345)  # same noise each time
    scores, kls, lengths, ended = [], [], [], []
    for i in range(0, len(run.val_queries), cfg.batch_size):
        queries = run.val_queries[i : i + cfg.batch_size]
        with autocast(run.device, cfg.train.precision):
            g = sample(
                policy,
                queries,
                pad_id=run.pad_id,
                eos_id=run.eos_id,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                generator=gen,
            )
            (qr, am), R = _join(run, queries, g), g.mask.shape[1]
            lp = policy_logprobs(policy, qr, am, R, cfg.temperature)[0]
            ref = policy_logprobs(run.ref_policy, qr, am, R, cfg.temperature)[0]
            scores.append(score(run.reward_model, qr, am))
        kls.append(((lp - ref) * g.mask).sum(1))
        lengths.append(g.mask.sum(1).float())
        ended.append(g.ended.float())
    mean = lambda xs: float(torch.cat(xs).mean())
    return {
        "eval/rm_score": mean(scores),
        "eval/kl": mean(kls),
        "eval/response_length": mean(lengths),
        "eval/eos_rate": mean(ended),
    }


def measure(run: Run, step: int, evaluator) -> dict[str, float]:
    """The validation metrics of what would be saved now. Under torchrun rank 0 measures
    (as one process would: the same numbers) and every rank gets its row; under FSDP with
    the policy gathered on every rank, so rank 0's forwards are its own."""
    with parallel.gathered(run.policy_train):
        row = None
        if run.dist.is_main:
            policy = run.ema if run.ema is not None else run.policy
            row = val_rollout_metrics(run, policy) if run.val_queries else {}
            if evaluator is not None:
                for key, value in evaluator(policy, run.tokenizer, step).items():
                    row[key if key.startswith("eval/") else f"eval/{key}"] = float(value)
        return run.dist.broadcast(row)


# --------------------------------------------------------------------------- the run


def train(config: PPOConfig, evaluator=None) -> tuple[Path, dict]:
    """PPO (or PPO-ptx when ptx_data is set) from the SFT policy; returns (out_dir, summary)."""
    validate(config)
    dist = distributed.setup(resolve_device(config.run.device))  # one process, or this rank of torchrun's
    if evaluator is None and config.world and dist.is_main:
        evaluator = make_evaluator(config)  # imported only here: the lab world is optional
    set_seed(config.run.seed)
    run = open_run(config)  # validates every input and loads models; writes nothing
    out = Path(config.out_dir)
    start = run.restore_or_start()
    log = _NoLog()
    if dist.is_main:
        log = MetricsLog(
            out / "metrics.jsonl", truncate_after_step=start if start else None, report_to=config.run.report_to
        )
        save_config(config, out / "config.yaml")
    measures = bool(run.val_queries) or bool(dist.broadcast(evaluator is not None))  # the same on every rank
    t0, last = time.perf_counter(), {}
    if start == 0 and measures:
        log.log({"step": 0, "episodes": 0, **measure(run, 0, evaluator)})
    steps = range(start + 1, config.n_steps + 1)
    for step in progress(steps, total=config.n_steps, desc="ppo", initial=start, show=dist.is_main):
        last = ppo_step(run, step)
        if measures and (step % config.eval_every == 0 or step == config.n_steps):
            last.update(measure(run, step, evaluator))
        log.log(last)
        if step % config.train.save_every == 0 or step == config.n_steps:
            run.save_checkpoint(step)
        parallel.dump_step({"policy": run.policy, "value": run.value_model}, step, dist)
    if not last:  # resumed at the end: nothing left to train
        last = (read_metrics(out / "metrics.jsonl") or [{}])[-1]
    summary = {
        "steps": config.n_steps,
        "episodes": config.n_steps * config.batch_size,
        "resumed_from_step": start,
        "skipped_updates": run.guard.skipped,
        "kl_coef": run.kl_ctl.value,
        "time_s": time.perf_counter() - t0,
        "final": last,
        "ptx": run.ptx is not None,
        "ema": config.ema_decay is not None,
        "processes": dist.world_size,
    }
    log.close()
    _save_outputs(run, out)
    if dist.is_main:
        write_json(out / "summary.json", summary)
    dist.barrier()
    return out, summary


def _save_outputs(run: Run, out: Path) -> None:
    """policy/ and value/ as plain transformers models; with LoRA, merged (in place: the run
    is over) after the policy's adapter went to adapter/ in peft's format. Under torchrun
    rank 0 writes the full weights (gathered from every rank's shards under FSDP)."""
    dist = run.dist
    if run.lora is not None and dist.is_main:  # LoRA runs one process or DDP: rank 0 holds it whole
        with atomic_dir(out / "adapter") as tmp:
            adapters.save_adapter(run.lora.policy, tmp)
        adapters.merge(run.lora)
    for name, model in (
        ("policy", run.ema if run.ema is not None else run.policy),
        ("value", run.value_model),
    ):
        plain = distributed.full_model(model, dist)  # None on every rank but 0; a collective under FSDP
        if plain is not None:
            with atomic_dir(out / name) as tmp:
                plain.save_pretrained(tmp)
                run.tokenizer.save_pretrained(str(tmp))
    dist.barrier()


class _NoLog:
    """The metrics log of ranks other than 0: they compute every row, rank 0 writes it."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def make_evaluator(config: PPOConfig):
    """The lab world's measurement (gold, styles, capability) on the validation prompts."""
    from rlhflab.data import read_prompts
    from rlhflab.eval.lab import make_lab_evaluator

    if not Path(config.world).is_dir():
        raise InputError("lab world directory not found", file=config.world, field="world")
    prompts = read_prompts(config.val_prompts or Path(config.world) / "ppo_val.jsonl")
    return make_lab_evaluator(config.world, prompts, config.max_new_tokens, config.temperature)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_config_arguments(parser, PPOConfig)


def run_cli(args) -> int:
    config = config_from_args(PPOConfig, args)
    out, summary = train(config)  # builds the lab evaluator when config.world is set
    if not distributed.setup(resolve_device(config.run.device)).is_main:  # torchrun: rank 0 reports
        return 0
    final = summary["final"]
    print(
        f"ppo: {summary['steps']} steps, {summary['episodes']} episodes -> {out}/policy "
        f"(RM score {final.get('objective/rm_score', float('nan')):.3f}, "
        f"KL {final.get('objective/kl', float('nan')):.3f})"
    )
    return 0
