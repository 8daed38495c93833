"""Sampling for labeling: K = k_min..k_max non-empty responses per prompt, rankable JSONL."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhflab.cli import main
from rlhflab.data import parse_ranking
from rlhflab.errors import TrainingError
from rlhflab.generation import Responses
from rlhflab.stages import sample

from tiny import gpt2_dir, llama_dir, make, tiny_tokenizer, write_jsonl

os.environ["RLHFLAB_QUIET"] = "1"

PROMPTS = [
    "say cat",
    "name a color",
    "summarize this : birds fly south in winter",
    "yes or no",
    "one two three",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    tok = tiny_tokenizer()
    return {
        "gpt2": gpt2_dir(d / "gpt2", tok),
        "llama": llama_dir(d / "llama", tok),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
    }


def config(world, out, policy="gpt2", **kw):
    kw = {"max_new_tokens": 12, "batch_size": 7, "device": "cpu", **kw}
    return make(sample.SampleConfig, policy=str(world[policy]), prompts=str(world["prompts"]), out=str(out), **kw)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_k_responses_per_prompt_ready_to_rank(world, tmp_path, arch):
    path, metrics = sample.run(config(world, tmp_path / "s.jsonl", policy=arch))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    ks = torch.randint(4, 10, (len(PROMPTS),), generator=torch.Generator().manual_seed(0)).tolist()
    assert [len(r["responses"]) for r in rows] == ks  # K drawn per prompt, seeded
    assert metrics["sample/responses"] == sum(ks)
    for r in rows:
        assert set(r) == {"prompt", "responses"}
        assert all(isinstance(t, str) and t.strip() for t in r["responses"])
        # Ready for labelers: any ordering of its responses is a valid ranking row.
        parse_ranking({**r, "ranking": list(range(len(r["responses"])))[::-1]})


def test_sampling_is_seeded(world, tmp_path):
    a, _ = sample.run(config(world, tmp_path / "a.jsonl", k_min=2, k_max=3))
    b, _ = sample.run(config(world, tmp_path / "b.jsonl", k_min=2, k_max=3))
    c, _ = sample.run(config(world, tmp_path / "c.jsonl", k_min=2, k_max=3, seed=1))
    assert a.read_text() == b.read_text() != c.read_text()


def test_cli_and_refusals(world, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "sample",
                f"--policy={world['gpt2']}",
                f"--prompts={world['prompts']}",
                f"--out={out}",
                "--max_new_tokens=8",
                "--k_min=2",
                "--k_max=2",
            ]
        )
        == 0
    )
    assert all(len(json.loads(x)["responses"]) == 2 for x in out.read_text().splitlines())
    capsys.readouterr()
    # A prompt that leaves no room for max_new_tokens in the context (128) is refused.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "cat " * 120}])
    out2 = tmp_path / "s2.jsonl"
    rc = main(["sample", f"--policy={world['gpt2']}", f"--prompts={bad}", f"--out={out2}", "--max_new_tokens=16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{bad}:2:" in err and "field 'prompt'" in err and not out2.exists()
    rc = main(["sample", f"--policy={world['gpt2']}", f"--prompts={bad}", f"--out={out2}", "--k_min=1"])
    assert rc == 2 and "k_min" in capsys.readouterr().err


def test_empty_responses_are_resampled_or_dropped(world, tmp_path, monkeypatch):
    real = sample.generate
    calls = []

    def flaky(model, tokenizer, queries, **kw):  # the first pass answers every other one with ""
        out = real(model, tokenizer, queries, **kw)
        calls.append(len(queries))
        if len(calls) == 1:
            out.texts = [t if i % 2 else "" for i, t in enumerate(out.texts)]
        return out

    monkeypatch.setattr(sample, "generate", flaky)
    path, metrics = sample.run(config(world, tmp_path / "s.jsonl", k_min=2, k_max=2))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    # the first pass in seeded chunks of batch_size (7 + 3 of the 10), the first chunk's
    # every other answer blanked; then one retry of exactly those 4
    assert calls == [7, 3, 4] and metrics["sample/dropped_empty"] == 0
    assert all(len(r["responses"]) == 2 and all(t.strip() for t in r["responses"]) for r in rows)

    def silent(model, tokenizer, queries, **kw):
        n = len(queries)
        return Responses(list(queries), [""] * n, [[] for _ in range(n)], [True] * n)

    monkeypatch.setattr(sample, "generate", silent)
    out = tmp_path / "never.jsonl"
    with pytest.raises(TrainingError, match="two non-empty"):
        sample.run(config(world, out, k_min=2, k_max=2, retries=2))
    assert not out.exists()


def test_categorical_draws_follow_the_probabilities_and_never_a_zero():
    from rlhflab.generation import categorical

    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]).expand(100_000, 7).contiguous()
    g = torch.Generator().manual_seed(0)
    draws = categorical(probs, g)
    freq = torch.bincount(draws, minlength=7).double() / len(draws)
    assert freq[[0, 2, 6]].sum() == 0  # zero-probability tokens, first and last included
    # 5 standard errors of a binomial proportion at 100k draws is <= 0.008.
    assert torch.allclose(freq, probs[0].double(), atol=0.008), freq
    assert torch.equal(categorical(probs, torch.Generator().manual_seed(0)), draws)  # seeded
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), torch.tensor([0, 4, 2])] = 1
    assert categorical(one_hot).tolist() == [0, 4, 2]
    unnormalized = categorical(torch.tensor([2.0, 0.0, 6.0]).expand(40_000, 3).contiguous(), g)
    assert abs(float((unnormalized == 2).double().mean()) - 0.75) < 0.01 and not bool((unnormalized == 1).any())
