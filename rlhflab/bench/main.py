"""`rlhflab bench`: fixed PPO workloads, timed, optionally side by side with TRL.

A workload fixes everything that sets the cost of a PPO step: the model shape (policy,
reference, reward and value model are all that shape), prompt and response lengths,
batch / minibatch / micro-batch sizes, PPO epochs, device and threads. Responses are
forced to full length (rlhflab never samples eos; TRL, without a stop token, does not
stop at it) so two runs do the same work. Models are
built from config (random init) and written to a scratch directory with a word-level
tokenizer of the workload's vocabulary; the prompts are random words of exactly the
prompt length. Each side runs in a fresh process (its own peak memory, its own thread
pool), one after the other; its first PPO step (warm-up) is left out of every figure.

Figures: episodes/s over whole steps; generated tokens/s over the generate phase;
training tokens/s = epochs x batch x (prompt + response) over the update phase; the
split of step wall time into generate, score (old/ref log-probs, values, RM, rewards,
GAE), update (PPO epochs) and other; peak memory (RSS on CPU, max allocated on CUDA);
the last measured step's KL and RM score, so speed is not bought by doing less; and per
phase the fraction of this machine's limit (bench/limit.py: the FLOPs the phase must do at
the matmul rates timed on its shapes in the same run, over the measured time).

`--nproc N` also measures rlhflab at N processes: the same workload (the same global
batch and minibatch) under `torchrun` (launched here as a subprocess; gloo on a CPU, one
GPU each with nccl), DDP or FSDP2 (`--parallel`), the workload's CPU threads split
between the processes; its figures sit beside the 1-process ones.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from rlhflab.bench.common import (
    PPO_SETTINGS,
    SEED,
    WORKLOADS,
    Workload,
    build_inputs,
    cpu_name,
    n_params,
    peak_memory,
    side_result,
)
from rlhflab.bench.limit import fractions, measure_limit
from rlhflab.bench.report import format_report
from rlhflab.device import sync
from rlhflab.errors import InputError


def run_rlhflab(
    w: Workload,
    inputs: dict,
    steps: int,
    out_dir: str,
    precision: str = "fp32",
    lora_r: int = 0,
    gradient_checkpointing: bool = False,
    parallel: str = "auto",
    seed: int = SEED,
) -> dict:
    """rlhflab's own PPO step (`rlhflab ppo`'s code path) on the workload; `lora_r` > 0: LoRA
    adapters of that rank (peft) on policy and value model, the reference their shared base;
    `seed` the run's (prompt order, sampling, minibatch order; the models and prompt set are fixed).
    Under torchrun (bench/ranks.py) every rank runs it; `parallel` is train.parallel, and
    the peak memory is the largest of the ranks'."""
    import torch

    from rlhflab.config import RunFields, TrainFields
    from rlhflab.stages.ppo import PPOConfig, open_run, ppo_step
    from rlhflab.training import set_seed

    settings = dict(PPO_SETTINGS)
    train = TrainFields(
        lr=settings.pop("lr"), precision=precision, gradient_checkpointing=gradient_checkpointing, parallel=parallel
    )
    config = PPOConfig(
        **inputs,
        batch_size=w.batch_size,
        minibatch_size=w.minibatch_size,
        ppo_epochs=w.ppo_epochs,
        max_new_tokens=w.response_len,
        force_length=True,
        no_eos_penalty=0.0,
        warmup_steps=0,
        total_episodes=steps * w.batch_size,
        run=RunFields(seed=seed, device=w.device),
        train=train,
        out_dir=out_dir,
        lora_r=lora_r,
        **settings,
    )
    set_seed(seed)
    run = open_run(config)
    wall, phases, kl, rm_score = [], [], [], []
    for step in range(1, steps + 1):
        sync(w.device)
        t0 = time.perf_counter()
        row = ppo_step(run, step)
        sync(w.device)
        kl.append(row["objective/kl"])
        rm_score.append(row["objective/rm_score"])
        if step > 1:
            wall.append(time.perf_counter() - t0)
            phases.append({k: row.get(f"time/{k}_s", 0.0) for k in ("generate", "score", "update")})
    peak, kind = peak_memory(w.device)
    peak = run.dist.max(peak)  # one process: its own
    return side_result(
        wall,
        phases,
        w,
        kl,
        rm_score,
        peak,
        kind,
        response_length=row["response/length"],
        threads=torch.get_num_threads(),
        param_mb=param_mb(run),
    )


def param_mb(run) -> dict[str, float]:
    """MiB of the run's four models' parameters, each tensor once (the LoRA reference shares the
    policy's), split trainable / frozen, and of Adam's state (two tensors per trainable one).
    Under FSDP: this process's shards."""
    import torch

    from rlhflab.distributed import local

    seen, sizes = set(), {"trainable": 0, "frozen": 0}
    for model in (run.policy, run.ref_policy, run.reward_model, run.value_model, run.ema):
        for p in model.parameters() if model is not None else ():
            t = local(p)
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                sizes["trainable" if p.requires_grad else "frozen"] += t.numel() * t.element_size()
    state = [local(t) for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    sizes["adam_state"] = sum(t.numel() * t.element_size() for t in state)
    return {k: v / 2**20 for k, v in sizes.items()}


def _child(side: str, w: Workload, inputs: dict, steps: int, options: dict) -> dict:
    """Entry point of the fresh process that measures one side."""
    import torch

    if w.threads:
        torch.set_num_threads(w.threads)
    with tempfile.TemporaryDirectory(prefix=f"rlhflab-bench-{side}-") as out_dir:
        if side == "trl":
            from rlhflab.bench.trl_side import run_trl

            return run_trl(w, inputs, steps, out_dir, **options)
        return run_rlhflab(w, inputs, steps, out_dir, **options)


def measure(side: str, w: Workload, inputs: dict, steps: int, options: dict | None = None) -> dict:
    from rlhflab.training import in_fresh_process

    return in_fresh_process(_child, side, w, inputs, steps, options or {})


def measure_nproc(nproc: int, w: Workload, inputs: dict, steps: int, options: dict, root: Path) -> dict:
    """rlhflab at `nproc` processes: torchrun (as a subprocess) runs bench/ranks.py, whose
    rank 0 writes the figures. The workload's threads are split between the processes."""
    import subprocess
    import sys

    threads = max(1, (w.threads or os.cpu_count() or 1) // nproc)
    spec = {"workload": asdict(replace(w, threads=threads)), "inputs": inputs, "steps": steps, "options": options}
    spec.update(out_dir=str(root / "nproc-run"), result=str(root / "nproc.json"))
    (root / "nproc-spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RLHFLAB_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "rlhflab.bench.ranks", str(root / "nproc-spec.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"bench at {nproc} processes failed (exit {done.returncode}):\n{tail}")
    result = json.loads((root / "nproc.json").read_text())
    return {**result, "processes": nproc, "threads_per_process": threads, "parallel": options.get("parallel", "auto")}


# --------------------------------------------------------------------------- the bench


def check_can_run(w: Workload, vs: str | None) -> None:
    """Refuse, in one line, what this machine or environment cannot run."""
    import torch

    if w.device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"workload {w.name!r} needs a CUDA GPU and this machine has none (on a CPU: --workload cpu)",
            field="workload",
        )
    if vs == "trl":
        from rlhflab.bench.trl_side import check_trl

        check_trl()


def bench(
    w: Workload,
    steps: int,
    vs: str | None = None,
    trl_kernels: bool = False,
    log=print,
    precision: str = "auto",
    lora_r: int = 0,
    gradient_checkpointing: bool = False,
    nproc: int = 1,
    parallel: str = "ddp",
    seed: int = SEED,
) -> dict:
    """Run the workload with rlhflab (and TRL); return the report as a dict. `lora_r` and
    `gradient_checkpointing` are rlhflab's memory savers (adapters.py), its side only.
    `nproc` > 1: rlhflab also at that many processes (`parallel`: ddp or fsdp). `seed`: the
    PPO runs' seed on every side; the models and prompt set are the workload's at any seed."""
    if steps < 2:
        raise InputError("needs at least 2 steps (the first is a warm-up)", field="steps")
    if nproc < 1:
        raise InputError("must be >= 1", field="nproc")
    if seed < 0:
        raise InputError("must be >= 0", field="seed")
    if nproc > 1 and vs:
        raise InputError("--nproc measures rlhflab alone: not with --vs", field="nproc")
    if parallel not in ("ddp", "fsdp"):
        raise InputError("must be ddp or fsdp", field="parallel")
    if vs and (lora_r or gradient_checkpointing):
        raise InputError("--lora-r and --gradient-checkpointing apply to rlhflab alone: not with --vs", field="vs")
    if lora_r < 0:
        raise InputError("must be >= 0 (0: full fine-tuning)", field="lora-r")
    if lora_r and importlib.util.find_spec("peft") is None:
        raise InputError("needs peft: pip install 'rlhflab[lora]'", field="lora-r")
    check_can_run(w, vs)
    precision, precision_reason = resolve_precision(precision, w)
    sides = ["rlhflab"] + ([vs] if vs else [])
    report = {
        "workload": {
            **asdict(w),
            "steps": steps,
            "policy_params": n_params(w),
            "ppo": PPO_SETTINGS,
            "precision": precision,
            "precision_reason": precision_reason,
            "lora_r": lora_r,
            "gradient_checkpointing": gradient_checkpointing,
            "nproc": nproc,
            "seed": seed,
        },
        "machine": machine_info(w),
        "date": datetime.date.today().isoformat(),
    }
    if nproc > 1:
        check_nproc(w, nproc)
    with tempfile.TemporaryDirectory(prefix="rlhflab-bench-") as root:
        inputs = build_inputs(w, Path(root))
        for side in sides:
            log(f"bench: {side} on workload {w.name} ({steps} PPO steps) ...")
            options = {"precision": precision, "seed": seed}
            if side == "trl":
                options["kernels"] = trl_kernels
            else:
                options.update(lora_r=lora_r, gradient_checkpointing=gradient_checkpointing)
            report[side] = measure(side, w, inputs, steps, options)
        if nproc > 1:
            log(f"bench: rlhflab at {nproc} processes ({parallel}) on workload {w.name} ...")
            options = dict(precision=precision, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing, seed=seed)
            report["nproc"] = measure_nproc(nproc, w, inputs, steps, dict(options, parallel=parallel), Path(root))
            report["nproc"]["speedup"] = report["nproc"]["episodes_per_s"] / report["rlhflab"]["episodes_per_s"]
        log("bench: this machine's matmul rate at the workload's shapes ...")
        report["limit"] = measure_limit(w, precision)
        for side in sides + (["nproc"] if nproc > 1 else []):
            report[side]["fraction_of_limit"] = fractions(report["limit"], report[side])
    if vs:
        a, b = report["rlhflab"], report[vs]
        report["ratio"] = {
            k: a[k] / b[k]
            for k in (
                "episodes_per_s",
                "generated_tokens_per_s",
                "training_tokens_per_s",
                "step_s",
                "peak_memory_mb",
            )
        }
        report["ratio"].update({f"time_{k}": a["time_s"][k] / max(b["time_s"][k], 1e-12) for k in a["time_s"]})
    return report


def check_nproc(w: Workload, nproc: int) -> None:
    """More processes than this machine has GPUs (a cuda workload: one GPU per process)
    or cores is refused in one line."""
    import torch

    if w.device == "cuda" and torch.cuda.device_count() < nproc:
        raise InputError(
            f"--nproc {nproc} needs {nproc} GPUs (one per process); this machine has {torch.cuda.device_count()}",
            field="nproc",
        )
    if w.device == "cpu" and nproc > (os.cpu_count() or 1):
        raise InputError(f"--nproc {nproc} is more processes than this machine's {os.cpu_count()} cores", field="nproc")


def resolve_precision(precision: str, w: Workload) -> tuple[str, str]:
    """'auto': what `rlhflab run` picks on the workload's device (device.choose_precision:
    bf16 where bf16 matmuls are natively fast, else fp32), with its reason; both sides then
    run at that precision."""
    if precision != "auto":
        return precision, "asked for"
    import torch

    from rlhflab.device import choose_precision

    choice = choose_precision(torch.device(w.device))
    return choice.precision, choice.reason


def machine_info(w: Workload) -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if w.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="cpu",
        help="which fixed workload (default cpu; gpu needs CUDA)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="PPO steps per side, the first left out (default: the workload's); with --rm: RM steps "
        "per side (default 30)",
    )
    parser.add_argument(
        "--vs",
        choices=["trl"],
        help="also run TRL's PPOTrainer on the same workload (pip install 'rlhflab[bench]')",
    )
    parser.add_argument(
        "--trl-kernels",
        action="store_true",
        help="give TRL's models the kernels rlhflab swaps in (the same functions): a fused "
        "tanh-GELU for GPT-2's gelu_new, and on a CPU in bf16 attention whose scores stay in "
        "bf16; to compare the trainers alone",
    )
    parser.add_argument(
        "--lora-r",
        "--lora_r",
        type=int,
        default=0,
        help="rlhflab with LoRA adapters of this rank on policy and value model (ppo lora_r; "
        "pip install 'rlhflab[lora]'); 0 (default): full fine-tuning",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="rlhflab with activation checkpointing in policy and value model (train.gradient_checkpointing)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="also measure rlhflab at this many processes under torchrun (gloo on a CPU, one GPU each "
        "on CUDA), the same global batch; default 1 (one process only)",
    )
    parser.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="with --nproc: DDP (default) or FSDP2 for the policy and the value model (train.parallel)",
    )
    parser.add_argument(
        "--rm",
        action="store_true",
        help="time the reward model's training step instead: padded rows against packed rows "
        "(rm pack), on lab-shaped rankings, on the CPU (--steps per side, default 30)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="the PPO runs' seed on both sides (prompt order, sampling, minibatch order; default "
        "0); the workload's models and prompt set stay the same. One seed's KL is one noisy walk: "
        "compare the trainers' KL and RM score over several seeds",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the workload's)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both sides: fp32, or bf16 autocast over fp32 weights (rlhflab's "
        "precision=bf16, TRL's bf16=True); auto (default) is what rlhflab run picks: bf16 "
        "where bf16 matmuls are natively fast (a GPU with bf16; a CPU with AMX or AVX-512 "
        "BF16 where a timed matmul confirms it), else fp32",
    )


def run_cli(args) -> int:
    if args.rm:
        return _run_rm(args)
    w = WORKLOADS[args.workload]
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("must be >= 1", field="threads")
        w = replace(w, threads=args.threads)
    steps = args.steps if args.steps is not None else w.steps
    quiet = args.json or os.environ.get("RLHFLAB_QUIET")
    if args.trl_kernels and args.vs != "trl":
        raise InputError("--trl-kernels needs --vs trl", field="trl-kernels")
    report = bench(
        w,
        steps,
        args.vs,
        args.trl_kernels,
        log=(lambda *a: None) if quiet else (lambda msg: print(msg, flush=True)),
        precision=args.precision,
        lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing,
        nproc=args.nproc,
        parallel=args.parallel,
        seed=args.seed,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _run_rm(args) -> int:
    from rlhflab.bench.rm_pack import bench_rm, format_rm_report

    ppo_only = args.vs or args.nproc != 1 or args.lora_r or args.gradient_checkpointing or args.seed != SEED
    if ppo_only or args.workload != "cpu":
        raise InputError(
            "--rm times rlhflab's RM step alone, on the CPU: no --vs/--nproc/--lora-r/--seed/--workload", field="rm"
        )
    if args.threads is not None and args.threads < 1:
        raise InputError("must be >= 1", field="threads")
    quiet = args.json or os.environ.get("RLHFLAB_QUIET")
    report = bench_rm(
        args.steps if args.steps is not None else 30,
        args.precision,
        args.threads if args.threads is not None else 2,
        log=(lambda *a: None) if quiet else (lambda msg: print(msg, flush=True)),
    )
    print(json.dumps(report, indent=2) if args.json else format_rm_report(report))
    return 0
