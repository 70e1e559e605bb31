#!/usr/bin/env bash
# The one command a session with a lent GPU runs: CUDA tests, then the attention benchmarks.
#
#   OUT=/some/dir bash bench/gpu_suite.sh        # on the device machine $OUT is preset
#
# Machine: H100/H200, torch 2.11 + triton 3.6 preinstalled, Python 3.12, NO network.
# The package installs offline (--no-deps --no-build-isolation). Test tools missing there
# (pytest, pytest-benchmark, py-cpuinfo, hypothesis, ...) travel as wheels in ./.whl
# (git-ignored; pass it in the device tool's `carry`), made here with e.g.
#   pip download --no-deps -d .whl pytest pluggy iniconfig packaging pytest-benchmark \
#       py-cpuinfo hypothesis attrs sortedcontainers
# Writes under $OUT:
#   run_info.json            device, commit, command, versions; exit codes once done
#   pip.log                  the offline install
#   tests_cuda.log/.xml      pytest tests -m cuda (junit xml)
#   bench_<suite>.log/.json  benchmark tables and pytest-benchmark json per suite
#   bench_attention.json     both suites (S16x224, B32x224) merged; extra_info on every row
# bench/test_data.py (DALI vs PyAV) is not run here: it needs the DALI wheel carried in.
# Budget: well under the device tool's 10 minutes per command. Each step has its own
# timeout (SIGINT first, then KILL); override with TESTS_TIMEOUT / BENCH_TIMEOUT
# (seconds; defaults 120 + 2 x 170). MVIT_FAST_COMMIT names the commit when the copy
# has no .git.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

export MVIT_FAST_COMMIT=${MVIT_FAST_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}  # per suite

run_info() {  # run_info.json: what ran where; exit codes as name=rc arguments once known
  python - "$@" > "$OUT/run_info.json" <<'PY'
import json, os, platform, subprocess, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as e:
    smi = str(e)
print(json.dumps({
    "command": "bash bench/gpu_suite.sh",
    "commit": os.environ["MVIT_FAST_COMMIT"],
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "nvidia_smi": smi,
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "triton": triton_version,
    "exit_codes": {k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])},
}, indent=2))
PY
}

run_info
if [ -d .whl ]; then
  pip install --no-index --no-deps .whl/*.whl > "$OUT/pip.log" 2>&1
fi
pip install --no-index --no-deps --no-build-isolation -e . >> "$OUT/pip.log" 2>&1
pip_rc=$?

timeout -s INT -k 30 "$TESTS_TIMEOUT" python -m pytest tests -m cuda -p no:cacheprovider \
  --junitxml="$OUT/tests_cuda.xml" 2>&1 | tee "$OUT/tests_cuda.log"
tests_rc=$?

# One pytest run per suite, S first: a run cut by its timeout loses its own json
# (pytest-benchmark cannot save a half-timed case), not the other suite's.
# The test warms up itself (compile, autotune); rounds are bounded by max-time.
bench_rc=0
for suite in S16x224 B32x224; do
  timeout -s INT -k 30 "$BENCH_TIMEOUT" python -m pytest bench/test_attention.py --benchmark-only \
    -p no:cacheprovider -k "$suite" --benchmark-max-time=0.2 --benchmark-min-rounds=5 \
    --benchmark-columns=min,median,mean,stddev,rounds \
    --benchmark-json="$OUT/bench_$suite.json" 2>&1 | tee "$OUT/bench_$suite.log"
  rc=$?
  [ "$rc" = 0 ] || bench_rc=$rc
done
python - "$OUT" <<'PY' || bench_rc=1  # merge the suites into bench_attention.json
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted(out.glob("bench_[SB]*.json"))]
if runs:
    merged = dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]])
    (out / "bench_attention.json").write_text(json.dumps(merged, indent=2))
print(f"bench_attention.json: {sum(len(r['benchmarks']) for r in runs)} cases, {len(runs)} suite run(s)")
PY

run_info pip=$pip_rc tests=$tests_rc bench=$bench_rc
echo "exit codes: pip=$pip_rc tests=$tests_rc bench=$bench_rc (124: timed out)"
[ "$pip_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
