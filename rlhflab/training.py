"""Small pieces every training loop shares: seeding, schedules, the NaN guard, progress."""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from rlhflab.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from rlhflab.config import save_config, to_dict
from rlhflab.errors import InputError, TrainingError
from rlhflab.io import MetricsLog, atomic_dir, write_json


def set_seed(seed: int) -> torch.Generator:
    """Seed python and torch; return a torch Generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """Mixed precision for a block: 'bf16' runs matmuls in bfloat16 with fp32 weights, fp32
    optimizer state and fp32 log-softmax (a CPU with AMX, or a GPU); 'fp32' changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 matmuls natively (a CUDA GPU with bf16, a CPU with AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def fast_kernels(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The same function, faster: GPT-2's gelu_new as one fused kernel, and on a CPU in bf16
    the matmul ('eager') attention. Returns the model."""
    from rlhflab.models import fast_attention, fuse_gelu

    fuse_gelu(model)
    fast_attention(model, device, precision)
    return model


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    final_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `final_ratio` of the peak (§C.1: to 10%)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grads_finite(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class NonFiniteGuard:
    """Skip an update whose loss or gradient is not finite; stop after `patience` in a row."""

    def __init__(self, patience: int = 5, where: str = "training"):
        self.patience, self.where, self.streak, self.skipped = patience, where, 0, 0

    def ok(self, loss: torch.Tensor, params) -> bool:
        """Check one update: a finite one ends the streak of skipped ones."""
        if bool(torch.isfinite(loss).all()) and grads_finite(params):
            self.streak = 0
            return True
        self._skip()
        return False

    def check(self, value: torch.Tensor) -> bool:
        """Check an input to updates (PPO's rollout rewards). A finite one is no update, so
        it must not end a streak: else NaN gradients in every minibatch would never stop."""
        if bool(torch.isfinite(value).all()):
            return True
        self._skip()
        return False

    def _skip(self) -> None:
        self.streak += 1
        self.skipped += 1
        warnings.warn(f"{self.where}: non-finite loss, gradient or reward; step skipped "
                      f"({self.streak} in a row)", RuntimeWarning, stacklevel=3)
        if self.streak >= self.patience:
            raise TrainingError(f"{self.where}: {self.streak} non-finite steps in a row; "
                                "stopped, the last good checkpoint is kept")


def progress(iterable=None, total: int | None = None, desc: str = "", initial: int = 0):
    """A tqdm bar on stderr, quiet when RLHFLAB_QUIET is set (tests)."""
    disable = bool(os.environ.get("RLHFLAB_QUIET"))
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def in_fresh_process(fn, *args):
    """`fn(*args)` in a spawned child process; its result or its own exception comes back.
    Spawn, not fork: a forked child inherits torch's OpenMP pool, which is not fork-safe.
    `fn` and `args` must pickle (a module-level function, dataclass configs, paths)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"not a torch device: {name!r} (try auto, cpu, cuda)",
                         field="device") from None


def check_resumable(saved: dict, current: dict, where: str,
                    ignore=("save_every", "device")) -> None:
    """Refuse to resume a checkpoint made under another config (other data, lr, ...)."""
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            raise InputError(f"the checkpoint there was made with {key}={saved.get(key)!r}, "
                             f"this run has {current.get(key)!r}; remove the checkpoint "
                             "directory or choose another out_dir", file=where, field=key)


def start_or_resume(model, config, total_steps: int, extra_state: dict | None = None):
    """AdamW + cosine schedule for an SFT/RM-style stage; restored from <out_dir>/checkpoint
    when one exists (refused if it was made under another config).

    Returns (optimizer, scheduler, state, metrics log). `config` needs out_dir, lr,
    weight_decay, warmup_steps, final_lr_ratio.
    """
    out_dir = Path(config.out_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                            weight_decay=config.weight_decay)  # App. C: Adam β = (0.9, 0.95)
    sched = cosine_schedule(opt, total_steps, config.warmup_steps, config.final_lr_ratio)
    state = {"step": 0, "epoch": 0, "batch": 0, "epochs": [], "config": to_dict(config),
             **(extra_state or {})}
    resumed = has_checkpoint(out_dir)
    if resumed:
        saved = load_checkpoint(out_dir, {"model": model}, {"optimizer": opt})
        check_resumable(saved["config"], state["config"], str(out_dir / "checkpoint"))
        sched.load_state_dict(saved.pop("scheduler"))
        state = saved
    else:
        shutil.rmtree(out_dir / "best", ignore_errors=True)  # left by an abandoned run
    (out_dir / "summary.json").unlink(missing_ok=True)  # not finished until written again
    save_config(config, out_dir / "config.yaml")
    log = MetricsLog(out_dir / "metrics.jsonl", keep_rows=state.get("metrics_rows"),
                     truncate_after_step=state["step"] if resumed else None)
    return opt, sched, state, log


def save_stage_checkpoint(out_dir: Path, model, opt, sched, state: dict, log: MetricsLog) -> None:
    """The SFT/RM checkpoint: weights, optimizer, schedule, data position, and how many
    metrics rows it has seen (an epoch-end or final row shares its step with the last
    training row, so only a row count tells a resume exactly what to drop)."""
    save_checkpoint(out_dir, {"model": model}, {"optimizer": opt},
                    dict(state, scheduler=sched.state_dict(), metrics_rows=log.rows))


def write_outputs(out_dir: Path, model, tokenizer, summary: dict) -> Path:
    """<out_dir>/model (atomically), then summary.json, the mark of a finished stage."""
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json(out_dir / "summary.json", summary)
    for name in ("checkpoint", "best"):  # resumable state is not needed any more
        shutil.rmtree(out_dir / name, ignore_errors=True)
    return out_dir / "model"


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings must not stop early."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall time per named phase of a step (synchronising the GPU at each boundary)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return max(sum(self.times.values()), 1e-9)

    def metrics(self, episodes: int, tokens: int) -> dict[str, float]:
        return {**{f"time/{k}_s": v for k, v in self.times.items()}, "time/step_s": self.total(),
                "time/episodes_per_s": episodes / self.total(),
                "time/generated_tokens_per_s": tokens / max(self.times.get("generate", 0), 1e-9)}
