"""Reward model: K-wise loss, one batch element per prompt, padding-safe scores, demo centring."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.cli import main
from rlhflab.data import parse_ranking, read_demos, read_rankings
from rlhflab.models import fold_reward_bias, load_reward_model, load_tokenizer, reward_scores, scale_reward
from rlhflab.stages import rm, rm_score
from rlhflab.text import encode_query, encode_response, pad_left, pad_right

from tiny import demo_rows, gpt2_dir, llama_dir, make, ranking_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    tok = tiny_tokenizer()
    return {
        "dir": d,
        "tok": tok,
        "gpt2": gpt2_dir(d / "gpt2", tok),
        "llama": llama_dir(d / "llama", tok),
        "ranks": write_jsonl(d / "ranks.jsonl", ranking_rows(24)),
        "val": write_jsonl(d / "val.jsonl", ranking_rows(6)),
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(10)),
    }


def config(world, out, base="gpt2", **kw):
    kw = {"batch_size": 4, "lr": 1e-3, "demos": str(world["demos"]), "device": "cpu", **kw}
    return make(rm.RMConfig, base=str(world[base]), rankings=str(world["ranks"]), out_dir=str(out), **kw)


# --------------------------------------------------------------------------- the loss


def test_kwise_loss_equals_brute_force_over_pairs():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.5])
    ranking = parse_ranking({"prompt": "p", "responses": list("abcd"), "ranking": [2, 0, 3, 1]})
    pairs = ranking.pairs()
    assert sorted(pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)])
    brute = 0.0
    for better, worse in itertools.combinations([2, 0, 3, 1], 2):  # every C(4,2) pair once
        brute += math.log(1 / (1 + math.exp(-(scores[better] - scores[worse]).item())))
    assert rm.kwise_loss(scores, pairs).item() == pytest.approx(-brute / 6, abs=1e-6)

    # A tie (0 and 3 in one group) drops that pair; the mean is over the 5 left.
    tied = parse_ranking({"prompt": "p", "responses": list("abcd"), "ranking": [2, [0, 3], 1]})
    assert len(tied.pairs()) == 5 and (0, 3) not in tied.pairs()
    by_hand = -sum(math.log(torch.sigmoid(scores[w] - scores[lose]).item()) for w, lose in tied.pairs()) / 5
    assert rm.kwise_loss(scores, tied.pairs()).item() == pytest.approx(by_hand, abs=1e-6)


def test_one_prompt_is_one_batch_element_with_all_its_pairs(world):
    tok = world["tok"]
    rows = [
        parse_ranking(
            {
                "prompt": "name a color",
                "ranking": [3, 0, 2, 1],
                "responses": ["red", "blue", "green", "red red"],
            }
        ),
        parse_ranking({"prompt": "yes or no", "chosen": "yes", "rejected": "no"}),
    ]
    comparisons = rm.encode_rankings(tok, rows, "<test>", 128)
    batch = rm.collate(comparisons, tok.pad_token_id)
    assert batch.input_ids.shape[0] == 6  # K forward passes: 4 + 2 sequences
    assert batch.offsets == [0, 4] and batch.sizes == [4, 2]
    assert [len(p) for p in batch.pairs] == [6, 1]  # C(4,2) = 6 in ONE element, 1 for K = 2
    scores = torch.randn(6)
    loss, _ = rm.batch_loss(scores, batch)
    expected = (rm.kwise_loss(scores[:4], batch.pairs[0]) + rm.kwise_loss(scores[4:], batch.pairs[1])) / 2
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_do_not_depend_on_padding(world, arch):
    tok = world["tok"]
    model = load_reward_model(world[arch]).eval()
    texts = [
        ("say cat", "cat ."),
        ("summarize this : birds fly south in winter", "birds fly"),
        ("yes", "no no no no no no no no"),
    ]
    seqs = [encode_query(tok, p) + encode_response(tok, r) for p, r in texts]
    with torch.no_grad():
        alone = torch.cat([reward_scores(model, torch.tensor([s]), torch.ones(1, len(s)).long()) for s in seqs])
        right = reward_scores(model, *pad_right(seqs, tok.pad_token_id))
        left = reward_scores(model, *pad_left(seqs, tok.pad_token_id))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    batched = rm_score.score_pairs(model, tok, [p for p, _ in texts], [r for _, r in texts], batch_size=2)
    assert batched == pytest.approx(alone.tolist(), abs=1e-5)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch,precision", [("gpt2", "fp32"), ("llama", "fp32"), ("gpt2", "bf16")])
def test_rm_learns_changes_every_parameter_and_centres_demos(world, tmp_path, arch, precision):
    cfg = config(world, tmp_path / "out", base=arch, epochs=2, val_rankings=str(world["val"]), precision=precision)
    out, summary = rm.train(cfg)
    assert summary["steps"] == 2 * 6  # 24 prompts / 4 per batch, not 24 * 6 comparisons
    rows = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["rm/loss"] for r in rows if "rm/loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert summary["epochs"][-1]["val_accuracy"] > 0.8
    model, tok = load_reward_model(out), load_tokenizer(out)
    assert rm.pairwise_accuracy(model, tok, read_rankings(world["val"])) > 0.8
    # §3.5: after the bias, the demonstrations score mean 0.
    demos = read_demos(world["demos"])
    scores = rm_score.score_pairs(model, tok, [d.prompt for d in demos], [d.completion for d in demos])
    assert abs(sum(scores) / len(scores)) < 0.01
    assert summary["bias"] != 0.0
    # Every trainable parameter moved (the head is fresh, so compare the backbone to the SFT).
    after = load_file(str(out / "model.safetensors"))
    before = load_reward_model(world[arch]).state_dict()
    backbone = [k for k in after if not k.startswith("score.")]
    assert backbone and all(not torch.equal(before[k], after[k]) for k in backbone)
    assert "score.weight" in after


def _samples(n: int = 8) -> list[dict]:
    """Policy samples as `rlhflab sample` writes them: a prompt and its responses, no ranking."""
    words = "red blue green cat dog".split()
    return [{"prompt": f"name a color {i}", "responses": words[: 2 + i % 4]} for i in range(n)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # the bias in ln_f, and in the config
def test_rm_scales_policy_samples_to_reward_std_then_centres_demos(world, tmp_path, arch):
    samples = write_jsonl(tmp_path / "samples.jsonl", _samples())
    cfg = config(world, tmp_path / "out", base=arch, policy_samples=str(samples), reward_std=1.0)
    with pytest.warns(UserWarning) if arch == "llama" else contextlib.nullcontext():
        out, summary = rm.train(cfg)
    model, tok = load_reward_model(out), load_tokenizer(out)
    rows = [(r["prompt"], x) for r in _samples() for x in r["responses"]]
    scores = rm_score.score_pairs(model, tok, [p for p, _ in rows], [x for _, x in rows])
    scores = torch.tensor(scores, dtype=torch.float64)
    # The gain first (openai/lm-human-preferences: the initial policy's samples at std 1) ...
    assert float(scores.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    assert summary["gain"] == pytest.approx(1.0 / summary["rm/sample_std_before"])
    assert summary["gain"] != pytest.approx(1.0, abs=1e-3)
    # ... then the bias (§3.5): the demonstrations at mean 0; the samples' mean is reported.
    demos = read_demos(world["demos"])
    demo_scores = rm_score.score_pairs(model, tok, [d.prompt for d in demos], [d.completion for d in demos])
    assert sum(demo_scores) / len(demo_scores) == pytest.approx(0.0, abs=1e-4)
    assert summary["rm/sample_mean"] == pytest.approx(float(scores.mean()), abs=1e-4)


def test_scale_reward_multiplies_every_score_wherever_the_bias_went(world):
    tok = load_tokenizer(world["gpt2"])
    ids, mask = pad_right([[5, 6, 7, 8], [9, 10]], tok.pad_token_id)
    for arch in ("gpt2", "llama"):
        model = load_reward_model(world[arch]).eval()
        torch.nn.init.normal_(model.score.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # llama: the bias stays in the config
            fold_reward_bias(model, 0.7)
        before = reward_scores(model, ids, mask)
        scale_reward(model, -2.5)
        torch.testing.assert_close(reward_scores(model, ids, mask), -2.5 * before, atol=1e-5, rtol=1e-5)


def test_bad_policy_samples_are_refused_before_anything_is_written(world, tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", _samples(2) + [{"prompt": "x", "responses": ["ok", 3]}])
    out = tmp_path / "out"
    rc = main(
        [
            "rm",
            f"--base={world['gpt2']}",
            f"--rankings={world['ranks']}",
            f"--policy_samples={samples}",
            f"--out_dir={out}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{samples}:3:" in err and "field 'responses[1]'" in err
    assert not out.exists()


def test_resume_after_interrupt_gives_identical_weights(world, tmp_path):
    ref, _ = rm.train(config(world, tmp_path / "ref", epochs=2, micro_batch_size=2))

    def interrupt(step, row):
        if step == 8:
            raise KeyboardInterrupt

    cfg = config(world, tmp_path / "run", epochs=2, save_every=5, micro_batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        rm.train(cfg, callback=interrupt)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 6
    out, _ = rm.train(cfg)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    bias = [json.loads((d / "config.json").read_text())["rlhflab_reward_bias"] for d in (ref, out)]
    assert bias[0] == bias[1]


# --------------------------------------------------------------------------- the command


def _ranking(**kw):
    return {"prompt": "name a color", "responses": ["red", "blue", "green"], "ranking": [0, 1, 2], **kw}


@pytest.mark.parametrize(
    "row, field",
    [
        (_ranking(ranking=[0, 1, 3]), "ranking"),  # out of range
        (_ranking(ranking=[0, 0, 1]), "ranking"),  # repeated
        (_ranking(responses=["red"], ranking=[0]), "responses"),  # K < 2
        (_ranking(responses=["red", "", "green"]), "responses[1]"),  # empty response
        (_ranking(prompt="red " * 200), "prompt"),  # longer than the context
        (_ranking(responses=["red", "blue " * 200, "green"]), "responses[1]"),
        ({"prompt": "yes or no", "chosen": "yes"}, "rejected"),
    ],
)
def test_bad_rankings_are_refused_before_anything_is_written(world, tmp_path, capsys, row, field):
    data = write_jsonl(tmp_path / "bad.jsonl", ranking_rows(2) + [row])
    out = tmp_path / "out"
    rc = main(["rm", f"--base={world['gpt2']}", f"--rankings={data}", f"--out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert f"{data}:3:" in err and f"field '{field}'" in err
    assert not out.exists()


def test_bad_demos_are_refused_too(world, tmp_path, capsys):
    demos = write_jsonl(tmp_path / "demos.jsonl", demo_rows(2) + [{"prompt": "x", "completion": "y " * 300}])
    rc = main(
        [
            "rm",
            f"--base={world['gpt2']}",
            f"--rankings={world['ranks']}",
            f"--demos={demos}",
            f"--out_dir={tmp_path / 'out'}",
        ]
    )
    assert rc == 2 and f"{demos}:3:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rm", "--help-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "epochs = 1" in text and "demos" in text
