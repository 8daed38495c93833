"""Judging two models' answers the way §4.1 does: held-out labelers compare them.

`compare` shows each prompt's pair of answers, in random order, to one randomly drawn
held-out labeler (and to the gold scorer); `win_rate` turns the outcomes into a rate with
a 95% Wilson interval; `likert_mean` is one held-out labeler's 1-7 rating per answer.
"""

from __future__ import annotations

import math
import random


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (ties counted as half a success)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(outcomes: list[float]) -> tuple[float, float, float]:
    """(rate, ci_low, ci_high) of outcomes in {1, 0.5, 0}."""
    n = len(outcomes)
    rate = sum(outcomes) / n if n else 0.5
    return (rate, *wilson(sum(outcomes), n))


def labeler_prefers(labeler, texts: list[str], judgements: list, rng: random.Random) -> float:
    """One labeler ranks two answers: 1 if the first wins, 0 if the second, 0.5 for a tie.

    The pair is shown in random order; identical texts are a tie (Labeler.rank groups them).
    """
    swap = rng.random() < 0.5
    order = [1, 0] if swap else [0, 1]
    top = labeler.rank([texts[i] for i in order], [judgements[i] for i in order], rng)[0]
    if isinstance(top, list):
        return 0.5
    return 1.0 if order[top] == 0 else 0.0


def compare(world, judged: list, base: list, seed: str) -> tuple[list[float], list[float]]:
    """Per-prompt outcomes of a model against the baseline: (held-out labelers, gold)."""
    rng = random.Random(seed)
    by_labelers, by_gold = [], []
    for (ra, ja), (rb, jb) in zip(judged, base):
        labeler = rng.choice(world.heldout_labelers)
        by_labelers.append(labeler_prefers(labeler, [ra, rb], [ja, jb], rng))
        by_gold.append(0.5 if ja.quality == jb.quality else float(ja.quality > jb.quality))
    return by_labelers, by_gold


def win_keys(world, prefix: str, name: str, judged: list, base: list, seed: str) -> dict:
    """<prefix>/<name> and <prefix>_gold/<name>, each with its _ci_low and _ci_high."""
    (labelers, gold), out = compare(world, judged, base, seed), {}
    for key, outcomes in ((prefix, labelers), (f"{prefix}_gold", gold)):
        rate, lo, hi = win_rate(outcomes)
        out.update({f"{key}/{name}": rate, f"{key}_ci_low/{name}": lo, f"{key}_ci_high/{name}": hi})
    return out


def likert_mean(world, judgements: list, seed: str) -> float:
    rng = random.Random(seed)
    return sum(rng.choice(world.heldout_labelers).likert(j, rng) for j in judgements) / max(1, len(judgements))


def unseen_win_keys(world, prefix: str, name: str, judged: list, base: list, tasks: list, seed: str) -> dict:
    """`win_keys` as <prefix>_unseen on the test prompts in no training split (none: {})."""
    seen = world.seen_prompts()
    unseen = [(a, b) for a, b, t in zip(judged, base, tasks) if t.prompt not in seen]
    if not unseen:
        return {}
    pairs = [a for a, _ in unseen], [b for _, b in unseen]
    return win_keys(world, f"{prefix}_unseen", name, *pairs, f"{prefix}_unseen-{seed}")


FIGURE1 = (
    ("winrate", "win_vs_{b}"),
    ("winrate_gold", "gold_win_vs_{b}"),
    ("winrate_unseen", "win_vs_{b}_unseen"),
    ("winrate_unseen_gold", "gold_win_vs_{b}_unseen"),
)
"""Figure 1's keys, from the win-rate keys they repeat: figure1/<size>/<family>/<name>."""


def figure1_keys(summary: dict, names: list[str], baseline: str) -> dict:
    """Figure 1 in stable keys: `figure1/<size>/<family>/win_vs_<b>` (held-out labelers),
    `gold_win_vs_<b>` (gold), both also `_unseen` (test prompts in no training split), each
    with `_ci_low`, `_ci_high`; <b> the baseline's name in lower case with '_' for '-'
    ('sft_large'). Names not of the form '<family>-<size>' get none."""
    b, out = baseline.lower().replace("-", "_"), {}
    for m in names:
        family, _, size = m.rpartition("-")
        if not family:
            continue
        for src, dst in FIGURE1:
            dst = f"figure1/{size}/{family}/{dst.format(b=b)}"
            for suffix in ("", "_ci_low", "_ci_high"):
                if f"{src}{suffix}/{m}" in summary:
                    out[dst + suffix] = summary[f"{src}{suffix}/{m}"]
    return out
