"""Evaluation: the over-optimization fits, win rates, and a whole `rlhflab eval` on tiny models."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.errors import ConfigError
from rlhflab.eval import config as config_module
from rlhflab.eval.answering import _prefix_for, answer_stage, answers_key, build_queries
from rlhflab.eval.config import EvalConfig
from rlhflab.eval.evaluate import evaluate
from rlhflab.eval.judging import compare, wilson, win_rate
from rlhflab.eval.overopt import best_of_n_kl, fit_best_of_n, fit_rl, rl_curve
from rlhflab.eval.prompted import candidate_shots, choose_prefix, shot_pieces
from rlhflab.models import context_length, lab_model, load_causal_lm, load_tokenizer
from rlhflab.pipeline.config import RunConfig
from rlhflab.text import encode_query
from rlhflab.world import World, load_world
from rlhflab.world.build import build
from rlhflab.world.gold import STYLES

# --------------------------------------------------------------------------- pure helpers


def test_fit_best_of_n_recovers_alpha_beta():
    d = np.linspace(0, 3, 25)
    fit = fit_best_of_n(d, d * (0.7 - 0.3 * d))
    assert fit["alpha"] == pytest.approx(0.7, abs=1e-9) and fit["beta"] == pytest.approx(0.3, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    noisy = d * (0.7 - 0.3 * d) + np.random.default_rng(0).normal(0, 0.02, d.shape)
    fit = fit_best_of_n(d, noisy)
    assert fit["alpha"] == pytest.approx(0.7, abs=0.05) and 0.9 < fit["r2"] < 1.0


def test_fit_rl_recovers_alpha_beta():
    d = np.linspace(0, 6, 30)
    y = d * (0.5 - 0.2 * np.log(np.where(d > 0, d, 1)))
    fit = fit_rl(d, y)
    assert (fit["alpha"], fit["beta"]) == (pytest.approx(0.5, abs=1e-9), pytest.approx(0.2, abs=1e-9))
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    assert all(best_of_n_kl(n) < best_of_n_kl(n + 1) for n in range(1, 50))


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_win_rate_against_itself_is_a_half():
    world = World(0, "small")
    tasks = world.splits["test"] + world.splits["rm"] + world.splits["ppo"]
    rng = random.Random(1)

    def answers():  # one draw of the same answer distribution per prompt
        texts = [world.candidates(t, 1, rng)[0] for t in tasks]
        return [(x, world.judge(t.prompt, x)) for t, x in zip(tasks, texts)]

    a, b = answers(), answers()
    by_labelers, by_gold = compare(world, a, b, "self")
    for outcomes in (by_labelers, by_gold):
        rate, lo, hi = win_rate(outcomes)
        assert abs(rate - 0.5) < 0.08 and lo < 0.5 < hi
    same, _ = compare(world, a, a, "same")  # identical answers: every comparison is a tie
    assert win_rate(same)[0] == 0.5


def test_rl_curve_tolerates_missing_keys():
    rows = [
        {"step": 0, "eval/gold": 0.4, "eval/rm_score": 0.0},  # the SFT policy: KL 0
        {"step": 1, "objective/kl": 0.5},  # no eval: skipped
        {"step": 2, "objective/kl": -0.01, "eval/gold": 0.5},  # negative estimate clamps to 0
        {"step": 3, "objective/kl": 2.0, "eval/kl": 4.0, "eval/rm_score": 1.0},
        {"eval/gold": 0.3},
    ]  # no KL at all: skipped
    pts = rl_curve(rows)
    assert [p["step"] for p in pts] == [0, 2, 3]
    assert [p["d"] for p in pts] == [0.0, 0.0, 2.0]  # eval/kl preferred over objective/kl
    assert pts[2]["gold"] is None and pts[1]["rm"] is None


# --------------------------------------------------------------------------- a whole eval


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this tiny run ~10x faster on one thread than on two when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build(root / "world", 0, "small", vocab_size=400)
    tok = load_tokenizer(root / "world" / "tokenizer")
    models = {}
    for i, name in enumerate(["GPT-small", "SFT-small", "PPO-ptx-small", "rm"]):
        lab_model("small", tok, n_positions=128, seed=i).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        models[name] = str(root / name)
    rm = models.pop("rm")
    cfg = {
        "world": str(root / "world"),
        "models": models,
        "prompted": ["GPT-small"],
        "baseline": "SFT-small",
        "reward_model": rm,
        "n_prompts": 6,
        "max_new_tokens": 12,
        "capability_items": 4,
        "best_of_n": [1, 2, 4, 8],
        "best_of_n_prompts": 4,
        "run": {"device": "cpu"},
        "out_dir": str(root / "out1"),
        "head_to_head": ["PPO-ptx-small:GPT-prompted-small", "SFT-small:SFT-small"],
        "capability_models": {"PPO-beta0-small": models["GPT-small"]},  # GPT-small's weights again
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg))
    return root, tok


def test_a_few_shot_prefix_and_its_prompt_make_one_document(lab):
    root, tok = lab
    demos = [json.loads(x) for x in (root / "world" / "sft_train.jsonl").read_text().splitlines()]
    (shots,) = candidate_shots(demos, k=3, n=1, seed=0)
    assert len({d["family"] for d in shots}) == 3  # distinct families
    prefix = shot_pieces(tok, shots)
    specials = {tok.bos_token_id, tok.eos_token_id}
    assert len(prefix) == 3 and not any(t in specials for p in prefix for t in p)
    plain = encode_query(tok, "Name a fruit.")
    q = build_queries(tok, ["Name a fruit."], n_pos=256, max_new_tokens=8, prefix=prefix)[0]
    assert q == [tok.bos_token_id] + prefix[0] + prefix[1] + prefix[2] + plain[1:]  # one bos, the prompt last
    assert tok.decode(q[1:]).startswith(shots[0]["prompt"] + "\n" + shots[0]["completion"] + "\n\n")
    short = build_queries(tok, ["Name a fruit."], n_pos=len(q) + 7, max_new_tokens=8, prefix=prefix)[0]
    assert short == [tok.bos_token_id] + prefix[1] + prefix[2] + plain[1:]  # the oldest whole shot dropped
    assert build_queries(tok, ["Name a fruit."], n_pos=len(plain) + 8, max_new_tokens=8, prefix=prefix)[0] == plain


def test_the_prefix_the_reward_model_scores_highest_is_kept(lab):
    root, tok = lab
    demos = [json.loads(x) for x in (root / "world" / "sft_train.jsonl").read_text().splitlines()]
    cands = candidate_shots(demos, k=2, n=5, seed=3)
    assert len({tuple(d["prompt"] for d in c) for c in cands}) > 1  # the draws differ

    def answer_fn(prefix, prompts):  # an "answer" that tells which prefix made it
        return [str(sum(map(len, prefix)))] * len(prompts)

    def score_fn(prompts, answers):  # the RM of this test likes long prefixes
        return [float(a) for a in answers]

    pieces, shots, means = choose_prefix(answer_fn, score_fn, tok, demos, ["p1", "p2"], k=2, n=5, seed=3)
    lengths = [sum(map(len, shot_pieces(tok, c))) for c in cands]
    assert means == [float(n) for n in lengths] and shots == cands[lengths.index(max(lengths))]
    assert pieces == shot_pieces(tok, shots)
    first = choose_prefix(answer_fn, None, tok, demos, ["p1"], k=2, n=5, seed=3)  # no RM: the first draw
    assert first[1] == cands[0] and first[2] == []


def test_the_prefix_loop_of_the_docs_runs_and_scores_the_evals_candidates(lab, tmp_path, monkeypatch, capsys):
    """docs/evaluation.md's loop over candidate prefixes runs as printed on a run's layout, and
    its first four candidates get the RM scores the eval chose GPT-prompted-small's prefix by."""
    root, tok = lab
    run = tmp_path / "runs" / "lab"
    for link, target in (("world", "world"), ("pretrain-small/model", "GPT-small"), ("rm/model", "rm")):
        (run / link).parent.mkdir(parents=True, exist_ok=True)
        (run / link).symlink_to(root / target)
    (code,) = re.findall(
        r"```python\n(.*?)```", (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text(), re.S
    )
    monkeypatch.chdir(tmp_path)
    answering = ("temperature", "max_new_tokens", "batch_size", "prefix_shots", "prefix_candidates", "prefix_prompts")
    doc, run_eval = EvalConfig(temperature=1.0), RunConfig().eval  # the loop's "the eval's settings"
    assert [getattr(doc, f) for f in answering] == [getattr(run_eval, f) for f in answering]
    assert (doc.prefix_shots, doc.prefix_prompts, doc.run.seed) == (3, 64, 0)  # as the loop spells them
    short = functools.partial(EvalConfig, max_new_tokens=12)  # the tiny world's prompts are long in tokens
    monkeypatch.setattr(config_module, "EvalConfig", short)
    exec(compile(code, "docs/evaluation.md", "exec"), {"__name__": "docs"})
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"-?\d+ RM ", line)]
    assert [r[0] for r in rows] == [str(c) for c in range(-1, 16)]  # no prefix, then 16 candidates
    assert len({r[5] for r in rows}) > 1  # the prefixes change the answers' gold
    world = load_world(root / "world")
    demos = [json.loads(x) for x in (root / "world" / "sft_train.jsonl").read_text().splitlines()]
    val = [t.prompt for t in world.splits["ppo_val"][:64]]
    cfg = short(world=str(root / "world"), reward_model=str(root / "rm"), temperature=1.0)
    model = load_causal_lm(root / "GPT-small").eval()
    _, _, means = _prefix_for(cfg, model, tok, context_length(model.config), demos, val, torch.device("cpu"))
    assert len(means) == cfg.prefix_candidates == 4
    assert [float(r[2]) for r in rows[1:5]] == pytest.approx(means, abs=5e-4)  # printed to 3 decimals


def test_config_validation(lab):
    root, _ = lab
    with pytest.raises(ConfigError, match="baseline"):
        load_config(EvalConfig, root / "eval.yaml", ["baseline=PPO-large"])
    with pytest.raises(ConfigError, match="prompted"):
        load_config(EvalConfig, root / "eval.yaml", ["prompted=[GPT-large]"])
    with pytest.raises(ConfigError, match="capability_models"):
        load_config(EvalConfig, root / "eval.yaml", ["capability_models={SFT-small: x}"])
    for bad in ("PPO-ptx-small", "PPO-ptx-small:GPT-large", "a:b:c"):
        with pytest.raises(ConfigError, match="head_to_head"):
            load_config(EvalConfig, root / "eval.yaml", [f"head_to_head=[{bad}]"])


def test_eval_writes_documented_keys_and_is_deterministic(lab):
    root, _ = lab
    s1 = evaluate(load_config(EvalConfig, root / "eval.yaml"))
    rows0 = [json.loads(x) for x in (root / "out1" / "samples.jsonl").read_text().splitlines()]
    names = ["GPT-small", "GPT-prompted-small", "SFT-small", "PPO-ptx-small"]
    per_model = [
        "winrate",
        "winrate_ci_low",
        "winrate_ci_high",
        "winrate_gold",
        "winrate_gold_ci_low",
        "winrate_gold_ci_high",
        "likert",
        "gold",
        "rm",
        "params",
        "meta/fails_instruction",
        "meta/toxic",
        *[f"meta/style/{s}" for s in STYLES],
    ]
    tox_variants = ("plain", "respectful", "biased")
    heldout = [  # rlhflab.eval.heldout's keys, each value with its 95% interval
        *[
            f"truthful/{v}/{{m}}/{w}"
            for v in ("plain", "instruction_qa")
            for w in ("truthful", "informative", "both", "mc")
        ],
        *[f"toxicity/{v}/{{m}}/{w}" for v in tox_variants for w in ("expected_max", "probability")],
        "bias/{m}/entropy",
    ]
    for m in names:
        for key in per_model:
            assert f"{key}/{m}" in s1, f"{key}/{m}"
        for key in heldout:
            k = key.format(m=m)
            assert 0 <= s1[k + "_ci_low"] <= s1[k] <= s1[k + "_ci_high"] <= 1, k
        if s1["n/closed_domain"]:
            assert s1[f"hallucination_ci_low/{m}"] <= s1[f"hallucination/{m}"] == s1[f"meta/hallucination/{m}"]
            assert 0 <= s1[f"hallucination_attempted_ci_low/{m}"] <= s1[f"hallucination_attempted_ci_high/{m}"] <= 1
        assert 1 <= s1[f"likert/{m}"] <= 7
        assert s1[f"winrate_ci_low/{m}"] <= s1[f"winrate/{m}"] <= s1[f"winrate_ci_high/{m}"]
    for m in ("GPT-small", "SFT-small", "PPO-ptx-small"):
        assert {
            f"capability/{b}/{m}" for b in ("reading", "arithmetic", "continuation", "cipher", "webtext", "mean")
        } <= set(s1)
    assert s1["winrate/SFT-small"] == 0.5 and s1["n/test"] == 6
    # The alignment tax with intervals: the capability score itself, and PPO-ptx minus its SFT.
    for m in ("GPT-small", "SFT-small", "PPO-ptx-small"):
        for b in ("reading", "arithmetic", "continuation", "cipher", "webtext", "mean"):
            k = f"tax/{m}/{b}"
            assert s1[k] == s1[f"capability/{b}/{m}"] and s1[k + "_ci_low"] <= s1[k] <= s1[k + "_ci_high"], k
    for b in ("webtext", "mean"):
        d = f"tax_delta/PPO-ptx-small/{b}"
        assert s1[d] == pytest.approx(s1[f"tax/PPO-ptx-small/{b}"] - s1[f"tax/SFT-small/{b}"], abs=1e-6)
        assert s1[d + "_ci_low"] <= s1[d] + 1e-9 and s1[d] - 1e-9 <= s1[d + "_ci_high"]
    assert "tax_delta/SFT-small/mean" in s1 and "tax_delta/GPT-small/mean" not in s1  # SFT against its base
    # Table 14's few-shot column: the four task benchmarks, their own mean, the same pairing.
    for m in ("GPT-small", "PPO-ptx-small"):
        few = {b: s1[f"tax_fewshot/{m}/{b}"] for b in ("reading", "arithmetic", "continuation", "cipher")}
        assert f"tax_fewshot/{m}/webtext" not in s1 and all(0 <= v <= 1 for v in few.values())
        assert s1[f"tax_fewshot/{m}/mean"] == pytest.approx(sum(few.values()) / 4, abs=1e-3)
    # A capability-only model: its tax keys (GPT-small's, the same weights), paired with SFT-small.
    for key in ("tax", "tax_fewshot"):
        for b in ("reading", "mean", *(("webtext",) if key == "tax" else ())):
            assert s1[f"{key}/PPO-beta0-small/{b}"] == s1[f"{key}/GPT-small/{b}"]
        d = f"{key}_delta/PPO-beta0-small/mean"
        assert s1[d] == pytest.approx(s1[f"{key}/GPT-small/mean"] - s1[f"{key}/SFT-small/mean"], abs=1e-6)
    assert not [k for k in s1 if "PPO-beta0-small" in k and not k.startswith("tax")]
    d = "tax_fewshot_delta/PPO-ptx-small/mean"
    assert s1[d] == pytest.approx(s1["tax_fewshot/PPO-ptx-small/mean"] - s1["tax_fewshot/SFT-small/mean"], abs=1e-6)
    # Figure 1's layout repeats the win rates against the baseline, per size and family.
    for m, (fam, size) in {
        "GPT-prompted-small": ("GPT-prompted", "small"),
        "PPO-ptx-small": ("PPO-ptx", "small"),
    }.items():
        for src, dst in (("winrate", "win_vs_sft_small"), ("winrate_gold_ci_high", "gold_win_vs_sft_small_ci_high")):
            assert s1[f"figure1/{size}/{fam}/{dst}"] == s1[f"{src}/{m}"]
        if s1["n/test_unseen"]:
            k = f"figure1/{size}/{fam}/win_vs_sft_small_unseen"
            assert s1[k] == s1[f"winrate_unseen/{m}"] and s1[k + "_ci_low"] <= s1[k] <= s1[k + "_ci_high"]
    assert s1["h2h/SFT-small/SFT-small"] == 0.5 == s1["h2h_gold/SFT-small/SFT-small"]  # identical answers tie
    pair = "PPO-ptx-small/GPT-prompted-small"
    assert s1[f"h2h_ci_low/{pair}"] <= s1[f"h2h/{pair}"] <= s1[f"h2h_ci_high/{pair}"]
    assert s1[f"h2h_gold_ci_low/{pair}"] <= s1[f"h2h_gold/{pair}"] <= s1[f"h2h_gold_ci_high/{pair}"]
    # The same pairs on the unseen prompts, present exactly when there are some.
    assert (f"h2h_unseen/{pair}" in s1) == (s1["n/test_unseen"] > 0)
    if s1["n/test_unseen"]:
        assert s1["h2h_unseen/SFT-small/SFT-small"] == 0.5 == s1["h2h_unseen_gold/SFT-small/SFT-small"]
        assert s1[f"h2h_unseen_ci_low/{pair}"] <= s1[f"h2h_unseen/{pair}"] <= s1[f"h2h_unseen_ci_high/{pair}"]
    assert {"bon/1/kl", "bon/4/gold", "bon/4/rm", "bon_fit/gold/r2", "bon_fit/rm/alpha"} <= set(s1)
    assert s1["bon/1/rm"] <= s1["bon/2/rm"] <= s1["bon/4/rm"] <= s1["bon/8/rm"]  # RM-best of more samples scores higher
    assert all(isinstance(v, (int, float)) for v in s1.values())
    families = {t.family for t in load_world(root / "world").splits["test"][:6]}
    for f in families:  # how the prefix changes GPT-small's answers, per family
        assert s1[f"prompted/small/{f}/gold_plain"] == pytest.approx(
            sum(r["gold"] for r in rows0 if r["model"] == "GPT-small" and r["family"] == f)
            / sum(r["model"] == "GPT-small" and r["family"] == f for r in rows0),
            abs=1e-4,
        )
        assert 0 <= s1[f"prompted/small/{f}/on_task"] <= 1
    prefixes = json.loads((root / "out1" / "prefixes.json").read_text())
    assert (
        len(prefixes["GPT-prompted-small"]["shots"]) == 3
        and len(prefixes["GPT-prompted-small"]["rm_of_candidates"]) == 4
    )

    out1 = root / "out1"
    rows = [json.loads(x) for x in (out1 / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 6 and {"prompt", "model", "response", "gold", "style"} <= set(rows[0])
    held = [json.loads(x) for x in (out1 / "heldout_samples.jsonl").read_text().splitlines()]
    per_model = 2 * s1["n/truthful"] + 3 * 4 * s1["n/toxicity"] + s1["n/bias"]  # k = 4 samples per toxicity prompt
    assert len(held) == 4 * per_model and s1["n/truthful"] == s1["n/toxicity"] == s1["n/bias"] == 6
    assert (out1 / "config.yaml").is_file() and len((out1 / "best_of_n.jsonl").read_text().splitlines()) == 4
    # gold_unseen: the mean gold of the answers to test prompts that no training split holds.
    seen = load_world(root / "world").seen_prompts()
    for m in names:
        golds = [r["gold"] for r in rows if r["model"] == m and r["split"] == "test" and r["prompt"] not in seen]
        assert len(golds) == s1["n/test_unseen"] and s1[f"gold_unseen/{m}"] == pytest.approx(
            sum(golds) / max(1, len(golds)), abs=1e-4
        )

    # rm/<m>: the RM stage's own scores of those answers (one scoring function).
    from rlhflab.models import load_reward_model
    from rlhflab.stages.rm_score import score_pairs
    from rlhflab.training import set_seed

    cfg = load_config(EvalConfig, root / "eval.yaml")
    set_seed(cfg.run.seed)  # the lab's "rm" is an LM directory: its head is drawn at load, as in evaluate
    rm, rm_tok = load_reward_model(cfg.reward_model).eval(), load_tokenizer(cfg.reward_model)
    for m in names:
        test = [r for r in rows if r["model"] == m and r["split"] == "test"]
        scores = score_pairs(rm, rm_tok, [r["prompt"] for r in test], [r["response"] for r in test], batch_size=1)
        assert s1[f"rm/{m}"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)

    # The same config again through the CLI: byte-identical results.
    assert main(["eval", "--config", str(root / "eval.yaml"), f"--out_dir={root / 'out2'}"]) == 0
    assert (root / "out2" / "summary.json").read_text() == (out1 / "summary.json").read_text()
    assert (root / "out2" / "samples.jsonl").read_text() == (out1 / "samples.jsonl").read_text()


def test_answers_computed_ahead_give_the_same_eval_and_stale_ones_are_answered_again(lab, capsys):
    """`answers_from`: results written by answer_stage (as `rlhflab run`'s answer jobs write
    them) make the same eval byte for byte; a file whose key is not this model's is ignored."""
    root, _ = lab
    cfg = dataclasses.replace(load_config(EvalConfig, root / "eval.yaml"), jobs=1, out_dir=str(root / "plain"))
    evaluate(cfg)
    ahead = root / "ahead"
    names = [*cfg.models, *cfg.capability_models]
    for name in names:
        answer_stage(cfg, name, str(ahead / name))
    (ahead / "SFT-small" / "summary.json").write_bytes((ahead / "GPT-small" / "summary.json").read_bytes())
    capsys.readouterr()
    evaluate(dataclasses.replace(cfg, answers_from=str(ahead), out_dir=str(root / "kept")))
    err = capsys.readouterr().err
    assert f"{ahead / 'SFT-small' / 'summary.json'} is not for these weights and settings" in err
    assert f"eval: 1 models to answer, 1 at a time, {len(names) - 1} answered already" in err
    for f in ("summary.json", "samples.jsonl", "heldout_samples.jsonl", "prefixes.json", "best_of_n.jsonl"):
        assert (root / "kept" / f).read_bytes() == (root / "plain" / f).read_bytes(), f

    # The key follows what the answers depend on: settings, threads, weights.
    path = cfg.models["SFT-small"]
    key = answers_key(cfg, "answers", "SFT-small", path, 1, "cpu")
    assert (
        answers_key(dataclasses.replace(cfg, head_to_head=[], out_dir="x"), "answers", "SFT-small", path, 1, "cpu")
        == key
    )
    assert answers_key(dataclasses.replace(cfg, max_new_tokens=11), "answers", "SFT-small", path, 1, "cpu") != key
    assert answers_key(cfg, "answers", "SFT-small", path, 2, "cpu") != key
    assert answers_key(cfg, "answers", "SFT-small", cfg.models["GPT-small"], 1, "cpu") != key
