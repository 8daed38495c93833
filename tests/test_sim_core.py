"""The policy simulator's maths (rlhflab.sim.core): readouts, gradients, presets, log."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from rlhflab.errors import InputError
from rlhflab.sim import core
from rlhflab.sim.core import PRESETS, Params, Simulator, trajectory

STEPS = 300


def preset(name: str, **changes) -> Params:
    return replace(PRESETS[name][1], **changes)


def test_default_readout_matches_the_spec_up_to_normalisation():
    assert core.SFT_SHARE.sum() == pytest.approx(1.0)
    r = core.readout(core.sft_logits(), Params())
    # From the unnormalised shares (sum 1.01) the readout would be 0.68 / 0.63 / 0.00 / 0.05;
    # normalised, true quality is 0.6303 / 1.01 = 0.624.
    assert (round(r.proxy, 2), round(r.true, 2), round(r.kl, 2), round(r.gap, 2)) == (0.68, 0.62, 0.0, 0.05)
    assert r.proxy == pytest.approx(0.6839 / 1.01)
    assert r.true == pytest.approx(0.6303 / 1.01)
    assert r.verdict == "aligned"


def test_gradient_matches_finite_differences_of_the_objective():
    logits = np.array([0.3, -1.2, 0.5, -2.0, 0.1])
    params = Params(beta=0.3, gamma=0.2, corrupt_style="Terse", corrupt_bias=0.1)
    eps, numeric = 1e-6, np.zeros(5)
    for i in range(5):
        d = np.zeros(5)
        d[i] = eps
        up, down = core.objective(logits + d, params), core.objective(logits - d, params)
        numeric[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(core.gradient(logits, params), numeric, atol=1e-8)


def test_calibrated_true_quality_rises_with_proxy():
    tr = trajectory(preset("calibrated"), STEPS)
    proxy, true = np.array([r.proxy for r in tr]), np.array([r.true for r in tr])
    assert np.all(np.diff(proxy) >= -1e-12)
    assert np.all(np.diff(true) >= -1e-12)
    assert true[-1] > true[0] + 0.25
    assert {r.verdict for r in tr} == {"aligned"}


def test_reward_hacking_proxy_rises_while_true_quality_peaks_then_falls():
    params = preset("reward_hacking")
    assert params.beta == 0 and core.rm_scores(params)[1] > core.RM_SCORE[0]  # Syco over-rated
    tr = trajectory(params, STEPS)
    proxy, true = np.array([r.proxy for r in tr]), np.array([r.true for r in tr])
    assert np.all(np.diff(proxy) > 0)  # the proxy keeps rising
    peak = int(np.argmax(true))
    assert 10 < peak < STEPS - 50  # an interior peak ...
    assert true[peak] > true[0] + 0.05  # ... after a real rise
    assert true[-1] < true[peak] - 0.2  # ... and a real fall
    z = core.sft_logits()
    for _ in range(STEPS):
        z = core.update(z, params)
    assert core.softmax(z)[core.STYLES.index("Sycophantic")] > 0.9  # collapsed
    assert tr[0].verdict == "aligned" and tr[-1].verdict == "hacking"


def test_kl_leash_keeps_true_quality_higher_under_a_hacked_rm():
    loose = trajectory(preset("reward_hacking", beta=0.0), STEPS)[-1]
    leashed = trajectory(preset("reward_hacking", beta=0.3), STEPS)[-1]
    assert leashed.true > loose.true + 0.1
    assert leashed.kl < loose.kl and leashed.proxy < loose.proxy


def test_alignment_tax_raising_gamma_buys_capability_for_a_little_true_quality():
    base = preset("alignment_tax")
    low = trajectory(base, STEPS)[-1]
    high = trajectory(replace(base, gamma=2 * base.gamma), STEPS)[-1]
    no_ptx = trajectory(replace(base, gamma=0.0), STEPS)[-1]
    for lo, hi in ((no_ptx, low), (low, high)):
        assert hi.capability > lo.capability + 0.1
        assert lo.true - 0.1 < hi.true < lo.true  # a small cost
        assert hi.capability - lo.capability > 2 * (lo.true - hi.true)


def test_trajectories_and_sessions_are_deterministic():
    for _, params in PRESETS.values():
        assert trajectory(params, 200) == trajectory(params, 200)
    a, b = Simulator(), Simulator()
    for sim, chunks in ((a, [1] * 40), (b, [7, 13, 20])):  # batching does not matter
        sim.apply_preset("reward_hacking")
        for n in chunks:
            sim.run(n)
        sim.set_params(beta=0.3)
        sim.run(10)
    assert a.history == b.history
    assert [e.to_dict() for e in a.events] == [e.to_dict() for e in b.events]


def test_event_log_says_what_changed_and_what_followed():
    sim = Simulator()
    sim.apply_preset("reward_hacking")
    sim.run(120)
    texts = [e.text for e in sim.events]
    assert texts[0].startswith("preset “reward hacking”") and "Sycophantic by +0.33" in texts[0]
    assert any(t.startswith("true quality peaked at 0.739") for t in texts)
    assert any(t.startswith("verdict aligned → hacking") for t in texts)
    assert sim.events[0].followed.startswith("then 120 updates: proxy 0.739 → ")
    sim.set_params(beta=0.3)
    change = sim.events[-1]
    assert (change.text, change.step, change.kind) == ("β 0.00 → 0.30", 120, "user")
    sim.run(30)
    assert change.followed.startswith(
        f"then 30 updates: proxy {sim.history[120].proxy:.3f} → {sim.current.proxy:.3f} · true "
    )
    assert sim.current.true > sim.history[120].true  # the leash pulled truth back up
    sim.set_params(corrupt_style="Toxic", corrupt_bias=0.0)
    assert sim.events[-1].text == "RM as trained (uncorrupted)"
    n = len(sim.events)
    sim.set_params(corrupt_style="Hedging")  # bias 0: the RM is unchanged ...
    assert len(sim.events) == n  # ... so nothing to log


def test_nudge_moves_one_share_and_keeps_the_others_in_proportion():
    sim = Simulator()
    before = sim.policy
    sim.nudge("Toxic", -0.05)
    after = sim.policy
    i = core.STYLES.index("Toxic")
    assert after[i] == pytest.approx(before[i] - 0.05)
    others = np.delete(after, i) / np.delete(before, i)
    np.testing.assert_allclose(others, others[0])
    assert sim.events[-1].text == "nudged Toxic share 0.10 → 0.05"
    assert sim.current.true > core.readout(core.sft_logits(), Params()).true


def test_corrupting_the_rm_changes_the_proxy_not_the_truth():
    sim = Simulator()
    r0 = sim.current
    sim.set_params(corrupt_style="Sycophantic", corrupt_bias=0.33)
    assert sim.current.true == r0.true
    assert sim.current.proxy == pytest.approx(r0.proxy + core.SFT_SHARE[1] * 0.33)
    assert sim.events[-1].text == "RM over-rates Sycophantic by +0.33 (score 0.62 → 0.95)"
    assert core.rm_scores(Params(corrupt_style="Toxic", corrupt_bias=-0.5))[3] == 0.0  # clipped


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"beta": -0.1}, "beta"),
        ({"gamma": float("nan")}, "gamma"),
        ({"lr": "fast"}, "lr"),
        ({"lr": True}, "lr"),
        ({"corrupt_bias": 3}, "corrupt_bias"),
        ({"corrupt_style": "Rude"}, "corrupt_style"),
        ({"temperature": 1}, "temperature"),
    ],
)
def test_bad_params_are_refused_with_the_field_named(changes, field):
    sim = Simulator()
    with pytest.raises(InputError) as e:
        sim.set_params(**changes)
    assert e.value.field == field
    assert sim.params == Params() and len(sim.events) == 0  # nothing half-applied


def test_bad_actions_are_refused():
    sim = Simulator()
    for call in (
        lambda: sim.run(0),
        lambda: sim.run(501),
        lambda: sim.run(2.0),
        lambda: sim.nudge("Rude", 0.1),
        lambda: sim.nudge("Toxic", 0.9),
        lambda: sim.nudge("Toxic", float("inf")),
        lambda: sim.apply_preset("chaos"),
    ):
        with pytest.raises(InputError):
            call()
    sim.run(500)
    sim.history.extend([sim.current] * (core.MAX_STEPS - sim.step))  # fast-forward
    with pytest.raises(InputError, match="stops at"):
        sim.run(1)
