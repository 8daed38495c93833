"""`device.reading_last`, the last GPT-2 block at the read positions only: the full forward's outputs there, and
its gradients; a no-op wherever it cannot apply."""

from __future__ import annotations

import pytest
import torch

from rlhflab.adapters import add_lora, checkpoint_activations
from rlhflab.device import LOWP_EAGER, _last_gpt2_block, autocast, reading_last
from rlhflab.models import load_causal_lm, load_reward_model, position_ids, token_logprobs, token_values

from tiny import gpt2_dir, llama_dir, tiny_tokenizer

CPU = torch.device("cpu")
K = 5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("last_block")
    return {"gpt2": gpt2_dir(root / "gpt2"), "llama": llama_dir(root / "llama")}


def _batch(padded: bool):
    """Rows of 11 tokens: left-padded to different lengths, or all full (no mask needed)."""
    tok = tiny_tokenizer()
    rows = [tok.encode("name a color : red blue green . yes no maybe"), tok.encode("the cat sat on the mat")]
    rows = [r[:11] for r in rows] if padded else [rows[0][:11], rows[0][-11:]]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _logprobs_and_grads(model, ids, mask, keep: int | None, precision: str = "fp32"):
    """log-probs of the last K - 1 tokens (read from the last K positions' logits) and every
    parameter's gradient of their sum; `keep`: run under reading_last(model, keep)."""
    model.zero_grad(set_to_none=True)
    with autocast(CPU, precision):
        if keep is None:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        else:
            with reading_last(model, keep):
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    lp = token_logprobs(out.logits[:, -K:-1].float(), ids[:, -K + 1 :])
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


def _close(grads, ref, tol):
    assert grads.keys() == ref.keys()
    for n in ref:
        assert (grads[n] - ref[n]).norm() <= tol * (ref[n].norm() + 1e-12), n


@pytest.mark.parametrize("attention", ["sdpa", "eager", LOWP_EAGER])
@pytest.mark.parametrize("padded", [True, False])  # unpadded: sdpa gets no mask, only causality
def test_the_read_positions_and_every_gradient_are_the_full_forwards(dirs, attention, padded):
    model = _no_dropout(load_causal_lm(dirs["gpt2"]).train())
    model.set_attn_implementation(attention)
    ids, mask = _batch(padded)
    ref_lp, ref_g = _logprobs_and_grads(model, ids, mask, keep=None)

    block, seen = _last_gpt2_block(model), {}
    hook = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    lp, g = _logprobs_and_grads(model, ids, mask, keep=K)
    hook.remove()
    assert torch.equal(seen["y"][:, :-K], seen["x"][:, :-K])  # the cut ran: the rest passed through
    assert not torch.equal(seen["y"][:, -K:], seen["x"][:, -K:])
    assert (lp - ref_lp).abs().max() < 1e-5
    _close(g, ref_g, 1e-5)
    assert "forward" not in vars(block)  # the context restored the block


def test_in_bf16_the_cut_stays_as_close_to_fp32_as_the_full_forward(dirs):
    model = _no_dropout(load_causal_lm(dirs["gpt2"]).train())
    model.set_attn_implementation(LOWP_EAGER)
    ids, mask = _batch(padded=True)
    ref_lp, _ = _logprobs_and_grads(model, ids, mask, keep=None)
    full_lp, _ = _logprobs_and_grads(model, ids, mask, keep=None, precision="bf16")
    cut_lp, _ = _logprobs_and_grads(model, ids, mask, keep=K, precision="bf16")
    assert 0 < (full_lp - ref_lp).abs().max() < 0.1  # bf16 did run
    assert (cut_lp - ref_lp).abs().max() <= 2 * (full_lp - ref_lp).abs().max()


def test_value_model_outputs_at_the_read_positions(dirs):
    model = _no_dropout(load_reward_model(dirs["gpt2"]).train())
    ids, mask = _batch(padded=True)
    full = token_values(model, ids, mask)
    with reading_last(model, K):
        cut = token_values(model, ids, mask)
    assert (cut[:, -K:] - full[:, -K:]).abs().max() < 1e-5
    assert (cut[:, :-K] - full[:, :-K]).abs().max() > 1e-4  # the rest is not computed


def test_lora_wrapped_projections_keep_their_adapters(dirs):
    policy = _no_dropout(load_causal_lm(dirs["gpt2"]).train())
    lora = add_lora(policy, load_reward_model(dirs["gpt2"]), r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    with torch.no_grad():  # adapters that change the function (B starts at 0)
        for n, p in lora.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, mask = _batch(padded=True)
    ref_lp, ref_g = _logprobs_and_grads(lora.policy, ids, mask, keep=None)
    lp, g = _logprobs_and_grads(lora.policy, ids, mask, keep=K)
    assert (lp - ref_lp).abs().max() < 1e-5
    _close(g, ref_g, 1e-5)


def test_a_no_op_for_other_models_and_under_checkpointing(dirs):
    ids, mask = _batch(padded=True)
    llama = _no_dropout(load_causal_lm(dirs["llama"]).train())
    assert _last_gpt2_block(llama) is None
    ref_lp, ref_g = _logprobs_and_grads(llama, ids, mask, keep=None)
    lp, g = _logprobs_and_grads(llama, ids, mask, keep=K)
    assert torch.equal(lp, ref_lp) and all(torch.equal(g[n], ref_g[n]) for n in ref_g)

    gpt2 = _no_dropout(load_causal_lm(dirs["gpt2"]).train())
    checkpoint_activations(gpt2)
    assert _last_gpt2_block(gpt2) is None  # its recompute would run outside the context
    ref_lp, _ = _logprobs_and_grads(gpt2, ids, mask, keep=None)
    lp, _ = _logprobs_and_grads(gpt2, ids, mask, keep=K)
    assert torch.equal(lp, ref_lp)


def test_the_block_is_restored_after_an_error(dirs):
    model = load_causal_lm(dirs["gpt2"])
    block = _last_gpt2_block(model)
    with pytest.raises(RuntimeError, match="inside"):
        with reading_last(model, K):
            assert "forward" in vars(block)
            raise RuntimeError("inside")
    assert "forward" not in vars(block)
