"""`rlhflab eval`'s config with a lab world (`EvalConfig`): what is evaluated and how; read by
the answering (eval.answering) and the judging (eval.evaluate) alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rlhflab.config import RunFields, check
from rlhflab.eval.prompted import prompted_name

N_SHOTS = 3


@dataclass
class EvalConfig:
    world: str = ""
    """Lab world directory (prompts, gold scorer, held-out labelers, benchmarks)."""
    models: dict[str, str] = field(default_factory=dict)
    """Name -> model directory, e.g. {GPT-small: runs/lab/pretrain-small/model, SFT-small: ...};
    names read '<family>-<size>' (GPT, SFT, PPO, PPO-ptx; small, large) for the report's charts."""
    prompted: list[str] = field(default_factory=list)
    """Names in `models` that also get a few-shot-prompted variant ('GPT-small' -> 'GPT-prompted-small')."""
    prefix_shots: int = N_SHOTS
    """Demonstrations in a few-shot prefix (sft_train.jsonl, distinct families)."""
    prefix_candidates: int = 4
    """Seeded prefixes that compete for each prompted model; it keeps the one whose answers to
    prefix_prompts validation prompts (ppo_val) the reward model scores highest (§3.5). 1,
    or no reward_model: the first draw."""
    prefix_prompts: int = 64
    """Validation prompts each candidate prefix answers."""
    baseline: str = "SFT-small"
    """The model every win rate is measured against (the paper: 175B SFT)."""
    reward_model: str = ""
    """Reward model directory (optional): RM scores per model and the best-of-n curve."""
    n_prompts: int = 0
    """Items per set (test prompts, truthful questions, toxicity texts, bias pairs); 0: all of them."""
    max_new_tokens: int = 48
    """Longest answer, in tokens."""
    temperature: float = 0.0
    """Sampling temperature for answers; 0: greedy (deterministic, the default)."""
    capability_items: int = 0
    """Items per capability benchmark; 0: all."""
    capability_models: dict[str, str] = field(default_factory=dict)
    """Name -> model directory measured on the capability benchmarks only (tax/ and tax_fewshot/
    keys, nothing else): `rlhflab run` gives the β sweep's policies, 'PPO-beta0.02-small'.
    A name '<family>-<size>' is paired with SFT-<size> in the tax_delta/ keys."""
    capability_shots: int = 2
    """Solved items of its benchmark before each task item in the few-shot measurement
    (Table 14's few-shot column: tax_fewshot/ keys); as many as fit the context. 0: zero-shot only."""
    head_to_head: list[str] = field(default_factory=list)
    """Extra pairs 'A:B' judged like the baseline comparison: how often A's answer beats B's
    (the paper's headline: 1.3B InstructGPT preferred to 175B GPT-3, §1)."""
    rl_runs: dict[str, str] = field(default_factory=dict)
    """Label -> a PPO run's metrics.jsonl: its over-optimization curve (gold and RM score of
    validation samples against sqrt(KL)) is summarized and fitted (rl/..., rl_fit/... keys)."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """n values of the best-of-n curve (needs reward_model; empty: skip)."""
    best_of_n_policy: str = ""
    """Model sampled for best-of-n; default: the baseline."""
    best_of_n_prompts: int = 40
    """Test prompts for best-of-n (each gets max(best_of_n) samples at T = 1)."""
    batch_size: int = 64
    """Prompts per generation batch."""
    jobs: int = 0
    """Models answered side by side, each in a one-thread process of its own (0: two on a CPU
    of two or more cores, one on a GPU; 1: one after another in this process)."""
    answers_from: str = ""
    """A directory of models' results computed ahead (`<dir>/<name>/summary.json`, written by
    eval.answering.answer_stage: `rlhflab run` answers each model as soon as it is trained);
    a model's file there is used when it holds the same weights, world, settings, device and
    thread count, else the model is answered again. Empty: every model is answered here."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (sampling, and which held-out labeler judges what) and device."""
    out_dir: str = "runs/eval"
    """Output directory: summary.json, samples.jsonl, best_of_n.jsonl, config.yaml."""

    def validate(self):
        check(bool(self.world), "world", self.world, "give the lab world directory")
        check(self.prefix_shots >= 1, "prefix_shots", self.prefix_shots, "must be >= 1")
        check(self.capability_shots >= 0, "capability_shots", self.capability_shots, "must be >= 0")
        check(self.prefix_candidates >= 1, "prefix_candidates", self.prefix_candidates, "must be >= 1")
        check(self.prefix_prompts >= 1, "prefix_prompts", self.prefix_prompts, "must be >= 1")
        check(bool(self.models), "models", self.models, "give at least one name: model directory")
        for name in self.capability_models:
            check(name not in self.models, "capability_models", name, "is also in models")
        for where, name, path in [("models", *kv) for kv in self.models.items()] + [
            ("capability_models", *kv) for kv in self.capability_models.items()
        ]:
            check(
                isinstance(name, str) and "/" not in name and name != "",
                where,
                name,
                "model names must be non-empty and contain no '/'",
            )
            check(isinstance(path, str) and path != "", f"{where}.{name}", path, "must be a directory")
        for name in self.prompted:
            check(name in self.models, "prompted", name, f"must name a model in models ({list(self.models)})")
        check(self.baseline in self.names(), "baseline", self.baseline, f"must be one of {self.names()}")
        for pair in self.head_to_head:
            ok = isinstance(pair, str) and len(pair.split(":")) == 2 and set(pair.split(":")) <= set(self.names())
            check(ok, "head_to_head", pair, f"must read 'A:B' with A and B in {self.names()}")
        check(
            not self.best_of_n_policy or self.best_of_n_policy in self.models,
            "best_of_n_policy",
            self.best_of_n_policy,
            "must name a model in models",
        )
        check(all(n >= 1 for n in self.best_of_n), "best_of_n", self.best_of_n, "must be positive")
        for label, path in self.rl_runs.items():
            check(Path(path).is_file(), f"rl_runs.{label}", path, "no such metrics file")
        check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            "temperature",
            self.temperature,
            "must be >= 0 (0: greedy)",
        )
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")
        check(self.n_prompts >= 0, "n_prompts", self.n_prompts, "must be >= 0 (0: all)")
        check(self.jobs >= 0, "jobs", self.jobs, "must be >= 0 (0: auto)")

    def bon_policy(self) -> str:
        """The model sampled for best-of-n: best_of_n_policy, else the baseline's weights."""
        if self.best_of_n_policy:
            return self.best_of_n_policy
        return next((m for m in self.models if self.baseline in (m, prompted_name(m))), next(iter(self.models)))

    def names(self) -> list[str]:
        """Every evaluated name: the models, then their prompted variants."""
        return list(self.models) + [prompted_name(m) for m in self.prompted]
