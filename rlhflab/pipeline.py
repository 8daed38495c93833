"""`rlhflab run`: the whole recipe on the lab world, one run directory, resumable.

    world -> pretrain (small, large) -> sft -> comparisons -> rm -> rlinit -> ppo / ppo-ptx -> eval -> report

Each stage writes its own directory under the run directory and hands off through it
only. A stage whose `summary.json` exists is finished and is not redone, so running
the same command again after an interruption carries on where it stopped (and a stage
that was interrupted mid-way resumes from its own checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rlhflab.config import add_config_arguments, check, config_from_args, flat_dict, save_config, validate
from rlhflab.errors import InputError
from rlhflab.eval.evaluate import EvalConfig
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.pretrain import PretrainConfig
from rlhflab.stages.pretrain import train as pretrain
from rlhflab.stages.rm import RMConfig
from rlhflab.stages.sample import SampleConfig
from rlhflab.stages.sft import SFTConfig
from rlhflab.training import check_resumable, cpu_cores, default_jobs
from rlhflab.world import load_world

SIZES = ("small", "large")

LAB_KL_COEF = 0.1
"""β of the lab run's PPO. The paper's 0.02 (PPOConfig's default) lets the lab policy walk
past the reward model's useful range: gold of samples peaks at 0.50 (KL 5 nats) and falls to
0.35 by 4096 episodes (KL 45) in one run (in another it held 0.45 at KL 7), while β = 0.1
holds KL near 2 nats and keeps the gain (README,
"What a run shows today"). The β sweep (sweep_betas) shows both."""
LAB_PTX_COEF = 0.03
"""γ of the lab run's PPO-ptx (App. C.4: 27.8, far too strong for models this small). On the
lab world γ = 0.1 lifted capability to 0.22 (SFT 0.10) but kept little of PPO's gold gain;
0.03 kept most of it with capability back to 0.13."""

LAB_SFT = {
    "small": {"epochs": 4, "dropout": 0.0},
    "large": {"epochs": 4, "dropout": 0.0, "train": {"lr": 3e-4}},
}
"""The lab's SFT (SFTConfig overrides by size): 4 epochs, no dropout, lr 1e-3 (small) and 3e-4
(large), against SFTConfig's paper defaults of 16 epochs and residual dropout 0.2 (§3.5). On the lab's base models
those erased what pretraining taught (capability mean GPT-small 0.41 -> SFT 0.15), so the
alignment tax landed at SFT, not at PPO. Measured from one pair of base models (capability mean
over 150 items a benchmark, gold of samples on 300 test prompts): small 16 epochs at 1e-3 with
dropout 0.2: 0.15 / 0.35; the same without dropout: 0.15 / 0.70; 4 epochs without dropout: 0.29
/ 0.36 (1e-3), 0.38 / 0.28 (3e-4); large 16 epochs at 3e-4 with dropout 0.2: 0.22 / 0.84, 4
epochs without: 0.56 / 0.67. Optimizer steps x peak lr, SFT over pretraining: 0.33 (small), 0.1
(large), against 1.33 and 0.4 before. With 3e-4 the small SFT kept more (0.38), but from its
weaker samples PPO learned to refuse every prompt, which the reward model scored high: gold
0.28 -> 0.20 at β = 0.02, no gain at β = 0.1."""

HEADLINE_RIVALS = ("GPT-large", "GPT-prompted-large")
"""The paper's headline (§1): the small PPO-ptx model against the ~10x larger base model,
plain and few-shot prompted, judged head to head by the held-out labelers."""

FIGURE1_BASELINE = "SFT-large"
"""Every win rate of the lab's eval is against the largest SFT model, as Figure 1 measures
against 175B SFT."""


def head_to_head(rlhf_sizes: list[str]) -> list[tuple[str, str]]:
    """The eval's head-to-head pairs (a, b), how often a's answer beats b's: the headline, then
    PPO and PPO-ptx of each size against the SFT model of their size, the policy they started from."""
    own = [(f"{m}-{s}", f"SFT-{s}") for s in SIZES if s in rlhf_sizes for m in ("PPO", "PPO-ptx")]
    return [("PPO-ptx-small", r) for r in HEADLINE_RIVALS] + own


# Overrides applied on top of the defaults, by preset. `smoke` is the one-minute check.
PRESETS: dict[str, dict] = {
    "default": {
        "pretrain_small": {"steps": 600, "batch_size": 32},
        "pretrain_large": {"steps": 600, "batch_size": 16},
        "sft_small": LAB_SFT["small"],  # SFT small next to pretraining (App. C.1's proportion)
        "sft_large": LAB_SFT["large"],
        "rm": {
            "train": {"lr": 1e-4},
            "epochs": 2,
        },  # 2nd epoch: within-prompt Spearman with gold 0.36 -> 0.46
    },
    "smoke": {
        "scale": "small",
        "rm_base": "small",
        "pretrain_small": {"steps": 40, "batch_size": 16, "eval_every": 20, "gold_prompts": 20},
        "pretrain_large": {"steps": 20, "batch_size": 8, "eval_every": 20, "gold_prompts": 20},
        "sft_small": {"epochs": 2},
        "sft_large": {"epochs": 1},
        "comparisons": {"max_new_tokens": 16, "k_max": 5},
        "eval": {"n_prompts": 20, "capability_items": 10, "best_of_n": [1, 2, 4], "best_of_n_prompts": 8},
        "ppo": {"total_episodes": 64, "batch_size": 16, "minibatch_size": 8, "eval_every": 2},
        "ppo_ptx": {"total_episodes": 64, "batch_size": 16, "minibatch_size": 8, "eval_every": 4},
        "sweep_betas": [0.0],
    },
}
PRESETS["figure1"] = {**PRESETS["default"], "rlhf_sizes": list(SIZES), "comparisons_from": list(SIZES)}
"""Figure 1's every point: the default run, plus PPO and PPO-ptx from SFT-large, with the RM's
training comparisons ranked on samples of both SFT models (README, "What a run shows today",
says what they cost and what the second SFT model's samples change)."""


# Paths the pipeline sets for each stage; placeholders so the nested configs validate.
_SET_BY_PIPELINE = "(set by rlhflab run)"
_FILLED: dict = {
    "sft_small": {"base": _SET_BY_PIPELINE, "data": _SET_BY_PIPELINE},
    "sft_large": {"base": _SET_BY_PIPELINE, "data": _SET_BY_PIPELINE},
    "comparisons": {"policy": _SET_BY_PIPELINE, "prompts": _SET_BY_PIPELINE},
    "rm": {"base": _SET_BY_PIPELINE, "rankings": _SET_BY_PIPELINE},
    "eval": {"world": _SET_BY_PIPELINE, "models": {"SFT-small": _SET_BY_PIPELINE}},
    "ppo": {"policy": _SET_BY_PIPELINE, "reward_model": _SET_BY_PIPELINE, "prompts": _SET_BY_PIPELINE},
    "ppo_ptx": {"policy": _SET_BY_PIPELINE, "reward_model": _SET_BY_PIPELINE, "prompts": _SET_BY_PIPELINE},
}


def _base(preset: str) -> dict:
    import copy

    base = copy.deepcopy(_FILLED)
    for key, value in PRESETS[preset].items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return base


def _pretrain(size: str) -> PretrainConfig:
    return PretrainConfig(size=size)


@dataclass
class RunConfig:
    out_dir: str = "runs/lab"
    """The run directory; every stage writes a subdirectory of it."""
    seed: int = 0
    """World seed and the seed of every stage."""
    scale: Literal["lab", "small"] = "lab"
    """Lab world size ('small' only for smoke tests)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the training stages, pretraining, SFT, RM and PPO (their own `precision`
    is set from this): 'auto' is bf16 autocast where the hardware has bf16 matrix units (a
    CPU with AMX, a GPU with bf16), else fp32. Sampling for comparisons and evaluation run
    in fp32."""
    pretrain_small: PretrainConfig = field(default_factory=lambda: _pretrain("small"))
    """Stage 0, the small base model (world, out_dir, size, seed are set by the pipeline)."""
    pretrain_large: PretrainConfig = field(default_factory=lambda: _pretrain("large"))
    """Stage 0, the ~10x larger base model."""
    sft_small: SFTConfig = field(default_factory=SFTConfig)
    """Stage 1 on the small base (base, data, out_dir, seed are set by the pipeline)."""
    sft_large: SFTConfig = field(default_factory=SFTConfig)
    """Stage 1 on the large base."""
    comparisons: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=48))
    """Stage 2a: K = 4-9 samples per RM prompt (of SFT-small, or of each SFT model in
    `comparisons_from`), ranked by the simulated labelers (policy, prompts, out, seed are set by
    the pipeline)."""
    comparisons_from: list[Literal["small", "large"]] = field(default_factory=lambda: ["small"])
    """The SFT models whose samples the labelers rank on the RM's training prompts, the prompts
    dealt out between them in turn; the validation comparisons (and the RM's gain, set on
    them) stay SFT-small's. §3.1 collects comparisons on the models being trained. Ranking the
    small policy's samples only (the default), PPO-large fell below SFT-large (gold 0.52
    against 0.65, world v4); with both (`--preset figure1`) it rose to 0.69; on world v6 PPO-large
    is 0.65 and PPO-ptx-large 0.70 against SFT-large's 0.65 (README, "Figure 1 at both sizes")."""
    rm_base: Literal["small", "large"] = "large"
    """Which SFT model the reward model starts from. §3.5 trains one 6B RM for every policy
    size; on the lab world the large one ranks SFT-small's samples far better (within-prompt
    Spearman with gold 0.36 vs 0.20 from the small one, same data)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Stage 2b: one reward model for every policy, trained on the comparisons."""
    rl_init: Literal["c3", "sft"] = "sft"
    """What PPO and PPO-ptx start from and anchor their KL to (App. C.4). 'sft': the SFT model of
    the size (the default: see below). 'c3': App. C.3's model
    (rlinit-<size>/), the base fine-tuned `rl_init_epochs` on the demonstrations with
    `rl_init_ptx_fraction` pretraining text mixed in, at its size's SFT lr, batch and dropout,
    the epoch kept whose samples on the PPO validation prompts the reward model scores best
    (§3.5, App. C.1). It trains after the RM, so the RM can choose it; the SFT models, whose
    samples the RM is trained on, come before the RM and are chosen by validation loss. Its
    capability is measured as RL-init-<size>. On world v6 (the same world, base models, SFT
    and RM, one run each, 2-core EPYC) 'c3' kept 90% of the base's capability (0.378 against
    SFT-small's 0.221; PPO-small from it 0.354) but the RM chose its first epoch, and PPO-small
    from it reached gold 0.299 against 0.378 from SFT-small, and lost to SFT-small head to head
    (0.47 [0.44, 0.50]; from SFT-small 0.51): the lab's PPO gains too little over its start to
    make up the weaker instruction following, so the default starts from SFT."""
    rl_init_epochs: int = 2
    """Epochs of the 'c3' RL init (App. C.3: 2)."""
    rl_init_ptx_fraction: float = 0.1
    """Pretraining texts' share of the 'c3' RL init's loss (App. C.3: 10%), drawn from the
    world's web corpus."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF))
    """Stage 3, PPO on the SFT policy of each of `rlhf_sizes` (policy, reward_model, prompts, world, out_dir set
    by the pipeline)."""
    ppo_ptx: PPOConfig = field(
        default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF, ptx_coef=LAB_PTX_COEF, ptx_per_episode=0.5)
    )
    """Stage 3, PPO-ptx on the SFT policy of each size, the web corpus as the pretraining mix. γ and
    the mix ratio are far below App. C.4's 27.8 and 8: with those the lab policy's KL to SFT
    passed 50 nats and the gold of its samples fell from 0.43 to 0.12 (the ptx term
    outweighed the PPO loss)."""
    rlhf_sizes: list[Literal["small", "large"]] = field(default_factory=lambda: ["small"])
    """The sizes PPO and PPO-ptx run at, each from the SFT model of its size with the one reward
    model (§3.5); Figure 1 has every size (`--preset figure1`). 'small' is always among them:
    the headline, the β sweep and the walkthrough are the small model's. PPO and PPO-ptx large took 1.8-2.2x
    their small runs' time in the figure1 runs (2-core Zen 4 EPYC; BENCHMARKS.md, "The lab run")."""
    sweep_betas: list[float] = field(default_factory=lambda: [0.0, 0.02])
    """Extra PPO runs (as `ppo`, one per β, in sweep/beta-<β>/) for the over-optimization
    chart: gold and RM score against sqrt(KL). [] skips them."""
    jobs: int = 0
    """Stages run side by side at most, each in its own process (like make -j). 0: two on a CPU
    with two or more cores, one on a GPU. At the lab's matrix sizes two one-thread processes
    do more work than one two-thread process; stages that can run together (the two
    pretrainings, the two SFTs, PPO, PPO-ptx and the β sweep) then get cores // jobs threads
    each, and a stage that every other one waits for (world, RM, eval) all of them."""
    isolate_stages: bool = True
    """Run each stage in a fresh process (forked from a server that imported torch and
    transformers once: training.stage_context). In one process the later stages ran slower
    than on their own (PPO 185 s against 137 s)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(temperature=1.0))
    """The evaluations (world, models, reward_model, out_dir are set by the pipeline). Answers
    are sampled at T = 1, the temperature PPO trains and is measured at; greedy decoding
    hides the distribution that RL changes (a seeded generator keeps it deterministic)."""

    def validate(self):
        check(self.seed >= 0, "seed", self.seed, "must be non-negative")
        check(self.jobs >= 0, "jobs", self.jobs, "must be >= 0 (0: auto)")
        check(all(b >= 0 for b in self.sweep_betas), "sweep_betas", self.sweep_betas, "must be >= 0")
        sizes = self.rlhf_sizes
        check("small" in sizes and len(set(sizes)) == len(sizes), "rlhf_sizes", sizes, "must hold 'small', once")
        src = self.comparisons_from
        check("small" in src and len(set(src)) == len(src), "comparisons_from", src, "must hold 'small', once")
        check(self.rl_init_epochs >= 1, "rl_init_epochs", self.rl_init_epochs, "must be >= 1")
        f = self.rl_init_ptx_fraction
        check(0 < f < 1, "rl_init_ptx_fraction", f, "must be in (0, 1)")


@dataclass
class Job:
    """One stage of the run: `make()` gives (fn, args) when the stage starts (its inputs
    exist by then), `needs` the stages whose directories it reads."""

    name: str
    make: Callable[[], tuple[Callable, tuple]]
    needs: tuple[str, ...] = ()


def _stage_child(conn, fn, args, env: dict, threads: int, log: str | None) -> None:
    """A stage in its own process (training.stage_context): the caller's environment, its
    thread count, its output to `log` (when it runs beside another stage), and its result
    or its own exception sent back."""
    import os
    import sys

    from rlhflab.training import apply_env

    apply_env(env, threads)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        fn(*args)
        conn.send((True, None))
    except BaseException as e:  # the parent raises it again, whole
        try:
            conn.send((False, e))
        except Exception:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Pipeline:
    def __init__(self, cfg: RunConfig):
        from rlhflab.training import choose_precision, resolve_device

        self.cfg, self.root = cfg, Path(cfg.out_dir)
        self.timings: dict[str, float] = {}
        self.device = resolve_device("auto")
        self.precision, self.precision_reason = cfg.precision, "asked for"
        if cfg.precision == "auto":
            choice = choose_precision(self.device)
            self.precision, self.precision_reason = choice.precision, choice.reason

    def _seeded(self, cfg):
        """A stage's config with the run's seed and, for a training stage, its precision."""
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=self.cfg.seed))
        if hasattr(cfg, "train"):
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=self.precision))
        return cfg

    # ------------------------------------------------------------------ the stages

    def jobs(self) -> list[Job]:
        """Every stage with what it reads, longest first among those that can run together."""
        root, world = self.root, self.root / "world"
        rm = root / "rm" / "model"
        out = [Job("world", lambda: self._world(world))]
        for size in ("large", "small"):  # the large one is the longer
            out.append(Job(f"pretrain-{size}", lambda s=size: self._pretrain(s, world), ("world",)))
        for size in ("large", "small"):
            out.append(Job(f"sft-{size}", lambda s=size: self._sft(s, world), (f"pretrain-{size}",)))
        sampled = tuple(f"sft-{s}" for s in SIZES if s in self.cfg.comparisons_from)
        out.append(Job("comparisons", lambda: self._comparisons(world), sampled))
        out.append(Job("rm", lambda: self._rm(world), (f"sft-{self.cfg.rm_base}", "comparisons")))
        sizes = [s for s in ("large", "small") if s in self.cfg.rlhf_sizes]  # the large runs first: the longer
        if self.cfg.rl_init == "c3":
            for size in sizes:
                out.append(
                    Job(f"rlinit-{size}", lambda s=size: self._rl_init(s, world, rm), (f"pretrain-{size}", "rm"))
                )
        for size in sizes:
            out += self._rl_jobs(size, world, rm)
        for beta in self.cfg.sweep_betas:
            name, cfg = f"sweep/beta-{beta:g}", dataclasses.replace(self.cfg.ppo, kl_coef=beta)
            make = lambda n=name, c=cfg: self._ppo(n, c, world, rm, False)
            out.append(Job(name, make, ("rm", self._rl_start_stage("small"))))
        out.append(Job("rm-eval", lambda: self._rm_eval(world), ("rm", "comparisons")))
        out.append(Job("eval", lambda: self._evaluate(world, rm), tuple(j.name for j in out)))
        return out

    def _rl_jobs(self, size: str, world: Path, rm: Path) -> list[Job]:
        """PPO-ptx and PPO (the longer first) from the SFT model of `size`, with the one RM."""
        out = []
        for kind, cfg, ptx in (("ppoptx", self.cfg.ppo_ptx, True), ("ppo", self.cfg.ppo, False)):
            name = f"{kind}-{size}"
            make = lambda n=name, c=cfg, p=ptx: self._ppo(n, c, world, rm, p, size)
            out.append(Job(name, make, ("rm", self._rl_start_stage(size))))
        return out

    def _rl_start_stage(self, size: str) -> str:
        """The stage whose model PPO of `size` starts from and is anchored to (`rl_init`)."""
        return f"rlinit-{size}" if self.cfg.rl_init == "c3" else f"sft-{size}"

    def rl_start(self, size: str) -> Path:
        return self.root / self._rl_start_stage(size) / "model"

    def models(self) -> dict[str, Path]:
        """The evaluated models by name (the paper's GPT, SFT, PPO, PPO-ptx)."""
        models = {f"GPT-{s}": self.root / f"pretrain-{s}" / "model" for s in SIZES}
        models.update({f"SFT-{s}": self.root / f"sft-{s}" / "model" for s in SIZES})
        for s in SIZES:
            if s in self.cfg.rlhf_sizes:
                models[f"PPO-{s}"] = self.root / f"ppo-{s}" / "policy"
                models[f"PPO-ptx-{s}"] = self.root / f"ppoptx-{s}" / "policy"
        return models

    def _world(self, path: Path):
        from rlhflab.world.build import build

        return build, (path, self.cfg.seed, self.cfg.scale)

    def _pretrain(self, size: str, world: Path):
        base: PretrainConfig = getattr(self.cfg, f"pretrain_{size}")
        cfg = dataclasses.replace(base, world=str(world), out_dir=str(self.root / f"pretrain-{size}"), size=size)
        return pretrain, (self._seeded(cfg),)

    def _sft(self, size: str, world: Path):
        from rlhflab.stages.sft import train

        cfg = dataclasses.replace(
            getattr(self.cfg, f"sft_{size}"),
            base=str(self.root / f"pretrain-{size}" / "model"),
            data=str(world / "sft_train.jsonl"),
            val_data=str(world / "sft_val.jsonl"),
            out_dir=str(self.root / f"sft-{size}"),
        )
        return train, (self._seeded(cfg),)

    def _rl_init(self, size: str, world: Path, rm: Path):
        """App. C.3's model: the SFT recipe of `size`, `rl_init_epochs` long, with pretraining
        text mixed in, its epoch chosen by the reward model."""
        from rlhflab.stages.sft import train

        cfg = dataclasses.replace(
            getattr(self.cfg, f"sft_{size}"),
            base=str(self.root / f"pretrain-{size}" / "model"),
            data=str(world / "sft_train.jsonl"),
            val_data=str(world / "sft_val.jsonl"),
            epochs=self.cfg.rl_init_epochs,
            ptx_data=str(world / "corpus_train.jsonl"),
            ptx_fraction=self.cfg.rl_init_ptx_fraction,
            reward_model=str(rm),
            val_prompts=str(world / "ppo_val.jsonl"),
            out_dir=str(self.root / f"rlinit-{size}"),
        )
        return train, (self._seeded(cfg),)

    def _comparisons(self, world: Path):
        from rlhflab.stages.comparisons import build

        out, sft = self.root / "comparisons", lambda s: self.root / f"sft-{s}" / "model"
        also = tuple(sft(s) for s in SIZES if s in self.cfg.comparisons_from and s != "small")
        return build, (world, sft("small"), out, self.cfg.comparisons, self.cfg.seed, also)

    def _rm(self, world: Path):
        from rlhflab.stages.rm import train

        comparisons = self.root / "comparisons"
        cfg = dataclasses.replace(
            self.cfg.rm,
            base=str(self.root / f"sft-{self.cfg.rm_base}" / "model"),
            rankings=str(comparisons / "train.jsonl"),
            val_rankings=str(comparisons / "val.jsonl"),
            demos=str(world / "sft_train.jsonl"),
            # SFT-small's samples on the RM's validation prompts (the default's one PPO start; the
            # large size's PPO sees the same RM scale), on prompts the RM did not train on
            policy_samples=str(comparisons / "val_samples.jsonl"),
            out_dir=str(self.root / "rm"),
        )
        return train, (self._seeded(cfg),)

    def _rm_eval(self, world: Path):
        from rlhflab.eval.rm_report import rm_report

        c = self.root / "comparisons"
        return rm_report, (
            world,
            self.root / "rm" / "model",
            self.root / "rm-eval",
            c / "val.jsonl",
            c / "heldout.jsonl",
        )

    def _ppo(self, name: str, base: PPOConfig, world: Path, rm: Path, ptx: bool, size: str = "small"):
        from rlhflab.stages.ppo import train

        cfg = dataclasses.replace(
            base,
            policy=str(self.rl_start(size)),
            reward_model=str(rm),
            prompts=str(world / "ppo_train.jsonl"),
            val_prompts=str(world / "ppo_val.jsonl"),
            ptx_data=str(world / "corpus_train.jsonl") if ptx else None,
            world=str(world),
            out_dir=str(self.root / name),
        )
        return train, (self._seeded(cfg),)

    def _evaluate(self, world: Path, rm: Path):
        from rlhflab.eval.evaluate import evaluate

        models = self.models()
        runs = [f"{r}-{s}" for s in SIZES if s in self.cfg.rlhf_sizes for r in ("ppo", "ppoptx")]
        runs += [f"sweep/beta-{b:g}" for b in self.cfg.sweep_betas]
        rl_runs = {name.removeprefix("sweep/"): str(self.root / name / "metrics.jsonl") for name in runs}
        capability_only = {
            f"PPO-beta{b:g}-small": str(self.root / f"sweep/beta-{b:g}" / "policy") for b in self.cfg.sweep_betas
        }
        if self.cfg.rl_init == "c3":
            capability_only.update({f"RL-init-{s}": str(self.rl_start(s)) for s in self.cfg.rlhf_sizes})
        cfg = dataclasses.replace(
            self.cfg.eval,
            world=str(world),
            models={k: str(v) for k, v in models.items()},
            rl_runs=rl_runs,
            capability_models=capability_only,
            prompted=[m for m in models if m.startswith("GPT-")],
            baseline=FIGURE1_BASELINE,
            head_to_head=[f"{a}:{b}" for a, b in head_to_head(self.cfg.rlhf_sizes)],
            reward_model=str(rm),
            out_dir=str(self.root / "eval"),
        )
        cfg = self._seeded(cfg)
        validate(cfg)
        return evaluate, (cfg,)

    # ------------------------------------------------------------------ running them

    def lanes(self) -> int:
        """How many stages run side by side (`jobs`; 0: two on a CPU of two or more cores,
        one on a GPU, one when stages share this process)."""
        if not self.cfg.isolate_stages:
            return 1
        return self.cfg.jobs or default_jobs(self.device)

    def stage(self, name: str, fn, *args) -> dict:
        """Run `fn(*args)` unless `<root>/<name>/summary.json` says the stage already finished."""
        self.schedule([Job(name, lambda: (fn, args))], lanes=1)
        return json.loads((self.root / name / "summary.json").read_text())

    def schedule(self, jobs: list[Job], lanes: int | None = None) -> None:
        """Run every unfinished job once its `needs` have finished, at most `lanes` at once.

        Each stage runs in a fresh process (`isolate_stages`, training.stage_context; the
        stages hand off through their directories only, docs/design.md §2). A stage that can run beside
        another (neither needs the other) gets cores // lanes threads and writes its output
        to `<root>/logs/<name>.log`; a stage every other one waits for or follows gets all
        cores and the terminal. The thread count depends on the graph only, never on
        timing, so a run is deterministic for a given `jobs`. On a stage's error the
        stages beside it are stopped (their checkpoints let a rerun resume) and the
        error is raised again here, whole.
        """
        lanes = lanes or self.lanes()
        done = set()
        for j in jobs:
            if (self.root / j.name / "summary.json").is_file():
                print(f"[run] {j.name}: done already, skipped")
                done.add(j.name)
        pending = [j for j in jobs if j.name not in done]
        if not self.cfg.isolate_stages:
            for j in pending:
                print(f"[run] {j.name} ...", flush=True)
                t0 = time.time()
                fn, args = j.make()
                fn(*args)
                self._finished(j.name, t0)
            return
        alone = _alone(jobs)
        running: dict = {}  # connection -> (job, process, start time, log path)
        last_beat = time.time()
        try:
            while pending or running:
                for j in [j for j in pending if set(j.needs) <= done][: max(lanes - len(running), 0)]:
                    pending.remove(j)
                    running.update(self._launch(j, lanes == 1 or j.name in alone, lanes))
                if not running:
                    missing = {n for j in pending for n in j.needs} - done - {j.name for j in pending}
                    raise RuntimeError(f"stages wait on stages that are not in the run: {sorted(missing)}")
                import multiprocessing.connection

                for conn in multiprocessing.connection.wait(list(running), timeout=60):
                    job, proc, t0, log = running.pop(conn)
                    try:
                        ok, err = conn.recv()
                    except EOFError:
                        ok, err = False, None
                    proc.join()
                    if not ok:
                        if err is None:
                            where = f"; its output: {log}" if log else ""
                            err = RuntimeError(f"stage {job.name} died (exit code {proc.exitcode}){where}")
                        elif log:
                            print(f"[run] {job.name} failed; its output: {log}", flush=True)
                        raise err
                    done.add(job.name)
                    self._finished(job.name, t0)
                if any(v[3] for v in running.values()) and time.time() - last_beat >= 60:  # output in logs
                    last_beat = time.time()
                    print("[run] running: " + ", ".join(_status(*v) for v in running.values()), flush=True)
        finally:
            for _job, proc, _t0, _log in running.values():
                proc.terminate()
                proc.join()

    def _launch(self, job: Job, alone: bool, lanes: int) -> dict:
        import os

        import torch

        from rlhflab.training import stage_context

        fn, args = job.make()
        threads = torch.get_num_threads() if alone else max(1, cpu_cores() // lanes)
        log = None
        if not alone:
            log = self.root / "logs" / f"{job.name.replace('/', '-')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
        ctx = stage_context()  # not a fork of this process: torch's OpenMP pool is not fork-safe
        parent, child = ctx.Pipe(duplex=False)
        child_args = (child, fn, args, dict(os.environ), threads, str(log) if log else None)
        proc = ctx.Process(target=_stage_child, args=child_args)
        proc.start()
        child.close()
        where = f" ({threads} thread{'s' * (threads != 1)}, output in {log})" if log else ""
        print(f"[run] {job.name} ...{where}", flush=True)
        return {parent: (job, proc, time.time(), log)}

    def _finished(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[run] {name}: finished in {self.timings[name]:.0f}s", flush=True)

    def run(self) -> dict:
        self._check_resumable()
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        print(f"[run] precision: {self.precision} ({self.precision_reason})", flush=True)
        lanes = self.lanes()
        if lanes > 1:
            print(f"[run] up to {lanes} stages side by side (jobs)", flush=True)
        t0 = time.time()
        self.schedule(self.jobs(), lanes)
        from rlhflab.report.sections import write_report
        from rlhflab.report.walkthrough import write_walkthrough

        world, rm = self.root / "world", self.root / "rm" / "model"
        write_walkthrough(self.root, world, rm, self.root / "ppo-small", self.rl_start("small"))
        write_report(self.root, self.root / "report.html")
        results = {f"pretrain_{s}": self._summary(f"pretrain-{s}") for s in SIZES}
        results["eval"] = self._summary("eval")
        results["timings"] = {**self.timings, "total": round(time.time() - t0, 1)}
        return results

    def _check_resumable(self) -> None:
        """A run directory holds one run: finished stages of another config or of an older
        world are refused here, before any stage starts, rather than reused."""
        world = self.root / "world"
        if (world / "summary.json").is_file():
            try:
                load_world(world)
            except InputError as e:  # its later stages are stale too: rebuilding the world is no cure
                msg = f"a lab world of another version: {self.root} was made by another rlhflab; use a new --out_dir"
                raise InputError(msg, file=e.file, field=e.field) from None
        saved = self.root / "config.yaml"
        if not saved.is_file():
            return
        old = flat_dict(yaml.safe_load(saved.read_text()) or {})
        new = flat_dict(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(self.cfg))))  # lists as YAML has them
        remedy = "its finished stages would be reused: use a new --out_dir, or delete config.yaml and stages to redo"
        check_resumable(old, new, str(saved), ignore=RERUN_FREE, what="run", remedy=remedy)

    def _summary(self, name: str) -> dict:
        return json.loads((self.root / name / "summary.json").read_text())


RERUN_FREE = {"out_dir", "jobs", "isolate_stages"}
"""RunConfig keys a rerun into the same directory may change: they move no stage's output."""


def _alone(jobs: list[Job]) -> set[str]:
    """Stages that no other stage can run beside: every other one is before or after them."""
    needs = {j.name: set(j.needs) for j in jobs}

    def before(name: str) -> set[str]:
        out, todo = set(), list(needs.get(name, ()))
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(needs.get(n, ()))
        return out

    ancestors = {n: before(n) for n in needs}
    return {n for n in needs if all(m == n or m in ancestors[n] or n in ancestors[m] for m in needs)}


def _status(job: Job, proc, t0: float, log: Path | None) -> str:
    """'ppo-small (3m 10s, 41%)': elapsed time and the last progress figure in its output."""
    import re

    s = int(time.time() - t0)
    pct = ""
    if log is not None and log.is_file():
        with open(log, "rb") as f:
            f.seek(max(log.stat().st_size - 4096, 0))
            found = re.findall(rb"(\d+)%\|", f.read())
        pct = f", {found[-1].decode()}%" if found else ""
    return f"{job.name} ({s // 60}m {s % 60:02d}s{pct})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RunConfig)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="'default': the full lab run; 'figure1': the default plus PPO and PPO-ptx at the large size "
        "(Figure 1's every point), the RM's comparisons ranked on both SFT models' samples; 'smoke': a "
        "one-minute check",
    )


def run_cli(args) -> int:
    cfg = config_from_args(RunConfig, args, base=_base(args.preset))
    results = Pipeline(cfg).run()
    ev = results["eval"]
    print(f"model              gold   unseen  win vs {FIGURE1_BASELINE} (held-out labelers)   capability")
    for name in sorted(k.split("/", 1)[1] for k in ev if k.startswith("gold/")):
        win = (
            f"{ev[f'winrate/{name}']:.2f} [{ev[f'winrate_ci_low/{name}']:.2f}, {ev[f'winrate_ci_high/{name}']:.2f}]"
            if f"winrate/{name}" in ev
            else ""
        )
        cap = ev.get(f"capability/mean/{name}", float("nan"))
        unseen = ev.get(f"gold_unseen/{name}", float("nan"))
        print(f"  {name:<18} {ev[f'gold/{name}']:.3f}  {unseen:.3f}   {win:<36} {cap:.3f}")
    for a, b in head_to_head(cfg.rlhf_sizes):
        key = f"{a}/{b}"
        print(
            f"{a} preferred to {b}: {ev[f'h2h/{key}']:.2f} "
            f"[{ev[f'h2h_ci_low/{key}']:.2f}, {ev[f'h2h_ci_high/{key}']:.2f}] (held-out labelers)"
            + (
                f"; unseen prompts {ev[f'h2h_unseen/{key}']:.2f} "
                f"[{ev[f'h2h_unseen_ci_low/{key}']:.2f}, {ev[f'h2h_unseen_ci_high/{key}']:.2f}]"
                if f"h2h_unseen/{key}" in ev
                else ""
            )
        )
    print(f"report: {Path(cfg.out_dir) / 'report.html'}")
    return 0
