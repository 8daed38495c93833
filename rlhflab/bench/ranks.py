"""What each rank of `rlhflab bench --nproc N` runs: torchrun starts N of these, each
runs the workload's PPO steps (`main.run_rlhflab`, the process group joined by
`open_run`), and rank 0 writes the figures where the spec says.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m rlhflab.bench.ranks SPEC.json

SPEC.json (written by `main.measure_nproc`): {"workload", "inputs", "steps", "options",
"out_dir", "result"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    import torch

    from rlhflab.bench.common import Workload
    from rlhflab.bench.main import run_rlhflab
    from rlhflab.distributed import setup

    spec = json.loads(Path(spec_path).read_text())
    w = Workload(**spec["workload"])
    if w.threads:
        torch.set_num_threads(w.threads)
    result = run_rlhflab(w, spec["inputs"], spec["steps"], spec["out_dir"], **spec["options"])
    dist = setup(torch.device(w.device))  # the group run_rlhflab joined
    if dist.is_main:
        Path(spec["result"]).write_text(json.dumps(result))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
