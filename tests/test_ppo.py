"""PPO / PPO-ptx on tiny GPT-2s built from config: invariants, resume, NaN guard, learning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab import cli
from rlhflab.errors import InputError
from rlhflab.io import read_metrics
from rlhflab.models import load_causal_lm, load_reward_model
from rlhflab.stages.ppo import loop as ppo_loop
from rlhflab.stages.ppo import step as ppo
from rlhflab.stages.ppo.step import PPOConfig, Rollout, minibatch_loss, policy_logprobs
from rlhflab.text import pad_left

from tiny import gpt2_dir, make, tiny_tokenizer, write_jsonl


@torch.no_grad()
def bag_of_tokens_rm(policy_dir: Path, out: Path, seed: int = 0) -> Path:
    """A hand-set reward model: the score rises with the mean of a per-token value s(v).

    Token v embeds as s(v)·d + u (d, u orthogonal, zero-mean, unit-variance, so LayerNorm
    barely moves them); layer 0 attends uniformly (q = k = 0) and copies the mean embedding
    into the residual ×10; every other block writes nothing. The head reads along d, so the
    score is an increasing function of the sequence's mean s: a dense toy reward.
    """
    rm = load_reward_model(policy_dir)
    tr = rm.transformer
    V, H = tr.wte.weight.shape
    d = torch.tensor([1.0, -1.0]).repeat(H // 2)
    u = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(H // 4)
    s = torch.rand(V, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    tr.wte.weight.copy_(s[:, None] * d + u)
    tr.wpe.weight.zero_()
    for block in tr.h:
        for lin in (block.attn.c_proj, block.mlp.c_proj):
            lin.weight.zero_()
            lin.bias.zero_()
    attn = tr.h[0].attn
    attn.c_attn.weight.zero_()
    attn.c_attn.bias.zero_()
    attn.c_attn.weight[:, 2 * H :] = torch.eye(H)
    attn.c_proj.weight.copy_(10.0 * torch.eye(H))
    rm.score.weight.copy_(4.0 * d[None] / H)
    rm.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    policy = gpt2_dir(root / "policy", n_positions=64)
    rm = bag_of_tokens_rm(policy, root / "rm")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(24)])
    val = write_jsonl(root / "val.jsonl", [{"prompt": f"say {w}"} for w in ("cat", "dog", "red")])
    ptx = write_jsonl(
        root / "ptx.jsonl",
        [{"text": "the cat sat on the mat ."}, {"text": "a dog ran far away . one two three"}],
    )
    return {"root": root, "policy": policy, "rm": rm, "prompts": prompts, "val": val, "ptx": ptx}


def make_config(lab, out: str, **kw) -> PPOConfig:
    base = dict(
        policy=str(lab["policy"]),
        reward_model=str(lab["rm"]),
        prompts=str(lab["prompts"]),
        batch_size=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        total_episodes=16,
        lr=1e-3,
        warmup_steps=0,
        seed=1,
        out_dir=str(lab["root"] / out),
    )
    base.update(kw)
    return make(PPOConfig, **base)


def capture_run(monkeypatch) -> dict:
    """Keep a handle on the Run that train() opens."""
    held = {}

    def opener(config):
        held["run"] = real(config)
        return held["run"]

    real = ppo_loop.open_run
    monkeypatch.setattr(ppo_loop, "open_run", opener)
    return held


@pytest.mark.parametrize("buckets", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lr_zero_ratio_is_exactly_one_on_every_minibatch(lab, monkeypatch, precision, buckets):
    seen = []

    def spy(logprobs, old_logprobs, advantages, mask, clip_range):
        loss, stats = real(logprobs, old_logprobs, advantages, mask, clip_range)
        seen.append((torch.equal(logprobs, old_logprobs), stats["clipfrac"].item()))
        return loss, stats

    real = ppo.policy_loss
    monkeypatch.setattr(ppo, "policy_loss", spy)
    calls = []
    evaluator = lambda policy, tok, step: calls.append(step) or {"gold": 0.5}
    cfg = make_config(
        lab,
        f"lr0-{precision}-{buckets}",
        lr=0.0,
        length_buckets=buckets,
        ptx_data=str(lab["ptx"]),
        ptx_per_episode=1.0,
        val_prompts=str(lab["val"]),
        eval_every=1,
        no_eos_penalty=-1.0,
        precision=precision,
    )
    out, summary = ppo_loop.train(cfg, evaluator=evaluator)
    assert len(seen) == 2 * 2 * 2  # steps × epochs × minibatches
    assert all(equal and clipfrac == 0.0 for equal, clipfrac in seen)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and calls == [0, 1, 2]
    for r in rows[1:]:
        assert r["ppo/policy/ratio_min"] == 1.0 == r["ppo/policy/ratio_max"]
        assert r["ppo/policy/clipfrac"] == 0.0 and r["ppo/loss/ptx"] > 0
        # same temperature as sampling; bf16 rounds the cached and the full forward differently
        assert r["ppo/policy/rollout_logprob_gap"] < (1e-4 if precision == "fp32" else 0.1)
        assert r["objective/scores"] == pytest.approx(r["objective/rm_score"] - (1 - r["response/eos_rate"]), abs=1e-5)
        assert r["eval/gold"] == 0.5 and "eval/rm_score" in r and "time/episodes_per_s" in r
    for name in ("policy", "value"):
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file() and json.loads((out / "summary.json").read_text())


def test_length_buckets_keep_their_rows_through_the_epochs_and_sort_by_length():
    lengths = torch.tensor([9, 3, 3, 7, 12, 1, 5, 5, 8, 2, 11, 6, 4, 10, 3, 7], dtype=torch.float64)
    cfg = make(PPOConfig, batch_size=16, minibatch_size=4, ppo_epochs=3, seed=5)
    orders = ppo._minibatch_orders(cfg, 2, torch.device("cpu"), lengths)
    assert len(orders) == 3 and all(sorted(o.tolist()) == list(range(16)) for o in orders)
    cuts = [[frozenset(o[i : i + 4].tolist()) for i in range(0, 16, 4)] for o in orders]
    assert all(set(c) == set(cuts[0]) for c in cuts) and len({tuple(c) for c in cuts}) > 1  # same rows, new order
    spans = sorted((min(lengths[list(b)]), max(lengths[list(b)])) for b in cuts[0])
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # each bucket a run of the sorted lengths
    again = ppo._minibatch_orders(cfg, 2, torch.device("cpu"), lengths)
    assert all(torch.equal(a, b) for a, b in zip(orders, again))  # seeded
    plain = ppo._minibatch_orders(
        make(PPOConfig, batch_size=16, minibatch_size=4, ppo_epochs=3, length_buckets=False),
        2,
        torch.device("cpu"),
        lengths,
    )
    assert len({frozenset(o[:4].tolist()) for o in plain}) > 1  # a fresh split each epoch


def test_a_trimmed_minibatch_scores_as_at_the_batchs_width(lab):
    """Padded and unpadded scoring agree: the columns `cut` drops are padding in every row."""
    tok = tiny_tokenizer()
    policy = load_causal_lm(lab["policy"]).eval()
    g = torch.Generator().manual_seed(0)
    V = policy.config.vocab_size
    queries = [torch.randint(5, V, (n,), generator=g).tolist() for n in (9, 3, 4, 12, 2, 5)]
    responses = [torch.randint(5, V, (n,), generator=g).tolist() for n in (2, 7, 1, 3, 10, 4)]
    q_ids, q_mask = pad_left(queries, tok.pad_token_id)
    R = max(map(len, responses))
    r_ids = torch.tensor([r + [tok.pad_token_id] * (R - len(r)) for r in responses])
    mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])
    qr, am = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, mask], 1)
    zeros = torch.zeros(len(queries), R)
    whole = Rollout(qr, am, mask, zeros, zeros, zeros, zeros)
    rows = torch.tensor([1, 4, 5])  # short queries, short and long responses
    small = whole.select(rows, trim=True)
    assert small.query_responses.shape == (3, 5 + 10) and small.mask.shape == (3, 10)
    with torch.no_grad():
        full, _ = policy_logprobs(policy, qr[rows], am[rows], R, 1.0)
        cut, _ = policy_logprobs(policy, small.query_responses, small.attention_mask, small.mask.shape[1], 1.0)
    m = small.mask.bool()
    assert torch.allclose(cut[m], full[:, : small.mask.shape[1]][m], atol=1e-5)


@pytest.mark.parametrize("minibatch_size", [4, 8])
def test_first_minibatch_forward_is_the_rollouts_and_runs_once(lab, monkeypatch, minibatch_size):
    held, forwards, rollouts = capture_run(monkeypatch), [], []
    real_lp, real_epochs = ppo.policy_logprobs, ppo.ppo_epochs

    def spy_lp(policy, qr, am, R, temperature):
        forwards.append((policy is held["run"].policy, torch.is_grad_enabled(), qr.shape[0]))
        return real_lp(policy, qr, am, R, temperature)

    def spy_epochs(run, rollout, step, orders, head=None):
        rollouts.append(rollout)
        return real_epochs(run, rollout, step, orders, head)

    monkeypatch.setattr(ppo, "policy_logprobs", spy_lp)
    monkeypatch.setattr(ppo, "ppo_epochs", spy_epochs)
    ppo_loop.train(make_config(lab, f"once-{minibatch_size}", total_episodes=8, lr=0.0, minibatch_size=minibatch_size))
    policy = [(grad, n) for is_policy, grad, n in forwards if is_policy]
    # 8 episodes, 2 epochs: one training forward per minibatch, with gradients; the rows
    # outside the first minibatch get one more, without, for their old logprobs.
    per_epoch = 8 // minibatch_size
    assert policy.count((True, minibatch_size)) == 2 * per_epoch
    assert [p for p in policy if not p[0]] == [(False, minibatch_size)] * (per_epoch - 1)
    ro = rollouts[0]
    with torch.no_grad():
        plain = real_lp(held["run"].policy, ro.query_responses, ro.attention_mask, ro.mask.shape[1], 1.0)[0]
    torch.testing.assert_close(ro.logprobs, plain, rtol=0, atol=1e-5)  # rows in batch order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_training_forward_sees_the_latest_weights(lab, monkeypatch, precision):
    # A bf16 autocast context that spans an optimizer step keeps serving the bf16 copies of
    # the weights cast before it: the later minibatches would train on a stale policy.
    held, checked = capture_run(monkeypatch), []
    real = ppo.policy_logprobs

    def spy(policy, qr, am, R, temperature):
        lp, logits = real(policy, qr, am, R, temperature)
        if torch.is_grad_enabled() and policy is held["run"].policy:
            fresh = copy.deepcopy(policy)  # new parameter tensors: nothing cached for them
            with torch.no_grad():
                checked.append(torch.equal(lp.detach(), real(fresh, qr, am, R, temperature)[0]))
        return lp, logits

    monkeypatch.setattr(ppo, "policy_logprobs", spy)
    ppo_loop.train(make_config(lab, f"fresh-{precision}", total_episodes=8, precision=precision))
    assert len(checked) == 4 and all(checked)  # 2 epochs x 2 minibatches, lr 1e-3


def test_step_changes_every_trainable_parameter_and_no_frozen_one(lab, monkeypatch):
    held = capture_run(monkeypatch)
    cfg = make_config(lab, "lr_pos", total_episodes=8, ema_decay=0.9)
    ppo_loop.train(cfg)
    run = held["run"]
    sft = dict(load_causal_lm(lab["policy"]).named_parameters())
    rm = dict(load_reward_model(lab["rm"]).named_parameters())
    for name, p in run.policy.named_parameters():
        assert not torch.equal(p, sft[name]), f"policy {name} did not change"
    for name, p in run.value_model.named_parameters():
        assert not torch.equal(p, rm[name]), f"value {name} did not change"
    for name, p in run.ref_policy.named_parameters():
        assert torch.equal(p, sft[name]) and not p.requires_grad
    for name, p in run.reward_model.named_parameters():
        assert torch.equal(p, rm[name]) and not p.requires_grad
    # The saved policy is the EMA: 0.9·SFT + 0.1·θ after each of the 4 optimizer steps.
    saved = load_file(str(Path(cfg.out_dir) / "policy" / "model.safetensors"))
    ema = dict(run.ema.named_parameters())
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert not all(torch.equal(saved[k], dict(run.policy.named_parameters())[k]) for k in saved)


def test_ptx_gradient_is_gamma_times_the_lm_gradient(lab):
    policy = load_causal_lm(lab["policy"]).eval()
    value = load_reward_model(lab["rm"]).eval()
    cfg = make_config(lab, "unused", ptx_coef=27.8)
    g = torch.Generator().manual_seed(0)
    qr = torch.randint(3, 300, (4, 10), generator=g)
    am = torch.ones_like(qr)
    with torch.no_grad():
        old = policy_logprobs(policy, qr, am, 4, 1.0)[0]
    mb = Rollout(
        qr,
        am,
        torch.ones(4, 4),
        old,
        torch.zeros(4, 4),
        torch.randn(4, 4, generator=g),
        torch.randn(4, 4, generator=g),
    )
    ids = torch.randint(3, 300, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[0, 5:] = tiny_tokenizer().pad_token_id

    def grads(loss):
        policy.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in policy.parameters()]

    with_ptx = grads(minibatch_loss(policy, value, mb, (ids, mask), cfg)[0])
    without = grads(minibatch_loss(policy, value, mb, None, cfg)[0])
    labels = ids.masked_fill(mask == 0, -100)
    plain = grads(policy(input_ids=ids, attention_mask=mask, labels=labels).loss)
    for a, b, c in zip(with_ptx, without, plain):
        torch.testing.assert_close(a - b, 27.8 * c, rtol=1e-4, atol=1e-5)


def test_resumed_run_ends_identical_to_uninterrupted(lab, monkeypatch):
    kw = dict(
        total_episodes=32,
        save_every=2,
        ptx_data=str(lab["ptx"]),
        ptx_per_episode=0.5,
        adaptive_kl=True,
        kl_horizon=100,
        ema_decay=0.8,
        val_prompts=str(lab["val"]),
        eval_every=2,
    )
    whole, _ = ppo_loop.train(make_config(lab, "whole", **kw))

    real = ppo_loop.ppo_step

    def crash(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, step)

    monkeypatch.setattr(ppo_loop, "ppo_step", crash)
    with pytest.raises(KeyboardInterrupt):
        ppo_loop.train(make_config(lab, "resumed", **kw))
    monkeypatch.setattr(ppo_loop, "ppo_step", real)
    resumed, summary = ppo_loop.train(make_config(lab, "resumed", **kw))
    assert summary["resumed_from_step"] == 2
    assert summary["kl_coef"] < 0.02  # KL far below target: the adaptive β went down
    for name in ("policy/model.safetensors", "value/model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows_a, rows_b = read_metrics(whole / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if not k.startswith("time/")} == {
            k: v for k, v in rb.items() if not k.startswith("time/")
        }
    # A changed learning rate is refused rather than silently mixed into the trajectory.
    with pytest.raises(InputError, match="lr"):
        ppo_loop.train(make_config(lab, "resumed", **dict(kw, lr=5e-4)))


def test_nan_scores_skip_the_step_with_parameters_unchanged(lab, monkeypatch):
    real_score, real_step = ppo.score, ppo_loop.ppo_step
    state = {"step": 0}
    snapshots = {}

    def nan_score(model, qr, am):
        out = real_score(model, qr, am)
        return out * float("nan") if state["step"] == 2 else out

    def step(run, n):
        state["step"] = n
        before = [p.detach().clone() for p in run.trainable]
        row = real_step(run, n)
        snapshots[n] = all(torch.equal(a, b) for a, b in zip(before, run.trainable))
        return row

    monkeypatch.setattr(ppo, "score", nan_score)
    monkeypatch.setattr(ppo_loop, "ppo_step", step)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out, summary = ppo_loop.train(make_config(lab, "nan", total_episodes=24))
    assert snapshots == {1: False, 2: True, 3: False}
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[1]["ppo/skipped"] == 1.0 and "ppo/skipped" not in rows[2]
    assert summary["skipped_updates"] == 1


def test_non_finite_minibatch_is_skipped_and_training_goes_on(lab, monkeypatch):
    real, calls = ppo.ptx_nll, []

    def nan_once(policy, ids, mask):
        calls.append(1)
        out = real(policy, ids, mask)
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setattr(ppo, "ptx_nll", nan_once)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out, _ = ppo_loop.train(
            make_config(lab, "nan_mb", total_episodes=8, ptx_data=str(lab["ptx"]), ptx_per_episode=0.5)
        )
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert len(calls) == 4 and row["ppo/skipped_minibatches"] == 1.0
    assert row["ppo/policy/approxkl"] > 0  # the other three minibatches did update


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rm_score_rises_on_a_toy_reward(lab, precision):
    cfg = make_config(
        lab,
        f"learn-{precision}",
        batch_size=16,
        minibatch_size=8,
        max_new_tokens=8,
        total_episodes=16 * 20,
        lr=3e-3,
        no_eos_penalty=0.0,
        precision=precision,
    )
    out, _ = ppo_loop.train(cfg)
    scores = [r["objective/rm_score"] for r in read_metrics(out / "metrics.jsonl")]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.3, scores


def test_inputs_are_checked_before_anything_is_written(lab, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ok"}, {"prompt": "red " * 80}])
    cfg = make_config(lab, "never", prompts=str(long), out_dir=str(tmp_path / "out"))
    with pytest.raises(InputError) as e:
        ppo_loop.train(cfg)
    assert e.value.line == 2 and e.value.field == "prompt"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"promt": "typo"}])
    with pytest.raises(InputError, match="bad.jsonl:2: field 'prompt'"):
        ppo_loop.train(make_config(lab, "never", prompts=str(bad), out_dir=str(tmp_path / "out")))
    with pytest.raises(InputError, match="not a reward model"):  # an LM dir given as the RM
        ppo_loop.train(make_config(lab, "never", reward_model=str(lab["policy"]), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_runs_and_reports_bad_input(lab, tmp_path, capsys):
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(
        f"policy: {lab['policy']}\nreward_model: {lab['rm']}\n"
        f"prompts: {lab['prompts']}\nbatch_size: 4\nminibatch_size: 4\n"
    )
    args = [
        "ppo",
        "--config",
        str(cfg),
        "--total_episodes=4",
        "--max_new_tokens=4",
        f"--out_dir={tmp_path / 'out'}",
    ]
    assert cli.main(args + ["--force_length=true"]) == 0
    assert (tmp_path / "out" / "policy" / "model.safetensors").is_file()
    row = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    assert row["response/length"] == 4 and row["response/eos_rate"] == 0
    assert cli.main(args + ["--minibatch_size=3"]) == 2
    assert "minibatch_size" in capsys.readouterr().err
