"""Reward-model report against the lab world: Spearman by hand, keys on a tiny run."""
from __future__ import annotations

import math

import pytest

from rlhflab.eval.rm_report import spearman


def test_spearman_matches_hand_computed_values():
    assert math.isclose(spearman([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    assert math.isclose(spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    # ranks a = 1,2,3,4 ; b = 2,1,4,3 -> d^2 sum = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert math.isclose(spearman([1, 2, 3, 4], [2, 1, 4, 3]), 0.6)
    # ties share their mean rank
    assert math.isclose(spearman([1, 1, 2], [1, 1, 2]), 1.0)


def test_within_prompt_spearman_averages_prompts_and_skips_constant_ones():
    from rlhflab.eval.rm_report import within_prompt_spearman

    agree, reverse, flat_rm = ([1, 2, 3], [0.1, 0.5, 0.9]), ([1, 2, 3], [0.9, 0.5, 0.1]), ([2, 2, 2], [0, 1, 2])
    assert within_prompt_spearman([agree]) == pytest.approx(1.0)
    assert within_prompt_spearman([agree, agree, reverse]) == pytest.approx(1 / 3)
    assert within_prompt_spearman([agree, flat_rm]) == pytest.approx(1.0)  # no ranking: left out
