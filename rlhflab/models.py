"""Model plumbing shared by every stage: loading, padding-safe forwards, log-probs, scores.

Policies are `AutoModelForCausalLM`; reward and value models are
`AutoModelForSequenceClassification` with one label, read at the last real token of
each sequence (§3.5). Nothing here downloads: paths are local directories, and
`trust_remote_code` stays off unless a caller passes it explicitly.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch.autograd.function import once_differentiable
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)

from rlhflab.device import fuse_gelu, reading_last
from rlhflab.errors import InputError

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REWARD_BIAS_KEY = "rlhflab_reward_bias"
"""Config attribute holding the part of the demo-centring offset (§3.5) that is not in the
weights: rlhflab adds it to every score, other tools do not see it. 0 once
`fold_reward_bias` has moved it into the weights; set in RMs from older rlhflab versions."""

# Two GPT-2-shaped sizes about 10x apart in parameters, both trainable on 2 CPU cores.
LAB_SIZES = {
    "small": dict(n_layer=2, n_embd=64, n_head=4),
    "large": dict(n_layer=4, n_embd=192, n_head=6),
}


def lab_model(
    size: str, tokenizer: PreTrainedTokenizerBase, n_positions: int = 256, dropout: float = 0.0, seed: int = 0
) -> GPT2LMHeadModel:
    """A fresh GPT-2-shaped model built from config (no download)."""
    if size not in LAB_SIZES:
        raise InputError(f"unknown size {size!r} (known: {', '.join(LAB_SIZES)})", field="size")
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **LAB_SIZES[size],
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def context_length(config) -> int | None:
    """Longest sequence the model's position embeddings allow (None: no fixed limit)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"not a Hugging Face model directory (no config.json) for the {what}", file=str(path))
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():  # else transformers reads the path as a hub repo id
        raise InputError("no such model directory", file=str(path))
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer: {str(e).splitlines()[0]}", file=str(path)) from None
    if tok.pad_token_id is None:
        # Llama-style tokenizers ship without pad; reuse eos for padding only.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, fast_gelu: bool = True, **kw):
    """A causal LM from a local directory; GPT-2's gelu_new fused unless fast_gelu=False
    (`fuse_gelu`: the same values, ~3x faster)."""
    path = _check_dir(path, "policy")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, **kw
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise InputError(f"cannot load a causal LM: {str(e).splitlines()[0]}", file=str(path)) from None
    if fast_gelu:
        fuse_gelu(model)
    return model


def load_reward_model(path: str | Path, trust_remote_code: bool = False, **kw):
    """A scalar-head model; from an LM directory the head starts fresh (§3.5: RM from SFT)."""
    path = _check_dir(path, "reward model")
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, local_files_only=True, trust_remote_code=trust_remote_code, **kw
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise InputError(f"cannot load a reward model: {str(e).splitlines()[0]}", file=str(path)) from None


_TAKES_KEEP: dict[type, bool] = {}


def keep_last(model, n: int) -> dict:
    """Forward kwargs asking for the last n positions' logits only (`logits_to_keep`),
    where the model's forward takes it; {} where it does not."""
    cls = type(model)
    if cls not in _TAKES_KEEP:
        _TAKES_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": n} if _TAKES_KEEP[cls] else {}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so padded and unpadded forwards agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding.  (B,)"""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(-1).values


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden layer of a sequence-classification model's backbone.  (B, T, H)"""
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position (the value function's per-token output), plus
    whatever bias is left in the config (`reward_bias`).  (B, T)"""
    return _head(model, hidden_states(model, input_ids, attention_mask))


def _head(model, h: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states (..., H), plus the config's bias.  (...)"""
    with torch.autocast(h.device.type, enabled=False):  # the scalar head in fp32 under bf16 autocast
        return model.score(h.float()).squeeze(-1) + reward_bias(model)


def reward_scores(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    score_at: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """r_θ(x, y): the scalar head at the last real token, plus the config's bias.  (B,)

    The same number as a plain `AutoModelForSequenceClassification(...).logits[:, 0]` of an
    RM saved by rlhflab, when the bias is folded (`fold_reward_bias`) and the config's pad
    differs from eos (`hf_pad_token_id`), on right-padded input: HF numbers positions from
    0 whatever the mask, so left padding needs `position_ids(mask)` passed to it.

    Packed rows (`text.pack`: several responses per row over one copy of their prompt):
    the 4D `attention_mask`, `position_ids` and `score_at` = (rows, cols) of each sequence's
    last token from the `Packed`; (N,), the score each sequence gets alone in a padded row.
    """
    if score_at is None:
        last = last_token_index(attention_mask)
        with reading_last(model, input_ids.shape[1] - int(last.min())):  # the last block from the first read
            values = token_values(model, input_ids, attention_mask)  # (B, T)
        return values.gather(1, last[:, None]).squeeze(1)
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return _head(model, out.last_hidden_state[score_at])  # at each sequence's last token


def reward_bias(model) -> float:
    """The demo-centring offset still held in the config (0: none, or folded into the weights)."""
    return float(getattr(model.config, REWARD_BIAS_KEY, 0.0) or 0.0)


def scale_reward(model, gain: float) -> None:
    """Multiply every score and token value of `model` by `gain`, in its weights: the scalar
    head's weight (and bias) and any bias left in the config. Exact wherever a bias was
    folded, too: a folded LayerNorm shift reaches the score only through the head's weight."""
    head = model.score
    with torch.no_grad():
        head.weight *= gain
        if getattr(head, "bias", None) is not None:
            head.bias *= gain
    if reward_bias(model):
        setattr(model.config, REWARD_BIAS_KEY, reward_bias(model) * gain)


def fold_reward_bias(model, bias: float) -> str:
    """Add `bias` to every score and token value of `model`, in its weights where that is exact.

    Then a plain `AutoModelForSequenceClassification` scores as `reward_scores` does: into
    the head's own bias where it has one; else into the bias of the LayerNorm whose output
    IS the last hidden state (GPT-2's `ln_f`): shifting it by δ = b·w/|w|² shifts w·h by
    exactly b, and in a sequence-classification model that state feeds only the head. A
    bias already in REWARD_BIAS_KEY moves too; the key is left 0, so nothing counts twice.

    Where no exact fold exists (RMSNorm without a bias and a bias-free head, as in Llama;
    a head that is not an fp32 `Linear`) the bias stays in REWARD_BIAS_KEY: rlhflab adds it,
    other tools do NOT (their scores are rlhflab's minus it), and a warning says so.
    Returns where the bias went: a parameter name, or REWARD_BIAS_KEY.
    """
    total = reward_bias(model) + float(bias)
    target = _bias_fold_target(model) if total else None
    if target is None:
        setattr(model.config, REWARD_BIAS_KEY, total)
        if total:
            warnings.warn(
                f"reward model: the bias {total:+.6g} stays in config.json as {REWARD_BIAS_KEY} "
                f"({type(model).__name__} has no bias it folds into exactly); rlhflab adds it, "
                "other tools loading the directory as AutoModelForSequenceClassification will not",
                UserWarning,
                stacklevel=2,
            )
        return REWARD_BIAS_KEY
    name, param, unit = target
    with torch.no_grad():
        param += unit * total
    setattr(model.config, REWARD_BIAS_KEY, 0.0)
    return name


def _bias_fold_target(model) -> tuple[str, torch.nn.Parameter, torch.Tensor] | None:
    """(name, parameter, u): `parameter += u·b` adds exactly b to every score; None: no such one."""
    exact = (torch.float32, torch.float64)  # a bf16 bias would round the offset away
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1 or head.weight.dtype not in exact:
        return None
    if head.bias is not None:
        return "score.bias", head.bias, torch.ones_like(head.bias)
    norm = _last_norm(model)
    if norm is None or norm.bias.dtype not in exact:
        return None
    w = head.weight[0].detach().to(norm.bias.dtype)
    name = next(n for n, m in model.named_modules() if m is norm)
    return f"{name}.bias", norm.bias, w / w.dot(w)


def _last_norm(model) -> torch.nn.LayerNorm | None:
    """The LayerNorm (with a bias) whose output is the backbone's last hidden state itself,
    found by one forward of a single token; None where the state comes from anything else."""
    norms = [m for m in model.base_model.modules() if isinstance(m, torch.nn.LayerNorm) and m.bias is not None]
    if not norms:
        return None
    outputs: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.__setitem__(mod, out)) for m in norms]
    try:
        ids = torch.zeros((1, 1), dtype=torch.long, device=norms[0].bias.device)
        with torch.no_grad():
            h = hidden_states(model, ids, torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
    # The same storage and shape: h is that output (a view at most), not a function of it.
    same = [m for m, out in outputs.items() if out.data_ptr() == h.data_ptr() and out.shape == h.shape]
    return same[0] if len(same) == 1 else None


def hf_pad_token_id(tokenizer) -> int | None:
    """The `pad_token_id` a saved RM's config needs for transformers' own pooling to read the
    token `reward_scores` reads (the last real one, the response's eos).

    transformers 5.24 (`GPT2ForSequenceClassification`, `GenericForSequenceClassification`)
    pools at the rightmost token != `config.pad_token_id`, ignoring the attention mask; with
    no pad id it reads the last position and refuses a batch of more than one row. So: the
    tokenizer's pad where it differs from eos. Where pad IS eos (Llama-style tokenizers,
    `load_tokenizer`) no id works, since HF would skip the response's own eos and read the
    token before it: None, so HF scores one unpadded sequence as rlhflab does and refuses a
    padded batch (ValueError) rather than silently reading another token.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return None if pad is None or pad == eos else pad


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[labels], in fp32, without a full-vocabulary fp32 tensor.

    logits (B, ..., V), labels (B, ...) -> (B, ...). Works a block of rows at a time, in
    the forward and in the backward (which recomputes the softmax of its block), so what
    stays alive is the logits themselves.
    """
    return _TokenLogprobs.apply(logits, labels, float(temperature))


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, a statistic (no gradient).
    (B, ..., V) -> (B, ...)"""
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for rows in _row_blocks(logits):
        logp = _log_softmax(logits[rows], temperature)
        out[rows] = -(logp.exp() * logp).sum(-1)
    return out


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    """Slices along dim 0 of about 2^20 elements (CPU: a block's fp32 copy stays in cache)
    or 2^26 (GPU: bounds the fp32 working set)."""
    per_row = max(logits[0].numel(), 1) if logits.shape[0] else 1
    budget = 1 << (26 if logits.device.type == "cuda" else 20)
    step = max(1, budget // per_row)
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


def _log_softmax(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(block / T) in fp32: one fused pass over bf16 or fp32 logits at T = 1."""
    if temperature == 1.0:
        return torch.log_softmax(block, -1, dtype=torch.float32)
    return torch.log_softmax(block.to(torch.float32) / temperature, -1)


def _softmax(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(block / T) in fp32, a new tensor (callers write into it)."""
    if temperature == 1.0:
        return torch.softmax(block, -1, dtype=torch.float32)
    return torch.softmax(block.to(torch.float32) / temperature, -1)


class _TokenLogprobs(torch.autograd.Function):
    """d/dz log softmax(z)[y] = onehot(y) - softmax(z); z = logits / T."""

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for rows in _row_blocks(logits):
            logp = _log_softmax(logits[rows], temperature)
            out[rows] = logp.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, labels)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        T = ctx.temperature
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for rows in _row_blocks(logits):
            g = (grad[rows] / T).unsqueeze(-1)
            p = _softmax(logits[rows], T)  # recomputed: cheaper than keeping a (B, R, V) fp32 tensor
            out[rows] = p.mul_(-g).scatter_add_(-1, labels[rows].unsqueeze(-1), g)
        return out, None, None
