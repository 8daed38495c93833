"""Comparison data for the reward model: labelers rank K samples of the SFT policy (§3.2, §3.5).

The paper's rankings are of *model outputs*: labelers saw K = 4-9 responses that the
models themselves wrote. On the lab world this stage samples K responses from the SFT
policy for every reward-model prompt and has the simulated labelers rank them:

    <out>/train.jsonl          training prompts, ranked by the training labelers
    <out>/val.jsonl            validation prompts, ranked by the training labelers
    <out>/heldout.jsonl        the same validation samples, ranked by held-out labelers

A reward model trained on the world's hand-written candidate answers (rm_train.jsonl)
instead scores the SFT policy's own samples almost at random (within-prompt Spearman
with gold 0.05, against 0.35 for one trained on these; README, "What a run shows
today"), and PPO then has nothing to climb.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhflab.data import iter_jsonl, pair_agreement
from rlhflab.io import write_json, write_jsonl
from rlhflab.stages.sample import SampleConfig
from rlhflab.stages.sample import run as sample
from rlhflab.world import load_world
from rlhflab.world.rank import rank_samples


def _prompts(src: Path, dst: Path) -> Path:
    """The prompts of a rankings file, one {"prompt"} row each."""
    write_jsonl(dst, [{"prompt": obj["prompt"]} for _, obj in iter_jsonl(src)])
    return dst


def agreement(a: list[dict], b: list[dict]) -> float:
    """Pairwise agreement of two labelers' rankings of the same samples: the ceiling for a
    reward model's accuracy on these comparisons (§3.4: 72.6% on the paper's data)."""
    agree = total = 0
    for x, y in zip(a, b):
        n_agree, n = pair_agreement(x["ranking"], y["ranking"])
        agree, total = agree + n_agree, total + n
    return round(agree / max(total, 1), 4)


def build(
    world_dir: str | Path,
    policy: str | Path,
    out_dir: str | Path,
    config: SampleConfig,
    seed: int = 0,
    also_train: tuple[str | Path, ...] = (),
) -> dict:
    """Sample from `policy` on the world's RM prompts, rank, write the three files + summary.
    `also_train`: more policies for the training prompts, which are dealt out in turn
    (`policy` takes prompts 0, n, 2n, ... of n policies); the validation samples stay `policy`'s
    (the RM's gain is set on them: the small policy, where every PPO run of the default starts, docs/design.md)."""
    world_dir, out = Path(world_dir), Path(out_dir)
    world = load_world(world_dir)
    summary: dict = {"stage": "comparisons", "policy": str(policy)}
    if also_train:
        summary["train_policies"] = [str(p) for p in (policy, *also_train)]
    for split, seed_offset in (("train", 0), ("val", 1)):
        prompts = _prompts(world_dir / f"rm_{split}.jsonl", out / f"{split}_prompts.jsonl")
        cfg = dataclasses.replace(
            config,
            policy=str(policy),
            prompts=str(prompts),
            out=str(out / f"{split}_samples.jsonl"),
            run=dataclasses.replace(config.run, seed=seed + seed_offset),
        )
        if split == "train" and also_train:
            rows, metrics = _sample_dealt(cfg, (policy, *also_train), out, seed)
        else:
            _, metrics = sample(cfg)
            rows = [obj for _, obj in iter_jsonl(cfg.out)]
        pools = [("train", split)] + ([("heldout", "heldout")] if split == "val" else [])
        ranked = {}
        for pool, name in pools:
            ranked[name] = rank_samples(world, rows, pool, seed + seed_offset)
            summary[f"comparisons/{name}_rankings"] = write_jsonl(out / f"{name}.jsonl", ranked[name])
        summary.update({f"{split}/{k}": v for k, v in metrics.items()})
    summary["comparisons/labeler_agreement"] = agreement(ranked["val"], ranked["heldout"])
    write_json(out / "summary.json", summary)
    return summary


def _sample_dealt(cfg: SampleConfig, policies: tuple, out: Path, seed: int) -> tuple[list[dict], dict]:
    """K samples a prompt, prompt i from policies[i % n], each policy with its own seed; the
    rows, policy by policy, written to cfg.out, and each policy's metrics under p<j>/."""
    prompts = [obj for _, obj in iter_jsonl(cfg.prompts)]
    parts, metrics = [], {}
    for j, policy in enumerate(policies):
        mine = out / f"train_prompts_p{j}.jsonl"
        write_jsonl(mine, prompts[j :: len(policies)])
        part = dataclasses.replace(
            cfg,
            policy=str(policy),
            prompts=str(mine),
            out=str(out / f"train_samples_p{j}.jsonl"),
            run=dataclasses.replace(cfg.run, seed=seed + 2 + j),  # 0 and 1: the splits' own seeds
        )
        _, m = sample(part)
        metrics.update({f"p{j}/{k}": v for k, v in m.items()})
        parts.append([obj for _, obj in iter_jsonl(part.out)])
    rows = [row for part in parts for row in part]
    write_jsonl(Path(cfg.out), rows)
    return rows, metrics
