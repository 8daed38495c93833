"""Pieces of the run report (rlhflab.report): HTML helpers and the walkthrough section.

The walkthrough shows one real example per stage from `walkthrough.json` (its layout is in
rlhflab.report's docstring). Every function returns an HTML fragment; model text is escaped.
"""
from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from rlhflab import report_charts as charts

if TYPE_CHECKING:
    from rlhflab.report import RunFiles

def missing(text: str) -> str:
    return f'<p class="missing">Not shown: {escape(text)}</p>'


def figure(uri: str | None, alt: str, caption: str, missing: str) -> str:
    if uri is None:
        return missing(missing)
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{caption}</figcaption></figure>'


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"
    return escape(str(v))


def table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """A table cell that is already HTML."""


def text_cell(s: str) -> Raw:
    return Raw(f'<span class="text">{escape(s) if s else "<em>(empty)</em>"}</span>')



# --------------------------------------------------------------------------- walkthrough

def s_walkthrough(run: RunFiles) -> str:
    w = run.walkthrough
    if not w:
        return missing("walkthrough.json is missing (written by `rlhflab run`).")
    return _walk_sft(run, w.get("sft")) + _walk_ranking(w.get("ranking")) + _walk_ppo(w.get("ppo_step"))


def _extras(d: dict, skip: set) -> str:
    rows = [[k, v] for k, v in d.items() if k not in skip and isinstance(v, (int, float, str, bool))]
    return table(["", "value"], rows, "kv") if rows else ""


def _walk_sft(run: RunFiles, d) -> str:
    head = "<h3>Step 1 — supervised fine-tuning on a demonstration</h3>"
    if not isinstance(d, dict):
        return head + missing("walkthrough.json has no 'sft' example.")
    stage = str(d.get("stage", "sft-small"))
    panel = (f"{stage}: loss on response tokens", [("", run.metrics.get(stage, []), "sft/loss")])
    curve = charts.curves_figure([panel], ncols=1)
    return (head + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p><p class="answer">'
            f'{escape(str(d.get("completion", "")))}</p>'
            '<p class="caption">A labeler-written answer. The loss counts only the answer\'s tokens, not the '
            "prompt's (§3.5).</p>" + _extras(d, {"prompt", "completion", "stage"})
            + figure(curve, "SFT loss", "The loss over SFT steps, on demonstrations like this one.",
                      f"{stage}/metrics.jsonl has no sft/loss."))


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
            rows.append([pos + 1, text_cell(responses[i]), scores[i] if i < len(scores) else "–",
                         gold[i] if i < len(gold) else "–"])
    agree = [(ranks[a] < ranks[b]) == (scores[a] > scores[b]) for a in ranks for b in ranks
             if a < b and ranks[a] != ranks[b] and len(scores) == len(responses)]
    note = (f" The reward model orders {sum(agree)} of {len(agree)} pairs as the labeler did." if agree else "")
    return (head + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p>'
            + table(["labeler's rank", "answer", "RM score", "gold"], rows, "samples")
            + f'<p class="caption">K = {len(responses)} answers ranked best first by labeler '
            f'{escape(str(d.get("labeler", "?")))}; all C(K,2) pairs of this ranking are one batch element of the '
            f"RM loss (§3.5).{escape(note)}</p>")


def _walk_ppo(d) -> str:
    head = "<h3>Step 3 — one PPO step: reward = RM score − β·KL</h3>"
    if not isinstance(d, dict) or "rm_score" not in d:
        return head + missing("walkthrough.json has no 'ppo_step' example.")
    rm, kl, beta = d.get("rm_score"), d.get("kl"), d.get("kl_coef")
    reward = d.get("reward")
    if reward is None and None not in (rm, kl, beta):
        reward = rm - beta * kl
    dash = lambda v: "–" if v is None else v  # noqa: E731
    rows = [["r_θ(x, y): reward-model score", rm], ["KL: Σ log π(y_t)/π_SFT(y_t)", dash(kl)],
            ["β (KL coefficient)", dash(beta)], ["reward = r − β·KL", dash(reward)]]
    return (head + f'<p class="prompt">{escape(str(d.get("prompt", "")))}</p><p class="answer">'
            f'{escape(str(d.get("response", "")))}</p>' + table(["quantity", "value"], rows, "kv")
            + '<p class="caption">The policy\'s sampled answer is scored by the reward model and charged for drifting '
            "from the SFT policy (§3.5, eq. 2); PPO then raises the probability of answers with high reward.</p>"
            + _extras(d, {"prompt", "response", "rm_score", "kl", "kl_coef", "reward"}))
