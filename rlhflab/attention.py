"""Attention on a CPU in bf16: the matmul ('eager') attention, without its fp32 detour.

Under bf16 autocast transformers' eager attention adds a float32 mask to bf16 scores, so
the add, the softmax and its backward run in float32 over the (B, H, T, T) scores, with a
cast to float32 and one back on each side. `lowp_eager` keeps the scores in bf16 from end
to end: the scale and the mask are one add (`torch.add(mask, scores, alpha=scale)`), the
mask is built in bf16 in the first place, and the softmax runs on bf16 (torch's CPU
kernel accumulates in float32 and rounds once, as the cast after a float32 softmax does).
The forward gives the same bf16 probabilities as eager; gradients differ in bf16 rounding
only (tests/test_attention.py). On the bench's `cpu` workload one policy forward + backward
took 144 against 153 ms (medians of interleaved rounds, 2-core Zen 4 EPYC; BENCHMARKS.md).

Only model types whose eager attention is exactly this computation switch to it
(`LOWP_EAGER_MODELS`: no soft-capping, no attention sinks, no upcast-and-reorder); any
other model keeps transformers' own eager attention.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

LOWP_EAGER = "rlhflab_lowp_eager"
"""The attention implementation's name (`config._attn_implementation`)."""

LOWP_EAGER_MODELS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
"""Model types whose eager attention is scores = QKᵀ·scale + mask, softmax, ·V (with
grouped key/value heads repeated), so `lowp_eager` computes the same function."""


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H_kv·groups, T, d): each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    B, H, T, d = x.shape
    return x[:, :, None].expand(B, H, groups, T, d).reshape(B, H * groups, T, d)


def lowp_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(QKᵀ·scale + mask)·V in the dtype of the scores.  -> (B, T, H, d), probabilities"""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2))
    if attention_mask is None:
        scores = scores * scaling
    else:
        if attention_mask.dtype != scores.dtype:  # a caller's own 4D mask (packed rows)
            low = torch.finfo(scores.dtype).min
            attention_mask = attention_mask.clamp(min=low).to(scores.dtype)
        scores = torch.add(attention_mask, scores, alpha=scaling)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def lowp_eager_mask(*args, dtype: torch.dtype = torch.float32, device="cpu", **kwargs):
    """eager's additive mask, in the autocast dtype when autocast is on (0 where a token may
    attend, that dtype's lowest finite value where not: a row with nothing to attend to
    stays finite, as in eager)."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    return eager_mask(*args, dtype=dtype, device=device, **kwargs)


AttentionInterface.register(LOWP_EAGER, lowp_eager)
AttentionMaskInterface.register(LOWP_EAGER, lowp_eager_mask)


def lowp_eager_fits(model: torch.nn.Module) -> bool:
    """Whether `lowp_eager` computes the same function as `model`'s eager attention."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in LOWP_EAGER_MODELS
        and not getattr(config, "reorder_and_upcast_attn", False)
        and getattr(config, "attn_logit_softcapping", None) is None
    )


def fast_attention(model: torch.nn.Module, device: torch.device, precision: str, lowp: bool = True) -> None:
    """bf16 on a CPU: the matmul attention, `lowp_eager` where it fits the model (and `lowp`)
    and transformers' eager otherwise. torch's CPU flash-attention backward is ~7x slower in
    bf16 than in fp32 and would eat the whole bf16 gain (BENCHMARKS.md)."""
    if precision == "bf16" and device.type == "cpu" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(LOWP_EAGER if lowp and lowp_eager_fits(model) else "eager")
