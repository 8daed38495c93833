"""The report's charts: matplotlib (Agg) figures returned as base64 PNG data URIs.

Each function takes plain data read from a run directory (flat eval summary, metrics
rows, curve points) and returns a `data:image/png;base64,...` string, or None when it
has nothing to draw. Nothing here reads files.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rlhflab.eval.overopt import fit_best_of_n, fit_rl, relative_to_start

FAMILY_ORDER = ["GPT", "GPT-prompted", "SFT", "PPO", "PPO-ptx"]
COLORS = {
    "GPT": "#8c8c8c",
    "GPT-prompted": "#4c72b0",
    "SFT": "#55a868",
    "PPO": "#dd8452",
    "PPO-ptx": "#c44e52",
}
SIZE_ORDER = ["small", "large"]
DPI = 100

plt.rcParams.update(
    {
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 10,
        "legend.fontsize": 8,
        "legend.frameon": False,
    }
)


def split_name(name: str) -> tuple[str, str]:
    """'PPO-ptx-small' -> ('PPO-ptx', 'small'); a name without a size -> (name, '')."""
    family, _, size = name.rpartition("-")
    return (family, size) if family else (name, "")


def model_order(names) -> list[str]:
    def key(n):
        fam, size = split_name(n)
        return (
            FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER),
            fam,
            SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER),
            size,
        )

    return sorted(set(names), key=key)


def color(name: str) -> str:
    fam = split_name(name)[0]
    if fam in COLORS:
        return COLORS[fam]
    return plt.get_cmap("tab10")(sum(map(ord, fam)) % 10)


def models_with(summary: dict, prefix: str) -> list[str]:
    """Model names <m> for which `<prefix>/<m>` is a key."""
    tails = (k[len(prefix) + 1 :] for k in summary if k.startswith(prefix + "/"))
    return model_order(t for t in tails if "/" not in t)


def to_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- Figure 1


def winrate_figure(summary: dict) -> str | None:
    """Win rate against the baseline vs model size, one line per family, 95% CIs (Figure 1)."""
    panels = [
        (k, t)
        for k, t in (("winrate", "judged by held-out labelers"), ("winrate_gold", "judged by gold quality"))
        if models_with(summary, k)
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        names = models_with(summary, key)
        names = [n for n in names if split_name(n)[0] in FAMILY_ORDER] or names  # Figure 1's families
        by_family: dict[str, list[str]] = {}
        for n in names:
            by_family.setdefault(split_name(n)[0], []).append(n)
        use_params = all(f"params/{n}" in summary for n in names)
        sizes = model_order({split_name(n)[1] for n in names})
        for i, (fam, members) in enumerate(by_family.items()):
            # Families sharing a size are dodged sideways so no point hides another.
            shift = (i - (len(by_family) - 1) / 2) * 0.04
            x = [
                summary[f"params/{n}"] * 10**shift if use_params else sizes.index(split_name(n)[1]) + shift
                for n in members
            ]
            y = np.array([summary[f"{key}/{n}"] for n in members])
            lo = np.array([summary.get(f"{key}_ci_low/{n}", v) for n, v in zip(members, y)])
            hi = np.array([summary.get(f"{key}_ci_high/{n}", v) for n, v in zip(members, y)])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, color=color(members[0]), label=fam)
        ax.axhline(0.5, color="#bbbbbb", lw=1, ls="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate against the baseline")
        if use_params:
            params = sorted({summary[f"params/{n}"] for n in names})
            ax.set_xscale("log")
            ax.set_xlim(params[0] / 2.5, params[-1] * 2.5)
            ax.set_xticks(params, [_human(p) for p in params])
            ax.minorticks_off()
            ax.set_xlabel("model parameters")
        else:
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_xlabel("model size")
        ax.set_title(title)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return to_uri(fig)


# --------------------------------------------------------------------------- bars


def bar_panels(summary: dict, panels: list[tuple[str, str, tuple | None]], ncols: int = 2) -> str | None:
    """One bar chart per (key prefix, title, ylim); a bar per model, coloured by family."""
    panels = [p for p in panels if models_with(summary, p[0])]
    if not panels:
        return None
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (prefix, title, ylim) in zip(axes.flat, panels):
        names = models_with(summary, prefix)
        vals = [summary[f"{prefix}/{n}"] for n in names]
        bars = ax.bar(range(len(names)), vals, color=[color(n) for n in names])
        for b, n in zip(bars, names):
            b.set_alpha(0.6 if split_name(n)[1] == "small" else 1.0)  # small sizes lighter
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7.5)
        ax.set_title(title)
        if ylim:
            ax.set_ylim(ylim[0], ylim[1] + 0.08 * (ylim[1] - ylim[0]))  # room for the bar labels
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return to_uri(fig)


def capability_figure(summary: dict, benches: list[str]) -> str | None:
    """Grouped bars: benchmarks on x, one bar per model (the alignment tax)."""
    names = model_order({k.split("/", 2)[2] for k in summary if k.startswith("capability/") and k.count("/") == 2})
    benches = [b for b in benches if any(f"capability/{b}/{n}" in summary for n in names)]
    if not names or not benches:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 3.0))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = np.arange(len(benches)) + (i - (len(names) - 1) / 2) * width
        vals = [summary.get(f"capability/{b}/{n}", 0.0) for b in benches]
        ax.bar(xs, vals, width, color=color(n), alpha=0.6 if split_name(n)[1] == "small" else 1.0, label=n)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("score")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return to_uri(fig)


# --------------------------------------------------------------------------- over-optimization


def _fit_line(ax, d, y, fit_fn, col) -> str:
    """Draw the fitted curve; return its parameters as legend text ('' when too few points)."""
    if len(d) < 3 or np.ptp(d) == 0:
        return ""
    fit = fit_fn(d, y)
    grid = np.linspace(0, d.max() * 1.05, 100)
    base = grid * np.log(np.where(grid > 0, grid, 1.0)) if fit_fn is fit_rl else grid * grid
    ax.plot(grid, fit["alpha"] * grid - fit["beta"] * base, color=col, lw=1, ls="--")
    return f"α={fit['alpha']:.2f} β={fit['beta']:.2f} R²={fit['r2']:.2f}"


def overopt_figure(bon: list[dict], rl_runs: dict[str, list[dict]]) -> str | None:
    """Gold and RM score (change from the start) vs d = sqrt(KL): best-of-n row, RL row.

    Dashed lines: Gao et al.'s fits, d(α − βd) for best-of-n and d(α − β log d) for RL.
    """
    rows = [("best-of-n", {"": bon}, fit_best_of_n)] if bon else []
    if any(rl_runs.values()):
        rows.append(("RL (PPO)", rl_runs, fit_rl))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(8.6, 3.1 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, (label, runs, fit_fn) in enumerate(rows):
        for c, (key, what) in enumerate((("gold", "gold quality"), ("rm", "reward-model score"))):
            ax = axes[r][c]
            for i, (run, points) in enumerate(runs.items()):
                col = cmap(i / max(1, len(runs) - 1) * 0.85) if len(runs) > 1 else "#c44e52"
                d, y = relative_to_start(points, key)
                if len(d):
                    fit = _fit_line(ax, d, y, fit_fn, col)
                    text = ": ".join(x for x in (run, fit and f"fit {fit}") if x)
                    ax.plot(d, y, "o", ms=4, color=col, label=text or None)
            ax.axhline(0, color="#bbbbbb", lw=1)
            ax.set_xlabel("d = √KL(π ‖ π_init)")
            ax.set_ylabel(f"Δ {what}")
            ax.set_title(f"{label}: {what}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6.5)
    fig.tight_layout()
    return to_uri(fig)


# --------------------------------------------------------------------------- training curves


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    number = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    pts = [(r[x], r[key]) for r in rows if number(r.get(key)) and number(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(ys: list[float]) -> np.ndarray:
    """Centred moving average over ~4% of the series (shorter windows at the edges)."""
    w = max(5, len(ys) // 25) | 1
    k = np.ones(w)
    return np.convolve(ys, k, "same") / np.convolve(np.ones(len(ys)), k, "same")


def _human(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def curves_figure(
    panels: list[tuple[str, list[tuple[str, list[dict], str]]]], ncols: int = 3, x: str = "step", xlabel: str = "step"
) -> str | None:
    """Small multiples: each panel (title, [(label, metrics rows, key)]) draws one line per entry,
    `key` against the rows' `x`."""
    drawn = [(t, [(lab, *_series(rows, key, x)) for lab, rows, key in lines]) for t, lines in panels]
    drawn = [(t, [line for line in lines if line[1]]) for t, lines in drawn]
    drawn = [(t, lines) for t, lines in drawn if lines]
    if not drawn:
        return None
    ncols = min(ncols, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.4 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, drawn):
        for lab, xs, ys in lines:
            if len(xs) > 60:  # noisy per-step values: faint raw line, smoothed line on top
                raw = ax.plot(xs, ys, lw=0.6, alpha=0.3)[0]
                ax.plot(xs, smooth(ys), lw=1.4, color=raw.get_color(), label=lab)
            else:
                ax.plot(xs, ys, marker="o" if len(xs) < 25 else None, ms=3, lw=1.2, label=lab)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if len(lines) > 1 or lines[0][0]:
            ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.tight_layout()
    return to_uri(fig)


# --------------------------------------------------------------------------- held-out sets (Figures 6-7)

SERIES_COLORS = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]


def models_matching(summary: dict, template: str) -> list[str]:
    """Model names <m> for which `template` with {m} filled in is a key ('truthful/plain/{m}/both')."""
    head, _, tail = template.partition("{m}")
    return model_order(
        k[len(head) : len(k) - len(tail)]
        for k in summary
        if k.startswith(head)
        and k.endswith(tail)
        and len(k) > len(head) + len(tail)
        and "/" not in k[len(head) : len(k) - len(tail)]
    )


def ci_bars_figure(summary: dict, panels: list[tuple[str, tuple, list[tuple[str, str, str, str]]]], ncols: int = 2):
    """Grouped bars with 95% intervals. Each panel is (title, ylim, series); a series is
    (label, value key, ci_low key, ci_high key), each key a template with {m}. One group of
    bars per model, one bar per series (the paper's Figures 6 and 7)."""
    drawn = []
    for title, ylim, series in panels:
        names = model_order({m for _, key, _, _ in series for m in models_matching(summary, key)})
        if names:
            drawn.append((title, ylim, series, names))
    if not drawn:
        return None
    ncols = min(ncols, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.1 * nrows), squeeze=False)
    for ax, (title, ylim, series, names) in zip(axes.flat, drawn):
        width = 0.8 / len(series)
        for i, (label, key, lo_key, hi_key) in enumerate(series):
            xs, ys, err = [], [], [[], []]
            for j, n in enumerate(names):
                v = summary.get(key.format(m=n))
                if v is None:
                    continue
                lo, hi = summary.get(lo_key.format(m=n), v), summary.get(hi_key.format(m=n), v)
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(v)
                err[0].append(max(0.0, v - lo))
                err[1].append(max(0.0, hi - v))
            col = SERIES_COLORS[i % len(SERIES_COLORS)]
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=col, alpha=0.85, label=label, error_kw={"lw": 0.8})
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7.5)
        ax.set_title(title)
        if ylim:  # with a legend, room above the bars for it
            ax.set_ylim(ylim[0], ylim[1] + (0.3 if len(series) > 1 else 0.0) * (ylim[1] - ylim[0]))
            ax.set_yticks(np.linspace(ylim[0], ylim[1], 6))
        if len(series) > 1:
            ax.legend(fontsize=7, loc="upper center", ncol=len(series))
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.tight_layout()
    return to_uri(fig)
