"""Reward-model report against the lab world: Spearman by hand, keys on a tiny run."""
from __future__ import annotations

import math

from rlhflab.rm_eval import spearman


def test_spearman_matches_hand_computed_values():
    assert math.isclose(spearman([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    assert math.isclose(spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    # ranks a = 1,2,3,4 ; b = 2,1,4,3 -> d^2 sum = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert math.isclose(spearman([1, 2, 3, 4], [2, 1, 4, 3]), 0.6)
    # ties share their mean rank
    assert math.isclose(spearman([1, 1, 2], [1, 1, 2]), 1.0)
