"""Over-optimization summaries: a PPO run's gold peak, its end, and the RL-form fit."""

from __future__ import annotations

import math

import pytest

from rlhflab.eval.overopt import rl_summary


def _rows(alpha: float, beta: float, kls: list[float]) -> list[dict]:
    rows = []
    for step, kl in enumerate(kls):
        d = math.sqrt(kl)
        gain = d * (alpha - beta * math.log(d)) if d > 0 else 0.0
        rows.append(
            {
                "step": step * 8,
                "eval/kl": kl,
                "eval/sampled/gold": 0.4 + gain,
                "eval/gold": 0.9,
                "eval/rm_score": 0.1 * kl,
            }
        )
    return rows


def test_rl_summary_finds_the_peak_and_recovers_the_generating_form():
    rows = _rows(0.2, 0.15, [0.0, 0.5, 1.5, 4.0, 9.0, 25.0, 64.0])
    out = rl_summary("b0", rows)
    # d(0.2 - 0.15 log d) peaks at log d = 0.2/0.15 - 1, d ≈ 1.40, KL ≈ 1.95: nearest grid KL 1.5
    assert out["rl/b0/peak_kl"] == 1.5
    assert out["rl/b0/final_kl"] == 64.0 and out["rl/b0/final_gold"] < out["rl/b0/peak_gold"]
    assert out["rl_fit/b0/gold/alpha"] == pytest.approx(0.2, abs=1e-9)
    assert out["rl_fit/b0/gold/beta"] == pytest.approx(0.15, abs=1e-9)
    assert out["rl_fit/b0/gold/r2"] == pytest.approx(1.0)
    assert out["rl/b0/final_rm"] == pytest.approx(6.4)
    # sampled gold, not the greedy eval/gold (0.9 everywhere), is what the curve reads
    assert out["rl/b0/peak_gold"] < 0.9


def test_rl_summary_of_a_run_without_gold_is_empty():
    assert rl_summary("x", [{"step": 1, "objective/kl": 1.0}]) == {}
