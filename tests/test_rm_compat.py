"""A reward model other tools score the same: rlhflab's RM read by plain transformers, and
a plain transformers RM read by rlhflab (`rlhflab ppo`)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhflab import cli
from rlhflab.errors import InputError
from rlhflab.io import read_metrics
from rlhflab.models import (
    REWARD_BIAS_KEY,
    fold_reward_bias,
    hf_pad_token_id,
    load_reward_model,
    position_ids,
    reward_scores,
)
from rlhflab.stages import rm, rm_score
from rlhflab.stages.ppo import loop as ppo_loop
from rlhflab.stages.ppo import step as ppo
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.text import encode_query, encode_response, pad_left, pad_right

from tiny import demo_rows, gpt2_dir, llama_dir, make, ranking_rows, tiny_tokenizer, write_jsonl

TEXTS = [
    ("say cat", "cat ."),
    ("summarize this : birds fly south in winter", "birds fly"),
    ("yes", "no no no no no no no no"),
    ("name a color", "red blue green"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_compat")
    tok = tiny_tokenizer()
    return {
        "dir": d,
        "tok": tok,
        "gpt2": gpt2_dir(d / "gpt2", tok, n_positions=64),
        "llama": llama_dir(d / "llama", tok, max_positions=64),
        "ranks": write_jsonl(d / "ranks.jsonl", ranking_rows(8)),
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(10)),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(8)]),
    }


def sequences(tok) -> list[list[int]]:
    return [encode_query(tok, p) + encode_response(tok, r) for p, r in TEXTS]


def plain_hf(path) -> torch.nn.Module:
    """The RM as any other tool loads it: no rlhflab code in the way."""
    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def hf_scores(model, ids, mask, **kw) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, **kw).logits[:, 0]


def train_rm(world, out, base: str):
    cfg = make(
        rm.RMConfig,
        base=str(world[base]),
        rankings=str(world["ranks"]),
        demos=str(world["demos"]),
        out_dir=str(out),
        batch_size=4,
        lr=1e-3,
        device="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_dir, summary = rm.train(cfg)
    return out_dir, summary, [str(w.message) for w in caught if REWARD_BIAS_KEY in str(w.message)]


# --------------------------------------------------------------------------- rlhflab's RM in plain HF


def test_gpt2_rm_bias_is_folded_and_plain_hf_scores_as_rlhflab(world, tmp_path):
    out, summary, warned = train_rm(world, tmp_path / "rm", "gpt2")
    assert summary["bias"] != 0.0 and not warned
    assert json.loads((out / "config.json").read_text()).get(REWARD_BIAS_KEY, 0.0) == 0.0  # never counted twice
    ours, theirs, tok = load_reward_model(out).eval(), plain_hf(out), world["tok"]
    assert theirs.config.pad_token_id == tok.pad_token_id != tok.eos_token_id

    seqs = sequences(tok)
    ids, mask = pad_right(seqs, tok.pad_token_id)
    expected = torch.tensor(rm_score.score_sequences(ours, seqs, tok.pad_token_id))
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(ours, ids, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_scores(theirs, ids, mask), expected, atol=1e-5, rtol=0)
    # HF numbers positions 0.. whatever the mask says: left padding needs its position ids.
    left, left_mask = pad_left(seqs, tok.pad_token_id)
    left_scores = hf_scores(theirs, left, left_mask, position_ids=position_ids(left_mask))
    torch.testing.assert_close(left_scores, expected, atol=1e-5, rtol=0)

    # The demonstrations score mean 0 (§3.5) in the other tool too: it sees the bias.
    demos = [(d["prompt"], d["completion"]) for d in demo_rows(10)]
    demo_ids, demo_mask = pad_right([encode_query(tok, p) + encode_response(tok, c) for p, c in demos], 0)
    assert abs(float(hf_scores(theirs, demo_ids, demo_mask).mean())) < 1e-4


def test_llama_rm_keeps_the_bias_in_the_config_and_says_so(world, tmp_path):
    """RMSNorm without a bias and a bias-free head: no exact fold, so the key stays and a
    warning says other tools miss it; plain HF then scores rlhflab's score minus the key."""
    out, summary, warned = train_rm(world, tmp_path / "rm", "llama")
    assert len(warned) == 1
    bias = json.loads((out / "config.json").read_text())[REWARD_BIAS_KEY]
    assert bias == pytest.approx(summary["bias"]) and bias != 0.0

    tok, seqs = world["tok"], sequences(world["tok"])
    ids, mask = pad_right(seqs, tok.pad_token_id)
    expected = torch.tensor(rm_score.score_sequences(load_reward_model(out), seqs, tok.pad_token_id))
    torch.testing.assert_close(hf_scores(plain_hf(out), ids, mask) + bias, expected, atol=1e-5, rtol=0)


def test_fold_moves_an_older_rlhflab_rm_bias_into_the_weights(world, tmp_path):
    """An RM directory from an older rlhflab keeps its bias in the config: rlhflab scores it
    as before; folding (here with nothing added) moves it to the weights for other tools."""
    old = tmp_path / "old"
    model = load_reward_model(world["gpt2"])
    setattr(model.config, REWARD_BIAS_KEY, 0.75)
    model.save_pretrained(old)
    tok, seqs = world["tok"], sequences(world["tok"])
    ids, mask = pad_right(seqs, tok.pad_token_id)

    before = torch.tensor(rm_score.score_sequences(load_reward_model(old), seqs, tok.pad_token_id))
    torch.testing.assert_close(before, hf_scores(plain_hf(old), ids, mask) + 0.75, atol=1e-5, rtol=0)

    model = load_reward_model(old)
    ln_f = model.transformer.ln_f.bias.detach().clone()
    assert fold_reward_bias(model, 0.0) == "transformer.ln_f.bias"
    assert getattr(model.config, REWARD_BIAS_KEY) == 0.0 and not torch.equal(model.transformer.ln_f.bias, ln_f)
    model.save_pretrained(tmp_path / "new")
    after = torch.tensor(rm_score.score_sequences(load_reward_model(tmp_path / "new"), seqs, tok.pad_token_id))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_scores(plain_hf(tmp_path / "new"), ids, mask), before, atol=1e-5, rtol=0)


def test_a_head_with_its_own_bias_takes_the_fold_there(world):
    model = load_reward_model(world["gpt2"]).eval()
    head = torch.nn.Linear(model.score.in_features, 1, bias=True)
    head.weight.data.copy_(model.score.weight)
    head.bias.data.zero_()
    model.score = head
    ids, mask = pad_right(sequences(world["tok"]), world["tok"].pad_token_id)
    with torch.no_grad():
        before = reward_scores(model, ids, mask)
        assert fold_reward_bias(model, -1.5) == "score.bias"
        torch.testing.assert_close(reward_scores(model, ids, mask), before - 1.5, atol=1e-6, rtol=0)
    assert float(head.bias.detach()) == -1.5 and getattr(model.config, REWARD_BIAS_KEY) == 0.0


def test_pad_equal_to_eos_leaves_hf_no_pad_id_one_sequence_scores_the_same(world, tmp_path):
    """With eos reused as pad, HF's pooling (last token != pad) would skip the response's
    eos. The saved config has no pad id: HF reads the last token of one unpadded sequence
    (rlhflab's token) and refuses a padded batch rather than reading another one."""
    tok = copy.deepcopy(world["tok"])
    tok.pad_token = tok.eos_token
    assert hf_pad_token_id(tok) is None and hf_pad_token_id(world["tok"]) == world["tok"].pad_token_id
    model = load_reward_model(world["gpt2"])
    model.config.pad_token_id = hf_pad_token_id(tok)
    model.save_pretrained(tmp_path / "rm")
    ours, theirs = load_reward_model(tmp_path / "rm").eval(), plain_hf(tmp_path / "rm")
    seqs = sequences(tok)
    expected = rm_score.score_sequences(ours, seqs, tok.pad_token_id)
    alone = [float(hf_scores(theirs, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))) for s in seqs]
    assert alone == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="padding token"):
        hf_scores(theirs, *pad_right(seqs, tok.pad_token_id))
    theirs.config.pad_token_id = tok.eos_token_id  # what would go wrong with eos as pad
    s = seqs[0]
    wrong = float(hf_scores(theirs, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)))
    assert abs(wrong - expected[0]) > 1e-3


# --------------------------------------------------------------------------- a plain HF RM in rlhflab


@pytest.fixture(scope="module")
def hf_rm(world):
    """An RM as another tool leaves it: one-label AutoModelForSequenceClassification, trained a
    little with its own loss, `save_pretrained` + tokenizer, no rlhflab key in its config."""
    tok = world["tok"]
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(world["gpt2"], num_labels=1, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    ids, mask = pad_right(sequences(tok), tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):  # regress toward made-up targets: every weight moves off the LM's
        loss = (model(input_ids=ids, attention_mask=mask).logits[:, 0] - torch.arange(4.0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = world["dir"] / "hf_rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert REWARD_BIAS_KEY not in json.loads((path / "config.json").read_text())
    return path


def test_plain_hf_rm_scores_the_same_in_rlhflab(world, hf_rm):
    tok, seqs = world["tok"], sequences(world["tok"])
    ids, mask = pad_right(seqs, tok.pad_token_id)
    expected = hf_scores(plain_hf(hf_rm), ids, mask)
    ours = torch.tensor(rm_score.score_sequences(load_reward_model(hf_rm), seqs, tok.pad_token_id))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    # As `rlhflab ppo` opens it, on PPO's layout (queries left-padded, responses right-padded).
    cfg = make(PPOConfig, policy=str(world["gpt2"]), reward_model=str(hf_rm), prompts=str(world["prompts"]))
    run = ppo_loop.open_run(cfg)
    queries, responses = pad_left([encode_query(tok, p) for p, _ in TEXTS], tok.pad_token_id)
    resp, resp_mask = pad_right([encode_response(tok, r) for _, r in TEXTS], tok.pad_token_id)
    qr, am = torch.cat([queries, resp], 1), torch.cat([responses, resp_mask], 1)
    with torch.no_grad():
        theirs = hf_scores(plain_hf(hf_rm), qr, am, position_ids=position_ids(am))
        torch.testing.assert_close(ppo.score(run.reward_model, qr, am), theirs, atol=1e-5, rtol=0)


def test_plain_hf_rm_runs_through_rlhflab_ppo(world, hf_rm, tmp_path):
    out = tmp_path / "ppo"
    args = [
        "ppo",
        f"--policy={world['gpt2']}",
        f"--reward_model={hf_rm}",
        f"--prompts={world['prompts']}",
        "--batch_size=4",
        "--minibatch_size=4",
        "--total_episodes=8",  # two PPO steps
        "--max_new_tokens=4",
        "--run.device=cpu",
        f"--out_dir={out}",
    ]
    assert cli.main(args) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "objective/rm_score" in r]
    assert [r["step"] for r in rows][-1] == 2
    assert all(torch.isfinite(torch.tensor(r["objective/rm_score"])) for r in rows)
    assert (out / "policy" / "model.safetensors").is_file()


def test_a_classifier_with_several_labels_is_refused(world, tmp_path):
    path = tmp_path / "three"
    AutoModelForSequenceClassification.from_pretrained(world["gpt2"], num_labels=3).save_pretrained(path)
    cfg = make(PPOConfig, policy=str(world["gpt2"]), reward_model=str(path), prompts=str(world["prompts"]))
    with pytest.raises(InputError, match="3 labels") as e:
        ppo_loop.open_run(cfg)
    assert e.value.field == "reward_model"


def test_an_rm_whose_pad_is_eos_is_flagged(world, hf_rm, tmp_path):
    """Such an RM is pooled by transformers at the token before the eos, by rlhflab at the eos."""
    model = AutoModelForSequenceClassification.from_pretrained(hf_rm, local_files_only=True)
    model.config.pad_token_id = world["tok"].eos_token_id
    model.save_pretrained(tmp_path / "rm")
    cfg = make(PPOConfig, policy=str(world["gpt2"]), reward_model=str(tmp_path / "rm"), prompts=str(world["prompts"]))
    with pytest.warns(UserWarning, match="pad_token_id is the eos id"):
        ppo_loop.open_run(cfg)
