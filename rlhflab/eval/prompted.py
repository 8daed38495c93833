"""GPT-prompted (§3.5): a base model with a few-shot prefix that puts it into an
instruction-following mode, the prefix chosen by reward-model score on validation prompts.

The prefix and the prompt make one document, as a web page of questions and answers does:
``[bos] prompt_1 \\n answer_1 \\n\\n ... prompt_k \\n answer_k \\n\\n prompt \\n``. A prefix of
separate ``[bos] ... [eos]`` documents is one a model pretrained on packed documents learns to
ignore. Shots are demonstrations (sft_train.jsonl) of distinct families; `candidates` seeded
draws of them compete, and each model keeps the one whose answers to the validation prompts
the reward model scores highest (the mean).
"""

from __future__ import annotations

import random


def prompted_name(name: str) -> str:
    """'GPT-small' -> 'GPT-prompted-small'; any other name gets a '-prompted' suffix."""
    return "GPT-prompted" + name[3:] if name == "GPT" or name.startswith("GPT-") else name + "-prompted"


def shot_pieces(tokenizer, demos: list[dict]) -> list[list[int]]:
    """The token pieces of a prefix: one per demonstration, ``prompt \\n completion \\n\\n``
    (no bos or eos: `with_prefix` puts one bos before them all)."""
    from rlhflab.text import SEP, SHOT_SEP

    return [
        list(tokenizer(d["prompt"] + SEP + d["completion"] + SHOT_SEP, add_special_tokens=False)["input_ids"])
        for d in demos
    ]


def with_prefix(prefix: list[list[int]], ids: list[int], n_pos: int | None, room: int, bos: int | None) -> list[int]:
    """`ids` (a query or document that starts with `bos`) after the prefix pieces that fit
    the context `n_pos` with `room` new tokens (the oldest dropped first), as one document:
    a single bos, then the shots, then `ids` without its own bos. No piece fits: `ids`."""
    pieces = list(prefix)
    head = [bos] if bos is not None else []
    body = ids[1:] if head and ids[:1] == head else ids
    while pieces and n_pos is not None and len(head) + sum(map(len, pieces)) + len(body) + room > n_pos:
        pieces.pop(0)
    if not pieces:
        return list(ids)
    return head + [t for piece in pieces for t in piece] + body


def candidate_shots(demos: list[dict], k: int, n: int, seed: int, max_chars: int = 70) -> list[list[dict]]:
    """`n` seeded draws of `k` demonstrations of distinct families (a demo without a family
    counts as its own), each at most `max_chars` long so k of them fit a short context."""
    pool = [d for d in demos if len(d["prompt"]) + len(d["completion"]) <= max_chars] or list(demos)
    out = []
    for c in range(n):
        rng = random.Random(f"prefix-{seed}-{c}")
        rows, families = [], set()
        for d in rng.sample(pool, len(pool)):
            family = d.get("family") or d["prompt"]
            if family not in families:
                families.add(family)
                rows.append(d)
            if len(rows) == k:
                break
        out.append(rows)
    return out


def choose_prefix(answer_fn, score_fn, tokenizer, demos, prompts, k: int, n: int, seed: int):
    """The candidate whose answers score highest: `answer_fn(prefix_pieces, prompts)` gives
    the answers, `score_fn(prompts, answers)` their reward-model scores (None: no reward
    model, the first candidate is kept). Returns (pieces, shots, mean scores per candidate)."""
    cands = candidate_shots(demos, k, n, seed)
    pieces = [shot_pieces(tokenizer, c) for c in cands]
    if score_fn is None or len(cands) == 1 or not prompts:
        return pieces[0], cands[0], []
    means = []
    for p in pieces:
        scores = score_fn(prompts, answer_fn(p, prompts))
        means.append(sum(scores) / len(scores))
    best = max(range(len(cands)), key=lambda i: (means[i], -i))
    return pieces[best], cands[best], means


def prompted_keys(name: str, plain: list, prompted: list, tasks: list) -> dict:
    """Per family, how the prefix changes a model's answers (`plain`, `prompted`: judged test
    answers, (response, judgement) per task): prompted/<size>/<family>/gold with the prefix,
    gold_plain without, and the share of each that is on task (on_task, on_task_plain)."""
    size = prompted_name(name).removeprefix("GPT-prompted-")
    out = {}
    for family in sorted({t.family for t in tasks}):
        idx = [i for i, t in enumerate(tasks) if t.family == family]
        for suffix, judged in (("", prompted), ("_plain", plain)):
            out[f"prompted/{size}/{family}/gold{suffix}"] = sum(judged[i][1].quality for i in idx) / len(idx)
            on_task = sum(judged[i][1].style != "Off-task" for i in idx) / len(idx)
            out[f"prompted/{size}/{family}/on_task{suffix}"] = on_task
    return out
