"""How good is the reward model, measured against the lab world (§5.2 / Table 1 of App. E).

Accuracy on held-out comparisons ranked by the TRAINING labelers and by the HELD-OUT
labelers (the paper: 72.4% vs 69.6%), the rank correlation of RM scores with gold
quality, and the mean score of the demonstrations (0 after the §3.5 bias).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhflab.data import read_demos, read_rankings
from rlhflab.io import write_json
from rlhflab.models import load_reward_model, load_tokenizer
from rlhflab.stages.rm import pairwise_accuracy
from rlhflab.stages.rm_score import score_pairs
from rlhflab.world import load_world


def _ranks(xs: list[float]) -> torch.Tensor:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    t = torch.tensor(xs, dtype=torch.float64)
    order = t.argsort()
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(xs), dtype=torch.float64)
    for v in t.unique():
        same = t == v
        ranks[same] = ranks[same].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def within_prompt_spearman(groups: list[tuple[list[float], list[float]]]) -> float:
    """Mean over prompts of Spearman(RM score, gold) among that prompt's K responses: what
    best-of-n and PPO can use (prompts whose responses all score alike are left out)."""
    rhos = [spearman(s, g) for s, g in groups if len(set(s)) > 1 and len(set(g)) > 1]
    return sum(rhos) / len(rhos) if rhos else float("nan")


@torch.no_grad()
def rm_report(
    world_dir: str | Path,
    rm_dir: str | Path,
    out_dir: str | Path | None = None,
    val: str | Path | None = None,
    heldout: str | Path | None = None,
) -> dict:
    """`val` / `heldout`: rankings by training / held-out labelers (default: the world's
    rm_val.jsonl and rm_heldout.jsonl)."""
    world_dir = Path(world_dir)
    world = load_world(world_dir)
    rm, tok = load_reward_model(rm_dir).eval(), load_tokenizer(rm_dir)
    val_rankings = read_rankings(val or world_dir / "rm_val.jsonl")
    heldout_rankings = read_rankings(heldout or world_dir / "rm_heldout.jsonl")
    prompts = [r.prompt for r in val_rankings for _ in r.responses]
    responses = [x for r in val_rankings for x in r.responses]
    scores = score_pairs(rm, tok, prompts, responses)
    gold = [world.judge(p, x).quality for p, x in zip(prompts, responses)]
    groups, i = [], 0
    for r in val_rankings:
        k = len(r.responses)
        groups.append((scores[i : i + k], gold[i : i + k]))
        i += k
    demos = read_demos(world_dir / "sft_val.jsonl")
    demo_scores = score_pairs(rm, tok, [d.prompt for d in demos], [d.completion for d in demos])
    out = {
        "rm/accuracy_train_labelers": round(pairwise_accuracy(rm, tok, val_rankings), 4),
        "rm/accuracy_heldout_labelers": round(pairwise_accuracy(rm, tok, heldout_rankings), 4),
        "rm/spearman_gold": round(spearman(scores, gold), 4),
        "rm/spearman_gold_within_prompt": round(within_prompt_spearman(groups), 4),
        "rm/demo_mean_score": round(sum(demo_scores) / len(demo_scores), 4),
    }
    if out_dir is not None:
        write_json(Path(out_dir) / "summary.json", out)
    return out
