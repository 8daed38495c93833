"""The report's GPT-prompted section: the few-shot prefix each base model kept, and per task
family how it changes the answers (eval's prompted/<size>/<family>/... keys, prefixes.json)."""

from __future__ import annotations

from html import escape

from rlhflab.report.html import missing, table


def s_prompted(run) -> str:
    s, prefixes = run.eval, run.prefixes
    sizes = sorted({k.split("/")[1] for k in s if k.startswith("prompted/")})
    if not sizes:
        return missing("no prompted/ keys in eval/summary.json (no prompted models were evaluated).")
    out = [
        "<p>§3.5's GPT-prompted baseline: the base model with a few-shot prefix of demonstrations, prefix "
        "and prompt one document, the prefix chosen among seeded candidates for the reward model's score on "
        "validation prompts. Gold quality per task family without and with the prefix, and the share of "
        "answers that are on task (not off-task chatter).</p>"
    ]
    for size in sizes:
        fams = sorted({k.split("/")[2] for k in s if k.startswith(f"prompted/{size}/")})
        rows = []
        for f in fams:
            key = f"prompted/{size}/{f}"
            g0, g1 = s.get(f"{key}/gold_plain"), s.get(f"{key}/gold")
            rows.append(
                [
                    f,
                    g0,
                    g1,
                    None if g0 is None or g1 is None else g1 - g0,
                    s.get(f"{key}/on_task_plain"),
                    s.get(f"{key}/on_task"),
                ]
            )
        name = f"GPT-prompted-{size}"
        plain, prompted = s.get(f"gold/GPT-{size}", float("nan")), s.get(f"gold/{name}", float("nan"))
        head = f"<h3>{escape(name)}: gold {plain:.3f} → {prompted:.3f}</h3>"
        out.append(
            head + table(["family", "gold, GPT", "gold, prompted", "change", "on task, GPT", "on task, prompted"], rows)
        )
        chosen = prefixes.get(name) or {}
        if chosen.get("shots"):
            shots = "".join(f"<li>{escape(d['prompt'])} → {escape(d['completion'])}</li>" for d in chosen["shots"])
            rm = ", ".join(f"{x:.3f}" for x in chosen.get("rm_of_candidates") or [])
            out.append(
                f"<p>The prefix it kept{f' (mean RM score of each candidate: {rm})' if rm else ''}:</p><ol>{shots}</ol>"
            )
    return "".join(out)
