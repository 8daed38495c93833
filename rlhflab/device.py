"""What a device runs fast: the precision `auto` picks (timed where flags are not enough),
bf16 autocast, the same functions as faster kernels (`fast_kernels`: GPT-2's GELU fused, and
on a CPU in bf16 the attention below), the last GPT-2 block only where its output is read
(`reading_last`, at the end), and a device sync for timings.

Attention on a CPU in bf16: the matmul ('eager') attention, without its fp32 detour.

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

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, eager_attention_forward
from transformers.pytorch_utils import Conv1D


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings must not stop early."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """Mixed precision for a block: 'bf16' runs matmuls in bfloat16 with fp32 weights, fp32
    optimizer state and fp32 log-softmax (a CPU with AMX, or a GPU); 'fp32' changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (/proc/cpuinfo) of bf16 matrix instructions: AMX tiles, AVX-512 BF16 dot products."""

BF16_MIN_SPEEDUP = 1.15
"""`auto` takes bf16 on a CPU only where a bf16 matmul measured at least this much faster."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """'bf16' or 'fp32'."""
    reason: str
    """Why, in one line (printed by `rlhflab run` and the bench)."""


def cpu_bf16_flags() -> list[str]:
    """Which of BF16_CPU_FLAGS this CPU reports (Linux /proc/cpuinfo; [] where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return [f for f in BF16_CPU_FLAGS if f in flags]


def matmul_speedup(device: torch.device, rows: int = 2048, inner: int = 192, cols: int = 768, reps: int = 8) -> float:
    """fp32 time / bf16 time of one (rows × inner) @ (inner × cols) matmul, the shape of the
    lab-large model's MLP over a training batch; the median of `reps` after a warm-up, on
    one thread (on a CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, inner, device=device, generator=g)
    b = torch.randn(inner, cols, device=device, generator=g)

    def median_time(x, y) -> float:
        times = []
        for i in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            x @ y
            sync(device)
            if i >= 2:  # warm-up: the first calls pick kernels
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    # One thread: with every core's thread, a core that another process holds makes both
    # timings wait at OpenMP barriers (1.0x measured that way on a busy AMX machine, 7.8x alone).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return median_time(a, b) / max(median_time(a.bfloat16(), b.bfloat16()), 1e-12)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _choose(device: str) -> PrecisionChoice:
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if ok else "fp32", f"CUDA {'with' if ok else 'without'} bf16")
    if dev.type != "cpu":
        return PrecisionChoice("fp32", f"{dev.type}: bf16 not measured there")
    flags = cpu_bf16_flags()
    if not flags:  # bf16 is emulated there (~50x slower on a Zen 2): no need to time it
        none = " or ".join(BF16_CPU_FLAGS)
        return PrecisionChoice("fp32", f"CPU has no bf16 matrix instructions ({none})")
    speedup = matmul_speedup(dev)
    measured = f"a bf16 matmul ran {speedup:.2f}x the speed of fp32"
    if speedup >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU has {', '.join(flags)} and {measured}")
    return PrecisionChoice("fp32", f"CPU has {', '.join(flags)} but {measured} (< {BF16_MIN_SPEEDUP}x)")


def choose_precision(device: torch.device) -> PrecisionChoice:
    """What `precision=auto` runs on `device`: bf16 on a CUDA GPU with bf16; on a CPU, bf16
    where it has bf16 matrix instructions (AMX or AVX-512 BF16) AND a short timed matmul
    (once per process) confirms they are faster; else fp32. With the reason."""
    return _choose(str(torch.device(device)))


def native_bf16(device: torch.device) -> bool:
    """Whether `precision=auto` picks bf16 on this device (`choose_precision`)."""
    return choose_precision(device).precision == "bf16"


def fast_kernels(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The same function, faster: GPT-2's gelu_new as one fused kernel, and on a CPU in bf16
    the matmul attention in bf16 (`fast_attention`). Returns the model."""
    fuse_gelu(model)
    fast_attention(model, device, precision)
    return model


def fuse_gelu(model: torch.nn.Module) -> None:
    """Swap GPT-2's gelu_new (eight elementwise passes in Python) for the same tanh-GELU
    as one fused kernel; equal to ~1e-7, and ~3x faster forward + backward on a CPU."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


# --------------------------------------------------------------------------- bf16 attention on a CPU

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


# --------------------------------------------------------------------------- the last block where it is read

# PPO reads the policy's and the reference's logits at the response positions, the value
# model at the same positions and the reward model at the last real token, yet a plain
# forward runs every block at every position. The blocks before the last must (the last
# block's keys and values read every position's input); the last need not. Inside
# `reading_last(model, k)` the last block of a GPT-2 model computes its keys and values at
# every position and its queries, attention output and MLP at the last k positions only;
# at the other positions it hands on its input unchanged, which no caller reads. At the k
# positions the outputs are the full forward's to float rounding (the matmuls have fewer
# rows), and since every forward of a PPO step, the rollout's and the update's, goes the
# same way, the PPO ratio stays exactly 1 at lr = 0.
#
# GPT-2 blocks only (transformers' `GPT2Block`: the lab's models and the bench's). Any other
# model, a KV cache, cross-attention, gradient checkpointing (its recomputation would run
# outside the context) or an attention mask of a form this does not know runs the full block.


def _last_gpt2_block(model: torch.nn.Module) -> GPT2Block | None:
    """The model's last GPT-2 block, or None where it has none or it must run whole."""
    blocks = [m for m in model.modules() if isinstance(m, GPT2Block)]
    if not blocks:
        return None
    last = blocks[-1]
    if last.gradient_checkpointing or hasattr(last, "crossattention") or last.attn.reorder_and_upcast_attn:
        return None
    return last


@contextlib.contextmanager
def reading_last(model: torch.nn.Module, k: int):
    """Within the context, `model`'s forwards run its last block at the last k positions only
    (the other positions of its output: its input). The caller reads the last k positions'
    outputs and nothing else. No-op where `_last_gpt2_block` finds no block to cut."""
    block = _last_gpt2_block(model)
    if block is None or k < 1:
        yield
        return
    own = block.__dict__.get("forward")  # an instance-level forward someone else set
    block.forward = functools.partial(_forward_at_last, block, k)
    try:
        yield
    finally:
        if own is None:
            del block.forward
        else:
            block.forward = own


def _mask_rows(mask, k: int, T: int, implementation: str):
    """The attention mask of the last k query rows, or False where its form is unknown.

    A 4D mask (eager's additive one, sdpa's boolean one) keeps its last k rows. sdpa gets
    None where the rows need only causality (no padding): its `is_causal` would align k
    queries to the first k keys, so the causal rows are built here.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] == T:
        return mask[:, :, -k:, :]
    if mask is None and implementation == "sdpa":
        return None  # built by the caller, which knows the device
    return False


def _forward_at_last(
    block: GPT2Block,
    k: int,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    use_cache: bool | None = False,
    **kwargs,
) -> torch.Tensor:
    """GPT2Block.forward at the last k positions (keys and values at all); the rest: its input."""
    T = hidden_states.shape[1]
    attn = block.attn
    impl = attn.config._attn_implementation
    mask = _mask_rows(attention_mask, k, T, impl)
    if k >= T or cache is not None or use_cache or encoder_hidden_states is not None or mask is False:
        return GPT2Block.forward(
            block,
            hidden_states,
            cache,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
    if mask is None:  # causal rows T-k .. T-1 over keys 0 .. T-1
        rows = torch.arange(T - k, T, device=hidden_states.device)[:, None]
        mask = (torch.arange(T, device=hidden_states.device)[None, :] <= rows)[None, None]
    x = block.ln_1(hidden_states)
    d = attn.split_size
    if type(attn.c_attn) is Conv1D:  # x @ w + b with w (d, 3d) = [q | k | v]: q at the k rows only
        w, b = attn.c_attn.weight, attn.c_attn.bias
        query = torch.addmm(b[:d], x[:, -k:].reshape(-1, d), w[:, :d]).view(x.shape[0], k, d)
        key, value = torch.addmm(b[d:], x.reshape(-1, d), w[:, d:]).view(*x.shape[:2], 2 * d).split(d, dim=2)
    else:  # a wrapped projection (LoRA): the module itself, at every position
        query, key, value = attn.c_attn(x).split(d, dim=2)
        query = query[:, -k:]

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], -1, attn.head_dim).transpose(1, 2)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
    out, _ = interface(
        attn,
        heads(query),
        heads(key),
        heads(value),
        mask,
        dropout=attn.attn_dropout.p if attn.training else 0.0,
        scaling=attn.scaling,
        **kwargs,
    )
    out = attn.resid_dropout(attn.c_proj(out.reshape(*out.shape[:-2], -1).contiguous()))
    h = hidden_states[:, -k:] + out
    h = h + block.mlp(block.ln_2(h))
    return torch.cat([hidden_states[:, :-k], h], dim=1)
