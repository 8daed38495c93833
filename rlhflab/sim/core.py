"""The policy simulator's maths: RLHF on a policy over five response styles.

The policy π is a softmax over five response styles (docs/design.md §1, §5). Each style has a
reward-model score, a hidden true quality, a share under the SFT policy (the KL
reference) and a share of the pretraining text. One update is one closed-form
gradient-ascent step on the logits of the paper's objective (eq. 2),

    J(π) = E_π[RM] − β·KL(π‖π_SFT) + γ·E_{s~pretrain}[log π(s)],

so reward hacking and the alignment tax come out of the arithmetic, not a script.
Everything here is deterministic: no randomness anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from rlhflab.errors import InputError

STYLES = ("Helpful", "Sycophantic", "Hedging", "Toxic", "Terse")

# The simulator's defaults. The SFT shares as given sum to 1.01, so they are normalised.
SFT_SHARE = np.array([0.34, 0.19, 0.21, 0.10, 0.17]) / 1.01  # (S,) π_SFT(s)
RM_SCORE = np.array([0.90, 0.62, 0.55, 0.12, 0.78])  # (S,) reward model r(s)
TRUE_QUALITY = np.array([0.92, 0.45, 0.50, 0.08, 0.70])  # (S,) gold quality (hidden)
# Share of each style in the pretraining corpus, i.e. in the pretrained model. The web
# text of docs/design.md §1 is misaligned: less helpful, more hedging and flattery than SFT.
PRETRAIN_SHARE = np.array([0.30, 0.20, 0.24, 0.08, 0.18])  # (S,) q(s)

GAP_ALARM = 0.20
"""A proxy reward that overstates true quality by this much is called hacking outright."""
PEAK_DROP = 0.005
"""True quality must fall this far below its best before the log calls the best a peak."""
TRADE_EPS = 1e-4
"""Per-update changes smaller than this are drift, not a trade of truth for proxy."""
MAX_STEPS = 5000
"""A session stops here; reset to go on (keeps a forgotten 'play' from growing forever)."""


@dataclass
class Params:
    """The knobs of one run. Every field is validated by `validate()`."""

    beta: float = 0.02
    """β, the KL leash to π_SFT (the paper's default 0.02)."""
    gamma: float = 0.0
    """γ, weight of the pretraining log-likelihood (PPO-ptx); 0 is plain PPO."""
    lr: float = 1.0
    """Learning rate of the gradient-ascent step on the logits."""
    corrupt_style: str = ""
    """The style the reward model mis-scores ('' for none)."""
    corrupt_bias: float = 0.0
    """Added to that style's RM score (positive over-rates it); scores stay in [0, 1]."""

    LIMITS = {"beta": (0.0, 2.0), "gamma": (0.0, 2.0), "lr": (0.01, 10.0), "corrupt_bias": (-1.0, 1.0)}

    def validate(self) -> None:
        for key, (lo, hi) in self.LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"must be a number (got {value!r})", field=key)
            if not math.isfinite(value) or not lo <= value <= hi:
                raise InputError(f"must be between {lo} and {hi} (got {value!r})", field=key)
            setattr(self, key, float(value))
        if self.corrupt_style not in ("",) + STYLES:
            raise InputError(
                f"must be one of {', '.join(STYLES)} or '' (got {self.corrupt_style!r})",
                field="corrupt_style",
            )


PRESETS: dict[str, tuple[str, Params]] = {
    # The RM as trained: it ranks Helpful first, as the truth does. True quality rises.
    "calibrated": ("calibrated", Params(beta=0.02, gamma=0.0, lr=1.0)),
    # Sycophancy over-rated past Helpful (0.95 vs 0.90) and no KL leash: the policy
    # first sheds Toxic and Hedging (true quality rises), then collapses onto flattery.
    "reward_hacking": (
        "reward hacking",
        Params(beta=0.0, gamma=0.0, lr=1.0, corrupt_style="Sycophantic", corrupt_bias=0.33),
    ),
    # PPO-ptx: the pretraining term keeps the web-text styles alive, so capability
    # stays up at a small cost in true quality. Compare γ = 0.
    "alignment_tax": ("alignment tax", Params(beta=0.02, gamma=0.10, lr=1.0)),
}


# ---- the objective and its gradient (pure functions of logits and params) ----


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - math.log(np.exp(z).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def sft_logits() -> np.ndarray:
    return np.log(SFT_SHARE)


def rm_scores(params: Params) -> np.ndarray:
    """The reward model's score per style, with the user's corruption applied."""
    scores = RM_SCORE.copy()
    if params.corrupt_style:
        i = STYLES.index(params.corrupt_style)
        scores[i] = min(1.0, max(0.0, scores[i] + params.corrupt_bias))
    return scores


def kl_to_sft(logits: np.ndarray) -> float:
    """KL(π‖π_SFT) = Σ π log(π/π_SFT)."""
    logp = log_softmax(logits)
    return float(np.exp(logp) @ (logp - np.log(SFT_SHARE)))


def pretrain_loglik(logits: np.ndarray) -> float:
    """E_{s~q}[log π(s)]: how well the policy still models the pretraining text."""
    return float(PRETRAIN_SHARE @ log_softmax(logits))


def capability(logits: np.ndarray) -> float:
    """exp(−KL(q‖π)) in (0, 1]: 1 for the pretrained model, lower as styles are dropped."""
    return math.exp(pretrain_loglik(logits) - float(PRETRAIN_SHARE @ np.log(PRETRAIN_SHARE)))


def expectation_grad(pi: np.ndarray, f: np.ndarray) -> np.ndarray:
    """∇_logits E_π[f] = π ⊙ (f − E_π f)."""
    return pi * (f - pi @ f)


def objective(logits: np.ndarray, params: Params) -> float:
    # Ouyang et al. 2022, eq. 2: E[r_θ − β log(π^RL/π^SFT)] + γ E_pretrain[log π^RL].
    pi = softmax(logits)
    return float(pi @ rm_scores(params) - params.beta * kl_to_sft(logits) + params.gamma * pretrain_loglik(logits))


def gradient(logits: np.ndarray, params: Params) -> np.ndarray:
    """∇_logits J, term by term; each is exact (no sampling)."""
    logp = log_softmax(logits)
    pi = np.exp(logp)
    log_ratio = logp - np.log(SFT_SHARE)
    reward = expectation_grad(pi, rm_scores(params))  # ∇ E_π[RM]
    kl = pi * (log_ratio - pi @ log_ratio)  # ∇ KL(π‖π_SFT)
    ptx = PRETRAIN_SHARE - pi  # ∇ Σ q log π
    return reward - params.beta * kl + params.gamma * ptx


def update(logits: np.ndarray, params: Params) -> np.ndarray:
    """One gradient-ascent step on the objective."""
    return logits + params.lr * gradient(logits, params)


def nudge(logits: np.ndarray, style: str, delta: float) -> np.ndarray:
    """Move one style's share by `delta`; the others keep their relative sizes."""
    if not isinstance(style, str) or style not in STYLES:
        raise InputError(f"must be one of {', '.join(STYLES)} (got {style!r})", field="style")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or abs(delta) > 0.5:
        raise InputError(f"must be a number between -0.5 and 0.5 (got {delta!r})", field="delta")
    pi, i = softmax(logits), STYLES.index(style)
    new = min(0.999, max(0.001, pi[i] + delta))
    rest = np.delete(pi, i)
    out = np.insert(rest * (1.0 - new) / rest.sum(), i, new)
    return np.log(out)


# ---- readouts ----


@dataclass(frozen=True)
class Readout:
    step: int
    proxy: float
    """E_π[RM], what the optimiser sees."""
    true: float
    """E_π[true quality], what a person would judge."""
    kl: float
    """KL(π‖π_SFT)."""
    capability: float
    """exp(−KL(q‖π)): pretraining text the policy can still model."""
    gap: float
    """proxy − true."""
    verdict: str
    """'hacking' when the next update trades true quality for proxy reward, or the gap
    exceeds GAP_ALARM; 'aligned' otherwise."""


def readout(logits: np.ndarray, params: Params, step: int = 0) -> Readout:
    pi = softmax(logits)
    proxy, true = float(pi @ rm_scores(params)), float(pi @ TRUE_QUALITY)
    g = gradient(logits, params)
    # First-order change of proxy and truth under the update about to be taken.
    d_proxy = params.lr * float(expectation_grad(pi, rm_scores(params)) @ g)
    d_true = params.lr * float(expectation_grad(pi, TRUE_QUALITY) @ g)
    goodhart = d_proxy > TRADE_EPS and d_true < -TRADE_EPS
    verdict = "hacking" if goodhart or proxy - true > GAP_ALARM else "aligned"
    return Readout(step, proxy, true, kl_to_sft(logits), capability(logits), proxy - true, verdict)


def trajectory(params: Params, steps: int, logits: np.ndarray | None = None) -> list[Readout]:
    """Readouts at updates 0..steps, starting from π_SFT unless `logits` is given."""
    params.validate()
    z = sft_logits() if logits is None else np.asarray(logits, dtype=float)
    out = [readout(z, params, 0)]
    for t in range(1, steps + 1):
        z = update(z, params)
        out.append(readout(z, params, t))
    return out


# ---- a session: state, history and the event log the page shows ----


@dataclass
class Event:
    step: int
    kind: str
    """'user' (something the user changed) or 'auto' (something that followed)."""
    text: str
    run: int = 0
    """Which run (counting resets and presets) the event belongs to; its step is in that run."""
    followed: str = ""
    """For user events: what the updates since did, kept current until the next change."""
    start: Readout | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "kind": self.kind,
            "text": self.text,
            "run": self.run,
            "followed": self.followed,
        }


def _f(x: float) -> str:
    return f"{x:.2f}"


def _describe_corruption(params: Params) -> str:
    if not params.corrupt_style or params.corrupt_bias == 0:
        return "RM as trained (uncorrupted)"
    verb = "over-rates" if params.corrupt_bias > 0 else "under-rates"
    i = STYLES.index(params.corrupt_style)
    return (
        f"RM {verb} {params.corrupt_style} by {params.corrupt_bias:+.2f} "
        f"(score {_f(RM_SCORE[i])} → {_f(rm_scores(params)[i])})"
    )


class Simulator:
    """One user's run: the policy, its history of readouts and an event log."""

    MAX_EVENTS = 200

    def __init__(self, params: Params | None = None):
        self.params = replace(params) if params else Params()
        self.params.validate()
        self.events: list[Event] = []
        self._open: Event | None = None  # the user event whose consequences we are tracking
        self.run_id = -1  # counts resets and presets; 0 after __init__
        self._reset_policy()
        self._verdict = self.current.verdict
        self._best, self._best_logged = self.current, False  # true-quality peak watch

    # -- state --
    @property
    def step(self) -> int:
        return len(self.history) - 1

    @property
    def policy(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def current(self) -> Readout:
        return self.history[-1]

    def _reset_policy(self) -> None:
        self.run_id += 1
        self.logits = sft_logits()
        self.history = [readout(self.logits, self.params, 0)]

    # -- user actions --
    def reset(self) -> None:
        self._reset_policy()
        self._user("reset the policy to π_SFT")

    def apply_preset(self, name: str) -> None:
        if not isinstance(name, str) or name not in PRESETS:
            raise InputError(f"must be one of {', '.join(PRESETS)} (got {name!r})", field="preset")
        title, params = PRESETS[name]
        self.params = replace(params)
        self._reset_policy()
        p = self.params
        self._user(f"preset “{title}”: β {_f(p.beta)}, γ {_f(p.gamma)}, lr {_f(p.lr)}, {_describe_corruption(p)}")

    def set_params(self, **changes) -> None:
        unknown = set(changes) - set(Params.__dataclass_fields__)
        if unknown:
            raise InputError(
                f"unknown parameter (known: {', '.join(Params.__dataclass_fields__)})",
                field=sorted(unknown)[0],
            )
        new = replace(self.params, **changes)
        new.validate()
        old, self.params = self.params, new
        texts = [
            f"{label} {_f(getattr(old, key))} → {_f(getattr(new, key))}"
            for key, label in (("beta", "β"), ("gamma", "γ"), ("lr", "learning rate"))
            if getattr(old, key) != getattr(new, key)
        ]
        if not np.array_equal(rm_scores(old), rm_scores(new)):
            texts.append(_describe_corruption(new))
        # The policy is unchanged, but the RM (proxy, gap) and the update direction may not be.
        self.history[-1] = readout(self.logits, self.params, self.step)
        for text in texts:
            self._user(text)

    def nudge(self, style: str, delta: float) -> None:
        old, self.logits = self.policy, nudge(self.logits, style, delta)  # validates
        i = STYLES.index(style)
        self.history[-1] = readout(self.logits, self.params, self.step)
        self._user(f"nudged {style} share {_f(old[i])} → {_f(self.policy[i])}")

    def run(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 500:
            raise InputError(f"must be an integer from 1 to 500 (got {n!r})", field="n")
        if self.step + n > MAX_STEPS:
            raise InputError(f"the simulator stops at {MAX_STEPS} updates; press reset", field="n")
        for _ in range(n):
            before = self.policy
            self.logits = update(self.logits, self.params)
            self.history.append(readout(self.logits, self.params, self.step + 1))
            self._observe(before)

    # -- the log --
    def _log(self, event: Event) -> Event:
        event.run = self.run_id
        self.events.append(event)
        del self.events[: -self.MAX_EVENTS]
        return event

    def _user(self, text: str) -> None:
        self._open = self._log(Event(self.step, "user", text, start=self.current))
        self._best, self._best_logged = self.current, False
        self._check_verdict()

    def _check_verdict(self) -> None:
        cur = self.current
        if cur.verdict != self._verdict:
            if cur.verdict == "aligned":
                why = f"gap {cur.gap:.3f}; updates no longer trade true quality for proxy"
            elif cur.gap > GAP_ALARM:
                why = f"the proxy overstates true quality by {cur.gap:.3f}"
            else:
                why = "each update now raises the proxy but lowers true quality"
            self._log(Event(cur.step, "auto", f"verdict {self._verdict} → {cur.verdict} ({why})"))
            self._verdict = cur.verdict

    def _observe(self, before: np.ndarray) -> None:
        """After one update: note a true-quality peak, a collapse, a verdict flip; and
        refresh the 'followed' line of the last user event."""
        cur = self.current
        # A peak is logged once true quality has fallen PEAK_DROP below its best since the
        # user's last change, so slow drift near a fixed point is not called a peak.
        if cur.true > self._best.true:
            self._best, self._best_logged = cur, False
        elif not self._best_logged and cur.true < self._best.true - PEAK_DROP:
            self._log(
                Event(
                    cur.step,
                    "auto",
                    f"true quality peaked at {self._best.true:.3f} (update {self._best.step}) and is falling",
                )
            )
            self._best_logged = True
        for i in np.flatnonzero((self.policy >= 0.9) & (before < 0.9)):
            self._log(Event(cur.step, "auto", f"policy collapsed onto {STYLES[i]} (share ≥ 0.90)"))
        self._check_verdict()
        if self._open is not None:
            s, n = self._open.start, cur.step - self._open.step
            self._open.followed = (
                f"then {n} update{'s' * (n != 1)}: proxy {s.proxy:.3f} → {cur.proxy:.3f} · "
                f"true {s.true:.3f} → {cur.true:.3f} · KL {s.kl:.3f} → {cur.kl:.3f} · "
                f"capability {s.capability:.3f} → {cur.capability:.3f}"
            )

    def to_dict(self, since: int = 0) -> dict:
        """The view the page draws: readouts, styles, history from `since`, the log.

        The last readout is always sent, since a change of RM or policy rewrites it."""
        since = max(0, min(int(since), len(self.history) - 1))
        scores = rm_scores(self.params)
        styles = [
            {
                "name": n,
                "share": float(self.policy[i]),
                "sft_share": float(SFT_SHARE[i]),
                "rm": float(scores[i]),
                "rm_base": float(RM_SCORE[i]),
                "true": float(TRUE_QUALITY[i]),
                "pretrain": float(PRETRAIN_SHARE[i]),
            }
            for i, n in enumerate(STYLES)
        ]
        return {
            "step": self.step,
            "run": self.run_id,
            "params": asdict(self.params),
            "readout": asdict(self.current),
            "styles": styles,
            "history_start": since,
            "history": [asdict(r) for r in self.history[since:]],
            "events": [e.to_dict() for e in self.events],
        }
