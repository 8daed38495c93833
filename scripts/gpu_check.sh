#!/usr/bin/env bash
# The prepared GPU check (BENCHMARKS.md): on a machine with CUDA, in under 8 minutes,
#   1. `rlhflab bench --workload gpu --vs trl` (PPO episodes/s against TRL, the same workload),
#   2. the decode figure (python -m rlhflab.bench.decode: bytes read per token against the
#      card's measured copy bandwidth),
#   3. `rlhflab run --preset smoke` on the GPU,
# each under a time limit, all written to one JSON file (default gpu_check.json).
# Without CUDA it refuses in one line and exits 2. Usage: bash scripts/gpu_check.sh [OUT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
[ -x .venv/bin/python ] && .venv/bin/pip install -q -e '.[bench]' >/dev/null
TMP="$(mktemp -d)"
step() {  # name, seconds, command...: run it, keep its stdout, its exit code and its time
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
  echo "$? $((SECONDS - t0))" >"$TMP/$name.rc"
}
step bench 240 "$PY" -m rlhflab bench --workload gpu --vs trl --json
step decode 60 "$PY" -m rlhflab.bench.decode --workload gpu --json
step smoke 150 "$PY" -m rlhflab run --preset smoke --out_dir "$TMP/smoke"
"$PY" - "$TMP" "$OUT" <<'PY'
import json, subprocess, sys
from pathlib import Path

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
report = {"gpu": gpu}
for name in ("bench", "decode", "smoke"):
    rc, seconds = (tmp / f"{name}.rc").read_text().split()
    text = (tmp / f"{name}.out").read_text()
    try:
        result = json.loads(text)
    except ValueError:
        result = text[-4000:]
    report[name] = {"exit_code": int(rc), "seconds": int(seconds), "result": result,
                    "stderr_tail": (tmp / f"{name}.err").read_text()[-2000:]}
out.write_text(json.dumps(report, indent=2))
codes = ", ".join(f"{k} exit {v['exit_code']}" for k, v in report.items() if k != "gpu")
print(f"gpu_check: wrote {out} ({codes})")
PY
