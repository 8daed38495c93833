"""`rlhflab bench`: a tiny workload end to end, its JSON figures, and clean refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rlhflab import cli
from rlhflab.bench import main as bench

SIDE_KEYS = {
    "episodes_per_s",
    "generated_tokens_per_s",
    "training_tokens_per_s",
    "step_s",
    "time_s",
    "time_share",
    "step_wall_s",
    "peak_memory_mb",
    "final_kl",
    "final_rm_score",
    "mean_kl",
    "mean_rm_score",
    "response_length",
}


def run_json(capsys, *args) -> dict:
    assert cli.main(["bench", "--workload", "tiny", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def check_side(side: dict, w: bench.Workload, steps: int, exact_length: bool = True) -> None:
    assert SIDE_KEYS <= side.keys()
    assert side["steps_measured"] == steps - 1 == len(side["step_wall_s"])  # warm-up left out
    for key in ("episodes_per_s", "generated_tokens_per_s", "training_tokens_per_s", "peak_memory_mb"):
        assert math.isfinite(side[key]) and side[key] > 0, key
    assert side["episodes_per_s"] == pytest.approx(w.batch_size / side["step_s"])
    assert set(side["time_share"]) == {"generate", "score", "update", "other"}
    assert sum(side["time_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(v >= 0 for v in side["time_s"].values())
    assert side["time_share"]["update"] > 0 and side["time_share"]["generate"] > 0
    if exact_length:  # rlhflab never samples eos with force_length
        assert side["response_length"] == w.response_len
    else:  # TRL generates full length but ends a response at a sampled pad token (1 in 256)
        assert 0 < side["response_length"] <= w.response_len
    assert math.isfinite(side["final_kl"]) and math.isfinite(side["final_rm_score"])
    kl = side["kl_per_step"]
    assert len(kl) == steps and min(kl) <= side["mean_kl"] <= max(kl)  # the warm-up's rollout too
    assert side["peak_memory_mb"] > 50  # RSS of a process that imported torch


def test_tiny_bench_reports_every_figure(capsys):
    w = bench.WORKLOADS["tiny"]
    report = run_json(capsys, "--steps", "3")
    assert report["workload"]["name"] == "tiny" and report["workload"]["steps"] == 3
    assert report["workload"]["policy_params"] > 0 and "cpu" in report["machine"]
    assert "trl" not in report and "ratio" not in report
    # --precision auto (the default) runs what this CPU runs natively, as `rlhflab run` does
    from rlhflab.device import native_bf16

    assert report["workload"]["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    check_side(report["rlhflab"], w, 3)
    frac = report["rlhflab"]["fraction_of_limit"]
    assert set(frac) == {"generate", "score", "update", "step"}
    assert all(math.isfinite(v) and v > 0 for v in frac.values())
    assert all(report["limit"]["phases"][p]["possible_s"] > 0 for p in ("generate", "score", "update"))
    text = bench.format_report(report)
    assert "episodes/s" in text and "update (s/step, share)" in text and "TRL" not in text
    assert "update, of limit" in text and report["workload"]["precision_reason"] in text


def test_seed_moves_the_ppo_run_and_not_the_workload(capsys, monkeypatch):
    """--seed draws other prompts and samples from the same models and prompt set; one seed
    repeats its run exactly."""
    built, build_inputs = [], bench.build_inputs

    def recording(w, root):  # the digest of every model and prompt file the bench builds
        paths = build_inputs(w, root)
        files = sorted(f for p in paths.values() for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")))
        built.append(hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest())
        return paths

    monkeypatch.setattr(bench, "build_inputs", recording)
    a = run_json(capsys, "--steps", "2", "--precision", "fp32")
    b = run_json(capsys, "--steps", "2", "--precision", "fp32", "--seed", "1")
    again = run_json(capsys, "--steps", "2", "--precision", "fp32", "--seed", "1")
    assert (a["workload"]["seed"], b["workload"]["seed"]) == (0, 1)
    assert len(built) == 3 and len(set(built)) == 1  # the same models and prompts at every seed
    assert a["rlhflab"]["rm_score_per_step"] != b["rlhflab"]["rm_score_per_step"]
    assert again["rlhflab"]["kl_per_step"] == b["rlhflab"]["kl_per_step"]
    assert again["rlhflab"]["rm_score_per_step"] == b["rlhflab"]["rm_score_per_step"]
    assert "seed 1;" in bench.format_report(b)
    assert cli.main(["bench", "--workload", "tiny", "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err


def _workload_gpt2(w):
    """A GPT-2 of the workload's shape, sdpa attention (random init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=w.vocab_size,
        n_positions=w.n_positions,
        n_embd=w.n_embd,
        n_layer=w.n_layer,
        n_head=w.n_head,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg)


def test_the_limits_flop_count_is_what_torch_counts_for_gpt2():
    """bench/limit.py's GEMM FLOPs of one forward (and forward + backward) equal what
    torch's FlopCounterMode counts on a real GPT-2 of the workload's shape; its attention
    FLOPs are the causal share of torch's full count."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlhflab.bench.limit import _backward, _linears, attention_flops

    w = bench.WORKLOADS["tiny"]
    model = _workload_gpt2(w)
    B, T = 4, w.prompt_len + w.response_len
    ids = torch.randint(0, w.vocab_size, (B, T))

    def counted(backward: bool) -> dict:
        with FlopCounterMode(display=False) as fc:
            out = model(ids).logits
            if backward:
                out.float().sum().backward()
        return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}

    def gemm(shapes) -> int:
        return sum(2 * m * k * n for m, k, n in shapes)

    blocks = w.n_layer * gemm(_linears(w, B * T))
    head = gemm([(B * T, w.n_embd, w.vocab_size)])  # HF computes logits at every position
    fwd = counted(False)
    linear = sum(v for k, v in fwd.items() if "mm" in k and "bmm" not in k)
    assert linear == blocks + head
    sdpa = sum(v for k, v in fwd.items() if "attention" in k or "bmm" in k)  # per the attention kernel
    assert sdpa > 0
    causal = w.n_layer * attention_flops(w, "causal", B, T, T)
    assert causal == pytest.approx(sdpa * (T + 1) / (2 * T))
    both = counted(True)
    linear_both = sum(v for k, v in both.items() if "mm" in k and "bmm" not in k)
    backward = w.n_layer * gemm(_backward(_linears(w, B * T))) + gemm(_backward([(B * T, w.n_embd, w.vocab_size)]))
    assert linear_both == blocks + head + backward


def test_the_limits_count_of_a_forward_read_at_its_last_positions_is_what_torch_counts():
    """A forward under `reading_last` (the last block at the read positions only) does
    what bench/limit.py counts for it: the GEMMs of L - 1 blocks, `_last_linears`, the LM
    head at the read positions, and their backward; its last layer's attention runs the
    read queries only."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlhflab.bench.limit import _backward, _last_linears, _linears
    from rlhflab.device import reading_last

    w = bench.WORKLOADS["tiny"]
    model = _workload_gpt2(w)
    B, T, read = 4, w.prompt_len + w.response_len, w.response_len
    ids = torch.randint(0, w.vocab_size, (B, T))
    with FlopCounterMode(display=False) as fc:
        with reading_last(model, read):
            out = model(ids, use_cache=False, logits_to_keep=read).logits
        out.float().sum().backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}

    def gemm(shapes) -> int:
        return sum(2 * m * k * n for m, k, n in shapes)

    head = [(B * read, w.n_embd, w.vocab_size)]
    shapes = (w.n_layer - 1) * _linears(w, B * T) + _last_linears(w, B * T, B * read) + head
    linear = sum(v for k, v in counts.items() if "mm" in k and "bmm" not in k)
    assert linear == gemm(shapes) + gemm(_backward(shapes))
    attention = sum(v for k, v in counts.items() if "attention" in k or "bmm" in k)
    forward = 4 * B * w.n_embd * ((w.n_layer - 1) * T * T + read * T)  # torch counts the full rectangle
    assert attention == 3 * forward  # forward and backward


def test_workload_shapes_are_the_documented_ones():
    cpu, gpu = bench.WORKLOADS["cpu"], bench.WORKLOADS["gpu"]
    assert round(bench.n_params(cpu) / 1e6, 2) == 1.19  # GPT-2 shape, 4 layers, d 128, vocab 2048
    assert (
        cpu.prompt_len,
        cpu.response_len,
        cpu.batch_size,
        cpu.minibatch_size,
        cpu.ppo_epochs,
        cpu.threads,
    ) == (32, 32, 64, 64, 4, 2)
    assert round(bench.n_params(gpu) / 1e6) == 124  # GPT-2 small
    assert (
        gpu.prompt_len,
        gpu.response_len,
        gpu.batch_size,
        gpu.minibatch_size,
        gpu.ppo_epochs,
        gpu.device,
    ) == (64, 64, 512, 128, 4, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_workload_is_refused_in_one_line_without_cuda(capsys):
    assert cli.main(["bench", "--workload", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


def test_too_few_steps_and_stray_flag_are_refused(capsys):
    assert cli.main(["bench", "--workload", "tiny", "--steps", "1"]) == 2
    assert "at least 2 steps" in capsys.readouterr().err
    assert cli.main(["bench", "--workload", "tiny", "--trl-kernels"]) == 2
    assert "needs --vs trl" in capsys.readouterr().err


def test_vs_trl_without_trl_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    assert cli.main(["bench", "--workload", "tiny", "--vs", "trl"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "TRL" in err and "pip install 'rlhflab[bench]'" in err


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (the bench extra) is not installed")
@pytest.mark.slow
def test_vs_trl_runs_both_sides_on_the_same_workload(capsys):
    w = bench.WORKLOADS["tiny"]
    report = run_json(capsys, "--steps", "3", "--vs", "trl", "--seed", "3")
    check_side(report["rlhflab"], w, 3)
    check_side(report["trl"], w, 3, exact_length=False)
    trl = report["trl"]
    assert trl["version"].startswith("1.12") and trl["kernels"] is False
    s = trl["settings"]
    assert (
        s["num_ppo_epochs"],
        s["response_length"],
        s["per_device_train_batch_size"],
        s["num_mini_batches"],
        s["gradient_checkpointing"],
        s["bf16"],
        s["seed"],
    ) == (
        w.ppo_epochs,
        w.response_len,
        w.batch_size,
        w.batch_size // w.minibatch_size,
        False,
        report["workload"]["precision"] == "bf16",
        3,
    )  # the same precision and seed on both sides
    assert report["ratio"]["episodes_per_s"] == pytest.approx(
        report["rlhflab"]["episodes_per_s"] / trl["episodes_per_s"]
    )
    assert "rlhflab/TRL" in bench.format_report(report)


def test_rm_bench_times_padded_against_packed_rows_with_the_same_scores(capsys):
    assert cli.main(["bench", "--rm", "--steps", "2", "--precision", "fp32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["ms_per_step"]) == {"padded", "packed"} and all(v > 0 for v in r["ms_per_step"].values())
    assert r["token_slots_per_step"]["packed"] < r["token_slots_per_step"]["padded"]
    assert r["max_score_diff"] < 1e-4  # fp32: both sides compute the same scores
    assert r["packed_over_padded_time"] > 0 and r["workload"]["precision"] == "fp32"


def test_rm_bench_refuses_ppo_only_options(capsys):
    assert cli.main(["bench", "--rm", "--nproc", "2"]) != 0
    assert "--rm times rlhflab's RM step alone" in capsys.readouterr().err
    assert cli.main(["bench", "--rm", "--seed", "1"]) != 0
    assert "--seed" in capsys.readouterr().err
