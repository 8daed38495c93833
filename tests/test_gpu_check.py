"""The prepared GPU check: it refuses cleanly without CUDA, and its decode figure (the
same code on any device) measures what it says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from rlhflab.bench import decode
from rlhflab.bench.common import WORKLOADS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no CUDA device" in res.stderr, res.stderr
    assert not out.exists()


def test_decode_figure_counts_weights_and_kv_cache_per_step():
    w = WORKLOADS["tiny"]
    # step t reads the prompt plus t new positions, per sequence: keys and values of every layer
    assert decode.kv_bytes(
        w, prompt_len=8, new_tokens=2, batch=3, dtype_bytes=4
    ) == 3 * 2 * w.n_layer * w.n_embd * 4 * (8 + 9)
    report = decode.measure(w, torch.device("cpu"), batches=(1, 4), new_tokens=4, mib=8)
    assert report["copy_bandwidth_gb_s"] > 0 and [r["batch"] for r in report["rows"]] == [1, 4]
    for r in report["rows"]:
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_bandwidth"]
        assert r["bytes_per_s"] == pytest.approx(r["fraction_of_bandwidth"] * report["copy_bandwidth_gb_s"] * 1e9)
