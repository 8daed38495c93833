"""rlhflab's bf16 eager attention: eager's function, its scores kept in bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhflab.device import LOWP_EAGER, autocast, fast_attention, lowp_eager_fits
from rlhflab.models import load_causal_lm, position_ids, token_logprobs

from tiny import gpt2_dir, llama_dir, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {"gpt2": gpt2_dir(root / "gpt2"), "llama": llama_dir(root / "llama")}


def _batch():
    """Two left-padded rows: the first has pad positions whose attention row is all masked."""
    tok = tiny_tokenizer()
    rows = [tok.encode("name a color : red"), tok.encode("the cat sat on the mat . birds fly south")]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def _run(model, attention: str, bf16: bool):
    """(token log-probs at real positions, every parameter's gradient of their sum)."""
    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    ids, mask = _batch()
    with autocast(CPU, "bf16" if bf16 else "fp32"):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    lp = token_logprobs(out.logits[:, :-1], ids[:, 1:])
    real = (mask[:, :-1] * mask[:, 1:]).bool()
    lp[real].sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.isfinite(grads).all()  # fully masked pad rows stay finite, as in eager
    return lp.detach()[real], grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # llama: grouped key/value heads (4 query, 2 kv)
def test_same_function_as_eager_in_fp32_and_as_close_to_it_as_eager_in_bf16(models, arch):
    model = load_causal_lm(models[arch]).train()
    model.config.attn_pdrop = model.config.attention_dropout = 0.0
    for m in model.modules():  # dropout off: the comparison needs the same function twice
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref_lp, ref_g = _run(model, "eager", bf16=False)
    lp, g = _run(model, LOWP_EAGER, bf16=False)
    assert (lp - ref_lp).abs().max() < 1e-5
    assert ((g - ref_g).norm() / ref_g.norm()) < 1e-5
    eager_lp, eager_g = _run(model, "eager", bf16=True)
    low_lp, low_g = _run(model, LOWP_EAGER, bf16=True)
    assert 0 < (low_lp - ref_lp).abs().max() < 0.1  # bf16 did run
    # bf16 error against the fp32 function: within eager's own bf16 error, with slack for rounding order
    assert (low_lp - ref_lp).abs().max() <= 1.5 * (eager_lp - ref_lp).abs().max() + 1e-3
    eager_err, low_err = ((x - ref_g).norm() / ref_g.norm() for x in (eager_g, low_g))
    assert 0 < low_err < 0.05 and low_err <= 1.5 * eager_err + 1e-3


def test_fast_attention_switches_only_where_the_function_is_the_same(models):
    gpt2, llama = (load_causal_lm(models[a]) for a in ("gpt2", "llama"))
    for model in (gpt2, llama):
        fast_attention(model, CPU, "fp32")
        assert model.config._attn_implementation != LOWP_EAGER  # fp32: left as loaded
        fast_attention(model, CPU, "bf16")
        assert model.config._attn_implementation == LOWP_EAGER
        fast_attention(model, CPU, "bf16", lowp=False)
        assert model.config._attn_implementation == "eager"
    reordered = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, reorder_and_upcast_attn=True))
    assert not lowp_eager_fits(reordered)  # its eager upcasts QKᵀ to fp32 itself
    fast_attention(reordered, CPU, "bf16")
    assert reordered.config._attn_implementation == "eager"


def test_a_model_saved_after_the_switch_names_no_rlhflab_attention(models, tmp_path):
    """Its config must load in plain transformers, where `rlhflab_lowp_eager` is not registered."""
    model = load_causal_lm(models["gpt2"])
    fast_attention(model, CPU, "bf16")
    assert model.config._attn_implementation == LOWP_EAGER
    model.save_pretrained(tmp_path / "saved")
    assert LOWP_EAGER not in (tmp_path / "saved" / "config.json").read_text()
    assert load_causal_lm(tmp_path / "saved").config._attn_implementation != LOWP_EAGER
