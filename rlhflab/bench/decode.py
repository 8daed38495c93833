"""Decoding against the memory wall: `python -m rlhflab.bench.decode [--workload gpu]`.

Generating one token with a KV cache reads every weight once per step (shared by the
batch) plus each sequence's cached keys and values so far; at small batches that traffic,
not arithmetic, sets the speed. This measures the device's copy bandwidth (a large
device-to-device copy: read + write), times greedy cached decoding of the workload's
GPT-2 at a few batch sizes through rlhflab's own generation path, and prints the bytes
each decode step must read divided by its time, as a fraction of that bandwidth.

    bytes per step = parameter bytes + Σ_sequences KV bytes (2 · layers · width · position · dtype)
A fraction near 1 says decoding runs at the memory limit; far below says overhead (kernel
launches, Python) dominates. Runs anywhere: on a GPU it is `scripts/gpu_check.sh`'s decode
figure; on a CPU the same code (with --workload tiny) is what the tests run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlhflab.bench.common import WORKLOADS, Workload
from rlhflab.device import sync


def copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 5) -> float:
    """Bytes per second of a `mib`-MiB device-to-device copy (read + write), best of `reps`."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def kv_bytes(w: Workload, prompt_len: int, new_tokens: int, batch: int, dtype_bytes: int) -> float:
    """KV-cache bytes all decode steps read together: step t reads prompt_len + t positions."""
    positions = sum(prompt_len + t for t in range(new_tokens))
    return batch * 2 * w.n_layer * w.n_embd * dtype_bytes * positions


def measure(w: Workload, device: torch.device, batches=(1, 8, 64), new_tokens: int = 64, mib: int = 1024) -> dict:
    """Decode figures of the workload's policy on `device` at each batch size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhflab.generation import sample

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=w.vocab_size, n_positions=w.n_positions, n_layer=w.n_layer, n_embd=w.n_embd, n_head=w.n_head
    )
    model = GPT2LMHeadModel(cfg).to(device).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype_bytes = next(model.parameters()).element_size()
    bandwidth = copy_bandwidth(device, mib)
    rows = []
    for batch in batches:
        queries = torch.randint(3, w.vocab_size, (batch, w.prompt_len)).tolist()
        kw = dict(pad_id=0, eos_id=2, greedy=True, force_length=True)
        with torch.no_grad():
            sample(model, queries, max_new_tokens=2, **kw)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            sample(model, queries, max_new_tokens=new_tokens, **kw)
        sync(device)
        seconds = time.perf_counter() - t0
        read = new_tokens * param_bytes + kv_bytes(w, w.prompt_len, new_tokens, batch, dtype_bytes)
        rows.append(
            {
                "batch": batch,
                "tokens_per_s": batch * new_tokens / seconds,
                "step_ms": 1e3 * seconds / new_tokens,
                "bytes_per_s": read / seconds,
                "fraction_of_bandwidth": read / seconds / bandwidth,
            }
        )
    return {
        "workload": w.name,
        "device": str(device),
        "param_mb": param_bytes / 2**20,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "new_tokens": new_tokens,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhflab.bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="gpu", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default=None, help="default: the workload's device")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    w = WORKLOADS[args.workload]
    device = torch.device(args.device or w.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (give --device cpu to measure the CPU)", flush=True)
        return 2
    report = measure(w, device, new_tokens=args.new_tokens, mib=args.copy_mib)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['workload']} on {report['device']}: {report['param_mb']:.1f} MiB of weights, "
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s"
    )
    for r in report["rows"]:
        print(
            f"  batch {r['batch']:>3}: {r['tokens_per_s']:9.0f} tokens/s, {r['step_ms']:7.2f} ms/step, "
            f"{r['bytes_per_s'] / 1e9:7.2f} GB/s read = {r['fraction_of_bandwidth']:.2f} of the copy bandwidth"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
