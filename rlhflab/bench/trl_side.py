"""The TRL side of `rlhflab bench --vs trl`: TRL 1.12's PPOTrainer on the same workload.

Imported only with --vs trl; TRL is the optional `bench` extra, never a core dependency.
TRL runs the same models (loaded from the same directories), the same prompt token ids,
batch sizes, epochs and PPO hyperparameters, at the fastest settings found on a CPU
(see TRL_FIXED below and BENCHMARKS.md). TRL reports no phase times, so its phases are
read off the trainer's own module functions: `batch_generation` is generate; from its
end to the first forward with gradients is score; from there to the step's `log` call
is update; the rest of the step (data loading, gc.collect, logging) is other.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import warnings

from transformers import TrainerCallback

from rlhflab.device import sync
from rlhflab.errors import InputError

TRL_VERSIONS = ">=1.12,<1.13"
"""What `rlhflab bench --vs trl` was verified against (the newest release with PPO)."""

# Settings chosen for speed (BENCHMARKS.md): no gradient checkpointing, fp32 (bf16 with
# `--precision bf16`), no sample
# generations, no saving or reporting, a constant LR, rollouts in one chunk.
TRL_FIXED = dict(
    gradient_checkpointing=False,
    bf16=False,
    fp16=False,
    num_sample_generations=0,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    logging_steps=1,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_epsilon=1e-5,
    kl_estimator="k1",
    whiten_rewards=False,
    missing_eos_penalty=None,
    stop_token=None,
    dataloader_num_workers=0,
)


def check_trl() -> None:
    """Refuse in one line when TRL (with its experimental PPO) is not importable."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401
    except ImportError as e:
        have = ""
        try:
            import trl

            have = f" (found trl {trl.__version__}: {e})"
        except ImportError:
            pass
        raise InputError(
            f"--vs trl needs TRL {TRL_VERSIONS} with trl.experimental.ppo{have}; "
            "install it with: pip install 'rlhflab[bench]'",
            field="vs",
        ) from None


def trl_batch_args(w) -> dict:
    """TRL's batch knobs: the whole batch is one rollout batch, minibatches of one micro-batch.

    (TRL's optimizer steps once per gradient_accumulation_steps micro-batches, counted
    across minibatches, so accumulation is left at 1.)
    """
    return dict(
        per_device_train_batch_size=w.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=w.batch_size // w.minibatch_size,
    )


def run_trl(
    w, inputs: dict, steps: int, out_dir: str, kernels: bool = False, precision: str = "fp32", seed: int = 0
) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed arguments
    import torch
    import trl
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trainer_module

    from rlhflab.bench.common import PPO_SETTINGS, peak_memory, side_result
    from rlhflab.data import read_prompts
    from rlhflab.device import fast_attention, fuse_gelu
    from rlhflab.models import load_causal_lm, load_reward_model, load_tokenizer
    from rlhflab.text import encode_query

    tok = load_tokenizer(inputs["policy"])
    queries = [encode_query(tok, p) for p in read_prompts(inputs["prompts"])]
    dataset = Dataset.from_dict({"input_ids": queries})
    s = PPO_SETTINGS
    settings = dict(
        **{**TRL_FIXED, "bf16": precision == "bf16"},
        **trl_batch_args(w),
        learning_rate=s["lr"],
        kl_coef=s["kl_coef"],
        temperature=s["temperature"],
        cliprange=s["clip_range"],
        cliprange_value=s["value_clip_range"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        num_ppo_epochs=w.ppo_epochs,
        response_length=w.response_len,
        local_rollout_forward_batch_size=w.batch_size,
        total_episodes=steps * w.batch_size,
        use_cpu=w.device == "cpu",
        seed=seed,
    )
    if precision == "bf16":
        # TRL 1.12's PPOTrainer builds its Accelerator without the TrainingArguments' mixed
        # precision, and transformers 5 no longer exports it, so bf16=True alone changes nothing.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    args = PPOConfig(output_dir=out_dir, **settings)
    policy = load_causal_lm(inputs["policy"], fast_gelu=kernels)  # TRL's models as loaded, by default
    reward_model = load_reward_model(inputs["reward_model"])
    value_model = copy.deepcopy(reward_model)  # the value function starts from the RM, as rlhflab's
    if kernels:  # the GELU kernel rlhflab's loader swaps in (TRL's reference model copies the policy)
        for model in (policy, reward_model, value_model):
            fuse_gelu(model)
    for model in (policy, reward_model, value_model):  # bf16 on a CPU: the matmul attention, eager
        # as transformers ships it (TRL: 34 episodes/s vs 25 with sdpa), rlhflab's with kernels
        fast_attention(model, torch.device(w.device), precision, lowp=kernels)
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
    )
    # Full-length responses: with no stop token TRL generates response_length tokens and
    # eos is an ordinary token. No token is suppressed, since TRL's old log-probs are the
    # generation scores after logits processors (suppression would bias ratio and KL).
    # A sampled pad token still ends a response for TRL's masks (~1 in vocab_size tokens
    # are pad); `response_length` reports the shortest response those masks saw.

    clock = _PhaseClock()
    trainer.add_callback(clock)
    originals = {name: getattr(trainer_module, name) for name in ("batch_generation", "forward")}
    trainer_module.batch_generation = clock.timed_generation(originals["batch_generation"], tok, w.device)
    trainer_module.forward = clock.timed_forward(originals["forward"], w.device)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints its logs
            trainer.train()
    finally:
        for name, fn in originals.items():
            setattr(trainer_module, name, fn)
    wall, phases = clock.wall[1:], clock.phases[1:]  # the first step is a warm-up
    peak, kind = peak_memory(w.device)
    shown = {k: v for k, v in settings.items() if k != "total_episodes"}
    return side_result(
        wall,
        phases,
        w,
        [log["objective/kl"] for log in clock.logs],
        [log["objective/scores"] for log in clock.logs],
        peak,
        kind,
        version=trl.__version__,
        settings=shown,
        kernels=kernels,
        response_length=clock.min_response_length,
        threads=torch.get_num_threads(),
    )


class _PhaseClock(TrainerCallback):
    """Step wall times and generate/score/update phases of TRL's PPOTrainer.train()."""

    def __init__(self):
        self.wall, self.phases, self.logs = [], [], []
        self.min_response_length = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.step_start, self.gen_end, self.update_start, self.update_end = now, None, None, None
        self.current = {}

    def timed_generation(self, fn, tok, device):
        import torch

        def wrapper(model, queries, *args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(model, queries, *args, **kwargs)
            sync(device)
            self.gen_end = time.perf_counter()
            self.current["generate"] = self.gen_end - t0
            responses = out[0][:, queries.shape[1] :]
            is_pad = responses == tok.pad_token_id  # TRL's masks end a response at its first pad
            n = int(torch.where(is_pad.any(1), is_pad.int().argmax(1), is_pad.shape[1]).min())
            self.min_response_length = n if self.min_response_length is None else min(n, self.min_response_length)
            return out

        return wrapper

    def timed_forward(self, fn, device):
        import torch

        def wrapper(model, *args, **kwargs):
            if torch.is_grad_enabled() and self.update_start is None:
                sync(device)
                self.update_start = time.perf_counter()
                self.current["score"] = self.update_start - self.gen_end
            return fn(model, *args, **kwargs)

        return wrapper

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/kl" in logs:
            self.update_end = time.perf_counter()
            self.current["update"] = self.update_end - (self.update_start or self.update_end)
            self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.wall.append(now - self.step_start)
        self.phases.append(self.current)
        self._reset(now)
