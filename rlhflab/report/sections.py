"""The run report: ONE self-contained HTML page built from the files of a run directory.

    write_report("runs/lab", "runs/lab/report.html")

Reads only files under the run directory (each may be missing; its section then says
so and the rest of the page is still drawn):
  eval/summary.json, eval/samples.jsonl, eval/best_of_n.jsonl, eval/config.yaml   (`rlhflab eval`)
  <stage>/metrics.jsonl, <stage>/summary.json   for pretrain-*, sft-*, rm-*, ppo-*, ppoptx-*
  sweep/beta-<β>/metrics.jsonl                  PPO runs of the β sweep (over-optimization)
  world/summary.json                            the lab world's counts and labeler agreement
  walkthrough.json                              one real example per stage, written by `rlhflab run`:
    {"sft":      {"stage": "sft-small", "prompt": str, "completion": str, ...scalars},
     "ranking":  {"prompt": str, "responses": [str], "ranking": [int | [int, ...]] (best first),
                  "rm_scores": [float] (per response), "gold": [float], "labeler": str},
     "ppo_step": {"stage": "ppo-small", "step": int, "prompt": str, "response": str,
                  "rm_score": float, "kl": float, "kl_coef": float, "reward": float (= rm_score − kl_coef·kl)}}
Charts are PNGs embedded as base64 (matplotlib, Agg); the page loads nothing from outside.
An eval directory made without the lab world (rlhflab.eval.generic) gets report/generic.py's page.
"""

from __future__ import annotations

import argparse
from html import escape
from pathlib import Path

from rlhflab.eval.capability import BENCHMARKS
from rlhflab.eval.overopt import rl_curve
from rlhflab.io import atomic_write_text
from rlhflab.report import charts, generic
from rlhflab.report.files import RunFiles, baseline, load_run
from rlhflab.report.html import ci_cell, figure, fmt, missing, table, text_cell
from rlhflab.report.prompted import s_prompted
from rlhflab.report.truth import s_truth
from rlhflab.report.walkthrough import s_walkthrough
from rlhflab.world.gold import STYLES

# --------------------------------------------------------------------------- sections


def s_glance(run: RunFiles) -> str:
    s = run.eval
    names = charts.models_with(s, "winrate")
    if not names:
        return missing("eval/summary.json is missing or has no win rates (run `rlhflab eval`).")
    base = baseline(run)
    others = [n for n in names if n != base]
    lead = ""
    if others:
        best = max(others, key=lambda n: s[f"winrate/{n}"])
        lead = (
            f"<p><strong>{escape(best)}</strong>'s answers were preferred to {escape(base)}'s in "
            f"<strong>{s[f'winrate/{best}']:.0%}</strong> of comparisons by held-out labelers "
            f"(95% CI {s[f'winrate_ci_low/{best}']:.0%}–{s[f'winrate_ci_high/{best}']:.0%}, "
            f"{s.get('n/test', '?')} test prompts); by gold quality, in "
            f"{s.get(f'winrate_gold/{best}', 0):.0%}.</p>"
        )
    lead += _head_to_head(s)
    cols = [
        ("winrate", "win rate"),
        ("winrate_gold", "gold win rate"),
        ("gold", "gold quality"),
        ("gold_unseen", "gold, unseen prompts"),
        ("likert", "Likert 1–7"),
        ("rm", "RM score"),
        ("truthful/plain/{m}/both", "truthful & informative"),
        ("toxicity/plain/{m}/expected_max", "toxicity"),
        ("capability/mean", "capability"),
    ]
    cols = [(k if "{m}" in k else k + "/{m}", t) for k, t in cols]
    cols = [(k, t) for k, t in cols if any(k.format(m=n) in s for n in names)]
    rows = [[n] + [s.get(k.format(m=n), "–") for k, _ in cols] for n in names]
    return (
        lead
        + table(["model"] + [t for _, t in cols], rows)
        + (
            '<p class="caption">Every number is measured on a held-out draw of test prompts; win rates are against '
            f"{escape(base)}. Gold quality is the lab world's hidden truth, which no stage trains on. The world has "
            f"few distinct prompts in some families, so many test prompts also occur in training; "
            f"{s.get('n/test_unseen', '?')} of them do not (a quarter of each family's prompts only test users "
            "ask, so every family has some), and “gold, unseen prompts” is measured on those.</p>"
        )
    )


def _head_to_head(s: dict) -> str:
    """One line per h2h/<a>/<b> pair of eval's head_to_head (the paper's §1 headline)."""
    pairs = [k.split("/", 1)[1] for k in s if k.startswith("h2h/")]
    return "".join(
        f"<p>Head to head, held-out labelers preferred <strong>{escape(p.split('/')[0])}</strong> to "
        f"{escape(p.split('/')[1])} in <strong>{s[f'h2h/{p}']:.0%}</strong> of test prompts (95% CI "
        f"{s[f'h2h_ci_low/{p}']:.0%}–{s[f'h2h_ci_high/{p}']:.0%}); by gold quality, in {s[f'h2h_gold/{p}']:.0%}"
        f"{_unseen_h2h(s, p)}.</p>"
        for p in pairs
    )


def _unseen_h2h(s: dict, p: str) -> str:
    """'; on the N unseen prompts, R% (CI)' where eval measured it, else ''."""
    if f"h2h_unseen/{p}" not in s:
        return ""
    return (
        f"; on the {s.get('n/test_unseen', 0):.0f} prompts no training split has, {s[f'h2h_unseen/{p}']:.0%} "
        f"({s[f'h2h_unseen_ci_low/{p}']:.0%}–{s[f'h2h_unseen_ci_high/{p}']:.0%})"
    )


def s_winrate(run: RunFiles) -> str:
    return figure(
        charts.winrate_figure(run.eval),
        "win rate against the baseline by model size",
        f"Figure 1 analog: how often each model's answer beats {escape(baseline(run))}'s on the same "
        "prompt (ties count half; bars are 95% Wilson intervals). Look for PPO-ptx and PPO above the dashed "
        "0.5 line and GPT far below. The right panel asks the gold scorer instead of labelers: where the "
        "two disagree, the policy pleases labelers in ways gold does not reward.",
        "no win rates in eval/summary.json.",
    )


def s_likert(run: RunFiles) -> str:
    panels = [
        ("likert", "Likert score (1–7)", (1, 7)),
        ("meta/fails_instruction", "fails to follow the instruction", (0, 1)),
        ("meta/hallucination", "hallucinates (closed-domain tasks)", (0, 1)),
        ("meta/toxic", "toxic answer", (0, 1)),
    ]
    return figure(
        charts.bar_panels(run.eval, panels),
        "Likert scores and metadata per model",
        "Figure 4 analog: held-out labelers' 1–7 rating and the fraction of answers with each failure. "
        "Aligned models should score higher and fail, hallucinate and insult less.",
        "no Likert or metadata keys in eval/summary.json.",
    )


def s_capability(run: RunFiles) -> str:
    fig = figure(
        charts.capability_figure(run.eval, [*BENCHMARKS, "mean"]),
        "capability benchmarks per model",
        "The alignment tax: scores on the world's SQuAD/DROP/HellaSwag/translation-like benchmarks, "
        "which no stage trains on. Look for PPO below SFT/GPT and PPO-ptx recovering most of the gap "
        "(§4.2: mixing pretraining gradients into PPO).",
        "no capability keys in eval/summary.json.",
    )
    fig += _table14(run.eval)
    rl = {st: rows for st, rows in run.metrics.items() if st.startswith(("ppo", "sweep/"))}
    panels = [
        (f"capability ({bench}) against KL", [(st, rows, f"eval/capability/{bench}") for st, rows in rl.items()])
        for bench in ("mean", "webtext")
    ]
    curves = charts.curves_figure(panels, ncols=2, x="eval/kl", xlabel="KL(π ‖ π_SFT) of validation samples")
    return fig + (
        figure(
            curves,
            "capability against KL during PPO",
            "The tax as PPO pays it: the mean benchmark score and the pretraining text's token accuracy "
            "(webtext) on the first items of each benchmark, measured every few steps against the KL of the "
            "policy's validation samples from SFT, for every PPO run (the β sweep runs reach the largest KL). "
            "Look for PPO's scores falling as the KL grows and PPO-ptx's held up by its pretraining gradients "
            "(§4.2).",
            "",
        )
        if curves
        else ""
    )


def _ci_keys(key: str) -> tuple[str, str]:
    return f"{key}_ci_low", f"{key}_ci_high"


def _table14(s: dict) -> str:
    """Table 14's layout: a row per benchmark, zero-shot and few-shot, a column per model;
    each cell the score [95% bootstrap interval] of the tax/ and tax_fewshot/ keys."""
    names = charts.models_matching(s, "tax/{m}/mean")
    rows = [
        [
            f"{bench} ({label})",
            *[ci_cell(s, f"{key}/{{m}}/{bench}", *_ci_keys(f"{key}/{{m}}/{bench}"), m) for m in names],
        ]
        for key, label in (("tax", "zero-shot"), ("tax_fewshot", "few-shot"))
        for bench in [*BENCHMARKS, "mean"]
        if any(f"{key}/{m}/{bench}" in s for m in names)
    ]
    if not rows:
        return ""
    return table(["benchmark", *names], rows) + (
        '<p class="caption">Each cell: score [95% bootstrap interval over items]. Few-shot: solved items of the '
        "same benchmark before each one, as many as fit the context (its mean is over the four task benchmarks; "
        "webtext has no few-shot form). Compare PPO with SFT of its size, and PPO-ptx with both (Table 14).</p>"
    )


def _rl_runs(run: RunFiles) -> dict[str, list[dict]]:
    runs = {}
    for stage, rows in run.metrics.items():
        if stage.startswith(("ppo", "sweep/")):
            label = stage
            if "beta-" in stage:  # sweep/beta-0.02: PPO at that β; sweep/ptx-beta-0.02: PPO-ptx
                label = ("PPO-ptx " if "ptx-beta-" in stage else "") + "β_KL=" + stage.split("beta-", 1)[1]
            pts = rl_curve(rows)
            if pts:
                runs[label] = pts
    return runs


def s_overopt(run: RunFiles) -> str:
    rl = _rl_runs(run)
    fig = figure(
        charts.overopt_figure(run.bon, rl),
        "gold and RM score against sqrt KL",
        "Reward over-optimization (Gao et al. 2022): the reward model's score keeps rising with the "
        "distance d = √KL from the starting policy, while gold quality rises, peaks and falls. Dashed: "
        "least-squares fits of Gao et al.'s forms, d(α−βd) for best-of-n (KL = log n − (n−1)/n) and "
        "d(α−β log d) for RL, with R². The gap between the right and left panels is reward hacking.",
        "needs eval/best_of_n.jsonl (eval with a reward model) or PPO metrics with eval/gold.",
    )
    rows = []
    for label, pts in rl.items():
        last = pts[-1]
        rows.append(
            [
                label,
                last["step"],
                last["kl"],
                last["rm"] if last["rm"] is not None else "–",
                last["gold"] if last["gold"] is not None else "–",
            ]
        )
    runs_table = table(["PPO run", "last step", "KL", "RM score", "gold"], rows) if rows else ""
    gap = [[n, run.eval[f"rm/{n}"], run.eval.get(f"gold/{n}", "–")] for n in charts.models_with(run.eval, "rm")]
    gap_table = (
        (
            table(["model", "RM score (proxy)", "gold quality (truth)"], gap)
            + '<p class="caption">Proxy against truth on the test prompts: a model the RM ranks high but gold '
            "does not has learned the labelers' biases.</p>"
        )
        if gap
        else ""
    )
    return fig + runs_table + gap_table


def _lines(run: RunFiles, prefixes: tuple[str, ...], key: str) -> list[tuple[str, list[dict], str]]:
    return [
        (st, rows, key) for st, rows in run.metrics.items() if st.startswith(prefixes) and not st.startswith("sweep/")
    ]


def s_training(run: RunFiles) -> str:
    ppo = ("ppo", "ppoptx")
    panels = [
        ("pretraining loss", _lines(run, ("pretrain",), "pretrain/loss")),
        ("pretraining held-out loss", _lines(run, ("pretrain",), "pretrain/val_loss")),
        ("SFT loss (response tokens)", _lines(run, ("sft",), "sft/loss")),
        ("SFT held-out loss", _lines(run, ("sft",), "sft/val_loss")),
        ("RM loss", _lines(run, ("rm",), "rm/loss")),
        ("RM pairwise accuracy", _lines(run, ("rm",), "rm/accuracy")),
        (
            "PPO: RM score of rollouts",
            _lines(run, ppo, "objective/rm_score") or _lines(run, ppo, "objective/scores"),
        ),
        ("PPO: KL(π ‖ π_SFT)", _lines(run, ppo, "objective/kl")),
        ("PPO: gold of sampled answers (validation, T = 1)", _lines(run, ppo, "eval/sampled/gold")),
        ("PPO: gold of greedy answers (validation)", _lines(run, ppo, "eval/gold")),
        ("PPO: policy loss", _lines(run, ppo, "ppo/loss/policy")),
        ("PPO: value loss", _lines(run, ppo, "ppo/loss/value")),
        ("PPO-ptx: pretraining loss term", _lines(run, ppo, "ppo/loss/ptx")),
    ]
    out = figure(
        charts.curves_figure(panels),
        "training curves of every stage",
        "Each stage's own metrics.jsonl. Look for falling losses, RM accuracy well above 0.5 (labelers "
        "agree with each other on ~72% of SFT-small's pairs, comparisons/labeler_agreement: that is "
        "the ceiling), and PPO's RM score "
        "rising while the KL leash keeps the policy close to SFT.",
        "no metrics.jsonl in any stage directory.",
    )
    style_panels = [
        (f"{st}: answer styles", [(sty, rows, f"eval/style/{sty}") for sty in STYLES])
        for st, rows in run.metrics.items()
        if st.startswith(ppo)
    ]
    fig = charts.curves_figure(style_panels, ncols=2)
    if fig:
        out += figure(
            fig,
            "style of PPO answers over training",
            "The gold scorer's style label of validation answers during PPO. A rising Sycophantic share "
            "is the reward model's taste for flattery being exploited.",
            "",
        )
    return out


def _pick(names: list[str], family: str) -> str | None:
    cands = [n for n in names if charts.split_name(n)[0] == family]
    return next((n for n in cands if charts.split_name(n)[1] == "small"), cands[0] if cands else None)


def s_samples(run: RunFiles, n_prompts: int = 6) -> str:
    test = [r for r in run.samples if r.get("split") == "test"]
    names = charts.model_order({r.get("model", "") for r in test})
    chosen = [_pick(names, "GPT"), _pick(names, "SFT"), _pick(names, "PPO-ptx") or _pick(names, "PPO")]
    chosen = [m for m in chosen if m]
    if not chosen:
        return missing("eval/samples.jsonl is missing or has no test answers.")
    by_prompt: dict[str, dict[str, dict]] = {}
    for r in test:
        by_prompt.setdefault(r.get("prompt", ""), {})[r.get("model")] = r
    seen, blocks = set(), []
    for prompt, answers in by_prompt.items():
        family = next(iter(answers.values())).get("family")
        if family in seen or not all(m in answers for m in chosen):
            continue
        seen.add(family)
        rows = [
            [m, text_cell(a.get("response", "")), a.get("gold", "–"), a.get("style", "–")]
            for m, a in ((m, answers[m]) for m in chosen)
        ]
        blocks.append(
            f'<h3>{escape(str(family))}</h3><p class="prompt">{escape(prompt)}</p>'
            + table(["model", "answer", "gold", "style"], rows, "samples")
        )
        if len(blocks) == n_prompts:
            break
    return (
        f'<p class="caption">The same test prompts answered by {", ".join(map(escape, chosen))} (one prompt per '
        "task family). Look for the base model continuing the text like a web page, and the aligned models "
        "answering; check the gold column for flattery or hedging that labelers like and gold does not.</p>"
        + "".join(blocks)
    )


def s_world(run: RunFiles) -> str:
    w = run.world
    if not w:
        return missing("world/summary.json is missing.")
    counts = w.get("counts", {})
    agree = [[k.split("/", 1)[1], v] for k, v in w.items() if k.startswith("agreement/")]
    sanity = [[k, v] for k, v in (w.get("gold_sanity") or {}).items()]
    return (
        f"<p>Seed {fmt(w.get('seed'))}, scale {escape(str(w.get('scale')))}.</p>"
        + table(["file", "rows"], [[k, v] for k, v in counts.items()], "kv")
        + table(["labeler agreement", "fraction of pairs"], agree, "kv")
        + '<p class="caption">Agreement on the world\'s own candidate answers, which spread wider in '
        "quality than a policy's samples. The paper reports 72.6 ± 1.5% agreement between its labelers "
        "on its comparison data; the lab's labelers are calibrated to that on SFT-small's samples (the "
        "comparisons stage's labeler_agreement).</p>"
        + (table(["answer kind", "mean gold quality"], sanity, "kv") if sanity else "")
    )


def s_stages(run: RunFiles) -> str:
    if not run.summaries:
        return missing("no stage summary.json files.")
    out = []
    for stage, s in run.summaries.items():
        rows = [[k, v] for k, v in s.items() if isinstance(v, (int, float, str, bool))][:14]
        if stage not in ("eval", "world") and rows:
            out.append(f"<h3>{escape(stage)}</h3>" + table(["", "value"], rows, "kv"))
    return "".join(out) or missing("no scalar entries in the stage summaries.")


SECTIONS = [
    ("glance", "At a glance", s_glance),
    ("winrate", "1. Which answers do labelers prefer? (Figure 1)", s_winrate),
    ("prompted", "1b. GPT-prompted: what a few-shot prefix changes", s_prompted),
    ("likert", "2. Likert scores and failure metadata (Figure 4)", s_likert),
    ("truth", "3. Truthfulness, toxicity, hallucination and bias (Figures 6–7)", s_truth),
    ("capability", "4. The alignment tax", s_capability),
    ("overopt", "5. Reward over-optimization", s_overopt),
    ("training", "6. Training curves", s_training),
    ("samples", "7. Before and after: the same prompts", s_samples),
    ("walkthrough", "8. Walkthrough of the pipeline on real artifacts", s_walkthrough),
    ("world", "9. The lab world", s_world),
    ("stages", "10. Stage summaries", s_stages),
]

CSS = """
body{font:15px/1.55 system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;max-width:900px;
     margin:2em auto;padding:0 1em}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:1.4em 0 .3em;font-size:1.05em}
figure{margin:1em 0}figure img{max-width:100%;display:block}
figcaption,.caption{color:#555;font-size:.9em}
.missing{background:#fff6e6;border-left:4px solid #e8a33d;padding:.5em .8em;color:#6b4a10}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border-bottom:1px solid #e5e5e5;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6}td:not(:first-child){font-variant-numeric:tabular-nums}
table.samples{width:100%}table.samples td:nth-child(2){width:70%}.text{white-space:pre-wrap}
.prompt{background:#f3f6fb;border-left:4px solid #4c72b0;padding:.4em .8em;margin:.4em 0}
.answer{background:#f4faf4;border-left:4px solid #55a868;padding:.4em .8em;margin:.4em 0;white-space:pre-wrap}
nav ul{columns:2;font-size:.92em;list-style:none;padding-left:0}.sub{color:#666}
"""


def _section(anchor: str, title: str, fn, run: RunFiles) -> str:
    try:
        inner = fn(run)
    except Exception as e:
        inner = missing(f"this section could not be drawn ({type(e).__name__}: {e}).")
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{inner}</section>'


def render(run: RunFiles) -> str:
    toc = "".join(f'<li><a href="#{a}">{escape(t)}</a></li>' for a, t, _ in SECTIONS)
    body = "".join(_section(a, t, fn, run) for a, t, fn in SECTIONS)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>rlhflab report: {escape(run.root.name)}</title>'
        f"<style>{CSS}</style></head><body><h1>rlhflab run report</h1>"
        f'<p class="sub">Run directory <code>{escape(str(run.root))}</code>. The InstructGPT recipe (Ouyang et '
        "al. 2022, arXiv 2203.02155): SFT → reward model → PPO-ptx, on the lab world whose true answer quality "
        f"is known.</p><nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the report for `run_dir` to `out_path` (default <run_dir>/report.html)."""
    out = Path(out_path) if out_path else Path(run_dir) / "report.html"
    atomic_write_text(out, render_any(Path(run_dir)))
    return out


def render_any(root: Path) -> str:
    """An eval directory made without the lab world gets its own page (report/generic.py),
    with none of the lab sections; anything else is a lab run directory."""
    return generic.render(root, CSS) if generic.is_eval_dir(root) else render(load_run(root))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (`rlhflab run`) or an eval directory made without a world")
    parser.add_argument("--out", help="output HTML file (default: <run_dir>/report.html)")


def run_cli(args) -> int:
    print(f"report -> {write_report(args.run_dir, args.out)}")
    return 0
