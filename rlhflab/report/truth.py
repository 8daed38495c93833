"""The report's section on the held-out evaluations (§4.2): truthfulness (TruthfulQA-like),
toxicity (RealToxicityPrompts-like), closed-domain hallucination and bias, with 95% CIs."""

from __future__ import annotations

from rlhflab.report import charts
from rlhflab.report.files import RunFiles
from rlhflab.report.html import ci_cell, figure, missing, table


def _rate_series(label: str, key: str) -> tuple[str, str, str, str]:
    """A series of charts.ci_bars_figure for a key whose interval keys end in _ci_low / _ci_high."""
    return (label, key, key + "_ci_low", key + "_ci_high")


TRUTH_VARIANTS = [("plain", "QA prompt"), ("instruction_qa", "Instruction+QA")]
TOXICITY_VARIANTS = [("plain", "no prompt"), ("respectful", "respectful prompt"), ("biased", "biased prompt")]
HALLUCINATION = [
    (label, f"{key}/{{m}}", f"{key}_ci_low/{{m}}", f"{key}_ci_high/{{m}}")
    for key, label in (("hallucination", "all answers"), ("hallucination_attempted", "answers that attempt the task"))
]


def s_truth(run: RunFiles) -> str:
    s = run.eval
    truth = [
        (title, (0, 1), [_rate_series(lab, f"truthful/{v}/{{m}}/{what}") for v, lab in TRUTH_VARIANTS])
        for what, title in (
            ("truthful", "truthful"),
            ("informative", "informative"),
            ("both", "truthful and informative"),
            ("mc", "true answer likelier than the myth (MC1)"),
        )
    ]
    tox = [
        (title, (0, 1), [_rate_series(lab, f"toxicity/{v}/{{m}}/{what}") for v, lab in TOXICITY_VARIANTS])
        for what, title in (
            ("expected_max", "expected maximum toxicity (k = 4)"),
            ("probability", "toxicity probability"),
        )
    ]
    other = [
        ("hallucination (closed-domain tasks)", (0, 1), HALLUCINATION),
        (
            "bias: normalized entropy (higher: less biased)",
            (0, 1),
            [_rate_series("sentence pairs", "bias/{m}/entropy")],
        ),
    ]
    figs = [
        figure(
            charts.ci_bars_figure(s, truth),
            "truthfulness on held-out questions per model",
            "Figure 6 analog, on held-out TruthfulQA-like questions about entities the web corpus tells a myth "
            "about more often than the truth, asked with no instruction (QA prompt) and after the paper's "
            "Instruction+QA prefix (“reply I have no comment unless you are certain”). Truthful: asserts nothing "
            "false; informative: names an answer (“I have no comment” is truthful, not informative). MC1: "
            "TruthfulQA's multiple-choice form, the share of questions whose true answer the model finds likelier "
            "than the myth (0.5: no preference; below: the imitative falsehood). Bars are 95% Wilson intervals.",
            "",
        ),
        figure(
            charts.ci_bars_figure(s, tox),
            "toxicity on held-out text beginnings per model",
            "Figure 7 analog, RealToxicityPrompts-like: beginnings of rude text from templates no training split "
            "uses, each continued plain, after the paper's respectful instruction and after its biased one (the "
            "same text in all three). Left: mean over prompts of the highest graded toxicity of 4 samples (bootstrap "
            "interval); right: share of prompts with a sample scoring ≥ 0.5 (Wilson interval).",
            "",
        ),
        figure(
            charts.ci_bars_figure(s, other),
            "hallucination and bias per model",
            "Left: share of answers to closed-domain test prompts (closed QA, summarization, extraction) with a "
            "statement naming an entity the input does not (§4.1's hallucination metadata), of all answers and of "
            "those that attempt the task (a base model that says nothing makes nothing up). Right: Winogender / "
            "CrowS-Pairs-like minimal sentence pairs that differ only in a country or a pronoun; the entropy of "
            "the model's likelihood choice within a pair, normalized to [0, 1] (App. E). 95% intervals.",
            "",
        ),
    ]
    if not any(f.startswith("<figure>") for f in figs):
        return missing("no held-out truthfulness, toxicity, hallucination or bias keys in eval/summary.json.")
    halluc = ("hallucination", "hallucination_attempted")
    ci = {f"{k}/{{m}}": (f"{k}_ci_low/{{m}}", f"{k}_ci_high/{{m}}") for k in halluc}

    def ci_table(first: list[str], cols: list[tuple[str, str]], variants=((None, ""),)) -> str:
        """Rows of model (x variant), a "value [95% interval]" cell per column; keys hold {m} (and {v})."""
        keys = [k.format(m="{m}", v=v) for v, _ in variants for k, _ in cols]
        names = charts.model_order({m for k in keys for m in charts.models_matching(s, k)})
        rows = []
        for n in names:
            for v, label in variants:
                cells = []
                for k, _ in cols:
                    key = k.format(m="{m}", v=v)
                    cells.append(ci_cell(s, key, *ci.get(key, (key + "_ci_low", key + "_ci_high")), n))
                rows.append([n] + ([label] if v else []) + cells)
        return table(first + [t for _, t in cols], rows) if names else ""

    measures = [("truthful", "truthful"), ("informative", "informative"), ("both", "both"), ("mc", "MC1")]
    tables = (
        ci_table(["model", "prompt"], [(f"truthful/{{v}}/{{m}}/{w}", t) for w, t in measures], TRUTH_VARIANTS)
        + ci_table(
            ["model", "prompt"],
            [("toxicity/{v}/{m}/expected_max", "expected max toxicity"), ("toxicity/{v}/{m}/probability", "prob.")],
            TOXICITY_VARIANTS,
        )
        + ci_table(
            ["model"],
            [
                ("hallucination/{m}", "hallucination"),
                ("hallucination_attempted/{m}", "hallucination, attempts"),
                ("bias/{m}/entropy", "bias entropy"),
            ],
        )
    )
    n = f"{s.get('n/truthful', '?')} questions, {s.get('n/toxicity', '?')} texts, {s.get('n/bias', '?')} pairs"
    return (
        "".join(f for f in figs if f.startswith("<figure>"))
        + tables
        + f'<p class="caption">Each cell: value [95% interval] ({n}, {s.get("n/closed_domain", "?")} closed-domain '
        "test prompts).</p>"
    )
