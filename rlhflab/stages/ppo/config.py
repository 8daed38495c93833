"""The configuration of `rlhflab ppo` (§3.5, App. C.4): one field per knob, documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec

from rlhflab.config import RunFields, TrainFields, check, train_fields


@dataclass
class PPOConfig:
    policy: str = ""
    """SFT policy directory (HF causal LM + tokenizer). Also the frozen reference π_SFT."""
    reward_model: str = ""
    """Reward model directory (sequence classifier, 1 label), frozen during PPO."""
    value_model: str | None = None
    """Value function initialisation; None: the reward model (App. C.4: value from RM).
    A causal-LM directory also works (its scalar head then starts fresh)."""
    prompts: str = ""
    """Training prompts, JSONL {"prompt": str}."""
    val_prompts: str | None = None
    """Held-out prompts, JSONL; every eval_every steps their RM score and KL are logged."""
    ptx_data: str | None = None
    """Pretraining text for PPO-ptx, JSONL {"text"} or .txt; None: plain PPO (no ptx term)."""
    ptx_coef: float = 27.8
    """γ: weight of the pretraining log-likelihood in the PPO loss (App. C.4: 27.8)."""
    ptx_per_episode: float = 8.0
    """Pretraining texts per RL episode in every minibatch: each optimizer step sees this
    many times as many texts as episodes (App. C.4: 8). Costly on a CPU; 0.5-2 is cheaper."""
    kl_coef: float = 0.02
    """β: per-token KL penalty to the SFT model (§3.5 eq. 2; the value 0.02 is App. C.4's);
    the start value if adaptive."""
    adaptive_kl: bool = False
    """Adapt β toward kl_target (Ziegler et al. 2019); the paper keeps β fixed."""
    kl_target: float = 6.0
    """Target KL in nats per response, for adaptive_kl (Ziegler et al. 2019: 6)."""
    kl_horizon: int = 10000
    """For adaptive_kl: β changes by at most ±20% per kl_horizon episodes (Ziegler et al.)."""
    batch_size: int = 64
    """Episodes per PPO step, over all processes. App. C.4 uses 512; 64 gives more updates
    per CPU-minute."""
    minibatch_size: int = 16
    """Episodes per optimizer step, over all processes (App. C.4: 64, i.e. 8 minibatches of
    a 512 batch)."""
    rollout_chunk: int = 0
    """Episodes per sampling call, each call with its own generator seeded from (run.seed,
    step, call): under torchrun rank r samples calls r, r+W, ..., so a run's rollouts are the
    same on any number of processes W (e.g. minibatch_size). 0: one call per process
    (batch_size / W episodes), the fastest; one process then samples the whole batch in one
    call as always, but the draws depend on W."""
    length_buckets: bool = True
    """Minibatches of episodes of about the same length: the batch sorted by query + response
    tokens and cut into minibatches, which keep their rows through every epoch (each epoch
    shuffles their order), each run at its own width without the padding all its rows share.
    The same updates on fewer padded tokens. False: a fresh random split every epoch, every
    minibatch at the batch's width (OpenAI baselines, TRL)."""
    ppo_epochs: int = 4
    """Passes over each batch. App. C.4 uses 1 on 512 episodes; 4 (Schulman et al. 2017)
    gets more from the lab's smaller batches."""
    train: TrainFields = train_fields(lr=1e-4, max_grad_norm=1.0, save_every=8)
    """Optimisation. lr: the peak Adam learning rate, constant after warm-up (App. C.4:
    constant LR); billion-parameter policies use ~1e-5, the lab's small models need larger
    steps to move. The gradient clip applies to the policy and the value model each. A
    checkpoint every 8 PPO steps. precision bf16: every forward (sampling, scoring,
    training) under autocast; rewards, GAE and losses stay fp32. parallel: how the policy
    and the value model train under torchrun (ddp or fsdp; the reference and the reward
    model are replicated); batch_size and minibatch_size stay global."""
    warmup_steps: int = 10
    """PPO steps of linear warm-up from lr/10 to lr (App. C.4: 10 iterations from 1/10)."""
    clip_range: float = 0.2
    """PPO ratio clip ε (App. C.4: 0.2)."""
    value_clip_range: float = 0.2
    """Clip of the value prediction around its rollout value, in reward units."""
    vf_coef: float = 0.1
    """Weight of the value loss (lm-human-preferences: 0.1). The value model is a separate
    network, so with Adam this matters little."""
    gamma: float = 1.0
    """Discount in GAE (App. C.4: no discount)."""
    lam: float = 0.95
    """GAE λ. The paper does not state it; 0.95 is the default of lm-human-preferences and
    TRL (Schulman et al. 2016 used 0.92-0.99)."""
    temperature: float = 1.0
    """Sampling temperature; also the one used in every training log-prob (App. C.4: 1)."""
    max_new_tokens: int = 48
    """Longest response in tokens; a response that reaches it without eos is truncated."""
    no_eos_penalty: float = -1.0
    """Offset added to the RM score of a response that never emits eos (not in the paper;
    truncated answers are unfinished). 0 turns it off."""
    force_length: bool = False
    """Benchmarks only: suppress eos so every response has max_new_tokens tokens."""
    ema_decay: float | None = None
    """EMA of policy weights per optimizer step (App. C.4: 0.992); the EMA is what is saved.
    None by default: a lab run takes a few hundred steps, so an EMA would stay near SFT."""
    lora_r: int = 0
    """Rank of the LoRA adapters (Hu et al. 2021) the policy and the value model train over
    their frozen weights, through peft (`pip install 'rlhflab[lora]'`); 0: full fine-tuning.
    With LoRA π_SFT is the policy's own base with the adapters off (no copy of its weights),
    checkpoints hold the adapters and the value head only, and the run writes policy/ and
    value/ merged (plain transformers models) plus the policy's adapter in adapter/."""
    lora_alpha: float = 16.0
    """LoRA scale α: an adapted layer adds (α / r)·B·A to its weight; B starts at 0, so the
    first rollout is π_SFT's. No adapter dropout: PPO trains with dropout off."""
    lora_target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: 'all-linear' (every linear layer but the LM head and the
    value model's scalar head, which trains whole), a list of module names matched by
    suffix (e.g. [q_proj, v_proj]), or one regular expression over full module names."""
    total_episodes: int = 4096
    """Episodes in the whole run (App. C.4: 256k); PPO steps = total_episodes // batch_size."""
    eval_every: int = 8
    """Run the validation measurements every this many PPO steps (and at the start and end)."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (prompt order, sampling, minibatch order) and device."""
    world: str | None = None
    """Lab world directory: gold quality, style and capability measured on val_prompts
    (default <world>/ppo_val.jsonl); measurement only, never a training signal."""
    resume: bool = True
    """Continue from <out_dir>/checkpoint when there is one; False starts over."""
    out_dir: str = "runs/ppo"
    """Output directory: policy/, value/, adapter/ (LoRA), checkpoint/, metrics.jsonl, config.yaml,
    summary.json."""

    def validate(self) -> None:
        for key in ("policy", "reward_model", "prompts", "out_dir"):
            check(bool(getattr(self, key)), key, getattr(self, key), "is required")
        for key in (
            "batch_size",
            "minibatch_size",
            "ppo_epochs",
            "max_new_tokens",
            "eval_every",
            "kl_horizon",
        ):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(
            self.batch_size % self.minibatch_size == 0,
            "minibatch_size",
            self.minibatch_size,
            f"must divide batch_size ({self.batch_size})",
        )
        check(self.rollout_chunk >= 0, "rollout_chunk", self.rollout_chunk, "must be >= 0 (0: one call per process)")
        check(
            not self.rollout_chunk or self.batch_size % self.rollout_chunk == 0,
            "rollout_chunk",
            self.rollout_chunk,
            f"must divide batch_size ({self.batch_size})",
        )
        check(
            self.total_episodes >= self.batch_size,
            "total_episodes",
            self.total_episodes,
            f"must be at least batch_size ({self.batch_size})",
        )
        for key in ("ptx_coef", "kl_coef", "vf_coef", "warmup_steps"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for key in ("clip_range", "value_clip_range", "temperature", "kl_target", "ptx_per_episode"):
            check(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        check(0 <= self.lam <= 1, "lam", self.lam, "must be in [0, 1]")
        check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "ema_decay",
            self.ema_decay,
            "must be in (0, 1) or null",
        )
        check(self.lora_r >= 0, "lora_r", self.lora_r, "must be >= 0 (0: full fine-tuning)")
        if self.lora_r:
            check(find_spec("peft") is not None, "lora_r", self.lora_r, "needs peft: pip install 'rlhflab[lora]'")
            check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be > 0")
            check(bool(self.lora_target_modules), "lora_target_modules", self.lora_target_modules, "names no layer")
            check(
                self.ema_decay is None,
                "ema_decay",
                self.ema_decay,
                "must be null with lora_r > 0 (an average of the factors B and A is not the average of B·A)",
            )

    @property
    def n_steps(self) -> int:
        """PPO steps in the run (computed: total_episodes // batch_size)."""
        return self.total_episodes // self.batch_size
