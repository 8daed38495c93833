"""NaN injected into rewards, logits (sampling included) and gradients of SFT, RM and PPO
(in-process, by monkeypatching): the step is skipped with a warning, weights and optimizer state stay
bitwise unchanged; `patience` bad updates in a row stop the stage with a one-line error
and the last checkpoint intact and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab import cli, training
from rlhflab.errors import TrainingError
from rlhflab.io import read_metrics
from rlhflab.models import load_reward_model
from rlhflab.stages import rm, sft
from rlhflab.stages.ppo import loop as ppo_loop
from rlhflab.stages.ppo import step as ppo

from tiny import demo_rows, gpt2_dir, make, ranking_rows, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
NAN = float("nan")


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradients are all NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * NAN


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    tok = tiny_tokenizer()
    base = gpt2_dir(root / "gpt2", tok, n_positions=64)
    torch.manual_seed(0)
    reward = load_reward_model(base)
    reward.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {
        "root": root,
        "base": base,
        "rm": root / "rm",
        "demos": write_jsonl(root / "demos.jsonl", demo_rows(12)),
        "ranks": write_jsonl(root / "ranks.jsonl", ranking_rows(16)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(16)]),
    }


def snapshot(params, opt) -> list[torch.Tensor]:
    """Every trainable tensor and every optimizer state tensor (Adam moments, step)."""
    out = [p.detach().clone() for p in params]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if torch.is_tensor(v)]
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def capture(monkeypatch) -> dict:
    """Hold the model and optimizer that the training loop (`training.fit`) opens."""
    held, real = {}, training.start_or_resume

    def spy(model, *args):
        out = real(model, *args)
        held.update(model=model, opt=out[0])
        return out

    monkeypatch.setattr(training, "start_or_resume", spy)
    return held


def training_steps() -> dict:
    """Counts forwards with gradients on: the training step being taken (1-based)."""
    return {"n": 0}


# --------------------------------------------------------------------------- SFT and RM


def sft_config(lab, out, **kw):
    kw = {"epochs": 2, "batch_size": 4, "device": "cpu", "save_every": 2, **kw}
    return make(sft.SFTConfig, base=str(lab["base"]), data=str(lab["demos"]), out_dir=str(out), **kw)


def rm_config(lab, out, **kw):
    kw = {"batch_size": 4, "device": "cpu", "save_every": 2, **kw}
    return make(rm.RMConfig, base=str(lab["base"]), rankings=str(lab["ranks"]), out_dir=str(out), **kw)


def _nan_in_sft_logits(monkeypatch, bad):
    real, step = sft.sft_loss, training_steps()

    def loss(logits, labels):
        if torch.is_grad_enabled():
            step["n"] += 1
            if bad(step["n"]):
                logits = logits * NAN
        return real(logits, labels)

    monkeypatch.setattr(sft, "sft_loss", loss)


def _nan_in_sft_grads(monkeypatch, bad):
    real, step = sft.forward_loss, training_steps()

    def forward_loss(*args):
        loss = real(*args)
        if torch.is_grad_enabled():
            step["n"] += 1
            if bad(step["n"]):
                return NanGrad.apply(loss)
        return loss

    monkeypatch.setattr(sft, "forward_loss", forward_loss)


def _nan_in_rm_rewards(monkeypatch, bad, grads: bool = False):
    real, step = rm.reward_scores, training_steps()

    def scores(model, *args):
        out = real(model, *args)
        if torch.is_grad_enabled():
            step["n"] += 1  # one forward per step: micro_batch_size is the whole batch
            if bad(step["n"]):
                return NanGrad.apply(out) if grads else out * NAN
        return out

    monkeypatch.setattr(rm, "reward_scores", scores)


INJECT = {
    ("sft", "logits"): _nan_in_sft_logits,
    ("sft", "gradients"): _nan_in_sft_grads,
    ("rm", "reward"): _nan_in_rm_rewards,
    ("rm", "gradients"): lambda mp, bad: _nan_in_rm_rewards(mp, bad, grads=True),
}


@pytest.mark.parametrize("stage, where", list(INJECT), ids=[f"{s}-{w}" for s, w in INJECT])
def test_a_nan_step_leaves_weights_and_optimizer_untouched(lab, tmp_path, monkeypatch, stage, where):
    module, config = {"sft": (sft, sft_config), "rm": (rm, rm_config)}[stage]
    held = capture(monkeypatch)
    INJECT[stage, where](monkeypatch, lambda n: n == 2)
    states = {}

    def after(step, row):
        states[step] = snapshot(held["model"].parameters(), held["opt"])

    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, summary = module.train(config(lab, tmp_path / "out"), callback=after)
    assert same(states[1], states[2])  # the NaN step changed nothing at all
    assert not same(states[2], states[3])  # and training went on after it
    assert all(torch.isfinite(t).all() for t in states[max(states)])
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if f"{stage}/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))


def test_sft_stops_after_patience_bad_steps_with_its_checkpoint_intact(lab, tmp_path, monkeypatch):
    held = capture(monkeypatch)
    _nan_in_sft_logits(monkeypatch, lambda n: n >= 3)  # steps 3..7 bad: stop in step 7
    weights = {}

    def after(step, row):
        weights[step] = {k: v.detach().clone() for k, v in held["model"].state_dict().items()}

    cfg = sft_config(lab, tmp_path / "out", epochs=3)
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError) as e:
        sft.train(cfg, callback=after)
    assert "\n" not in str(e.value) and "5 non-finite steps in a row" in str(e.value)
    assert max(weights) == 6
    ckpt = tmp_path / "out" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(saved[k], weights[2][k]) for k in saved)  # step 2's: the last good
    assert not (tmp_path / "out" / "summary.json").exists()


def test_rm_cli_stops_with_one_line_and_exit_3(lab, tmp_path, monkeypatch, capsys):
    _nan_in_rm_rewards(monkeypatch, lambda n: n >= 2)
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning):
        rc = cli.main(
            [
                "rm",
                f"--base={lab['base']}",
                f"--rankings={lab['ranks']}",
                "--batch_size=2",
                "--train.save_every=1",
                "--run.device=cpu",
                f"--out_dir={out}",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert rc == 3
    assert err == ("error: rm: 5 non-finite steps in a row; stopped, the last good checkpoint is kept")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5  # saved after every step; the 6th raised before its save
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "model.safetensors")).values())


# --------------------------------------------------------------------------- PPO


def ppo_config(lab, out: Path, **kw) -> ppo.PPOConfig:
    base = dict(
        policy=str(lab["base"]),
        reward_model=str(lab["rm"]),
        prompts=str(lab["prompts"]),
        batch_size=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        total_episodes=32,
        lr=1e-3,
        warmup_steps=0,
        seed=1,
        save_every=1,
        device="cpu",
        out_dir=str(out),
    )
    return make(ppo.PPOConfig, **{**base, **kw})


def _ppo_step_spy(monkeypatch) -> tuple[dict, dict]:
    """({step under way, its Run}, snapshots of trainable weights and Adam state per step)."""
    now, states, real = {"step": 0}, {}, ppo_loop.ppo_step

    def step(run, n):
        now.update(step=n, run=run)
        row = real(run, n)
        states[n] = snapshot(run.trainable, run.optimizer)
        return row

    monkeypatch.setattr(ppo_loop, "ppo_step", step)
    return now, states


def _nan_in_ppo_reward(monkeypatch, now, bad):
    real = ppo.score
    monkeypatch.setattr(ppo, "score", lambda m, q, a: real(m, q, a) * (NAN if bad(now["step"]) else 1.0))


def _nan_in_ppo_logits(monkeypatch, now, bad):
    """NaN logits in the training forwards. The first minibatch's training forward also gives
    the rollout's old logprobs, so the KL-shaped rewards turn NaN and the whole step is
    skipped. Sampling's forwards are the "sampling" case."""
    real = ppo.policy_logprobs

    def logprobs(policy, qr, am, R, temperature):
        lp, logits = real(policy, qr, am, R, temperature)
        if bad(now["step"]) and torch.is_grad_enabled():
            logits = logits * NAN
            lp = lp + logits.sum(-1)  # NaN, and still on the autograd path to the weights
        return lp, logits

    monkeypatch.setattr(ppo, "policy_logprobs", logprobs)


def _nan_in_ppo_grads(monkeypatch, now, bad):
    real = ppo.minibatch_loss

    def loss(*args):
        total, stats = real(*args)
        return (NanGrad.apply(total) if bad(now["step"]) else total), stats

    monkeypatch.setattr(ppo, "minibatch_loss", loss)


def _nan_policy_in_ppo(monkeypatch, now, bad):
    """The policy itself emits NaN logits in every forward of the step, sampling included."""
    real = ppo.sample

    def sample(model, *args, **kw):
        if not bad(now["step"]):
            return real(model, *args, **kw)
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda mod, inp, out: out * NAN)
        try:
            return real(model, *args, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(ppo, "sample", sample)
    _nan_in_ppo_reward(monkeypatch, now, bad)  # its rollout forwards are NaN too


PPO_INJECT = {
    "reward": _nan_in_ppo_reward,
    "logits": _nan_in_ppo_logits,
    "gradients": _nan_in_ppo_grads,
    "sampling": _nan_policy_in_ppo,
}


@pytest.mark.parametrize("where", list(PPO_INJECT))
def test_ppo_nan_step_leaves_weights_and_optimizer_untouched(lab, tmp_path, monkeypatch, where):
    now, states = _ppo_step_spy(monkeypatch)
    PPO_INJECT[where](monkeypatch, now, lambda n: n == 2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out, summary = ppo_loop.train(ppo_config(lab, tmp_path / "out", total_episodes=24))
    assert same(states[1], states[2]) and not same(states[2], states[3])
    assert summary["skipped_updates"] == (4 if where == "gradients" else 1)  # 4 updates or the rollout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_ppo_stops_after_patience_bad_updates_and_resumes_from_its_checkpoint(lab, tmp_path, monkeypatch):
    # NaN gradients from step 2 on: 4 skipped updates in step 2, the 5th in step 3. Before
    # the fix, step 3's finite rollout reset the count and the run never stopped.
    now, states = _ppo_step_spy(monkeypatch)
    _nan_in_ppo_grads(monkeypatch, now, lambda n: n >= 2)
    cfg = ppo_config(lab, tmp_path / "out")
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError, match="5 non-finite"):
        ppo_loop.train(cfg)
    assert now["step"] == 3 and sorted(states) == [1, 2]
    ckpt = tmp_path / "out" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    saved, live = load_file(str(ckpt / "policy.safetensors")), now["run"].policy.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)  # step 1's weights, all finite
    assert all(torch.isfinite(t).all() for t in saved.values())

    monkeypatch.undo()  # the fault is gone: the same command resumes and finishes
    out, summary = ppo_loop.train(cfg)
    assert summary["resumed_from_step"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
