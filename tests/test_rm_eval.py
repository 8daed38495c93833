"""Reward-model report against the lab world: Spearman by hand, keys on a tiny run."""

from __future__ import annotations

import math

import pytest

from rlhflab.eval.rm_report import spearman


def test_spearman_matches_hand_computed_values():
    assert math.isclose(spearman([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    assert math.isclose(spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    # ranks a = 1,2,3,4 ; b = 2,1,4,3 -> d^2 sum = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert math.isclose(spearman([1, 2, 3, 4], [2, 1, 4, 3]), 0.6)
    # ties share their mean rank
    assert math.isclose(spearman([1, 1, 2], [1, 1, 2]), 1.0)


def test_within_prompt_spearman_averages_prompts_and_skips_constant_ones():
    from rlhflab.eval.rm_report import within_prompt_spearman

    agree, reverse, flat_rm = (
        ([1, 2, 3], [0.1, 0.5, 0.9]),
        ([1, 2, 3], [0.9, 0.5, 0.1]),
        ([2, 2, 2], [0, 1, 2]),
    )
    assert within_prompt_spearman([agree]) == pytest.approx(1.0)
    assert within_prompt_spearman([agree, agree, reverse]) == pytest.approx(1 / 3)
    assert within_prompt_spearman([agree, flat_rm]) == pytest.approx(1.0)  # no ranking: left out


# --------------------------------------------------------------------------- the one RM scoring function


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    import torch

    from rlhflab.models import load_reward_model

    from tiny import gpt2_dir, llama_dir, tiny_tokenizer

    d, tok = tmp_path_factory.mktemp("rm_scoring"), tiny_tokenizer()
    out = {"tok": tok}
    for arch, make_dir in (("gpt2", gpt2_dir), ("llama", llama_dir)):
        torch.manual_seed(0)
        out[arch] = load_reward_model(make_dir(d / arch, tok))  # context 128
        out[arch].config.pad_token_id = tok.pad_token_id
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_sequence_scores_the_same_alone_and_padded_in_a_batch(reward_models, arch):
    from rlhflab.stages.rm_score import score_sequences

    rm, tok = reward_models[arch].train(), reward_models["tok"]  # dropout must be off while scoring
    seqs = [
        tok("say cat")["input_ids"],
        tok("the cat sat on the mat . " * 6)["input_ids"],
        tok("one two three four " * 4)["input_ids"],
    ]
    assert len({len(s) for s in seqs}) == 3
    alone = [score_sequences(rm, [s], tok.pad_token_id)[0] for s in seqs]
    batched = score_sequences(rm, seqs, tok.pad_token_id, batch_size=3)
    assert batched == pytest.approx(alone, abs=1e-5)
    reversed_ = score_sequences(rm, seqs[::-1], tok.pad_token_id, batch_size=2)
    assert reversed_ == pytest.approx(alone[::-1], abs=1e-5)
    assert rm.training  # its mode is restored


def test_eval_and_the_rm_stage_score_with_one_function(reward_models):
    """evaluate's rm/<m> and best-of-n scores are the RM stage's scores, over-long pairs refused."""
    from rlhflab.errors import InputError
    from rlhflab.eval import evaluate
    from rlhflab.stages import rm as rm_stage
    from rlhflab.stages import rm_score

    assert rm_stage.score_sequences is rm_score.score_sequences  # its validation accuracy
    assert evaluate.score_pairs is rm_score.score_pairs
    assert evaluate.score_sequences is rm_score.score_sequences
    rm, tok = reward_models["gpt2"].eval(), reward_models["tok"]
    prompts, responses = ["say cat", "name a color"], ["cat .", "red blue green"]
    by_text = rm_score.score_pairs(rm, tok, prompts, responses, batch_size=1)
    seqs = [rm_score.encode_sequence(tok, p, r) for p, r in zip(prompts, responses)]
    by_tokens = rm_score.score_sequences(rm, seqs, tok.pad_token_id)
    assert by_text == pytest.approx(by_tokens, abs=1e-5)
    too_long = r"responses\[1\] is \d+ tokens, the reward model's context is 128"
    with pytest.raises(InputError, match=too_long) as e:
        rm_score.score_pairs(rm, tok, prompts, ["cat .", "cat " * 200])
    assert e.value.field == "responses"
