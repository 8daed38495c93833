"""Measuring a policy against the lab world's truth (never a training signal).

`gold_of_policy` answers prompts (`generation.generate`) and scores the answers with the
gold scorer; `make_lab_evaluator` bundles gold quality, the style distribution and the
capability benchmarks into the callable PPO logs every few steps.
"""

from __future__ import annotations

from collections import Counter

from rlhflab.generation import generate, generator_for
from rlhflab.text import encode_query
from rlhflab.world.gold import STYLES


def summarize_judgements(judgements) -> dict[str, float]:
    n = max(1, len(judgements))
    styles = Counter(j.style for j in judgements)
    out = {
        "gold": sum(j.quality for j in judgements) / n,
        "fails_instruction": sum(not j.followed for j in judgements) / n,
        "hallucination": sum(j.hallucination for j in judgements) / n,
        "toxic": sum(j.toxic for j in judgements) / n,
        "words": sum(j.n_words for j in judgements) / n,
    }
    out.update({f"style/{s}": styles.get(s, 0) / n for s in STYLES})
    return {k: round(v, 4) for k, v in out.items()}


def gold_of_policy(
    model,
    tokenizer,
    world,
    prompts: list[str],
    max_new_tokens: int = 48,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    # A prompt longer than the context keeps its end (evaluation only; training refuses it).
    responses = generate(
        model,
        tokenizer,
        [encode_query(tokenizer, p) for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=0 if greedy else temperature,
        batch_size=64,
        generator=generator_for(model, seed),
        fit_context=True,
    ).texts
    return summarize_judgements([world.judge(p, r) for p, r in zip(prompts, responses)])


def make_lab_evaluator(
    world_dir: str,
    val_prompts: list[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    capability_items: int = 60,
):
    """A callable (policy, tokenizer, step) -> metrics for PPO's periodic measurement."""
    from rlhflab.eval.capability import capability_scores, load_benchmarks
    from rlhflab.world import load_world

    world = load_world(world_dir)
    bench = load_benchmarks(world_dir, limit=capability_items)

    def evaluate(policy, tokenizer, step: int = 0) -> dict[str, float]:
        metrics = gold_of_policy(policy, tokenizer, world, val_prompts, max_new_tokens)
        out = {f"eval/{k}": v for k, v in metrics.items()}
        # What PPO optimizes is the sampled policy: gold of samples at the rollout temperature
        # (one fixed seed, so steps compare), beside the greedy answer above.
        sampled = gold_of_policy(
            policy, tokenizer, world, val_prompts, max_new_tokens, greedy=False, temperature=temperature
        )
        out.update({f"eval/sampled/{k}": v for k, v in sampled.items()})
        out.update({f"eval/capability/{k}": v for k, v in capability_scores(policy, tokenizer, bench).items()})
        return out

    return evaluate
