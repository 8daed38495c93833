"""The capability benchmarks' webtext score: next-token accuracy on held-out web text."""

from __future__ import annotations

import pytest
import torch

from rlhflab.errors import InputError
from rlhflab.eval.capability import BENCHMARKS, _token_accuracy, capability_scores, load_benchmarks, tax_keys
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.world.build import build

from tiny import gpt2_dir, llama_dir

TEXTS = [
    "the cat sat on the mat .",
    "a dog ran far away .",
    "name a color : red blue green .",
    "summarize this : birds fly south in winter .",
    "one two three four",
]


def _by_hand(model, tok, texts) -> float:
    hits = total = 0
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
        hits += int((pred == ids[0, 1:]).sum())
        total += ids.shape[1] - 1
    return hits / total


@pytest.mark.parametrize("make", [gpt2_dir, llama_dir])
def test_webtext_accuracy_matches_one_text_at_a_time_and_ignores_padding(make, tmp_path):
    path = make(tmp_path / "m")
    model, tok = load_causal_lm(path).eval(), load_tokenizer(path)
    want = _by_hand(model, tok, TEXTS)
    assert _token_accuracy(model, tok, TEXTS, batch_size=32) == pytest.approx(want, abs=1e-12)
    assert _token_accuracy(model, tok, TEXTS, batch_size=1) == pytest.approx(want, abs=1e-12)


def test_webtext_accuracy_rises_when_the_model_learns_the_text(tmp_path, one_torch_thread):
    path = gpt2_dir(tmp_path / "m")
    model, tok = load_causal_lm(path), load_tokenizer(path)
    before = _token_accuracy(model.eval(), tok, TEXTS)
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        for seq in ids:
            x = torch.tensor([seq])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _token_accuracy(model.eval(), tok, TEXTS)
    assert before < 0.3 and after > 0.8


def test_the_world_writes_webtext_and_every_score_is_a_fraction(tmp_path):
    world = tmp_path / "world"
    build(world, seed=1, scale="small", vocab_size=400)
    bench = load_benchmarks(world, limit=5)
    assert set(bench) == set(BENCHMARKS) and len(bench["webtext"]) == 5
    assert all(isinstance(x["text"], str) and x["text"] for x in bench["webtext"])
    path = gpt2_dir(tmp_path / "m", load_tokenizer(world / "tokenizer"))
    scores = capability_scores(load_causal_lm(path), load_tokenizer(path), bench)
    assert set(scores) == {*BENCHMARKS, "mean"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["mean"] == pytest.approx(sum(scores[b] for b in BENCHMARKS) / len(BENCHMARKS), abs=1e-3)

    (world / "benchmarks" / "webtext.jsonl").unlink()  # a world written before webtext existed
    with pytest.raises(InputError, match="webtext") as err:
        load_benchmarks(world)
    assert "webtext.jsonl" in str(err.value)


def test_tax_intervals_are_paired_across_models():
    """B answers every item 0.25 better than A: each model's own interval is wide (the items
    differ), the difference's is the single value 0.25 (the same items are drawn for both)."""
    a = [0.0, 0.25, 0.5, 0.75] * 10
    items = {
        "SFT-small": {"reading": (a, [1.0] * 40), "webtext": (a, [3.0, 1.0] * 20)},
        "PPO-small": {"reading": ([x + 0.25 for x in a], [1.0] * 40), "webtext": (a, [3.0, 1.0] * 20)},
    }
    out = tax_keys(items, {"PPO-small": "SFT-small"}, seed=0)
    lo, hi = out["tax/SFT-small/reading_ci_low"], out["tax/SFT-small/reading_ci_high"]
    assert lo < out["tax/SFT-small/reading"] == 0.375 < hi and hi - lo > 0.1
    for key in ("", "_ci_low", "_ci_high"):
        assert out[f"tax_delta/PPO-small/reading{key}"] == pytest.approx(0.25)
    # webtext is over tokens: the weighted mean, and no difference where the items agree.
    assert out["tax/SFT-small/webtext"] == pytest.approx((3 * 0 + 0.25 + 3 * 0.5 + 0.75) / 8, abs=1e-4)
    assert out["tax_delta/PPO-small/webtext_ci_low"] == pytest.approx(0.0, abs=1e-12)
    assert out["tax_delta/PPO-small/webtext_ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert out["tax_delta/PPO-small/mean"] == pytest.approx(0.125)
    assert "tax_delta/SFT-small/mean" not in out
    assert tax_keys(items, {"PPO-small": "SFT-small"}, seed=0) == out  # seeded


def test_few_shot_puts_other_solved_items_first_and_fits_the_context(tmp_path):
    from rlhflab.eval.capability import TASKS, few_shot, solved

    world = tmp_path / "world"
    build(world, seed=1, scale="small", vocab_size=400)
    bench, tok = load_benchmarks(world, limit=6), load_tokenizer(world / "tokenizer")
    fs = few_shot(bench, 2, tok, n_pos=None)
    assert set(fs) == set(TASKS)  # webtext has no few-shot form
    for name in TASKS:
        for i, (item, shot) in enumerate(zip(bench[name], fs[name])):
            lines = shot["context"].split("\n")
            assert lines[-1] == item["context"] and len(lines) == 3
            assert lines[:2] == [solved(name, bench[name][(i + j) % 6]) for j in (1, 2)]  # never its own answer
            assert {k: v for k, v in shot.items() if k != "context"} == {
                k: v for k, v in item.items() if k != "context"
            }
    # The corpus's own form where the world wrote it, else context and answer.
    item = bench["arithmetic"][0]
    assert solved("arithmetic", item).startswith(item["context"]) and solved("arithmetic", item).endswith("animals.")
    plain = {k: v for k, v in item.items() if k != "solved"}
    assert solved("arithmetic", plain) == f"{item['context']} {item['answer']}"
    # A short context keeps the newest shots that fit, then none.
    one = len(tok(fs["reading"][0]["context"].split("\n", 1)[1])["input_ids"]) + 1 + 16
    tight = few_shot(bench, 2, tok, n_pos=one)["reading"][0]["context"]
    assert tight.split("\n") == fs["reading"][0]["context"].split("\n")[1:]
    assert few_shot(bench, 2, tok, n_pos=8)["reading"][0]["context"] == bench["reading"][0]["context"]
