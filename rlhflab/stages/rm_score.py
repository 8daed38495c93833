"""The reward model as a scorer: r_θ(x, y) of token sequences or (prompt, response) pairs,
and the normalisation that sets its scale before RL.

    score_sequences: the one way anything scores with an RM (sorted by length, eval mode,
        a sequence over the context refused, never cut)
    normalize: a gain so the RL's initial policy's samples score std `reward_std`
        (openai/lm-human-preferences), then a bias so the demonstrations score mean 0 (§3.5)

Stage 2 (stages/rm.py) trains the model these read; its validation, the eval, the walkthrough
and SFT's epoch choice by RM score call them, PPO the same forward (models.reward_scores) on
its rollouts.
"""

from __future__ import annotations

import torch

from rlhflab import distributed
from rlhflab.data import read_samples
from rlhflab.errors import InputError
from rlhflab.models import context_length, fold_reward_bias, reward_scores, scale_reward
from rlhflab.text import encode_pair, pad_right


def encode_sequence(tokenizer, prompt, response: str, where: dict | None = None) -> list[int]:
    """query + response token ids (text.py layout, chat template for a conversation)."""
    query, answer = encode_pair(tokenizer, prompt, response, where)
    return query + answer


def encode_samples(tokenizer, path: str, max_len: int | None) -> list[list[int]]:
    """Every response of `path` (`read_samples`) as query + response ids, a sequence longer
    than the context refused naming its line."""
    seqs = []
    for line, prompt, responses in read_samples(path):
        for i, response in enumerate(responses):
            seq = encode_sequence(tokenizer, prompt, response, dict(file=path, line=line, field="prompt"))
            if max_len is not None and len(seq) > max_len:
                raise InputError(
                    f"prompt + response is {len(seq)} tokens, the model's context is {max_len}",
                    file=path,
                    line=line,
                    field=f"responses[{i}]",
                )
            seqs.append(seq)
    return seqs


@torch.no_grad()
def score_sequences(
    model, seqs: list[list[int]], pad_id: int, batch_size: int = 32, field: str = "sequences", scorer=None
) -> list[float]:
    """r_θ of token sequences (query + response), bias included; order preserved.

    The one way anything scores with a reward model: batched by length (little padding),
    dropout off (the model's mode restored after), and a sequence longer than the model's
    context refused (InputError naming `field`), never cut. `scorer(ids, mask)`: the
    forward, when not `reward_scores(model, ...)` itself (under FSDP the module from
    distributed.wrap(model, ..., forward=reward_scores), whose root gathers the head).
    """
    max_len = context_length(model.config)
    for i, s in enumerate(seqs):
        if max_len is not None and len(s) > max_len:
            raise InputError(f"{field}[{i}] is {len(s)} tokens, the reward model's context is {max_len}", field=field)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ids, mask = pad_right([seqs[j] for j in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        values = reward_scores(model, ids, mask) if scorer is None else scorer(ids, mask)
        for j, s in zip(idx, values.tolist()):
            scores[j] = s
    model.train(was_training)
    return scores


def score_pairs(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
    """r_θ(x, y) for each (prompt, response) in THE layout (text.py): `score_sequences`."""
    seqs = [encode_sequence(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, field="responses")


def shared_scores(model, seqs, pad_id: int, batch_size: int, dist=distributed.SINGLE, scorer=None) -> list[float]:
    """`score_sequences` of `seqs`, shared out over the ranks with `dist` (every rank gets all)."""

    def score(part: list) -> list[float]:
        return score_sequences(model, part, pad_id, batch_size, "responses", scorer)

    return dist.map_shards(score, seqs)


def demo_mean(model, tokenizer, demos, batch_size: int, dist=distributed.SINGLE, scorer=None) -> float:
    """The demonstrations' mean score (scoring shared out over the ranks with `dist`)."""
    seqs = [encode_sequence(tokenizer, d.prompt, d.completion) for d in demos]
    scores = shared_scores(model, seqs, tokenizer.pad_token_id, batch_size, dist, scorer)
    return sum(scores) / len(scores)


def normalize(model, tokenizer, samples, demos, config, dist=distributed.SINGLE, scorer=None) -> dict:
    """The gain that gives the policy samples std `reward_std`, and the bias that then gives
    the demonstrations mean 0 (§3.5), as numbers: `apply_normalization` puts them in the
    weights. Either part is left out (gain 1, bias 0) without its data. `config`: the stage's
    RMConfig (its eval_batch_size, reward_std and policy_samples)."""
    out, gain = {}, 1.0
    bs, pad_id = config.eval_batch_size, tokenizer.pad_token_id
    if samples:
        scores = torch.tensor(shared_scores(model, samples, pad_id, bs, dist, scorer), dtype=torch.float64)
        std = float(scores.std(correction=0))
        if not std > 0:
            raise ValueError(
                f"policy_samples: the reward model gives all {len(scores)} responses of "
                f"{config.policy_samples} the same score, so no gain sets their spread"
            )
        gain = config.reward_std / std
        out.update({"rm/sample_std_before": std, "rm/sample_mean_before": float(scores.mean())})
    out["rm/gain"] = gain
    if demos:
        mean = demo_mean(model, tokenizer, demos, bs, dist, scorer)
        out.update({"rm/demo_mean_before": mean, "rm/bias": -mean * gain})
    if samples:  # where the samples land after both: their mean is the RL's starting reward
        out["rm/sample_mean"] = out["rm/sample_mean_before"] * gain + out.get("rm/bias", 0.0)
    return out


def apply_normalization(model, norm: dict) -> None:
    """Scale by rm/gain, then shift by rm/bias, in the weights (`scale_reward`, `fold_reward_bias`)."""
    if norm["rm/gain"] != 1.0:
        scale_reward(model, norm["rm/gain"])
    if "rm/bias" in norm:
        fold_reward_bias(model, norm["rm/bias"])
