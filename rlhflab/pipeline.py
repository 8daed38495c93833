"""`rlhflab run`: the whole recipe on the lab world, one run directory, resumable.

    world -> pretrain (small, large) -> sft -> comparisons -> rm -> ppo / ppo-ptx -> eval -> report

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhflab.config import add_config_arguments, check, config_from_args, save_config, validate
from rlhflab.eval.evaluate import EvalConfig
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.pretrain import PretrainConfig
from rlhflab.stages.pretrain import train as pretrain
from rlhflab.stages.rm import RMConfig
from rlhflab.stages.sample import SampleConfig
from rlhflab.stages.sft import SFTConfig

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

HEADLINE_RIVALS = ("GPT-large", "GPT-prompted-large")
"""The paper's headline (§1): the small PPO-ptx model against the ~10x larger base model,
plain and few-shot prompted, judged head to head by the held-out labelers."""

# Overrides applied on top of the defaults, by preset. `smoke` is the one-minute check.
PRESETS: dict[str, dict] = {
    "default": {
        "pretrain_small": {"steps": 600, "batch_size": 32},
        "pretrain_large": {"steps": 600, "batch_size": 16},
        "sft_large": {"train": {"lr": 3e-4}},
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
    """Stage 2a: K = 4-9 samples of SFT-small per RM prompt, ranked by the simulated labelers
    (policy, prompts, out, seed are set by the pipeline)."""
    rm_base: Literal["small", "large"] = "large"
    """Which SFT model the reward model starts from. §3.5 trains one 6B RM for every policy
    size; on the lab world the large one ranks SFT-small's samples far better (within-prompt
    Spearman with gold 0.36 vs 0.20 from the small one, same data)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Stage 2b: one reward model for every policy, trained on the comparisons."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF))
    """Stage 3, PPO on the small SFT policy (policy, reward_model, prompts, world, out_dir set by the pipeline)."""
    ppo_ptx: PPOConfig = field(
        default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF, ptx_coef=LAB_PTX_COEF, ptx_per_episode=0.5)
    )
    """Stage 3, PPO-ptx on the small SFT policy with the web corpus as the pretraining mix. γ and
    the mix ratio are far below App. C.4's 27.8 and 8: with those the lab policy's KL to SFT
    passed 50 nats and the gold of its samples fell from 0.43 to 0.12 (the ptx term
    outweighed the PPO loss)."""
    sweep_betas: list[float] = field(default_factory=lambda: [0.0, 0.02])
    """Extra PPO runs (as `ppo`, one per β, in sweep/beta-<β>/) for the over-optimization
    chart: gold and RM score against sqrt(KL). [] skips them."""
    isolate_stages: bool = True
    """Run each stage in a fresh process (spawned; it re-imports torch, ~4 s). In one
    process the later stages ran slower than on their own (PPO 185 s against 137 s)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(temperature=1.0))
    """The evaluations (world, models, reward_model, out_dir are set by the pipeline). Answers
    are sampled at T = 1, the temperature PPO trains and is measured at; greedy decoding
    hides the distribution that RL changes (a seeded generator keeps it deterministic)."""

    def validate(self):
        check(self.seed >= 0, "seed", self.seed, "must be non-negative")
        check(all(b >= 0 for b in self.sweep_betas), "sweep_betas", self.sweep_betas, "must be >= 0")


class Pipeline:
    def __init__(self, cfg: RunConfig):
        from rlhflab.training import choose_precision, resolve_device

        self.cfg, self.root = cfg, Path(cfg.out_dir)
        self.timings: dict[str, float] = {}
        self.precision, self.precision_reason = cfg.precision, "asked for"
        if cfg.precision == "auto":
            choice = choose_precision(resolve_device("auto"))
            self.precision, self.precision_reason = choice.precision, choice.reason

    def _seeded(self, cfg):
        """A stage's config with the run's seed and, for a training stage, its precision."""
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=self.cfg.seed))
        if hasattr(cfg, "train"):
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=self.precision))
        return cfg

    def stage(self, name: str, fn, *args) -> dict:
        """Run `fn(*args)` unless `<root>/<name>/summary.json` says the stage already finished.

        Each stage runs in a fresh process (`isolate_stages`): run one after another in one
        process, the later stages slowed down (PPO 185 s against 137 s in a process of its own), and the
        stages hand off through their directories only anyway (docs/design.md §2).
        """
        done = self.root / name / "summary.json"
        if done.is_file():
            print(f"[run] {name}: done already, skipped")
            return json.loads(done.read_text())
        print(f"[run] {name} ...", flush=True)
        t0 = time.time()
        if self.cfg.isolate_stages:
            from rlhflab.training import in_fresh_process

            in_fresh_process(fn, *args)  # the stage's own error is raised again here
        else:
            fn(*args)
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[run] {name}: finished in {self.timings[name]:.0f}s", flush=True)
        return json.loads(done.read_text())

    def world(self) -> Path:
        from rlhflab.world.build import build

        path = self.root / "world"
        self.stage("world", build, path, self.cfg.seed, self.cfg.scale)
        return path

    def pretrain(self, size: str, world: Path) -> dict:
        base: PretrainConfig = getattr(self.cfg, f"pretrain_{size}")
        cfg = dataclasses.replace(base, world=str(world), out_dir=str(self.root / f"pretrain-{size}"), size=size)
        cfg = self._seeded(cfg)
        return self.stage(f"pretrain-{size}", pretrain, cfg)

    def sft(self, size: str, world: Path) -> Path:
        from rlhflab.stages.sft import train

        cfg = dataclasses.replace(
            getattr(self.cfg, f"sft_{size}"),
            base=str(self.root / f"pretrain-{size}" / "model"),
            data=str(world / "sft_train.jsonl"),
            val_data=str(world / "sft_val.jsonl"),
            out_dir=str(self.root / f"sft-{size}"),
        )
        cfg = self._seeded(cfg)
        self.stage(f"sft-{size}", train, cfg)
        return self.root / f"sft-{size}" / "model"

    def comparisons(self, world: Path) -> Path:
        from rlhflab.stages.comparisons import build

        out = self.root / "comparisons"
        self.stage(
            "comparisons",
            build,
            world,
            self.root / "sft-small" / "model",
            out,
            self.cfg.comparisons,
            self.cfg.seed,
        )
        return out

    def rm(self, world: Path, comparisons: Path) -> Path:
        from rlhflab.stages.rm import train

        cfg = dataclasses.replace(
            self.cfg.rm,
            base=str(self.root / f"sft-{self.cfg.rm_base}" / "model"),
            rankings=str(comparisons / "train.jsonl"),
            val_rankings=str(comparisons / "val.jsonl"),
            demos=str(world / "sft_train.jsonl"),
            out_dir=str(self.root / "rm"),
        )
        cfg = self._seeded(cfg)
        self.stage("rm", train, cfg)
        from rlhflab.eval.rm_report import rm_report

        self.stage(
            "rm-eval",
            rm_report,
            world,
            self.root / "rm" / "model",
            self.root / "rm-eval",
            comparisons / "val.jsonl",
            comparisons / "heldout.jsonl",
        )
        return self.root / "rm" / "model"

    def ppo(self, name: str, world: Path, rm: Path, ptx: bool) -> Path:
        return self._ppo(name, self.cfg.ppo_ptx if ptx else self.cfg.ppo, world, rm, ptx)

    def _ppo(self, name: str, base: PPOConfig, world: Path, rm: Path, ptx: bool) -> Path:
        from rlhflab.stages.ppo import train

        cfg = dataclasses.replace(
            base,
            policy=str(self.root / "sft-small" / "model"),
            reward_model=str(rm),
            prompts=str(world / "ppo_train.jsonl"),
            val_prompts=str(world / "ppo_val.jsonl"),
            ptx_data=str(world / "corpus_train.jsonl") if ptx else None,
            world=str(world),
            out_dir=str(self.root / name),
        )
        cfg = self._seeded(cfg)
        self.stage(name, train, cfg)
        return self.root / name / "policy"

    def sweep(self, world: Path, rm: Path) -> None:
        """PPO again at each β of sweep_betas, for the over-optimization chart (Gao et al. 2022)."""
        for beta in self.cfg.sweep_betas:
            name = f"sweep/beta-{beta:g}"
            self._ppo(name, dataclasses.replace(self.cfg.ppo, kl_coef=beta), world, rm, ptx=False)

    def evaluate(self, world: Path, models: dict[str, Path], rm: Path) -> dict:
        from rlhflab.eval.evaluate import evaluate

        runs = ["ppo-small", "ppoptx-small"] + [f"sweep/beta-{b:g}" for b in self.cfg.sweep_betas]
        rl_runs = {name.removeprefix("sweep/"): str(self.root / name / "metrics.jsonl") for name in runs}
        cfg = dataclasses.replace(
            self.cfg.eval,
            world=str(world),
            models={k: str(v) for k, v in models.items()},
            rl_runs=rl_runs,
            prompted=[m for m in models if m.startswith("GPT-")],
            baseline="SFT-small",
            head_to_head=[f"PPO-ptx-small:{m}" for m in HEADLINE_RIVALS],
            reward_model=str(rm),
            out_dir=str(self.root / "eval"),
        )
        cfg = self._seeded(cfg)
        validate(cfg)
        return self.stage("eval", evaluate, cfg)

    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        print(f"[run] precision: {self.precision} ({self.precision_reason})", flush=True)
        world = self.world()
        results = {f"pretrain_{s}": self.pretrain(s, world) for s in SIZES}
        models = {f"GPT-{s}": self.root / f"pretrain-{s}" / "model" for s in SIZES}
        models.update({f"SFT-{s}": self.sft(s, world) for s in SIZES})
        rm = self.rm(world, self.comparisons(world))
        models["PPO-small"] = self.ppo("ppo-small", world, rm, ptx=False)
        models["PPO-ptx-small"] = self.ppo("ppoptx-small", world, rm, ptx=True)
        self.sweep(world, rm)
        results["eval"] = self.evaluate(world, models, rm)
        from rlhflab.report.sections import write_report
        from rlhflab.report.walkthrough import write_walkthrough

        write_walkthrough(self.root, world, rm, self.root / "ppo-small", self.root / "sft-small" / "model")
        write_report(self.root, self.root / "report.html")
        results["timings"] = self.timings
        return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RunConfig)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="'default': the full lab run; 'smoke': a one-minute check",
    )


def run_cli(args) -> int:
    cfg = config_from_args(RunConfig, args, base=_base(args.preset))
    results = Pipeline(cfg).run()
    ev = results["eval"]
    print("model              gold   unseen  win vs SFT-small (held-out labelers)   capability")
    for name in sorted(k.split("/", 1)[1] for k in ev if k.startswith("gold/")):
        win = (
            f"{ev[f'winrate/{name}']:.2f} [{ev[f'winrate_ci_low/{name}']:.2f}, {ev[f'winrate_ci_high/{name}']:.2f}]"
            if f"winrate/{name}" in ev
            else ""
        )
        cap = ev.get(f"capability/mean/{name}", float("nan"))
        unseen = ev.get(f"gold_unseen/{name}", float("nan"))
        print(f"  {name:<18} {ev[f'gold/{name}']:.3f}  {unseen:.3f}   {win:<36} {cap:.3f}")
    for rival in HEADLINE_RIVALS:
        key = f"PPO-ptx-small/{rival}"
        print(
            f"PPO-ptx-small preferred to {rival}: {ev[f'h2h/{key}']:.2f} "
            f"[{ev[f'h2h_ci_low/{key}']:.2f}, {ev[f'h2h_ci_high/{key}']:.2f}] (held-out labelers)"
        )
    print(f"report: {Path(cfg.out_dir) / 'report.html'}")
    return 0
