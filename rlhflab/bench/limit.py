"""How close a PPO step comes to what this machine's matrix units allow, phase by phase.

The work a PPO step must do is counted in FLOPs, from the workload's shape alone: the
GEMMs of every GPT-2 block (qkv, attention projection, MLP in and out), the LM head where
its logits are read, and causal attention (half of the T x T scores); the last block only
where its output is read (keys and values at every position: rlhflab's `device.reading_last`).
Per phase:

  generate  prefill of B prompts (LM head at the last prompt token) and R - 1 decode steps
            of B rows each, attention over the cache so far
  score     four forwards over B x (P + R) tokens (policy and reference with the LM head at
            the R response positions, the value model there too, the reward model at the
            last token)
  update    ppo_epochs x (B / minibatch) forward + backward passes of policy and value model
            (backward: the dX and dW GEMMs of every linear, 2x the attention forward)

The machine's rate for each of those GEMM (and attention) shapes is timed here, in the same
run, at the workload's precision and threads; the possible time of a phase is the sum of
its FLOPs over their rates, and `fraction` = possible / measured: 1.0 would be every phase
spent in matrix units running at the speed they reach on that shape alone. What the count
leaves out (softmax, LayerNorm, GELU, Adam, sampling, bookkeeping) is overhead by this
measure, as it is for the roofline of any step.
"""

from __future__ import annotations

import time
from collections import defaultdict

from rlhflab.bench.common import Workload

PHASES = ("generate", "score", "update")


def _linears(w: Workload, m: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of one block's four linears on an M-row activation."""
    d = w.n_embd
    return [(m, d, 3 * d), (m, d, d), (m, d, 4 * d), (m, 4 * d, d)]


def _last_linears(w: Workload, m: int, read: int) -> list[tuple[int, int, int]]:
    """The last block's linears where only `read` of its m rows are read: keys and values
    at every row, the query, attention projection and MLP at the read rows."""
    d = w.n_embd
    return [(m, d, 2 * d), (read, d, d), (read, d, d), (read, d, 4 * d), (read, 4 * d, d)]


def _backward(shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """dX = dY W^T is (M, N) x (N, K); dW = X^T dY is (K, M) x (M, N)."""
    return [s for m, k, n in shapes for s in ((m, n, k), (k, m, n))]


def phase_work(w: Workload) -> dict[str, dict]:
    """Per phase: {"gemm": {(M, K, N): count}, "attention": {(kind, B, q_len, kv_len): count}}.

    A count is how many times that shape runs in one PPO step; `flops` turns it into FLOPs.
    """
    B, P, R, L, d, V = w.batch_size, w.prompt_len, w.response_len, w.n_layer, w.n_embd, w.vocab_size
    T, mb = P + R, w.minibatch_size
    work = {p: {"gemm": defaultdict(int), "attention": defaultdict(int)} for p in PHASES}

    def forward(phase: str, rows: int, t: int, read: int, times: int = 1, backward: bool = False) -> None:
        """A forward over `rows` sequences of t tokens whose last `read` positions are read:
        L - 1 whole blocks, the last block at the read positions (`_last_linears`)."""
        gemms = [(s, L - 1) for s in _linears(w, rows * t)] + [(s, 1) for s in _last_linears(w, rows * t, rows * read)]
        attention = [(("causal", rows, t, t), L - 1), (("causal", rows, read, t), 1)]
        for s, n in gemms:
            for shape in [s, *_backward([s])] if backward else [s]:
                work[phase]["gemm"][shape] += n * times
        for (kind, *shape), n in attention:
            work[phase]["attention"][(kind, *shape)] += n * times
            if backward:
                work[phase]["attention"][("causal_backward", *shape)] += n * times

    # generate: one prefill (the LM head and the last block's queries at the last prompt
    # token), R - 1 decode steps (the R-th token needs no forward of its own)
    forward("generate", B, P, 1)
    work["generate"]["gemm"][(B, d, V)] += R  # LM head: last prompt token, then each new one
    for s in _linears(w, B):
        work["generate"]["gemm"][s] += L * (R - 1)
    work["generate"]["attention"][("decode", B, 1, P + R // 2)] += L * (R - 1)
    # score: policy, reference and value model read the R positions before each response
    # token, the reward model the last one
    forward("score", B, T, R, 3)
    forward("score", B, T, 1)
    work["score"]["gemm"][(B * R, d, V)] += 2
    # update: policy and value model, forward and backward, per minibatch per epoch
    n = w.ppo_epochs * (B // mb)
    forward("update", mb, T, R, 2 * n, backward=True)
    head = (mb * R, d, V)
    for s in [head, *_backward([head])]:
        work["update"]["gemm"][s] += n
    return work


def attention_flops(w: Workload, kind: str, b: int, q: int, kv: int) -> float:
    """FLOPs of QK^T and AV over all heads of one layer. Causal: the last q of kv positions
    as queries, each over the keys up to its own (q = kv: the lower triangle, diagonal
    included); a backward is twice its forward (dQ, dK from dS; dP, dV)."""
    d = w.n_embd
    if kind == "decode":
        return 4.0 * b * q * kv * d
    causal = 4.0 * b * d * (q * kv - q * (q - 1) / 2)
    return 2 * causal if kind == "causal_backward" else causal


def _timed(fn, reps: int = 5, floor_s: float = 2e-3) -> float:
    """Seconds per call of `fn`: the best of `reps` timings, each of enough calls to last
    `floor_s` (a shape of a few microseconds is timed over many calls, so the rate of a
    small shape includes one PyTorch call's overhead, as every eager step pays it)."""
    fn()  # warm-up (kernel choice, allocation)
    t0, n = time.perf_counter(), 0
    while n < 1 or time.perf_counter() - t0 < floor_s:
        fn()
        n += 1
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def measure_rates(w: Workload, work: dict, precision: str) -> dict:
    """FLOP/s of every GEMM and attention shape in `work`, timed alone on this machine at the
    workload's precision (bf16 tensors for bf16, as autocast runs them) and current threads."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dev = torch.device(w.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gemm, attn = {}, {}
    for shape in sorted({s for p in work.values() for s in p["gemm"]}):
        m, k, n = shape
        a, b = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(k, n, dtype=dtype, device=dev)
        gemm[shape] = 2.0 * m * k * n / _timed(lambda a=a, b=b: (a @ b, sync()))
    h, dh = w.n_head, w.n_embd // w.n_head
    for shape in sorted({s for p in work.values() for s in p["attention"]}):
        _kind, b, q, kv = shape
        # The two batched matmuls of attention (QK^T, then AV; a backward is four of the same
        # shapes), full, not masked: a kernel that skipped the masked half at this rate is the limit.
        qt = torch.randn(b * h, q, dh, dtype=dtype, device=dev)
        kt = torch.randn(b * h, dh, kv, dtype=dtype, device=dev)
        pt = torch.randn(b * h, q, kv, dtype=dtype, device=dev)
        vt = torch.randn(b * h, kv, dh, dtype=dtype, device=dev)
        secs = _timed(lambda qt=qt, kt=kt, pt=pt, vt=vt: (torch.bmm(qt, kt), torch.bmm(pt, vt), sync()))
        attn[shape] = 4.0 * b * q * kv * w.n_embd / secs
    return {"gemm": gemm, "attention": attn}


def possible(w: Workload, work: dict, rates: dict) -> dict[str, dict]:
    """Per phase: its FLOPs and the time they take at the timed rates."""
    out = {}
    for phase, parts in work.items():
        flops = t = 0.0
        for shape, count in parts["gemm"].items():
            f = 2.0 * shape[0] * shape[1] * shape[2] * count
            flops, t = flops + f, t + f / rates["gemm"][shape]
        for shape, count in parts["attention"].items():
            f = attention_flops(w, *shape) * count
            flops, t = flops + f, t + f / rates["attention"][shape]
        out[phase] = {"flops": flops, "possible_s": t}
    return out


def limit_report(w: Workload, precision: str) -> dict:
    """The per-phase work and its possible time on this machine (run it in the process and
    with the threads the sides ran with)."""
    work = phase_work(w)
    rates = measure_rates(w, work, precision)
    phases = possible(w, work, rates)
    biggest = max(rates["gemm"], key=lambda s: s[0] * s[1] * s[2])
    return {
        "phases": phases,
        "precision": precision,
        "largest_gemm": list(biggest),
        "largest_gemm_flops_per_s": rates["gemm"][biggest],
    }


def fractions(limit: dict, side: dict) -> dict[str, float]:
    """achieved / possible per phase (and for the three together) for one side's figures."""
    out = {p: limit["phases"][p]["possible_s"] / max(side["time_s"][p], 1e-12) for p in PHASES}
    total = sum(side["time_s"][p] for p in PHASES)
    out["step"] = sum(limit["phases"][p]["possible_s"] for p in PHASES) / max(side["step_s"], total, 1e-12)
    return out


def _limit_child(w: Workload, precision: str) -> dict:
    import torch

    if w.threads:
        torch.set_num_threads(w.threads)
    return limit_report(w, precision)


def measure_limit(w: Workload, precision: str) -> dict:
    """`limit_report` in a fresh process with the workload's threads, as each side runs."""
    from rlhflab.training import in_fresh_process

    return in_fresh_process(_limit_child, w, precision)
