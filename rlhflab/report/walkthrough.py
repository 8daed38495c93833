"""The report's walkthrough: one real example per stage, written and drawn.

`write_walkthrough` (called by `rlhflab run`) writes `<run>/walkthrough.json`;
`s_walkthrough` draws it as the report's walkthrough section (layout in sections.py).

An SFT demonstration, a ranked set of K responses with their reward-model scores and
gold quality, and one PPO episode with its numbers: RM score, KL to the SFT model, and
the KL-shaped return r − β·KL (§3.5, eq. 2).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import torch
import yaml

from rlhflab.data import read_demos, read_prompts, read_rankings
from rlhflab.generation import generate, generator_for
from rlhflab.io import write_json
from rlhflab.models import load_causal_lm, load_reward_model, load_tokenizer, token_logprobs
from rlhflab.report import charts
from rlhflab.report.html import figure, missing, table, text_cell
from rlhflab.stages.rm_score import score_pairs, score_sequences
from rlhflab.text import encode_query, pad_right
from rlhflab.world import load_world


@torch.no_grad()
def ppo_episode(
    policy_dir: Path,
    ref_dir: Path,
    rm_dir: Path,
    prompt: str,
    kl_coef: float,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict:
    policy, ref = load_causal_lm(policy_dir).eval(), load_causal_lm(ref_dir).eval()
    rm, tok = load_reward_model(rm_dir).eval(), load_tokenizer(policy_dir)
    query = encode_query(tok, prompt)
    out = generate(
        policy,
        tok,
        [query],
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        generator=generator_for(policy, seed),
    )
    response = out.tokens[0]
    ids, mask = pad_right([query + response], tok.pad_token_id)
    labels = ids[:, len(query) :]  # the response tokens, each predicted from the position before
    logp = token_logprobs(policy(input_ids=ids, attention_mask=mask).logits[:, len(query) - 1 : -1], labels)
    ref_logp = token_logprobs(ref(input_ids=ids, attention_mask=mask).logits[:, len(query) - 1 : -1], labels)
    kl = float((logp - ref_logp).sum())
    score = score_sequences(rm, [query + response], tok.pad_token_id)[0]
    return {
        "prompt": prompt,
        "response": out.texts[0],
        "rm_score": round(score, 4),
        "kl": round(kl, 4),
        "kl_coef": kl_coef,
        "reward": round(score - kl_coef * kl, 4),
    }


def write_walkthrough(root: Path, world_dir: Path, rm_dir: Path, ppo_dir: Path, sft_dir: Path) -> dict:
    world = load_world(world_dir)
    demo = read_demos(world_dir / "sft_train.jsonl")[0]
    ranked = read_rankings(world_dir / "rm_val.jsonl")[0]
    rm, tok = load_reward_model(rm_dir).eval(), load_tokenizer(rm_dir)
    scores = score_pairs(rm, tok, [ranked.prompt] * len(ranked.responses), list(ranked.responses))
    labeler = json.loads((world_dir / "rm_val.jsonl").read_text().splitlines()[0]).get("labeler", "")
    ppo_cfg = yaml.safe_load((ppo_dir / "config.yaml").read_text())
    steps = [json.loads(x)["step"] for x in (ppo_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    episode = ppo_episode(
        ppo_dir / "policy",
        sft_dir,
        rm_dir,
        read_prompts(world_dir / "ppo_val.jsonl")[0],
        float(ppo_cfg["kl_coef"]),
        int(ppo_cfg["max_new_tokens"]),
    )
    out = {
        "sft": {"stage": "sft-small", "prompt": demo.prompt, "completion": demo.completion},
        "ranking": {
            "prompt": ranked.prompt,
            "responses": list(ranked.responses),
            "ranking": [list(g) if len(g) > 1 else g[0] for g in ranked.groups],
            "rm_scores": [round(s, 4) for s in scores],
            "gold": [round(world.judge(ranked.prompt, r).quality, 4) for r in ranked.responses],
            "labeler": labeler,
        },
        "ppo_step": {"stage": ppo_dir.name, "step": max(steps), **episode},
    }
    write_json(root / "walkthrough.json", out)
    return out


# --------------------------------------------------------------------------- the report section


def s_walkthrough(run) -> str:
    """The section, from a `files.RunFiles` (its .walkthrough and .metrics)."""
    w = run.walkthrough
    if not w:
        return missing("walkthrough.json is missing (written by `rlhflab run`).")
    return _walk_sft(run, w.get("sft")) + _walk_ranking(w.get("ranking")) + _walk_ppo(w.get("ppo_step"))


def _extras(d: dict, skip: set) -> str:
    rows = [[k, v] for k, v in d.items() if k not in skip and isinstance(v, (int, float, str, bool))]
    return table(["", "value"], rows, "kv") if rows else ""


def _walk_sft(run, d) -> str:
    head = "<h3>Step 1 — supervised fine-tuning on a demonstration</h3>"
    if not isinstance(d, dict):
        return head + missing("walkthrough.json has no 'sft' example.")
    stage = str(d.get("stage", "sft-small"))
    panel = (f"{stage}: loss on response tokens", [("", run.metrics.get(stage, []), "sft/loss")])
    curve = charts.curves_figure([panel], ncols=1)
    return (
        head + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p><p class="answer">'
        f"{escape(str(d.get('completion', '')))}</p>"
        '<p class="caption">A labeler-written answer. The loss counts only the answer\'s tokens, not the '
        "prompt's (§3.5).</p>"
        + _extras(d, {"prompt", "completion", "stage"})
        + figure(
            curve,
            "SFT loss",
            "The loss over SFT steps, on demonstrations like this one.",
            f"{stage}/metrics.jsonl has no sft/loss.",
        )
    )


def _walk_ranking(d) -> str:
    head = "<h3>Step 2 — a labeler ranks K answers; the reward model scores them</h3>"
    if not isinstance(d, dict) or not d.get("responses"):
        return head + missing("walkthrough.json has no 'ranking' example.")
    responses, scores, gold = d["responses"], d.get("rm_scores") or [], d.get("gold") or []
    order = d.get("ranking") or list(range(len(responses)))
    rows, ranks = [], {}
    for pos, entry in enumerate(order):
        for i in entry if isinstance(entry, list) else [entry]:
            ranks[i] = pos
            rows.append(
                [
                    pos + 1,
                    text_cell(responses[i]),
                    scores[i] if i < len(scores) else "–",
                    gold[i] if i < len(gold) else "–",
                ]
            )
    agree = [
        (ranks[a] < ranks[b]) == (scores[a] > scores[b])
        for a in ranks
        for b in ranks
        if a < b and ranks[a] != ranks[b] and len(scores) == len(responses)
    ]
    note = f" The reward model orders {sum(agree)} of {len(agree)} pairs as the labeler did." if agree else ""
    return (
        head
        + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p>'
        + table(["labeler's rank", "answer", "RM score", "gold"], rows, "samples")
        + f'<p class="caption">K = {len(responses)} answers ranked best first by labeler '
        f"{escape(str(d.get('labeler', '?')))}; all C(K,2) pairs of this ranking are one batch element of the "
        f"RM loss (§3.5).{escape(note)}</p>"
    )


def _walk_ppo(d) -> str:
    head = "<h3>Step 3 — one PPO step: reward = RM score − β·KL</h3>"
    if not isinstance(d, dict) or "rm_score" not in d:
        return head + missing("walkthrough.json has no 'ppo_step' example.")
    rm, kl, beta = d.get("rm_score"), d.get("kl"), d.get("kl_coef")
    reward = d.get("reward")
    if reward is None and None not in (rm, kl, beta):
        reward = rm - beta * kl
    dash = lambda v: "–" if v is None else v
    rows = [
        ["r_θ(x, y): reward-model score", rm],
        ["KL: Σ log π(y_t)/π_SFT(y_t)", dash(kl)],
        ["β (KL coefficient)", dash(beta)],
        ["reward = r − β·KL", dash(reward)],
    ]
    return (
        head + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p><p class="answer">'
        f"{escape(str(d.get('response', '')))}</p>"
        + table(["quantity", "value"], rows, "kv")
        + '<p class="caption">The policy\'s sampled answer is scored by the reward model and charged for drifting '
        "from the SFT policy (§3.5, eq. 2); PPO then raises the probability of answers with high reward.</p>"
        + _extras(d, {"prompt", "response", "rm_score", "kl", "kl_coef", "reward"})
    )
