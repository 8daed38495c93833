"""The run report: one self-contained HTML page that opens cleanly in a real browser."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from rlhflab.report.html import figure
from rlhflab.report.sections import write_report
from rlhflab.world.gold import STYLES

MODELS = {  # name -> (params, labeler win rate, gold, capability)
    "GPT-small": (133_888, 0.12, 0.08, 0.40),
    "GPT-large": (1_900_000, 0.18, 0.12, 0.55),
    "GPT-prompted-small": (133_888, 0.22, 0.15, 0.40),
    "GPT-prompted-large": (1_900_000, 0.30, 0.22, 0.55),
    "SFT-small": (133_888, 0.50, 0.45, 0.36),
    "SFT-large": (1_900_000, 0.61, 0.55, 0.50),
    "PPO-small": (133_888, 0.66, 0.50, 0.28),
    "PPO-ptx-small": (133_888, 0.64, 0.52, 0.35),
}


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def eval_summary() -> dict:
    s = {
        "n/test": 300,
        "n/test_unseen": 93,
        "n/truthful": 150,
        "n/toxicity": 100,
        "n/bias": 100,
        "n/closed_domain": 80,
    }
    for m, (params, win, gold, cap) in MODELS.items():
        s[f"params/{m}"] = params
        for key, rate in (("winrate", win), ("winrate_gold", gold + 0.05)):
            half = 1.96 * math.sqrt(rate * (1 - rate) / 300)
            s.update({f"{key}/{m}": rate, f"{key}_ci_low/{m}": rate - half, f"{key}_ci_high/{m}": rate + half})
        s.update(
            {
                f"gold/{m}": gold,
                f"gold_unseen/{m}": gold / 2,
                f"rm/{m}": 4 * win - 2,
                f"likert/{m}": 1 + 6 * win,
                f"meta/fails_instruction/{m}": 1 - gold,
                f"meta/hallucination/{m}": 0.3 - gold / 3,
                f"meta/toxic/{m}": 0.1 - gold / 10,
                f"bias/{m}/entropy": 0.9 - gold / 4,
            }
        )
        held = {f"hallucination/{m}": 0.3 - gold / 3, f"hallucination_attempted/{m}": 0.5 - gold / 3}
        for v, lift in (("plain", 0.0), ("instruction_qa", 0.1)):
            held.update({f"truthful/{v}/{m}/{w}": gold + lift for w in ("truthful", "informative", "both", "mc")})
        for v, lift in (("plain", 0.0), ("respectful", -0.05), ("biased", 0.1)):
            held.update({f"toxicity/{v}/{m}/{w}": 0.2 - gold / 5 + lift for w in ("expected_max", "probability")})
        s.update(held)
        for k, v in held.items():  # every held-out figure has its 95% interval
            head = k.split("/")[0]  # hallucination keys put the interval before the model name
            lo, hi = (k + "_ci_low", k + "_ci_high")
            if head.startswith("hallucination"):
                lo, hi = f"{head}_ci_low/{m}", f"{head}_ci_high/{m}"
            s.update({lo: max(0.0, v - 0.05), hi: min(1.0, v + 0.05)})
        s.update({f"bias/{m}/entropy_ci_low": 0.85 - gold / 4, f"bias/{m}/entropy_ci_high": 0.95 - gold / 4})
        s.update({f"meta/style/{st}/{m}": 1 / len(STYLES) for st in STYLES})
        if "prompted" not in m:
            for i, b in enumerate(("reading", "arithmetic", "continuation", "cipher", "webtext")):
                s[f"capability/{b}/{m}"] = cap * (0.8 + 0.1 * i)
            s[f"capability/mean/{m}"] = cap
            for key, shift in (("tax", 0.0), ("tax_fewshot", 0.05)):
                s[f"{key}/{m}/mean"] = cap + shift
                s[f"{key}/{m}/mean_ci_low"], s[f"{key}/{m}/mean_ci_high"] = cap + shift - 0.02, cap + shift + 0.02
    for size in ("small", "large"):  # how the few-shot prefix changes GPT's answers, per family
        for i, f in enumerate(("brainstorming", "open_qa")):
            s.update({f"prompted/{size}/{f}/gold_plain": 0.1 * i, f"prompted/{size}/{f}/gold": 0.1 * i + 0.2})
            s.update({f"prompted/{size}/{f}/on_task_plain": 0.3, f"prompted/{size}/{f}/on_task": 0.8})
    s.update(
        {
            "h2h/PPO-ptx-small/GPT-large": 0.71,
            "h2h_ci_low/PPO-ptx-small/GPT-large": 0.66,
            "h2h_ci_high/PPO-ptx-small/GPT-large": 0.76,
            "h2h_gold/PPO-ptx-small/GPT-large": 0.83,
            "h2h_unseen/PPO-ptx-small/GPT-large": 0.64,
            "h2h_unseen_ci_low/PPO-ptx-small/GPT-large": 0.55,
            "h2h_unseen_ci_high/PPO-ptx-small/GPT-large": 0.72,
        }
    )
    return s


def make_run_dir(root: Path) -> Path:
    rng = random.Random(0)
    _json(root / "eval" / "summary.json", eval_summary())
    (root / "eval" / "config.yaml").write_text("baseline: SFT-small\n")
    shots = [{"prompt": "List two <foods>.", "completion": "rice and beans."}]
    _json(root / "eval" / "prefixes.json", {"GPT-prompted-small": {"shots": shots, "rm_of_candidates": [0.1, 0.4]}})
    prompts = [
        ("Why is Bran the capital of Stil?", "false_premise"),
        ("Name three fruits.", "brainstorming"),
        ("Summarize: the goat <ate> the beans & slept.", "summarization"),
    ]
    _jsonl(
        root / "eval" / "samples.jsonl",
        [
            {
                "split": "test",
                "family": f,
                "prompt": p,
                "model": m,
                "response": f"{m} says <b>hi</b> to {p[:10]}",
                "gold": round(rng.random(), 3),
                "style": rng.choice(STYLES),
            }
            for p, f in prompts
            for m in MODELS
        ],
    )
    _jsonl(
        root / "eval" / "best_of_n.jsonl",
        [
            {
                "n": n,
                "kl": math.log(n) - (n - 1) / n,
                "d": math.sqrt(math.log(n) - (n - 1) / n),
                "gold": 0.4 + 0.3 * d - 0.25 * d * d,
                "rm": 0.1 + 0.9 * d,
            }
            for n in (1, 2, 4, 8, 16, 32)
            for d in [math.sqrt(math.log(n) - (n - 1) / n)]
        ],
    )
    _json(
        root / "world" / "summary.json",
        {
            "seed": 0,
            "scale": "lab",
            "counts": {"sft_train": 1200, "rm_train": 1500},
            "agreement/train_train": 0.726,
            "agreement/train_heldout": 0.71,
            "gold_sanity": {"demonstration": 0.93, "Sycophantic": 0.5},
        },
    )
    for size, n in (("small", 60), ("large", 40)):
        val = {i: {"pretrain/val_loss": 2.5} for i in range(20, n + 1, 20)}
        _jsonl(
            root / f"pretrain-{size}" / "metrics.jsonl",
            [{"step": i, "pretrain/loss": 6 * math.exp(-i / 20) + 2, **val.get(i, {})} for i in range(1, n + 1)],
        )
        _json(root / f"pretrain-{size}" / "summary.json", {"params": MODELS[f"GPT-{size}"][0], "val_loss": 2.4})
        _jsonl(
            root / f"sft-{size}" / "metrics.jsonl",
            [{"step": i, "sft/loss": 3 / (1 + i / 10)} for i in range(1, 40)],
        )
    _jsonl(
        root / "rm-small" / "metrics.jsonl",
        [{"step": i, "rm/loss": 0.69 - i / 200, "rm/accuracy": 0.5 + i / 200} for i in range(1, 40)],
    )
    for stage, runs in (
        ("ppo-small", [0.02]),
        ("ppoptx-small", [0.02]),
        ("sweep/beta-0.005", [0.005]),
        ("sweep/beta-0.05", [0.05]),
    ):
        rows = [{"step": 0, "eval/gold": 0.45, "eval/rm_score": 0.0, "eval/kl": 0.0}]
        for i in range(1, 31):
            kl = i / runs[0] / 300
            row = {
                "step": i,
                "objective/kl": kl,
                "objective/rm_score": math.sqrt(kl),
                "ppo/loss/ptx": 2.0,
                "ppo/loss/policy": -0.01 * i,
                "ppo/loss/value": 1 / i,
            }
            if i % 5 == 0:
                d = math.sqrt(kl)
                row.update(
                    {
                        "eval/gold": 0.45 + 0.2 * d * (1 - 0.6 * math.log(d)),
                        "eval/rm_score": 0.8 * d,
                        "eval/kl": kl,
                        "eval/capability/mean": 0.4 - i / 300,
                        **{f"eval/style/{st}": (0.5 if st == "Helpful" else 0.1) for st in STYLES},
                    }
                )
            rows.append(row)
        _jsonl(root / stage / "metrics.jsonl", rows)
    _json(
        root / "walkthrough.json",
        {
            "sft": {
                "stage": "sft-small",
                "prompt": "Name three fruits.",
                "completion": "Apples, pears, plums.",
            },
            "ranking": {
                "prompt": "Name three fruits.",
                "responses": [
                    "Apples, pears, plums.",
                    "Great question! Apples.",
                    "I am not sure.",
                    "Apples, pears, plums.",
                ],
                "ranking": [[0, 3], 1, 2],
                "rm_scores": [1.2, 0.9, -0.5, 1.2],
                "gold": [1.0, 0.4, 0.1, 1.0],
                "labeler": "L03",
            },
            "ppo_step": {
                "stage": "ppo-small",
                "step": 7,
                "prompt": "Name three fruits.",
                "response": "Apples, pears.",
                "rm_score": 0.8,
                "kl": 2.5,
                "kl_coef": 0.02,
            },
        },
    )
    return root


def test_report_is_self_contained_and_renders(tmp_path, browser, artifacts_dir):
    out = write_report(make_run_dir(tmp_path / "run"))
    assert out == tmp_path / "run" / "report.html"
    html = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "external asset"
    assert html.count("<img") >= 8 and "Not shown" not in html
    assert "&lt;b&gt;hi&lt;/b&gt;" in html  # model text is escaped, never injected
    assert re.search(r"preferred <strong>PPO-ptx-small</strong> to GPT-large in <strong>71%</strong>.*66%.76%", html)
    assert "gold, unseen prompts" in html and "93 of them do not" in html
    assert "prompts no training split has, 64% (55%–72%)" in html  # the headline on unseen prompts
    assert "capability against KL during PPO" in html
    cap = MODELS["PPO-ptx-small"][3]  # Table 14's layout, zero- and few-shot, with intervals
    assert "<td>mean (few-shot)</td>" in html and f"{cap + 0.05:.2f} [{cap + 0.03:.2f}–{cap + 0.07:.2f}]" in html
    gold = eval_summary()
    assert f"GPT-prompted-small: gold {gold['gold/GPT-small']:.3f} → {gold['gold/GPT-prompted-small']:.3f}" in html
    assert "List two &lt;foods&gt;. → rice and beans." in html and "0.100, 0.400" in html  # the prefix kept
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(out.as_uri())
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(w > 0 for w in widths), widths
    assert errors == []
    page.screenshot(path=str(artifacts_dir / "report.png"), full_page=True)
    page.close()


def test_report_survives_missing_and_broken_inputs(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    html = write_report(run).read_text()
    assert html.count('class="missing"') >= 8  # every section says what is missing
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text("{not json")
    (run / "ppo-small").mkdir()
    (run / "ppo-small" / "metrics.jsonl").write_text('{"step": 1, "objective/kl": 0.1}\nnot json\n[1]\n')
    (run / "walkthrough.json").write_text(json.dumps({"ranking": {"responses": ["a", "b"], "ranking": [5]}}))
    html = write_report(run, tmp_path / "r.html").read_text()
    assert "<h2>" in html and html.rstrip().endswith("</html>")


def test_figure_without_a_chart_says_what_is_missing():
    assert figure(None, "alt", "caption", "no <data> yet.") == '<p class="missing">Not shown: no &lt;data&gt; yet.</p>'
    shown = figure("data:image/png;base64,AA==", "a <chart>", "The caption.", "unused")
    assert shown.startswith("<figure>") and 'alt="a &lt;chart&gt;"' in shown and "unused" not in shown


def test_report_names_the_absent_chart_data(tmp_path):
    run = make_run_dir(tmp_path / "run")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    dropped = ("truthful/", "toxicity/", "hallucination", "bias/")
    _json(run / "eval" / "summary.json", {k: v for k, v in summary.items() if not k.startswith(dropped)})
    (run / "eval" / "best_of_n.jsonl").unlink()
    for stage in ("ppo-small", "ppoptx-small", "sweep/beta-0.005", "sweep/beta-0.05"):
        (run / stage / "metrics.jsonl").unlink()
    (run / "sft-small" / "metrics.jsonl").unlink()
    html = write_report(run).read_text()
    assert "could not be drawn" not in html
    for text in (
        "no held-out truthfulness, toxicity, hallucination or bias keys in eval/summary.json.",
        "needs eval/best_of_n.jsonl (eval with a reward model) or PPO metrics with eval/gold.",
        "sft-small/metrics.jsonl has no sft/loss.",
    ):
        assert f'<p class="missing">Not shown: {text}</p>' in html, text


def test_sweep_curves_of_ppo_and_ppo_ptx_at_one_beta_keep_their_own_labels():
    from types import SimpleNamespace

    from rlhflab.report.sections import _rl_runs

    rows = [{"step": 0, "eval/gold": 0.4, "eval/kl": 0.0}, {"step": 5, "eval/gold": 0.5, "eval/kl": 1.0}]
    other = [{"step": 0, "eval/gold": 0.4, "eval/kl": 0.0}, {"step": 5, "eval/gold": 0.3, "eval/kl": 9.0}]
    run = SimpleNamespace(metrics={"sweep/beta-0.02": rows, "sweep/ptx-beta-0.02": other, "ppo-small": rows})
    runs = _rl_runs(run)
    assert set(runs) == {"β_KL=0.02", "PPO-ptx β_KL=0.02", "ppo-small"}
    assert runs["PPO-ptx β_KL=0.02"][-1]["gold"] == 0.3 and runs["β_KL=0.02"][-1]["gold"] == 0.5
