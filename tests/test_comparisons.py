"""Comparison data from the policy's own samples: the labeler-agreement ceiling."""

from __future__ import annotations

from rlhflab.stages.comparisons import agreement


def test_agreement_counts_untied_pairs_across_rows():
    same = [{"ranking": [0, 1, 2]}, {"ranking": [1, 0]}]
    assert agreement(same, same) == 1.0
    assert agreement(same, [{"ranking": [2, 1, 0]}, {"ranking": [0, 1]}]) == 0.0
    # pairs (0,1) and (0,2) agree, (1,2) flips; a tie group drops its pairs
    assert agreement([{"ranking": [0, 1, 2]}], [{"ranking": [0, 2, 1]}]) == round(2 / 3, 4)
    assert agreement([{"ranking": [0, 1, 2]}], [{"ranking": [[0, 1], 2]}]) == 1.0


def test_training_prompts_dealt_between_two_policies_validation_stays_the_first(tmp_path):
    """comparisons_from = [small, large]: the training prompts go to the policies in turn, each
    sampling its own; the validation samples (the RM's gain is set on them) stay the first's."""
    import json

    from rlhflab.models import load_tokenizer
    from rlhflab.stages.comparisons import build
    from rlhflab.stages.sample import SampleConfig
    from rlhflab.world.build import build as build_world

    from tiny import gpt2_dir

    world = tmp_path / "world"
    build_world(world, 0, "small")
    tok = load_tokenizer(world / "tokenizer")
    a, b = gpt2_dir(tmp_path / "a", tok, seed=1), gpt2_dir(tmp_path / "b", tok, seed=2)
    cfg = SampleConfig(max_new_tokens=6, k_max=4)
    out = tmp_path / "cmp"
    summary = build(world, a, out, cfg, seed=0, also_train=(b,))
    prompts = [json.loads(x)["prompt"] for x in (world / "rm_train.jsonl").read_text().splitlines()]
    rows = lambda f: [json.loads(x) for x in (out / f).read_text().splitlines()]
    parts = [rows("train_samples_p0.jsonl"), rows("train_samples_p1.jsonl")]
    assert [r["prompt"] for r in parts[0]] == prompts[0::2] and [r["prompt"] for r in parts[1]] == prompts[1::2]
    assert rows("train_samples.jsonl") == parts[0] + parts[1]
    assert len(rows("train.jsonl")) == len(prompts)  # every training prompt ranked once
    assert summary["train_policies"] == [str(a), str(b)]
    assert any(k.startswith("train/p0/") for k in summary) and any(k.startswith("train/p1/") for k in summary)
    # validation: the first policy's alone, the same as without a second one
    build(world, a, tmp_path / "alone", cfg, seed=0)
    assert rows("val_samples.jsonl") == [json.loads(x) for x in (tmp_path / "alone" / "val_samples.jsonl").open()]
    # part 1 is b's: the same prompts and seed sampled from a instead give other answers
    build(world, a, tmp_path / "aa", cfg, seed=0, also_train=(a,))
    aa = [json.loads(x) for x in (tmp_path / "aa" / "train_samples_p1.jsonl").open()]
    assert [r["prompt"] for r in aa] == prompts[1::2]
    assert [r["responses"] for r in aa] != [r["responses"] for r in parts[1]]
