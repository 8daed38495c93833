"""The report page of an eval directory made without the lab world (rlhflab.eval.generic).

    is_eval_dir(root) -> bool        summary.json holds rm/<p>/win_vs_<b> keys
    render(root, css) -> str         one self-contained HTML page

Reads <root>/summary.json, samples.jsonl and config.yaml (each may be missing or broken:
the page then says what is missing). No lab section is drawn: there is no gold and no
labeler here, only the reward model's scores and the KL to the reference.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import yaml

from rlhflab.report.charts import color, plt, to_uri
from rlhflab.report.html import Raw, figure, missing, read_jsonl, table, text_cell

WIN_KEY = re.compile(r"^rm/(?P<policy>[^/]+)/win_vs_(?P<baseline>[^/]+?)$")


def _summary(root: Path) -> dict:
    try:
        obj = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _win_keys(summary: dict) -> list[re.Match]:
    """rm/<p>/win_vs_<b> keys (numbers; their _ci twins are [low, high] lists)."""
    return [m for k, v in summary.items() if isinstance(v, (int, float)) and (m := WIN_KEY.match(k))]


def is_eval_dir(root: str | Path) -> bool:
    return bool(_win_keys(_summary(Path(root))))


def policies_and_baseline(summary: dict, order: list[str] = ()) -> tuple[list[str], str]:
    """The policy names (those in `order` first, as there) and the baseline's name, from the
    win-rate keys."""
    found = _win_keys(summary)
    names = sorted((m["policy"] for m in found), key=lambda n: list(order).index(n) if n in order else len(order))
    return names, (found[0]["baseline"] if found else "the baseline")


def _interval(value, ci) -> Raw | str:
    """'0.512 [0.401, 0.622]', or '–' where the value is missing."""
    if not isinstance(value, (int, float)):
        return "–"
    if isinstance(ci, list) and len(ci) == 2:
        return Raw(f"{value:.3f} <span class='sub'>[{ci[0]:.3f}, {ci[1]:.3f}]</span>")
    return Raw(f"{value:.3f}")


def s_table(summary: dict, order: list[str]) -> str:
    names, base = policies_and_baseline(summary, order)
    rows = []
    for n in names:
        win, score = f"rm/{n}/win_vs_{base}", f"rm/{n}/score"
        rows.append(
            [
                n,
                _interval(summary.get(win), summary.get(f"{win}_ci")),
                _interval(summary.get(score), summary.get(f"{score}_ci")),
                _interval(summary.get(f"kl/{n}"), summary.get(f"kl_ci/{n}")),
                summary.get(f"length/{n}", "–"),
                summary.get(f"eos_rate/{n}", "–"),
            ]
        )
    headers = [
        "policy",
        f"RM win rate vs {base} [95% CI]",
        "RM score [95% CI]",
        "KL to the reference (nats) [95% CI]",
        "length (tokens)",
        "eos rate",
    ]
    return table(headers, rows) + (
        f'<p class="caption">{summary.get("n/prompts", "?")} prompts. Win rate: the share of prompts on which '
        f"the reward model scores the policy's answer above {escape(base)}'s (ties half; Wilson interval). KL: "
        "Σ log π − log π_ref over each answer's tokens, on the policy's own samples. The eos rate is the share of "
        "answers that ended before max_new_tokens.</p>"
    )


def winrate_chart(summary: dict, order: list[str]) -> str | None:
    """A bar per policy: its RM win rate against the baseline, with the 95% Wilson interval."""
    names, base = policies_and_baseline(summary, order)
    if not names:
        return None
    rates = [summary[f"rm/{n}/win_vs_{base}"] for n in names]
    cis = [summary.get(f"rm/{n}/win_vs_{base}_ci") or [r, r] for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(max(3.6, 1.0 + 0.8 * len(names)), 3.0))
    err = [[r - lo for r, (lo, _) in zip(rates, cis)], [hi - r for r, (_, hi) in zip(rates, cis)]]
    ax.bar(range(len(names)), rates, yerr=err, capsize=4, color=[color(n) for n in names])
    for x, r in enumerate(rates):  # at the foot of the bar, clear of the interval
        ax.text(x, 0.02, f"{r:.2f}", ha="center", va="bottom", fontsize=7.5, color="white")
    ax.axhline(0.5, color="#bbbbbb", lw=1, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"RM win rate vs {base}")
    return to_uri(fig)


def _prompt_text(prompt) -> str:
    """A prompt as text: a string as is, a conversation as one 'role: content' line per message."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def s_samples(rows: list[dict], n_prompts: int) -> str:
    by_index: dict[int, list[dict]] = {}
    for r in rows:
        if isinstance(r.get("index"), int) and (r["index"] in by_index or len(by_index) < n_prompts):
            by_index.setdefault(r["index"], []).append(r)
    if not by_index:
        return missing("samples.jsonl is missing or has no rows.")
    blocks = []
    for i, answers in by_index.items():
        cells = [[a.get("policy", "?"), text_cell(str(a.get("response", ""))), a.get("score", "–")] for a in answers]
        blocks.append(
            f'<h3>prompt {i}</h3><p class="prompt text">{escape(_prompt_text(answers[0].get("prompt", "")))}</p>'
            + table(["policy", "answer", "RM score"], cells, "samples")
        )
    return f'<p class="caption">The first {len(by_index)} prompts, every policy\'s answer.</p>' + "".join(blocks)


def _read(root: Path) -> tuple[dict, list[dict], dict]:
    rows = read_jsonl(root / "samples.jsonl")
    try:
        config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    return _summary(root), rows, config if isinstance(config, dict) else {}


def render(root: str | Path, css: str) -> str:
    root = Path(root)
    summary, rows, config = _read(root)
    shown = config.get("samples_shown", 10)
    policies = config.get("policies")
    order = [*policies, "reference"] if isinstance(policies, dict) else []  # the config's order
    sections = [
        ("table", "RM win rates, scores and KL", lambda: s_table(summary, order)),
        (
            "winrate",
            "RM win rate against the baseline",
            lambda: figure(
                winrate_chart(summary, order),
                "RM win rate per policy",
                "Bars: 95% Wilson intervals; the dashed line is a tie with the baseline.",
                "no win rates in summary.json.",
            ),
        ),
        ("samples", "Samples", lambda: s_samples(rows, shown if isinstance(shown, int) else 10)),
    ]
    body = ""
    for anchor, title, draw in sections:
        try:
            inner = draw()
        except Exception as e:  # a broken file spoils one section, never the page
            inner = missing(f"this section could not be drawn ({type(e).__name__}: {e}).")
        body += f'<section id="{anchor}"><h2>{escape(title)}</h2>{inner}</section>'
    judged = " ".join(
        f"{what} <code>{escape(str(config[k]))}</code>."
        for k, what in (("reward_model", "Reward model"), ("reference", "Reference policy"), ("prompts", "Prompts"))
        if config.get(k)
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>rlhflab eval: {escape(root.name)}</title>'
        f"<style>{css}</style></head><body><h1>rlhflab eval report</h1>"
        f'<p class="sub">Eval directory <code>{escape(str(root))}</code>, made without the lab world: every '
        f"figure is the reward model's judgement, not a human's. {judged}</p>{body}</body></html>\n"
    )
