"""`rlhflab bench`: fixed PPO workloads, timed, optionally side by side with TRL (issue 11).

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
the last measured step's KL and RM score, so speed is not bought by doing less.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhflab.errors import InputError


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    """GPT-2 blocks."""
    n_embd: int
    """Model width."""
    n_head: int
    """Attention heads."""
    vocab_size: int
    """Tokenizer and embedding rows (pad, bos, eos, unk included)."""
    n_positions: int
    """Position embeddings (1024 as GPT-2: counted in the parameters)."""
    prompt_len: int
    """Tokens per query (bos included); every prompt has exactly this many."""
    response_len: int
    """Tokens per response, always reached (eos suppressed)."""
    batch_size: int
    """Episodes per PPO step."""
    minibatch_size: int
    """Episodes per optimizer step, in one forward/backward (the micro-batch: no accumulation)."""
    ppo_epochs: int
    """Passes over each batch."""
    device: str
    """cpu or cuda."""
    threads: int | None
    """torch intra-op threads on CPU (None: torch's default)."""
    steps: int
    """PPO steps per side, the first one (warm-up) left out of the figures."""
    description: str = ""


WORKLOADS = {
    "cpu": Workload("cpu", n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=1024,
                    prompt_len=32, response_len=32, batch_size=64, minibatch_size=64,
                    ppo_epochs=4, device="cpu", threads=2, steps=8,
                    description="GPT-2 shape, 4 layers, d 128, vocab 2048, on 2 CPU cores"),
    "gpu": Workload("gpu", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                    prompt_len=64, response_len=64, batch_size=512, minibatch_size=128,
                    ppo_epochs=4, device="cuda", threads=None, steps=6,
                    description="GPT-2 small (124M) x4 models, on one CUDA GPU"),
    "tiny": Workload("tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                     prompt_len=8, response_len=8, batch_size=8, minibatch_size=8,
                     ppo_epochs=2, device="cpu", threads=2, steps=3,
                     description="a seconds-long smoke test of the bench itself"),
}

# PPO hyperparameters both sides run with, pinned here so a change of rlhflab's defaults
# does not move the benchmark. Values of §3.5 / App. C.4 and rlhflab's lab defaults.
PPO_SETTINGS = dict(lr=1e-4, kl_coef=0.02, temperature=1.0, clip_range=0.2,
                    value_clip_range=0.2, vf_coef=0.1, gamma=1.0, lam=0.95)
N_PROMPTS = 1024
SEED = 0


# --------------------------------------------------------------------------- inputs


def build_inputs(w: Workload, root: Path) -> dict[str, str]:
    """Tokenizer, policy and reward model (random init, from config) and prompts under root."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                              PreTrainedTokenizerFast)

    import rlhflab.models  # noqa: F401  (quiets transformers' progress bars)

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    words = [f"w{i}" for i in range(w.vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>",
                                  eos_token="<|eos|>", unk_token="<|unk|>")
    # A stock GPT-2 config (gelu_new, as every GPT-2 checkpoint): each side runs it as it
    # would any GPT-2 it loads (rlhflab swaps in a fused tanh-GELU kernel; see --trl-fused-gelu).
    cfg = GPT2Config(vocab_size=w.vocab_size, n_positions=w.n_positions, n_embd=w.n_embd,
                     n_layer=w.n_layer, n_head=w.n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    paths = {"policy": root / "policy", "reward_model": root / "rm",
             "prompts": root / "prompts.jsonl"}
    torch.manual_seed(SEED)
    GPT2LMHeadModel(cfg).save_pretrained(paths["policy"])
    torch.manual_seed(SEED + 1)
    GPT2ForSequenceClassification(cfg).save_pretrained(paths["reward_model"])
    for key in ("policy", "reward_model"):
        tok.save_pretrained(str(paths[key]))
    rng = random.Random(SEED)
    with open(paths["prompts"], "w", encoding="utf-8") as f:
        for _ in range(N_PROMPTS):  # bos + (prompt_len - 1) words = prompt_len tokens
            prompt = " ".join(rng.choice(words) for _ in range(w.prompt_len - 1))
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return {k: str(v) for k, v in paths.items()}


def n_params(w: Workload) -> int:
    """Parameters of the policy (GPT-2 LM head tied to the embeddings)."""
    d = w.n_embd
    block = 12 * d * d + 13 * d  # attn (qkv, proj) + mlp (4d) weights, biases, two LayerNorms
    return w.n_layer * block + (w.vocab_size + w.n_positions) * d + 2 * d


# --------------------------------------------------------------------------- one side


def side_result(wall: list[float], phases: list[dict], w: Workload, kl: list[float],
                rm_score: list[float], peak_bytes: int, memory_kind: str, **extra) -> dict:
    """Figures of one side from its measured steps (the warm-up step already dropped);
    kl and rm_score are per step, the warm-up's included."""
    total = sum(wall)
    split = {k: sum(p.get(k, 0.0) for p in phases) for k in ("generate", "score", "update")}
    split["other"] = max(total - sum(split.values()), 0.0)
    n = len(wall)
    episodes = n * w.batch_size
    return {
        "steps_measured": n,
        "episodes_per_s": episodes / total,
        "generated_tokens_per_s": episodes * w.response_len / max(split["generate"], 1e-9),
        "training_tokens_per_s": (w.ppo_epochs * episodes * (w.prompt_len + w.response_len)
                                  / max(split["update"], 1e-9)),
        "step_s": total / n,
        "time_s": {k: v / n for k, v in split.items()},
        "time_share": {k: v / total for k, v in split.items()},
        "step_wall_s": wall,
        "peak_memory_mb": peak_bytes / 2 ** 20,
        "memory": memory_kind,
        "final_kl": kl[-1],
        "final_rm_score": rm_score[-1],
        "kl_per_step": kl,
        "rm_score_per_step": rm_score,
        **extra,
    }


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    try:  # this process's own high-water mark (ru_maxrss would also count the parent's at fork)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def run_rlhflab(w: Workload, inputs: dict, steps: int, out_dir: str, precision: str = "fp32") -> dict:
    """rlhflab's own PPO step (`rlhflab ppo`'s code path) on the workload."""
    import torch

    from rlhflab.ppo import PPOConfig, open_run, ppo_step
    from rlhflab.training import set_seed

    config = PPOConfig(**inputs, batch_size=w.batch_size, minibatch_size=w.minibatch_size,
                       ppo_epochs=w.ppo_epochs, max_new_tokens=w.response_len, force_length=True,
                       no_eos_penalty=0.0, warmup_steps=0, total_episodes=steps * w.batch_size,
                       device=w.device, seed=SEED, out_dir=out_dir, precision=precision,
                       **PPO_SETTINGS)
    set_seed(SEED)
    run = open_run(config)
    wall, phases, kl, rm_score = [], [], [], []
    for step in range(1, steps + 1):
        _sync(w.device)
        t0 = time.perf_counter()
        row = ppo_step(run, step)
        _sync(w.device)
        kl.append(row["objective/kl"])
        rm_score.append(row["objective/rm_score"])
        if step > 1:
            wall.append(time.perf_counter() - t0)
            phases.append({k: row.get(f"time/{k}_s", 0.0) for k in ("generate", "score", "update")})
    peak, kind = peak_memory(w.device)
    return side_result(wall, phases, w, kl, rm_score, peak, kind,
                       response_length=row["response/length"], threads=torch.get_num_threads())


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _child(side: str, w: Workload, inputs: dict, steps: int, options: dict) -> dict:
    """Entry point of the fresh process that measures one side."""
    import torch

    if w.threads:
        torch.set_num_threads(w.threads)
    with tempfile.TemporaryDirectory(prefix=f"rlhflab-bench-{side}-") as out_dir:
        if side == "trl":
            from rlhflab.bench_trl import run_trl
            return run_trl(w, inputs, steps, out_dir, **options)
        return run_rlhflab(w, inputs, steps, out_dir, **options)


def measure(side: str, w: Workload, inputs: dict, steps: int, options: dict | None = None) -> dict:
    from rlhflab.training import in_fresh_process

    return in_fresh_process(_child, side, w, inputs, steps, options or {})


# --------------------------------------------------------------------------- the bench


def check_can_run(w: Workload, vs: str | None) -> None:
    """Refuse, in one line, what this machine or environment cannot run."""
    import torch

    if w.device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"workload {w.name!r} needs a CUDA GPU and this machine has none "
                         "(on a CPU: --workload cpu)", field="workload")
    if vs == "trl":
        from rlhflab.bench_trl import check_trl
        check_trl()


def bench(w: Workload, steps: int, vs: str | None = None, trl_fused_gelu: bool = False,
          log=print, precision: str = "auto") -> dict:
    """Run the workload with rlhflab (and TRL); return the report as a dict."""
    if steps < 2:
        raise InputError("needs at least 2 steps (the first is a warm-up)", field="steps")
    check_can_run(w, vs)
    precision = resolve_precision(precision, w)
    sides = ["rlhflab"] + ([vs] if vs else [])
    report = {"workload": {**asdict(w), "steps": steps, "policy_params": n_params(w),
                           "ppo": PPO_SETTINGS, "precision": precision},
              "machine": machine_info(w), "date": datetime.date.today().isoformat()}
    with tempfile.TemporaryDirectory(prefix="rlhflab-bench-") as root:
        inputs = build_inputs(w, Path(root))
        for side in sides:
            log(f"bench: {side} on workload {w.name} ({steps} PPO steps) ...")
            options = {"precision": precision, **({"fused_gelu": trl_fused_gelu} if side == "trl" else {})}
            report[side] = measure(side, w, inputs, steps, options)
    if vs:
        a, b = report["rlhflab"], report[vs]
        report["ratio"] = {k: a[k] / b[k] for k in ("episodes_per_s", "generated_tokens_per_s",
                                                   "training_tokens_per_s", "step_s",
                                                   "peak_memory_mb")}
        report["ratio"].update({f"time_{k}": a["time_s"][k] / max(b["time_s"][k], 1e-12)
                                for k in a["time_s"]})
    return report


def resolve_precision(precision: str, w: Workload) -> str:
    """'auto': bf16 where the workload's device has bf16 matrix units (a CPU with AMX, a GPU
    with bf16), else fp32, as `rlhflab run` picks; both sides then run at that precision."""
    if precision != "auto":
        return precision
    import torch

    from rlhflab.training import native_bf16

    return "bf16" if native_bf16(torch.device(w.device)) else "fp32"


def machine_info(w: Workload) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    if w.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- printing


def format_report(r: dict) -> str:
    w, m, vs = r["workload"], r["machine"], "trl" in r
    sides = ["rlhflab"] + (["trl"] if vs else [])
    lines = [
        f"workload {w['name']}: GPT-2, {w['n_layer']} layers, d {w['n_embd']}, vocab "
        f"{w['vocab_size']} ({w['policy_params'] / 1e6:.2f}M params) x4 models; prompt "
        f"{w['prompt_len']}, response {w['response_len']} (forced); batch {w['batch_size']}, "
        f"minibatch = micro-batch {w['minibatch_size']}, {w['ppo_epochs']} PPO epochs; "
        f"{w.get('precision', 'fp32')} on both sides",
        f"machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} cores"
        + (f", {w['threads']} threads" if w["threads"] and w["device"] == "cpu" else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}"
        + (f", trl {r['trl']['version']}" if vs else "") + f"; {r['date']}",
        f"{w['steps']} PPO steps per side, the first left out", "",
        f"{'':26}{'rlhflab':>14}" + (f"{'TRL':>14}{'rlhflab/TRL':>14}" if vs else ""),
    ]

    def row(label: str, values: list[str], ratio: float | None = None) -> None:
        text = "".join(f"{v:>14}" for v in values)
        if vs:
            text += f"{ratio:>13.2f}x" if ratio is not None else ""
        lines.append(f"{label:<26}{text}")

    def figure(key: str, fmt: str, label: str) -> None:
        ratio = r["ratio"].get(key) if vs else None
        row(label, [format(r[s][key], fmt) for s in sides], ratio)

    figure("episodes_per_s", ".1f", "episodes/s")
    figure("generated_tokens_per_s", ".0f", "generated tokens/s")
    figure("training_tokens_per_s", ".0f", "training tokens/s")
    for k in ("generate", "score", "update", "other"):
        row(f"  {k} (s/step, share)",
            [f"{r[s]['time_s'][k]:.3f} {100 * r[s]['time_share'][k]:3.0f}%" for s in sides],
            r["ratio"][f"time_{k}"] if vs else None)
    figure("step_s", ".3f", "  step (s)")
    figure("peak_memory_mb", ".0f", "peak memory (MiB)")
    figure("final_kl", ".4f", "final KL (nats/response)")
    figure("final_rm_score", ".4f", "final RM score")
    lines += ["", f"memory: {r['rlhflab']['memory']} of each side's own process; ratios of "
              "times and memory: below 1 is rlhflab less"]
    if vs:
        t = r["trl"]
        lines.append(f"TRL's models: {'fused tanh-GELU (as rlhflab)' if t['fused_gelu'] else 'as loaded (gelu_new)'}"
                     f"; its shortest response: {t['response_length']} tokens")
        settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
        lines += textwrap.wrap("TRL settings: " + settings, width=100, subsequent_indent="  ")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu",
                        help="which fixed workload (default cpu; gpu needs CUDA)")
    parser.add_argument("--steps", type=int, help="PPO steps per side, the first left out "
                        "(default: the workload's)")
    parser.add_argument("--vs", choices=["trl"], help="also run TRL's PPOTrainer on the same "
                        "workload (pip install 'rlhflab[bench]')")
    parser.add_argument("--trl-fused-gelu", action="store_true", help="give TRL's models the "
                        "fused tanh-GELU kernel rlhflab swaps in for GPT-2's gelu_new (same "
                        "function to 1e-7), to compare the trainers alone")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the workload's)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="both sides: fp32, or bf16 autocast over fp32 weights (rlhflab's "
                        "precision=bf16, TRL's bf16=True); auto (default) is bf16 where the "
                        "device has bf16 matrix units (a GPU, a CPU with AMX), else fp32")


def run_cli(args) -> int:
    w = WORKLOADS[args.workload]
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("must be >= 1", field="threads")
        w = replace(w, threads=args.threads)
    steps = args.steps if args.steps is not None else w.steps
    quiet = args.json or os.environ.get("RLHFLAB_QUIET")
    if args.trl_fused_gelu and args.vs != "trl":
        raise InputError("--trl-fused-gelu needs --vs trl", field="trl-fused-gelu")
    report = bench(w, steps, args.vs, args.trl_fused_gelu, log=(lambda *a: None) if quiet else
                   (lambda msg: print(msg, flush=True)), precision=args.precision)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
