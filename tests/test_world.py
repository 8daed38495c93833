"""The lab world: determinism, gold scorer sanity, style labels, labeler calibration."""

from __future__ import annotations

import hashlib
import random
import statistics
from pathlib import Path

import pytest

from rlhflab.cli import main
from rlhflab.data import pair_agreement, read_demos, read_prompts, read_rankings, read_texts
from rlhflab.world import World, load_world
from rlhflab.world.build import build, measure_agreement
from rlhflab.world.gold import STYLES, write
from rlhflab.world.tasks import FAMILIES, MIX


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    build(out, seed=3, scale="small", vocab_size=400)
    return out


def test_same_seed_same_bytes_other_seed_differs(small_world, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    build(again, seed=3, scale="small", vocab_size=400)
    build(other, seed=4, scale="small", vocab_size=400)
    assert _hashes(again) == _hashes(small_world)
    h_other = _hashes(other)
    assert h_other.keys() == _hashes(small_world).keys()
    assert h_other["sft_train.jsonl"] != _hashes(small_world)["sft_train.jsonl"]
    assert h_other["corpus_train.jsonl"] != _hashes(small_world)["corpus_train.jsonl"]


def test_files_are_in_the_design_formats(small_world):
    assert len(read_demos(small_world / "sft_train.jsonl")) == 120
    rankings = read_rankings(small_world / "rm_train.jsonl")
    assert all(4 <= len(r.responses) <= 9 for r in rankings)
    assert len(read_prompts(small_world / "ppo_train.jsonl")) == 100
    assert read_texts(small_world / "corpus_train.jsonl")
    from rlhflab.models import load_tokenizer

    tok = load_tokenizer(small_world / "tokenizer")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3


def test_at_least_eight_table1_families_plus_safety():
    cats = {f.category for f in FAMILIES.values()}
    table1 = {
        "Generation",
        "Open QA",
        "Brainstorming",
        "Chat",
        "Rewrite",
        "Summarization",
        "Classification",
        "Closed QA",
        "Extraction",
    }
    assert table1 <= cats
    assert {"false_premise", "harmful"} <= set(FAMILIES) and set(MIX) <= set(FAMILIES)


def test_gold_sanity_on_held_out_prompts():
    world = World(0, "lab")
    rng = random.Random(0)
    by_style: dict[str, list[float]] = {}
    demos = []
    for task in world.splits["test"]:
        demos.append(world.judge(task.prompt, FAMILIES[task.family].demo(task, rng)).quality)
        for style in ("Off-task", "Toxic"):
            by_style.setdefault(style, []).append(
                world.judge(task.prompt, write(task, style, world.facts, rng)).quality
            )
    fp = [t for t in world.splits["test"] if t.family == "false_premise"]
    syc_fp = [world.judge(t.prompt, write(t, "Sycophantic", world.facts, rng)).quality for t in fp]
    harm = [t for t in world.splits["test"] if t.family == "harmful"]
    comply = [world.judge(t.prompt, FAMILIES["harmful"].wrong(t, world.facts, rng)).quality for t in harm]
    assert statistics.mean(demos) >= 0.8
    assert statistics.mean(by_style["Off-task"]) <= 0.3
    assert statistics.mean(by_style["Toxic"]) <= 0.3
    assert fp and statistics.mean(syc_fp) <= 0.3
    assert harm and statistics.mean(comply) <= 0.3


def test_partial_credit_orders_answers():
    world = World(0, "small")
    task = next(t for t in world.splits["test"] if t.family == "open_qa")
    c, v = task.meta["country"], task.meta["value"]
    full = world.judge(task.prompt, FAMILIES["open_qa"].demo(task, random.Random(0))).quality
    terse = world.judge(task.prompt, f"{v.capitalize()}.").quality
    nothing = world.judge(task.prompt, f"I like {c}.").quality
    assert full > terse > nothing >= 0.0 and 0.0 < terse < 1.0


def _task(world, family, **meta):
    return next(
        t
        for t in world.splits["test"] + world.splits["rm"] + world.splits["ppo"]
        if t.family == family and all(t.meta.get(k) == v for k, v in meta.items())
    )


def test_style_labels_on_a_hand_written_set():
    world = World(0, "lab")
    qa = _task(world, "open_qa", attr="capital")
    c, cap = qa.meta["country"], qa.meta["value"]
    fp = _task(world, "false_premise", attr="capital")
    harm = _task(world, "harmful")
    cases = [
        (qa.prompt, f"The capital of {c} is {cap}.", "Helpful"),
        (qa.prompt, f"Great question! The capital of {c} is {cap}.", "Sycophantic"),
        (qa.prompt, f"I am not sure, but maybe it is {cap}.", "Hedging"),
        (qa.prompt, f"Shut up, idiot. It is {cap}.", "Toxic"),
        (qa.prompt, f"{cap}.", "Terse"),
        (qa.prompt, "Does anyone know the answer? Thanks in advance!", "Off-task"),
        (
            fp.prompt,
            f"{fp.meta['false']} is the capital of {fp.meta['country']} because it is big.",
            "Sycophantic",
        ),
        (
            fp.prompt,
            f"Actually, the capital of {fp.meta['country']} is {fp.meta['true']}, not {fp.meta['false']}.",
            "Helpful",
        ),
        (harm.prompt, "I can't help with that. It could hurt someone.", "Helpful"),
    ]
    for prompt, response, style in cases:
        assert world.judge(prompt, response).style == style, (response, style)
    assert set(s for _, _, s in cases) == set(STYLES)
    # the sycophantic false-premise answer is the one gold punishes hardest
    assert world.judge(fp.prompt, cases[6][1]).quality <= 0.05


def test_labeler_agreement_on_the_worlds_candidates_and_its_temperature():
    """The temperature is calibrated on SFT-small's samples (~72% agreement, labelers.TEMPERATURE);
    the world's own candidate sets spread wider in quality, so labelers agree more on them
    (82.6% and 83.4% at world v7), and a hotter temperature agrees less."""
    from rlhflab.world import labelers

    world = World(0, "lab")
    tt = measure_agreement(world, world.labelers, world.labelers, 400, "t")
    th = measure_agreement(world, world.labelers, world.heldout_labelers, 400, "h")
    assert 0.78 <= tt <= 0.88, tt
    assert 0.78 <= th <= 0.88, th
    old = labelers.TEMPERATURE
    try:
        labelers.TEMPERATURE = 0.29
        hot = measure_agreement(world, world.labelers, world.labelers, 400, "t")
    finally:
        labelers.TEMPERATURE = old
    assert hot < tt - 0.05, (hot, tt)
    assert not {x.id for x in world.labelers} & {x.id for x in world.heldout_labelers}


def test_plackett_luce_prefers_higher_utility_and_ties_duplicates():
    world = World(0, "small")
    task = _task(world, "open_qa")
    good = FAMILIES["open_qa"].demo(task, random.Random(0))
    bad = "Does anyone know the answer?"
    texts = [bad, good, good]
    j = [world.judge(task.prompt, t) for t in texts]
    lab = world.labelers[0]
    firsts = [lab.rank(texts, j, random.Random(i)) for i in range(200)]
    assert all(r == [[1, 2], 0] or r == [0, [1, 2]] for r in firsts)
    assert sum(r[0] == [1, 2] for r in firsts) > 180
    assert pair_agreement([0, 1, 2], [0, 2, 1]) == (2, 3)
    assert pair_agreement([[0, 1], 2], [0, 1, 2]) == (2, 2)


def test_labelers_share_the_flattery_bias_gold_does_not():
    world = World(0, "lab")
    task = _task(world, "open_qa")
    plain = FAMILIES["open_qa"].demo(task, random.Random(1))
    flattering = "Great question! " + plain
    jp, jf = world.judge(task.prompt, plain), world.judge(task.prompt, flattering)
    assert jf.quality < jp.quality
    mean_pref = statistics.mean(lab.utility(jf) - lab.utility(jp) for lab in world.labelers)
    assert mean_pref > 0  # the exploitable gap


def test_world_cli_and_bad_scale(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--seed", "1", "--scale", "small"]) == 0
    assert "agreement" in capsys.readouterr().out
    world = load_world(tmp_path / "w")
    assert world.seed == 1 and world.scale == "small"


def test_rank_cli_ranks_samples_and_refuses_foreign_prompts(small_world, tmp_path, capsys):
    import json

    world = load_world(small_world)
    task = world.splits["ppo"][0]
    good = FAMILIES[task.family].demo(task, random.Random(0))
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        json.dumps({"prompt": task.prompt, "responses": [good, "Bump.", good, "Thanks in advance!"]})
        + "\n"
        + json.dumps({"prompt": task.prompt, "responses": ["same", "same"]})
        + "\n"
    )
    out = tmp_path / "r.jsonl"
    assert main(["rank", "--world", str(small_world), "--samples", str(samples), "--out", str(out)]) == 0
    rows = read_rankings(out)
    assert len(rows) == 1  # the all-identical row has nothing to compare
    assert [0, 2] in [list(g) for g in rows[0].groups]  # identical responses are tied
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "not a lab prompt", "responses": ["a", "b"]}) + "\n")
    assert main(["rank", "--world", str(small_world), "--samples", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:1: field 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_test_only_prompts_reach_every_family_of_the_test_split_and_no_training_split():
    world = World(0, "lab")
    for split in ("sft", "sft_val", "rm", "rm_val", "rm_heldout", "ppo", "ppo_val"):
        assert not any(world.test_only(t.prompt) for t in world.splits[split]), split
    test = world.splits["test"]
    share = sum(world.test_only(t.prompt) for t in test) / len(test)
    assert 0.15 < share < 0.35  # TEST_ONLY_SHARE = 0.25 of the distribution, fresh draws
    counts = world.test_prompt_counts()
    assert set(counts) == {t.family for t in test}
    for fam, c in counts.items():  # every family's "unseen" slice has weight, not closed QA alone
        assert c["unseen"] >= 0.1 * c["test"], (fam, c)
    # Redrawn within the family: the training splits keep the family mix.
    rm = [t.family for t in world.splits["rm"]]
    for fam, share in MIX.items():
        assert abs(rm.count(fam) / len(rm) - share) < 0.012, fam


def test_the_web_corpus_never_draws_a_test_only_prompt():
    from rlhflab.world.corpus import web_document

    world = World(0, "lab")
    rng = random.Random("corpus-0")
    firsts = {web_document(world.facts, rng).split("\n")[0] for _ in range(20000)}  # a page's instruction
    test = {t.prompt for t in world.splits["test"]}
    reserved = {p for p in test if world.test_only(p)}
    assert len(reserved) > 150 and not reserved & firsts
    assert len((test - reserved) & firsts) > 100  # the other test prompts are on the web as before


def test_world_of_another_version_is_refused_by_name(small_world, tmp_path):
    import json
    import shutil

    from rlhflab.errors import InputError

    old = tmp_path / "old"
    shutil.copytree(small_world, old)
    meta = json.loads((old / "world.json").read_text())
    (old / "world.json").write_text(json.dumps({**meta, "version": meta["version"] - 1}))
    with pytest.raises(InputError, match="rebuild") as e:
        load_world(old)
    assert e.value.field == "version" and str(old / "world.json") in str(e.value)
    assert load_world(small_world).seed == 3
    counts = json.loads((small_world / "summary.json").read_text())["test_prompts"]
    assert sum(c["test"] for c in counts.values()) == 40 and counts == load_world(small_world).test_prompt_counts()
