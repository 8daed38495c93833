"""bf16 autocast and the faster kernels: the same function, fp32 where it matters."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab import device, pipeline
from rlhflab.config import ConfigError, TrainFields, validate
from rlhflab.device import autocast, fast_kernels, native_bf16
from rlhflab.models import load_causal_lm, load_reward_model, position_ids, token_logprobs, token_values
from rlhflab.stages.ppo import PPOConfig

from tiny import gpt2_dir, llama_dir, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {"gpt2": gpt2_dir(root / "gpt2"), "llama": llama_dir(root / "llama")}


def _batch():
    tok = tiny_tokenizer()
    rows = [tok.encode("the cat sat on the mat ."), tok.encode("name a color : red")]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def _logprobs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return token_logprobs(out.logits[:, :-1], ids[:, 1:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_kernels_compute_the_same_function(models, arch):
    ids, mask = _batch()
    plain = load_causal_lm(models[arch]).eval()
    fast = fast_kernels(load_causal_lm(models[arch]).eval(), CPU, "bf16")  # fused GELU, eager attention
    with torch.no_grad():
        a, b = _logprobs(plain, ids, mask), _logprobs(fast, ids, mask)
    real = (mask[:, :-1] * mask[:, 1:]).bool()  # a pad position predicts nothing rlhflab reads
    assert (a - b)[real].abs().max() < 1e-5


def test_bf16_autocast_stays_close_and_keeps_scores_fp32(models):
    ids, mask = _batch()
    policy = fast_kernels(load_causal_lm(models["gpt2"]).eval(), CPU, "bf16")
    rm = load_reward_model(models["gpt2"]).eval()
    with torch.no_grad():
        ref, ref_v = _logprobs(policy, ids, mask), token_values(rm, ids, mask)
        with autocast(CPU, "bf16"):
            lp, v = _logprobs(policy, ids, mask), token_values(rm, ids, mask)
    assert lp.dtype == torch.float32 and v.dtype == torch.float32  # log-softmax and the head in fp32
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    assert 0 < (lp - ref)[real].abs().max() < 0.1  # bf16 did run, and stayed close
    assert (v - ref_v).abs().max() < 0.05


def test_precision_is_checked_and_auto_follows_the_hardware(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="precision"):
        validate(PPOConfig(policy="p", reward_model="r", prompts="x", train=TrainFields(precision="fp16")))
    assert isinstance(native_bf16(CPU), bool)
    cfg = pipeline.RunConfig(out_dir=str(tmp_path))
    for expected in ("fp32", "bf16"):
        choice = device.PrecisionChoice(expected, "because")
        monkeypatch.setattr("rlhflab.device.choose_precision", lambda device, c=choice: c)
        run = pipeline.Pipeline(cfg)
        assert (run.precision, run.precision_reason) == (expected, "because")
    cfg.precision = "fp32"
    assert pipeline.Pipeline(cfg).precision == "fp32"


@pytest.mark.parametrize(
    "flags,speedup,expected",
    [
        ([], 3.0, "fp32"),  # no bf16 instructions: never bf16, whatever one matmul says
        (["avx512_bf16"], 1.6, "bf16"),  # a Zen 4: flags and a measured gain
        (["amx_bf16"], 4.0, "bf16"),
        (["avx512_bf16"], 1.05, "fp32"),  # flags, but no gain measured
    ],
)
def test_auto_precision_needs_bf16_instructions_and_a_measured_gain(monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(device, "matmul_speedup", lambda device: speedup)
    device._choose.cache_clear()
    try:
        choice = device.choose_precision(CPU)
    finally:
        device._choose.cache_clear()
    assert choice.precision == expected
    assert all(f in choice.reason for f in flags)
    assert (f"{speedup:.2f}x" in choice.reason) == bool(flags)  # timed only where the flags are


def test_matmul_speedup_is_measured_on_this_cpu():
    ratio = device.matmul_speedup(CPU, rows=256, reps=3)
    assert math.isfinite(ratio) and ratio > 0
    flags = device.cpu_bf16_flags()
    assert set(flags) <= set(device.BF16_CPU_FLAGS)
