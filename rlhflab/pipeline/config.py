"""What `rlhflab run` runs: the lab's recipe (its constants, with the measurements that set
them), the presets, and RunConfig, the run's one config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhflab.config import check
from rlhflab.eval.config import EvalConfig
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.pretrain import PretrainConfig
from rlhflab.stages.rm import RMConfig
from rlhflab.stages.sample import SampleConfig
from rlhflab.stages.sft import SFTConfig

SIZES = ("small", "large")

LAB_KL_COEF = 0.1
"""β of the lab run's PPO and PPO-ptx, at every size. The paper's 0.02 (PPOConfig's default), on
the RM normalised as §3.5 does, wins at the small size (head to head against SFT-small 0.570 /
0.580 / 0.575 in three seeds, against 0.53 at 0.1; README, "The γ sweep") but over-optimizes
the large one: in a figure1 run at 0.02 (420ada7) PPO-large's validation gold fell from
SFT-large's 0.867 to 0.221 at KL 22 nats while its RM score rose from -0.24 to 1.23
(PPO-ptx-large: 0.572 at KL 13); at 0.1 PPO-large held SFT-large's level, and with the RM at
lr 3e-4 (LAB_RM) beats it (0.568 [0.537, 0.598] head to head, README). The β sweeps
(sweep_betas, sweep_ptx_betas) run the small model at 0.02 beside it."""
LAB_PTX_COEF = 0.1
"""γ of the lab run's PPO-ptx (App. C.4: 27.8, far too strong for models this small). Chosen by
a sweep over the default run's SFT-small and RM (README, "The γ sweep"): against SFT-small
(held-out labelers), at β = 0.1 γ 0.03 / 0.1 / 0.3 won 0.554 / 0.554 / 0.539 with capability
mean +0.007 / +0.029 / +0.073; at β = 0.02 γ 0.01 / 0.03 / 0.1 / 0.3 won 0.586 / 0.535 /
0.572 and 0.558 (two seeds) / 0.550 against PPO's 0.575 (three seeds). γ 0.1 keeps most of
PPO's win rate and pays its tax back; 0.3 buys more capability with win rate."""

LAB_SFT = {
    "small": {"epochs": 4, "dropout": 0.0, "train": {"lr": 3e-4}},
    "large": {"epochs": 4, "dropout": 0.0, "train": {"lr": 3e-4}},
}
"""The lab's SFT (SFTConfig overrides by size): 4 epochs, no dropout, lr 3e-4, against
SFTConfig's defaults of lr 1e-3 and the paper's 16 epochs and residual dropout 0.2 (§3.5). Optimizer
steps x peak lr, SFT over pretraining: 0.1 at both sizes (600 steps at 3e-4 against 600 at
3e-3), SFT a small fraction of pretraining as in App. C.1. The paper's defaults erased what
pretraining taught (capability mean GPT-small 0.41 -> SFT 0.15), so the alignment tax landed
at SFT, not at PPO; so did the small model's 4 epochs at 1e-3 (ratio 0.33): at 499c107 its SFT
kept 56% of the base's capability mean (0.424 -> 0.239; continuation 1.000 -> 0.548, cipher
and reading to 0). At 3e-4 (README, "What a run shows today"): SFT-small keeps 93% (0.424 ->
0.393, continuation 1.000), its samples score lower on gold (0.289 against 0.321), PPO pays
the tax where the paper sees it (webtext and two or three benchmarks beyond their CIs at
β = 0.1 and at 0.02) and PPO-ptx pays most of it back. An earlier world (before the RM's
normalisation) had PPO learn to refuse every prompt from the weaker 3e-4 samples (gold 0.28
-> 0.20 at β = 0.02); on this one it gains (0.289 -> 0.298 at 0.02, 0.314 at 0.1)."""

LAB_RM = {"train": {"lr": 3e-4}, "epochs": 2}
"""The lab's RM (RMConfig overrides), from SFT-large, 2 epochs (the 2nd raised within-prompt
Spearman with gold 0.36 -> 0.46 at lr 1e-4), lr chosen by the RM's own validation accuracy
(training labelers' rankings of SFT-small's samples) over the default run's comparisons:
1e-4 / 3e-4 / 1e-3 gave 62.4% / 63.6% / 62.8% (train accuracy 64.5% / 68.0% / 64.2%: at
1e-4 it underfit). At 3e-4 agreement with held-out labelers rose 63.1% -> 64.7% and
within-prompt Spearman with gold 0.44 -> 0.49 (figure1's comparisons: 61.5% -> 63.2%,
0.42 -> 0.50)."""

HEADLINE_RIVALS = ("GPT-large", "GPT-prompted-large")
"""The paper's headline (§1): the small PPO-ptx model against the ~10x larger base model,
plain and few-shot prompted, judged head to head by the held-out labelers."""

FIGURE1_BASELINE = "SFT-large"
"""Every win rate of the lab's eval is against the largest SFT model, as Figure 1 measures
against 175B SFT."""


def head_to_head(rlhf_sizes: list[str]) -> list[tuple[str, str]]:
    """The eval's head-to-head pairs (a, b), how often a's answer beats b's: the headline, then
    PPO and PPO-ptx of each size against the SFT model of their size (their start, unless
    `rl_init` is 'c3')."""
    own = [(f"{m}-{s}", f"SFT-{s}") for s in SIZES if s in rlhf_sizes for m in ("PPO", "PPO-ptx")]
    return [("PPO-ptx-small", r) for r in HEADLINE_RIVALS] + own


# Overrides applied on top of the defaults, by preset. `smoke` is the one-minute check.
PRESETS: dict[str, dict] = {
    "default": {
        "pretrain_small": {"steps": 600, "batch_size": 32},
        "pretrain_large": {"steps": 600, "batch_size": 16},
        "sft_small": LAB_SFT["small"],  # SFT small next to pretraining (App. C.1's proportion)
        "sft_large": LAB_SFT["large"],
        "rm": LAB_RM,
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
        "sweep_ptx_betas": [0.0],
    },
}
PRESETS["figure1"] = {**PRESETS["default"], "rlhf_sizes": list(SIZES), "comparisons_from": list(SIZES)}
"""Figure 1's every point: the default run, plus PPO and PPO-ptx from SFT-large, with the RM's
training comparisons ranked on samples of both SFT models (README, "What a run shows today",
says what they cost and what the second SFT model's samples change)."""
PRESETS["quick"] = {
    **PRESETS["default"],
    "pretrain_large": {"steps": 300, "batch_size": 16},
    "sft_large": {**LAB_SFT["large"], "epochs": 2},  # SFT over pretraining stays 0.1
    "rm": {**LAB_RM, "epochs": 1},
    "ppo": {"total_episodes": 2048, "eval_every": 4},  # the β = 0 run's gold curve: 8 points, as the default's
    "ppo_ptx": {"total_episodes": 2048},
    "sweep_betas": [0.0],
    "sweep_ptx_betas": [],
}
"""The default halved where it waits on one stage after another, for a CPU on which the default
takes twice its budget (fp32 without bf16 instructions; README, "What a run shows today"): the
large model pretrained 300 steps (SFT-large 2 epochs, keeping SFT at a tenth of pretraining),
the RM one epoch, PPO and PPO-ptx 2,048 episodes, and of the β sweep PPO at β = 0 only. 17 min 54 s
with set-up on a 2-core Zen 3 EPYC in fp32, where the default took 38 min 20 s. It keeps the small
model's findings: the headline, PPO-ptx over SFT-small, the tax at β = 0.1 and PPO-ptx's repayment,
over-optimization at β = 0. It gives up the large model (300 steps left GPT-large no better
than GPT-small: gold 0.096 against 0.115), the tax at the paper's β, and some RM quality
(README, "What a run shows today")."""


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
    is set from this): 'auto' is bf16 autocast where bf16 matmuls are natively fast (a CPU
    with AMX or AVX-512 BF16, a GPU with bf16) and a short timed matmul at start-up confirms
    it (device.choose_precision; the run prints why), else fp32. Sampling for comparisons
    and evaluation run in fp32."""
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
    against 0.65, world v4); with both (`--preset figure1`) it rose to 0.69; on world v7 PPO-large
    is 0.69 and PPO-ptx-large 0.71 against SFT-large's 0.65 (README, "Figure 1 at both sizes")."""
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
    (0.47 [0.44, 0.50]; from SFT-small 0.51). On world v7 likewise (the RM chose epoch 1 again):
    gold of PPO-small 0.335 and PPO-ptx-small 0.312 from it against 0.381 and 0.384 from SFT-small,
    PPO-ptx-small preferred to SFT-small 0.52 [0.49, 0.55] against 0.58, capability 0.358 and
    0.404 against 0.204 and 0.367. The lab's PPO gains too little over its start to make up the
    weaker instruction following, so the default starts from SFT."""
    rl_init_epochs: int = 2
    """Epochs of the 'c3' RL init (App. C.3: 2)."""
    rl_init_ptx_fraction: float = 0.1
    """Pretraining texts' share of the 'c3' RL init's loss (App. C.3: 10%), drawn from the
    world's web corpus."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF))
    """Stage 3, PPO from the `rl_init` policy of each of `rlhf_sizes` (policy, reward_model, prompts, world,
    out_dir set by the pipeline)."""
    ppo_ptx: PPOConfig = field(
        default_factory=lambda: PPOConfig(kl_coef=LAB_KL_COEF, ptx_coef=LAB_PTX_COEF, ptx_per_episode=0.5)
    )
    """Stage 3, PPO-ptx from the `rl_init` policy of each size, the web corpus as the pretraining mix. γ and
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
    sweep_ptx_betas: list[float] = field(default_factory=lambda: [0.02])
    """Extra PPO-ptx runs (as `ppo_ptx`, one per β, in sweep/ptx-beta-<β>/): the tax PPO-ptx
    pays back where PPO pays one, at the paper's β (App. C.4: 0.02), beside PPO at that β
    from `sweep_betas`. Both are evaluated in full (PPO-ptx-beta<β>-small, PPO-beta<β>-small:
    win rates, head to head against SFT-small, capability); [] skips them."""
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
        check(all(b >= 0 for b in self.sweep_ptx_betas), "sweep_ptx_betas", self.sweep_ptx_betas, "must be >= 0")
        sizes = self.rlhf_sizes
        check("small" in sizes and len(set(sizes)) == len(sizes), "rlhf_sizes", sizes, "must hold 'small', once")
        src = self.comparisons_from
        check("small" in src and len(set(src)) == len(src), "comparisons_from", src, "must hold 'small', once")
        check(self.rl_init_epochs >= 1, "rl_init_epochs", self.rl_init_epochs, "must be >= 1")
        f = self.rl_init_ptx_fraction
        check(0 < f < 1, "rl_init_ptx_fraction", f, "must be in (0, 1)")


RERUN_FREE = {"out_dir", "jobs", "isolate_stages"}
"""RunConfig keys a rerun into the same directory may change: they move no stage's output."""
