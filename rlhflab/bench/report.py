"""The bench's printed report: one table of both sides' figures (and their ratios), then what
the figures mean and the settings each side ran with. `format_report(r)` takes the dict that
`rlhflab bench --json` prints."""

from __future__ import annotations

import textwrap

from rlhflab.bench.limit import PHASES

TRL_AS_LOADED = "as loaded (gelu_new; in bf16 on a CPU, transformers' eager attention)"
TRL_KERNELS = "rlhflab's kernels (fused tanh-GELU; in bf16 on a CPU, its bf16 attention)"


def format_report(r: dict) -> str:
    w, m, vs, par = r["workload"], r["machine"], "trl" in r, r.get("nproc")
    sides = ["rlhflab"] + (["trl"] if vs else []) + (["nproc"] if par else [])
    lines = [
        f"workload {w['name']}: GPT-2, {w['n_layer']} layers, d {w['n_embd']}, vocab "
        f"{w['vocab_size']} ({w['policy_params'] / 1e6:.2f}M params) x4 models; prompt "
        f"{w['prompt_len']}, response {w['response_len']} (forced); batch {w['batch_size']}, "
        f"minibatch = micro-batch {w['minibatch_size']}, {w['ppo_epochs']} PPO epochs; "
        f"{w.get('precision', 'fp32')} on both sides"
        + (f"; rlhflab with LoRA rank {w['lora_r']}" if w.get("lora_r") else "")
        + ("; rlhflab with gradient checkpointing" if w.get("gradient_checkpointing") else ""),
        f"machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} cores"
        + (f", {w['threads']} threads" if w["threads"] and w["device"] == "cpu" else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}"
        + (f", trl {r['trl']['version']}" if vs else "")
        + f"; {r['date']}",
        f"{w['steps']} PPO steps per side, the first left out; seed {w.get('seed', 0)}; precision "
        f"{w.get('precision', 'fp32')}: {w.get('precision_reason', 'asked for')}",
        "",
        f"{'':26}{'rlhflab':>14}"
        + (f"{'TRL':>14}{'rlhflab/TRL':>14}" if vs else "")
        + (f"{str(par['processes']) + ' processes':>14}" if par else ""),
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
        row(
            f"  {k} (s/step, share)",
            [f"{r[s]['time_s'][k]:.3f} {100 * r[s]['time_share'][k]:3.0f}%" for s in sides],
            r["ratio"][f"time_{k}"] if vs else None,
        )
    figure("step_s", ".3f", "  step (s)")
    if "limit" in r:
        for k in (*PHASES, "step"):
            f = [r[s]["fraction_of_limit"][k] for s in sides]
            row(f"  {k}, of limit", [f"{x:.3f}" for x in f], f[0] / f[1] if vs else None)
    figure("peak_memory_mb", ".0f", "peak memory (MiB)")
    for key, label in (("trainable", "trainable params"), ("frozen", "frozen params"), ("adam_state", "Adam state")):
        if "param_mb" in r["rlhflab"]:  # rlhflab's side only
            row(f"  {label} (MiB)", [f"{r[s]['param_mb'][key]:.2f}" if "param_mb" in r[s] else "" for s in sides])
    figure("final_kl", ".4f", "final KL (nats/response)")
    figure("final_rm_score", ".4f", "final RM score")
    figure("mean_kl", ".4f", "KL, mean over every step's rollout")
    figure("mean_rm_score", ".4f", "RM score, mean over every step's rollout")
    lines += [
        "",
        f"memory: {r['rlhflab']['memory']} of each side's own process; ratios of "
        "times and memory: below 1 is rlhflab less",
    ]
    if "limit" in r:
        lim = r["limit"]
        flops = ", ".join(f"{p} {lim['phases'][p]['flops'] / 1e9:.3g}" for p in PHASES)
        m, k, n = lim["largest_gemm"]
        lines += textwrap.wrap(
            f"fraction of limit: the FLOPs a step must do (GFLOP: {flops}) at the rates this machine's "
            f"{lim['precision']} matmuls reach on those shapes, timed in this run, over the measured "
            f"time (bench/limit.py); e.g. {m}x{k}x{n}: {lim['largest_gemm_flops_per_s'] / 1e9:.3g} GFLOP/s",
            width=100,
            subsequent_indent="  ",
        )
    if par:
        lines.append(
            f"{par['processes']} processes: torchrun, {par['parallel']}, {par['threads_per_process']} thread(s) "
            f"each, the same global batch; {par['speedup']:.2f}x the episodes/s of one process; its peak "
            "memory: the largest process's; its parameter MiB: rank 0's (its shards under fsdp)"
        )
    if vs:
        t = r["trl"]
        lines.append(
            f"TRL's models: {TRL_KERNELS if t['kernels'] else TRL_AS_LOADED}"
            f"; its shortest response: {t['response_length']} tokens"
        )
        settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
        lines += textwrap.wrap("TRL settings: " + settings, width=100, subsequent_indent="  ")
    return "\n".join(lines)
