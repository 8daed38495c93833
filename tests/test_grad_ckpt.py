"""train.gradient_checkpointing: the same losses and weights as without it, and the blocks
really recompute (their inner modules run twice per training forward) in SFT, RM and PPO."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_layers import GradientCheckpointingLayer

from rlhflab.io import read_metrics
from rlhflab.models import load_reward_model
from rlhflab.stages import rm, sft
from rlhflab.stages.ppo import PPOConfig
from rlhflab.stages.ppo import loop as ppo_loop

from tiny import demo_rows, gpt2_dir, llama_dir, make, ranking_rows, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    gpt2 = gpt2_dir(d / "gpt2", tok, n_positions=64)
    torch.manual_seed(0)
    load_reward_model(gpt2).save_pretrained(d / "rm")  # a seeded random head: reward enough here
    tok.save_pretrained(d / "rm")
    return {
        "dir": d,
        "gpt2": gpt2,
        "llama": llama_dir(d / "llama", tok, max_positions=64),
        "rm": d / "rm",
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(8)),
        "ranks": write_jsonl(d / "ranks.jsonl", ranking_rows(8)),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(8)]),
    }


class Recomputes:
    """Counts the forwards with gradients that the `mlp` of every checkpointable block
    starts: one per training forward, and one more in the backward when checkpointed."""

    def __init__(self):
        self.n, self.models = 0, []

    def watch(self, model):
        self.models.append(model)
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.mlp.register_forward_pre_hook(self._hook)
        return model

    def _hook(self, module, args) -> None:  # a pre-hook: the recompute stops once it has what the backward needs
        self.n += torch.is_grad_enabled()


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_run(off, on, loss_keys: tuple[str, ...], files: tuple[str, ...]) -> None:
    rows_off, rows_on = read_metrics(off / "metrics.jsonl"), read_metrics(on / "metrics.jsonl")
    assert len(rows_off) == len(rows_on)
    losses = [(a[k], b[k]) for a, b in zip(rows_off, rows_on) for k in loss_keys if k in a]
    assert losses and all(a == pytest.approx(b, abs=1e-5) for a, b in losses), losses
    for name in files:
        a, b = weights(off / name), weights(on / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{name}: {k}")


def run_twice(train, monkeypatch, module, loader: str, make_config):
    """`train(make_config(on))` with checkpointing off, then on; the models `module.loader`
    loads are watched. Returns (out dirs, recompute counters)."""
    outs, counters = [], []
    real = getattr(module, loader)
    for on in (False, True):
        counter = Recomputes()

        def load(*args, counter=counter, **kw):
            out = real(*args, **kw)
            counter.watch(out[0] if isinstance(out, tuple) else out)
            return out

        monkeypatch.setattr(module, loader, load)
        outs.append(train(make_config(on))[0])
        counters.append(counter)
    return outs, counters


@pytest.mark.parametrize("base", ["gpt2", "llama"])
def test_sft_with_checkpointing_trains_the_same_and_recomputes(world, monkeypatch, base):
    # SFT's dropout (0.2) stays on: the recompute replays the RNG, so the masks match too.
    cfg = lambda on: make(
        sft.SFTConfig,
        base=str(world[base]),
        data=str(world["demos"]),
        epochs=1,
        batch_size=4,
        lr=1e-3,
        device="cpu",
        gradient_checkpointing=on,
        out_dir=str(world["dir"] / f"sft-{base}-{on}"),
    )
    (off, on), (c_off, c_on) = run_twice(sft.train, monkeypatch, sft, "load_policy", cfg)
    assert_same_run(off.parent, on.parent, ("sft/loss",), ("model",))
    assert c_off.n > 0 and c_on.n == 2 * c_off.n  # every block recomputed once per step
    assert c_on.models[0].is_activation_checkpointing and not c_off.models[0].is_activation_checkpointing


@pytest.mark.parametrize("base", ["gpt2", "llama"])
def test_rm_with_checkpointing_trains_the_same_and_recomputes(world, monkeypatch, base):
    cfg = lambda on: make(
        rm.RMConfig,
        base=str(world[base]),
        rankings=str(world["ranks"]),
        batch_size=4,
        micro_batch_size=2,  # accumulation: two backwards per step, each recomputing
        lr=1e-3,
        device="cpu",
        gradient_checkpointing=on,
        out_dir=str(world["dir"] / f"rm-{base}-{on}"),
    )
    (off, on), (c_off, c_on) = run_twice(rm.train, monkeypatch, rm, "load_reward_model", cfg)
    assert_same_run(off.parent, on.parent, ("rm/loss", "rm/accuracy"), ("model",))
    assert c_off.n > 0 and c_on.n == 2 * c_off.n


def test_one_ppo_step_with_checkpointing_is_the_same_and_recomputes_policy_and_value(world, monkeypatch):
    outs, counters = [], []
    real = ppo_loop.open_run
    for on in (False, True):
        counter = Recomputes()

        def opener(config, counter=counter):
            run = real(config)
            counter.watch(run.policy), counter.watch(run.value_model)
            # PPO trains in eval mode (dropout off); checkpointing leaves it so
            assert not run.policy.training and not run.value_model.training
            return run

        monkeypatch.setattr(ppo_loop, "open_run", opener)
        cfg = make(
            PPOConfig,
            policy=str(world["gpt2"]),
            reward_model=str(world["rm"]),
            prompts=str(world["prompts"]),
            batch_size=8,
            minibatch_size=4,
            ppo_epochs=2,
            max_new_tokens=6,
            total_episodes=8,
            lr=1e-3,
            warmup_steps=0,
            seed=1,
            gradient_checkpointing=on,
            out_dir=str(world["dir"] / f"ppo-{on}"),
        )
        outs.append(ppo_loop.train(cfg)[0])
        counters.append(counter)
    keys = ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl", "objective/rm_score")
    assert_same_run(*outs, keys, ("policy", "value"))
    off, on = counters
    assert off.n > 0 and on.n == 2 * off.n
    assert all(m.is_activation_checkpointing for m in on.models)
