"""Shared-prompt packing: layout, mask, and scores and gradients equal to padded rows."""

from __future__ import annotations

import pytest
import torch

from rlhflab.data import parse_ranking
from rlhflab.models import load_reward_model, reward_scores
from rlhflab.stages import rm
from rlhflab.text import pack, pad_right, supports_packing

from tiny import gpt2_dir, llama_dir, tiny_tokenizer

PAD = 0


def test_layout_repeats_the_prompt_per_piece_and_continues_its_positions():
    groups = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11, 12]])]
    p = pack(groups, PAD, width=6)
    # Group 0 is cut into [1 2 3 | 4 5 | 6] and [1 2 3 | 7 8 9]; group 1 is [10 | 11 12].
    rows = [[t for t in r.tolist() if t != PAD] for r in p.input_ids]
    assert sorted(rows) == sorted([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9], [10, 11, 12]])
    last = [int(p.input_ids[r, c]) for r, c in zip(p.rows, p.cols, strict=True)]
    assert last == [5, 6, 9, 12]  # each sequence is read at its own last token
    for n, (r, c) in enumerate(zip(p.rows.tolist(), p.cols.tolist(), strict=True)):
        length = [2, 1, 3, 2][n] + (3 if n < 3 else 1)  # prompt + response
        assert int(p.position_ids[r, c]) == length - 1
        assert int(p.segment[r, c]) == n


def test_mask_lets_a_response_see_its_prompt_and_itself_only():
    p = pack([([1, 2], [[3, 4], [5]])], PAD, width=8)
    allow = p.attention_mask(additive=False)[0, 0]
    tokens = p.input_ids[0].tolist()  # [1 2 3 4 5]
    i5, i4, i3 = tokens.index(5), tokens.index(4), tokens.index(3)
    assert allow[i5, tokens.index(1)] and allow[i5, tokens.index(2)] and allow[i5, i5]
    assert not allow[i5, i3] and not allow[i5, i4]  # not the other response
    assert allow[i4, i3] and not allow[i3, i4]  # causal within a response
    additive = p.attention_mask(additive=True)[0, 0]
    assert torch.equal(additive == 0, allow)


def test_an_overlong_pair_gets_its_own_row_and_empty_responses_are_refused():
    p = pack([([1, 2, 3], [[4] * 10, [5]])], PAD, width=4)
    assert p.input_ids.shape == (2, 13)  # the 13-token pair sets the width
    with pytest.raises(ValueError, match="response 1 is empty"):
        pack([([1], [[2], []])], PAD, width=8)


def _loss_and_grads(model, batch: rm.RMBatch):
    model.zero_grad(set_to_none=True)
    scores = batch.scores(lambda *a: reward_scores(model, *a))
    loss, _ = rm.batch_loss(scores, batch)
    loss.backward()
    return scores.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch,attention", [("gpt2", "eager"), ("gpt2", "rlhflab_lowp_eager"), ("gpt2", "sdpa"), ("llama", "sdpa")]
)
def test_packed_scores_and_gradients_equal_padded(tmp_path, arch, attention):
    tok = tiny_tokenizer()
    path = (gpt2_dir if arch == "gpt2" else llama_dir)(tmp_path / arch, tok)
    model = load_reward_model(path).eval()
    model.set_attn_implementation(attention)
    assert supports_packing(model)
    rows = [
        parse_ranking(
            {"prompt": "name a color", "ranking": [3, 0, 2, 1], "responses": ["red", "blue", "a", "red red"]}
        ),
        parse_ranking({"prompt": "summarize this : birds fly south", "chosen": "birds fly", "rejected": "no"}),
        parse_ranking({"prompt": "yes", "ranking": [1, 0, 2], "responses": ["no no no no no", "yes", "ok ."]}),
    ]
    comparisons = rm.encode_rankings(tok, rows, "<test>", 128)
    padded = rm.collate(comparisons, tok.pad_token_id)
    packed = rm.collate(comparisons, tok.pad_token_id, pack_width=0, additive=attention != "sdpa")
    assert packed.input_ids.numel() < padded.input_ids.numel()  # fewer token slots
    s_pad, g_pad = _loss_and_grads(model, padded)
    s_pack, g_pack = _loss_and_grads(model, packed)
    torch.testing.assert_close(s_pack, s_pad, atol=1e-5, rtol=0)
    assert g_pack.keys() == g_pad.keys()
    for k in g_pad:
        torch.testing.assert_close(g_pack[k], g_pad[k], atol=1e-5, rtol=1e-4, msg=k)


def test_responses_with_different_query_tokens_do_not_share_a_prompt(tmp_path):
    """A chat template may tokenize the query differently per response: each distinct query
    is its own group, and scores stay those of padded rows."""
    tok = tiny_tokenizer()
    model = load_reward_model(gpt2_dir(tmp_path / "gpt2", tok)).eval()
    a, b = tok.encode("tell me"), tok.encode("tell me more")
    c = rm.Comparison([a + [7, 8], b + [9], a + [10]], [(0, 1), (2, 1)], [len(a), len(b), len(a)])
    groups, order = rm._prompt_groups([c], [0])
    assert [g[0] for g in groups] == [a, b] and order.tolist() == [0, 2, 1]
    packed = rm.collate([c], tok.pad_token_id, pack_width=0, additive=False)
    with torch.no_grad():
        alone = reward_scores(model, *pad_right(c.sequences, tok.pad_token_id))
        got = packed.scores(lambda *x: reward_scores(model, *x))
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,attention", [("gpt2", "eager"), ("llama", "sdpa")])
def test_packed_ending_likelihoods_equal_one_padded_row_per_ending(tmp_path, arch, attention):
    """The capability benchmarks' multiple choice: each context once, its endings after it."""
    from rlhflab.eval import capability
    from rlhflab.models import load_causal_lm

    tok = tiny_tokenizer()
    model = load_causal_lm((gpt2_dir if arch == "gpt2" else llama_dir)(tmp_path / arch, tok)).eval()
    model.set_attn_implementation(attention)
    items = [
        {"context": "the cat sat on the", "endings": [" mat", " dog ran away", " sun"], "label": 0},
        {"context": "birds fly", "endings": [" south in winter", " no"], "label": 1},
        {"context": "say yes", "endings": [" yes", " no no", " ok", " maybe so"], "label": 2},
    ]
    groups = [
        (
            capability._context_ids(tok, x["context"]),
            [tok(e, add_special_tokens=False)["input_ids"] for e in x["endings"]],
        )
        for x in items
    ]
    with torch.no_grad():
        padded = [
            m for ctx, ends in groups for m in capability._choice_means_padded(model, ctx, ends, tok.pad_token_id)
        ]
        packed = capability._choice_means_packed(model, groups, tok.pad_token_id)
    assert packed == pytest.approx(padded, abs=1e-5)
    assert len(set(round(m, 3) for m in padded)) > 1  # the endings do score differently
    hits = capability._choice_hits(model, tok, items, batch_items=2)  # packed, two forwards
    best = [max(range(len(e)), key=lambda k, o=o: padded[o + k]) for o, e in zip([0, 3, 5], [g[1] for g in groups])]
    assert hits == [float(b == x["label"]) for b, x in zip(best, items)]
