"""Reward-model over-optimization (Gao et al. 2022): the curves and their fitted forms.

Pure functions over numbers: best-of-n rows {n, kl, d, gold, rm} and PPO metrics rows in,
fits and flat summary keys out. `d = sqrt(KL)` is the distance from the initial policy.
"""

from __future__ import annotations

import math

import numpy as np


def _fit(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares y ≈ α·x1 − β·x2 (no intercept), closed form, with R²."""
    X = np.stack([x1, -x2], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss_res, ss_tot = float(resid @ resid), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res < 1e-12)
    return {"alpha": float(coef[0]), "beta": float(coef[1]), "r2": r2}


def fit_best_of_n(d, y) -> dict[str, float]:
    """Gao et al. 2022 eq. 1, best-of-n: R(d) = d(α − β d), d = sqrt(KL)."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    return _fit(d, d * d, y)


def fit_rl(d, y) -> dict[str, float]:
    """Gao et al. 2022 eq. 2, RL: R(d) = d(α − β log d)  (d log d := 0 at d = 0)."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return _fit(d, dlogd, y)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base policy) = log n − (n − 1)/n (Gao et al. 2022, §2)."""
    return math.log(n) - (n - 1) / n


def rl_curve(metrics_rows: list[dict]) -> list[dict]:
    """PPO metrics rows -> points {step, kl, d, gold, rm} (gold/rm None where not logged).

    KL is `eval/kl` (measured with eval/gold on the same policy) when present, else
    `objective/kl`; a step-0 row without either is the SFT policy itself, KL 0.
    """
    points = []
    for row in metrics_rows:
        kl = row.get("eval/kl", row.get("objective/kl"))
        if kl is None and row.get("step") == 0:
            kl = 0.0
        # eval/rm_score and eval/kl are of samples at the rollout temperature, so gold is too
        gold = row.get("eval/sampled/gold", row.get("eval/gold"))
        rm = row.get("eval/rm_score")
        if kl is None or (gold is None and rm is None):
            continue
        kl = max(0.0, float(kl))  # the sampled estimate can dip below 0
        points.append({"step": row.get("step"), "kl": kl, "d": math.sqrt(kl), "gold": gold, "rm": rm})
    return points


def bon_summary(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.update({f"bon/{r['n']}/{k}": r[k] for k in ("kl", "gold", "rm")})
    base = next((r for r in rows if r["n"] == 1), None)
    if base is not None and len(rows) >= 3:
        d = [r["d"] for r in rows]
        for key in ("gold", "rm"):
            fit = fit_best_of_n(d, [r[key] - base[key] for r in rows])
            out.update({f"bon_fit/{key}/{k}": v for k, v in fit.items()})
    return out


def relative_to_start(points: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(d, y − y at the smallest d): Gao et al.'s curves start at 0 for the initial policy."""
    pts = sorted((p["d"], p[key]) for p in points if p.get(key) is not None)
    if not pts:
        return np.zeros(0), np.zeros(0)
    d, y = np.array(pts, float).T
    return d, y - y[0]


def rl_summary(label: str, metrics_rows: list[dict]) -> dict:
    """Flat keys for one PPO run: where gold peaked, where it ended, and the RL-form fits.

    rl/<label>/<peak_gold|peak_kl|final_gold|final_rm|final_kl>,
    rl_fit/<label>/<gold|rm>/<alpha|beta|r2>   (d(α − β log d) to the change from step 0)
    """
    pts = [p for p in rl_curve(metrics_rows) if p["gold"] is not None]
    if not pts:
        return {}
    peak, last = max(pts, key=lambda p: p["gold"]), pts[-1]
    out = {
        f"rl/{label}/peak_gold": peak["gold"],
        f"rl/{label}/peak_kl": peak["kl"],
        f"rl/{label}/final_gold": last["gold"],
        f"rl/{label}/final_kl": last["kl"],
    }
    if last["rm"] is not None:
        out[f"rl/{label}/final_rm"] = last["rm"]
    for key in ("gold", "rm"):
        d, y = relative_to_start(pts, key)
        if len(d) >= 3 and np.ptp(d) > 0:
            out.update({f"rl_fit/{label}/{key}/{k}": v for k, v in fit_rl(d, y).items()})
    return out
