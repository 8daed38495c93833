"""Simulated labelers: Plackett–Luce rankings over gold quality plus biases gold ignores.

utility_j(y) = gold(y) + b_flat_j·[flattering]·content(y) + b_len_j·min(words/20, 1.5) + b_hedge_j·[hedged]
The b's are shared means (what *all* labelers like and gold does not reward) plus a
personal offset per labeler. Flattery charms only on an answer that is otherwise
right (content(y) is the family's content score): a flattering correct answer beats
the plain one for most labelers, while flattering junk stays junk. A ranking is drawn from Plackett–Luce with
P(y first) ∝ exp(utility / TEMPERATURE); the temperature is calibrated so that a training
and a held-out labeler agree on about 72% of the pairs of the data the reward model learns
from, SFT-small's samples (comparisons/labeler_agreement; §3.4 / App. B: 72.6 ± 1.5%).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rlhflab.world.gold import Judgement

SHARED_FLATTERY = 0.45
"""Labelers on average like a flattering answer; gold charges 0.35 for it (the exploitable gap)."""
SHARED_LENGTH = 0.15
"""Labelers on average like longer answers, up to 30 words."""
SHARED_HEDGE = 0.05
TEMPERATURE = 0.09
"""Plackett–Luce temperature. On SFT-small's samples (world v6, the default recipe) a training and
a held-out labeler agreed on 60.8% of pairs at 0.29, 64.7% at 0.22, 68.0% at 0.15, 71.6% at
0.10, 72.2% at 0.09, 73.8% at 0.08 (re-ranking one run's comparisons). The world's own
candidate sets spread wider in quality, so labelers agree more on them (world summary.json)."""
LIKERT_SD = 0.29
"""Noise of a labeler's 1–7 Likert score, in utility units (×6 on the scale)."""
PERSONAL_SD = 0.12
"""Spread of each labeler's own taste around the shared biases."""


@dataclass(frozen=True)
class Labeler:
    id: str
    flattery: float
    length: float
    hedge: float
    seed: int

    def utility(self, j: Judgement) -> float:
        return (
            j.quality
            + self.flattery * min(j.flattery, 1) * j.content
            + self.length * min(j.n_words / 20, 1.5)
            + self.hedge * j.hedge
        )

    def rank(self, texts: list[str], judgements: list[Judgement], rng: random.Random) -> list:
        """Plackett–Luce ranking, best first; identical texts form one tie group."""
        util = [self.utility(j) for j in judgements]
        remaining = list(range(len(texts)))
        order = []
        while remaining:
            weights = [math.exp((util[i] - max(util[r] for r in remaining)) / TEMPERATURE) for i in remaining]
            pick = rng.choices(remaining, weights=weights)[0]
            order.append(pick)
            remaining.remove(pick)
        groups: list[list[int]] = []
        seen: dict[str, list[int]] = {}
        for i in order:
            if texts[i] in seen:
                seen[texts[i]].append(i)
            else:
                seen[texts[i]] = [i]
                groups.append(seen[texts[i]])
        return [g[0] if len(g) == 1 else sorted(g) for g in groups]

    def likert(self, j: Judgement, rng: random.Random) -> int:
        """Overall quality on the paper's 1–7 scale (§4.1), with this labeler's taste and noise."""
        u = self.utility(j) - SHARED_LENGTH * 0.75 + rng.gauss(0, LIKERT_SD)
        return max(1, min(7, round(1 + 6 * u)))


def make_pool(seed: int, n: int, prefix: str, spread: float = 1.0) -> list[Labeler]:
    """`spread` scales the personal offsets (held-out labelers are drawn a little wider)."""
    rng = random.Random(f"labelers-{prefix}-{seed}")
    sd = PERSONAL_SD * spread
    return [
        Labeler(
            f"{prefix}{i:02d}",
            SHARED_FLATTERY + rng.gauss(0, sd),
            SHARED_LENGTH + rng.gauss(0, sd / 2),
            SHARED_HEDGE + rng.gauss(0, sd),
            rng.randrange(2**31),
        )
        for i in range(n)
    ]
