"""`rlhflab eval`: the paper's evaluations (§4) of several policies on held-out lab prompts.

Every model answers the world's `test` prompts; the gold scorer judges each answer and the
HELD-OUT labelers, who never ranked training data, compare and rate them (§4.1). Every model
also answers the held-out truthfulness and toxicity sets and scores the bias pairs
(rlhflab.eval.heldout; templates and entities no training split uses). Outputs in
`out_dir`: `summary.json` (flat keys below), `samples.jsonl` (one row per test answer:
split, family, prompt, model, response, gold, style), `heldout_samples.jsonl` (every
held-out answer, graded), `best_of_n.jsonl` (when a reward model is given) and `config.yaml`.
`<m>` is a model name from `models`, or `GPT-prompted-<size>` for a few-shot-prompted
variant (§3.5 baseline). Without a world, `rlhflab eval` runs rlhflab.eval.generic instead
(your own models, judged by a reward model).

summary.json keys (all numbers; see docs/evaluation.md):
  winrate/<m>, winrate_ci_low/<m>, winrate_ci_high/<m>   held-out labelers prefer <m> over
                          the baseline's answer to the same prompt (ties half), 95% Wilson CI
  winrate_gold/<m>, winrate_gold_ci_low/<m>, winrate_gold_ci_high/<m>   the same by gold quality
  winrate_unseen/<m>, winrate_unseen_gold/<m> (+ _ci_low, _ci_high)   both on the n/test_unseen
                          test prompts in no training split
  figure1/<size>/<family>/<win_vs_<b>|gold_win_vs_<b>> (+ _unseen; + _ci_low, _ci_high)
                          the same win rates in Figure 1's layout, <b> the baseline ('sft_large')
  h2h/<a>/<b>, h2h_ci_low/<a>/<b>, h2h_ci_high/<a>/<b>, h2h_gold/<a>/<b> (+ _ci_low, _ci_high)
                          each `head_to_head` pair: <a>'s win rate against <b>, as above;
                          h2h_unseen/<a>/<b>, h2h_unseen_gold/<a>/<b> (+ _ci_low, _ci_high)
                          the same on the n/test_unseen prompts
  likert/<m>              mean 1–7 Likert score from one held-out labeler per answer
  gold/<m>, rm/<m>        mean gold quality; mean reward-model score (with reward_model)
  gold_unseen/<m>         mean gold on the n/test_unseen test prompts in no training split
  meta/fails_instruction/<m>, meta/toxic/<m>   fraction of test answers (Figure 4 analog)
  hallucination/<m>, hallucination_ci_low/<m>, hallucination_ci_high/<m>   fraction of
                          answers to closed-domain test prompts (closed_qa, summarization,
                          extraction) with a statement naming an entity the input does not
                          (§4.1), 95% Wilson CI; meta/hallucination/<m> is the same fraction;
  hallucination_attempted/<m> (+ _ci_low, _ci_high)   the same among the answers that attempt
                          the task (gold `followed`): an answer that says nothing makes nothing up
  meta/style/<Style>/<m>  fraction of test answers of each gold style
  truthful/<v>/<m>/<truthful|informative|both> (+ _ci_low, _ci_high)   held-out TruthfulQA-like
                          questions, v = plain | instruction_qa (the "I have no comment"
                          prefix): truthful, informative, and both (Figure 6 analog), Wilson CIs
  toxicity/<v>/<m>/<expected_max|probability> (+ _ci_low, _ci_high)   held-out
                          RealToxicityPrompts-like texts, v = plain | respectful | biased (one
                          text, three prompts): mean over prompts of the highest graded
                          toxicity of k = 4 samples (bootstrap CI), and the share of prompts
                          with a sample >= 0.5 (Wilson CI) (Figure 7 analog)
  bias/<m>/entropy (+ _ci_low, _ci_high; entropy_country, entropy_pronoun)   mean normalized
                          entropy of the log-likelihood choice in minimal sentence pairs (1:
                          no preference, less biased; App. E), bootstrap CI
  capability/<bench>/<m>  benchmark score (reading, arithmetic, continuation, cipher, webtext, mean)
  tax/<m>/<bench> (+ _ci_low, _ci_high)   the same score with a 95% bootstrap CI over items
  tax_delta/<m>/<bench> (+ _ci_low, _ci_high)   <m>'s score minus its reference's (SFT-<size>
                          for PPO and PPO-ptx, GPT-<size> for SFT), paired bootstrap CI
                          (and for each of `capability_models`, by the same rule: PPO-beta<β>
                          against SFT, RL-init against GPT; it has only tax keys)
  tax_fewshot/<m>/<bench>, tax_fewshot_delta/<m>/<bench> (+ _ci_low, _ci_high)   the same with
                          `capability_shots` solved items before each one (Table 14's few-shot
                          column; the four task benchmarks and their mean, no webtext)
  params/<m>              parameter count
  n/test, n/truthful, n/toxicity, n/bias, n/closed_domain   items evaluated (questions per
                          variant, texts per variant, pairs, closed-domain test prompts);
                          n/test_unseen: test prompts in no training split
  bon/<n>/kl, bon/<n>/gold, bon/<n>/rm   best-of-n over-optimization (Gao et al. 2022)
  bon_fit/<gold|rm>/<alpha|beta|r2>      fit of Δ = d(α − βd), d = sqrt(KL), to those points
  rl/<run>/<peak_gold|peak_kl|final_gold|final_kl|final_rm>   each of `rl_runs` (PPO, validation
                          prompts, sampled answers): the gold peak and the end of training
  rl_fit/<run>/<gold|rm>/<alpha|beta|r2>  fit of Δ = d(α − β log d) to that run's curve
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from rlhflab.config import add_config_arguments, config_from_args, describe, save_config
from rlhflab.data import iter_jsonl
from rlhflab.errors import ConfigError, InputError
from rlhflab.eval.answering import SPLITS, Inputs, answer_all, build_queries
from rlhflab.eval.capability import tax_keys, tax_references
from rlhflab.eval.config import EvalConfig
from rlhflab.eval.heldout import hallucination_keys, heldout_metrics, sample_rows
from rlhflab.eval.judging import figure1_keys, likert_mean, unseen_win_keys, win_keys
from rlhflab.eval.overopt import best_of_n_kl, bon_summary, rl_summary
from rlhflab.eval.prompted import prompted_keys, prompted_name
from rlhflab.generation import generate, generator_for
from rlhflab.io import write_json, write_jsonl
from rlhflab.models import context_length, load_causal_lm, load_reward_model, load_tokenizer
from rlhflab.stages.rm_score import score_pairs, score_sequences
from rlhflab.training import resolve_device, set_seed
from rlhflab.world.gold import STYLES

CLOSED_DOMAIN = ("closed_qa", "summarization", "extraction")
"""Families whose answer must come from the prompt: hallucination is counted on these (§4.1)."""


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def model_metrics(world, name: str, judged: dict, base: dict, tasks: list, seed: int) -> dict:
    """Every per-model key of summary.json except capability, params and rm."""
    test, families, seen = [j for _, j in judged["test"]], [t.family for t in tasks], world.seen_prompts()
    out = {
        f"gold/{name}": _mean(j.quality for j in test),
        f"gold_unseen/{name}": _mean(j.quality for j, t in zip(test, tasks) if t.prompt not in seen),
        f"likert/{name}": likert_mean(world, test, f"likert-{seed}-{name}"),
    }
    out.update(win_keys(world, "winrate", name, judged["test"], base["test"], f"winrate-{seed}-{name}"))
    out.update(unseen_win_keys(world, "winrate", name, judged["test"], base["test"], tasks, f"{seed}-{name}"))
    out[f"meta/fails_instruction/{name}"] = _mean(not j.followed for j in test)
    out[f"meta/toxic/{name}"] = _mean(j.toxic for j in test)
    closed = [j for j, f in zip(test, families) if f in CLOSED_DOMAIN]
    if closed:
        out[f"meta/hallucination/{name}"] = _mean(j.hallucination for j in closed)
        out.update(hallucination_keys(name, [j.hallucination for j in closed], [j.followed for j in closed]))
    for style in STYLES:
        out[f"meta/style/{style}/{name}"] = _mean(j.style == style for j in test)
    return out


# --------------------------------------------------------------------------- over-optimization


@torch.no_grad()
def best_of_n_curve(
    policy,
    rm,
    world,
    prompts: list[str],
    ns: list[int],
    *,
    tokenizer,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """Sample max(ns) answers per prompt at T = 1; for each n pick the RM-best of the first n.

    Rows {n, kl, d, gold, rm}: mean gold quality and RM score of the picks.
    """
    N = max(ns)
    queries = build_queries(tokenizer, prompts, context_length(policy.config), max_new_tokens)
    out = generate(
        policy,
        tokenizer,
        [q for q in queries for _ in range(N)],
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        batch_size=batch_size,
        generator=generator_for(policy, seed),
        fit_context=True,
    )
    # Score the sampled tokens themselves, as PPO does (eos included when emitted).
    seqs = [q + r for q, r in zip(out.queries, out.tokens)]
    scores = score_sequences(rm, seqs, tokenizer.pad_token_id, batch_size)
    gold = [world.judge(prompts[j // N], t).quality for j, t in enumerate(out.texts)]
    rows = []
    for n in sorted(set(ns)):
        picks = [p * N + max(range(n), key=lambda k: scores[p * N + k]) for p in range(len(prompts))]
        kl = best_of_n_kl(n)
        rows.append(
            {
                "n": n,
                "kl": kl,
                "d": math.sqrt(kl),
                "gold": _mean(gold[i] for i in picks),
                "rm": _mean(scores[i] for i in picks),
            }
        )
    return rows


# --------------------------------------------------------------------------- the run


def _best_of_n(cfg: EvalConfig, rm, world, prompts: list[str], device) -> list[dict]:
    path = cfg.models[cfg.bon_policy()]
    policy = load_causal_lm(path).to(device).eval()
    return best_of_n_curve(
        policy,
        rm,
        world,
        prompts,
        cfg.best_of_n,
        tokenizer=load_tokenizer(path),
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.run.seed,
        batch_size=cfg.batch_size,
    )


def evaluate(cfg: EvalConfig) -> dict:
    """Run every evaluation and write out_dir; returns the summary (see the module docstring)."""
    from rlhflab.world import load_world

    world = load_world(cfg.world)
    for name, path in {**cfg.models, **cfg.capability_models, "reward_model": cfg.reward_model or None}.items():
        if path is not None and not (Path(path) / "config.json").is_file():
            raise InputError(f"not a model directory (no config.json) for {name!r}", file=str(path))
    set_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    out = Path(cfg.out_dir)
    inputs = Inputs.of(cfg, world)
    tasks, prompts, sets = inputs.tasks, inputs.prompts, inputs.sets
    rm = load_reward_model(cfg.reward_model).to(device).eval() if cfg.reward_model else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # not finished until written again
    save_config(cfg, out / "config.yaml")

    answers, summary, held = {}, {}, {}
    for result in answer_all(cfg, inputs, device).values():  # in the config's order
        answers.update(result.answers)
        summary.update(result.summary)
        held.update(result.held)
    prefixes = {k.split("/", 1)[1]: summary.pop(k) for k in [k for k in summary if k.startswith("_prefix/")]}
    for kind, prefix in (("_items", "tax"), ("_items_fewshot", "tax_fewshot")):
        items = {k.split("/", 1)[1]: summary.pop(k) for k in [k for k in summary if k.startswith(f"{kind}/")]}
        summary.update(tax_keys(items, tax_references(list(items)), cfg.run.seed, prefix=prefix))
    judged = {
        v: {s: [(r, world.judge(p, r)) for p, r in zip(prompts[s], a[s])] for s in SPLITS} for v, a in answers.items()
    }
    for variant in answers:
        summary.update(
            model_metrics(world, variant, judged[variant], judged[cfg.baseline], tasks["test"], cfg.run.seed)
        )
        summary.update(heldout_metrics(world, variant, sets, held[variant], cfg.run.seed))
    summary.update(figure1_keys(summary, list(answers), cfg.baseline))
    for name in cfg.prompted:
        summary.update(prompted_keys(name, judged[name]["test"], judged[prompted_name(name)]["test"], tasks["test"]))
    for a, b in (pair.split(":") for pair in cfg.head_to_head):  # seeded per pair, so order-free
        h2h = (judged[a]["test"], judged[b]["test"], f"h2h-{cfg.run.seed}-{a}-{b}")
        summary.update(win_keys(world, "h2h", f"{a}/{b}", *h2h))
        unseen = (judged[a]["test"], judged[b]["test"], tasks["test"], f"{cfg.run.seed}-{a}-{b}")
        summary.update(unseen_win_keys(world, "h2h", f"{a}/{b}", *unseen))
    summary.update({f"n/{s}": len(prompts[s]) for s in SPLITS})
    summary.update(sets.sizes())
    summary["n/closed_domain"] = sum(t.family in CLOSED_DOMAIN for t in tasks["test"])
    seen = world.seen_prompts()
    summary["n/test_unseen"] = sum(p not in seen for p in prompts["test"])

    bon_rows = []
    if rm is not None:
        rm_tok = load_tokenizer(cfg.reward_model)
        for variant, a in answers.items():
            summary[f"rm/{variant}"] = _mean(score_pairs(rm, rm_tok, prompts["test"], a["test"], cfg.batch_size))
        if cfg.best_of_n:
            bon_rows = _best_of_n(cfg, rm, world, prompts["test"][: cfg.best_of_n_prompts], device)
            summary.update(bon_summary(bon_rows))

    for label, path in cfg.rl_runs.items():
        summary.update(rl_summary(label, [obj for _, obj in iter_jsonl(path)]))

    rows = [
        {
            "split": s,
            "family": t.family,
            "prompt": t.prompt,
            "model": v,
            "response": r,
            "gold": round(j.quality, 4),
            "style": j.style,
        }
        for v in judged
        for s in SPLITS
        for t, (r, j) in zip(tasks[s], judged[v][s])
    ]
    write_jsonl(out / "samples.jsonl", rows)
    write_jsonl(out / "heldout_samples.jsonl", [r for v in held for r in sample_rows(world, v, sets, held[v])])
    write_json(out / "prefixes.json", prefixes)
    write_jsonl(out / "best_of_n.jsonl", [{k: _round(v) for k, v in r.items()} for r in bon_rows])
    summary = {k: _round(v) for k, v in summary.items()}
    write_json(out / "summary.json", summary)  # last: the mark of a finished stage
    return summary


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


# --------------------------------------------------------------------------- CLI


MODES = """modes (chosen by whether a world is given):
  with a world (--world DIR, or world: in --config): the paper's evaluations on the lab world;
      needs world and models (name: DIR); reward_model optional
  without a world: your own policies judged by your reward model (rlhflab.eval.generic);
      needs policies (--policies name=DIR,name=DIR), prompts, reward_model and reference"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlhflab.eval.generic import GenericEvalConfig

    add_config_arguments(parser, EvalConfig)
    generic = "\n".join(describe(GenericEvalConfig, brief=True))
    parser.epilog = f"{MODES}\n\nwith a world, {parser.epilog}\n\nwithout a world, config keys:\n{generic}"


def world_given(args) -> bool:
    """The lab mode: `world` among the overrides or in the --config file. A config file that
    cannot be read goes to the lab path, whose loader says what is wrong with it."""
    if any(o.partition("=")[0] == "world" for o in args.overrides):
        return True
    if not args.config:
        return False
    try:
        raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True
    return not isinstance(raw, dict) or bool(raw.get("world"))


def format_table(summary: dict, names: list[str]) -> str:
    lines = [
        f"{'model':<22} {'win rate vs baseline':>24} {'gold':>6} {'likert':>6} {'true+inf':>8} "
        f"{'halluc':>6} {'tox max':>7} {'bias H':>6} {'capab.':>6}"
    ]
    for m in names:
        lo, hi = summary[f"winrate_ci_low/{m}"], summary[f"winrate_ci_high/{m}"]
        win = f"{summary[f'winrate/{m}']:.2f} [{lo:.2f}, {hi:.2f}]"
        cap = summary.get(f"capability/mean/{m}")
        lines.append(
            f"{m:<22} {win:>24} {summary[f'gold/{m}']:>6.3f} {summary[f'likert/{m}']:>6.2f} "
            f"{summary[f'truthful/plain/{m}/both']:>8.2f} {summary.get(f'hallucination/{m}', float('nan')):>6.2f} "
            f"{summary[f'toxicity/plain/{m}/expected_max']:>7.2f} {summary[f'bias/{m}/entropy']:>6.2f} "
            f"{'' if cap is None else f'{cap:.3f}':>6}"
        )
    return "\n".join(lines)


def run_cli(args) -> int:
    from rlhflab.eval import generic

    if getattr(args, "help_config", False):
        print("with a world:\n" + "\n".join(describe(EvalConfig)))
        print("\nwithout a world (rlhflab.eval.generic):\n" + "\n".join(describe(generic.GenericEvalConfig)))
        return 0
    if not world_given(args):
        lab_only = {f.name for f in fields(EvalConfig)} - {f.name for f in fields(generic.GenericEvalConfig)}
        lab_keys = sorted({o.partition("=")[0].split(".")[0] for o in args.overrides} & lab_only)
        if lab_keys:
            raise ConfigError("a lab-world key: give --world DIR too (without a world, see --help)", field=lab_keys[0])
        return generic.run_cli(args)
    cfg = config_from_args(EvalConfig, args)
    summary = evaluate(cfg)
    print(format_table(summary, cfg.names()))
    print(f"baseline {cfg.baseline}; held-out labelers; {summary['n/test']} test prompts -> {cfg.out_dir}")
    return 0
