#!/usr/bin/env bash
# The one command a session with a lent GPU runs: CUDA tests, then every GPU benchmark.
#
#   OUT=/some/dir bash bench/gpu_suite.sh        # on the device machine $OUT is preset
#
# Machine: H100/H200, torch 2.11 + triton 3.6 preinstalled, Python 3.12, NO network.
# The package installs offline (--no-deps --no-build-isolation). What the image lacks
# (fvcore and three of its dependencies; setuptools >= 77 if its own is older) travels as
# wheels in ./.whl: make them with
# `bash bench/fetch_wheels.sh` on the development machine and name `.whl` in the device
# tool's `carry`.
#
# Steps, in priority order; each has a timeout (SIGINT, then KILL 15 s later; a pytest step
# starts no case in the last quarter of its timeout, tests/deadline.py) and all of them
# share one deadline, DEADLINE seconds after the start (default 570: the device tool allows
# 600 per command). A step the deadline leaves no time for is not started (exit code 125);
# STEPS="step step ..." runs only the named steps, e.g. in a second call.
#   pip                 offline install                                 pip.log
#   tests               pytest tests -m cuda, launch configs pinned     tests.log, tests.xml
#   model_eager         bench/test_model.py, S and B, eager fp32/bf16   bench_model_eager.json
#   train_compiled      compiled bf16 training step (Triton attention) of MViTv2-S and -B
#                       (bench/test_model.py: clips/s, compile time)    bench_train_compiled.json
#   warm                every kernel config at the S and B shapes compiled into Triton's
#                       cache in parallel (bench/kernel_resources.py)   warm.log
#   attention_S16x224   bench/test_attention.py, MViTv2-S shapes        bench_attention_S16x224.json
#   pool                bench/test_pool.py (fused pooling), if present  bench_pool.json
#   attention_B32x224   as for S
#   profile_attention   bench/profile_attention.py: one attention call at S block 0 and B
#                       blocks 0-1, fwd+bwd, per backend, kernel time by Triton pass and
#                       category (what the op targets miss by, and where)  opprofile_*.json
#   model_compiled_S16x224  the other compiled S cases (SDPA; Triton inference)
#   profile_S16x224     bench/profile_step.py: the compiled S training step, fused vs plain
#                       pooling, kernel time by category               profile_*.json
#   model_compiled_B32x224  as for S
#   profile_B32x224     the same for B, compiled Triton vs eager bf16   profile_*.json
#   data_pip, data      DALI GPU decoding vs PyAV (bench/test_data.py), only where the wheel
#                       parts came along (bench/fetch_wheels.sh data)   bench_data.json
#   report              python -m mvit_fast.report throughput           throughput.md (+ PNGs)
# An unknown step name or a DEADLINE that is not whole seconds stops the call (exit 2)
# before anything runs; without a CUDA device the steps past pip are not started (cuda=1);
# a benchmark step that writes no JSON (every case skipped) is recorded as NAME-json=1.
# A step gets at most the time left to the deadline minus what the report and the packing
# need, so the report runs however long the steps before it took.
# A session has 30 device-minutes, the machine's start-up (a minute or more) and idle time
# included: three calls of ~570 s, the third under what is left (DEADLINE = the device
# tool's budget_left_s minus ~40). Measured on an H100 (2026-11-25, commit cbf8ef1): the
# CUDA tests took 204 s for 127 tests on 16 workers (compile-bound), and the compiled
# MViTv2-S Triton training step was still compiling (Inductor's copies of the kernels, every
# autotune config) after 190 s. So one call per line (each may land on a fresh machine, hence
# pip), in order of what the issues still lack:
#   STEPS="pip tests model_eager report"                                  # numerics, baselines
#   STEPS="pip train_compiled report"                                     # the headline
#   STEPS="pip warm attention_S16x224 pool attention_B32x224 report"      # the op targets
# and, in a later session, STEPS="pip warm profile_attention model_compiled_S16x224 report"
# (warm first: a fresh machine's autotuner would compile every config inside the profiled
# cases' warm-up), then STEPS="pip profile_S16x224 profile_B32x224 model_compiled_B32x224
# report". A call without STEPS runs every step in the order below until the deadline.
# Autotuning compiles every config of a pass at each new specialization: the attention
# passes ~1-3 s per config, the pooling passes ~1-10 s (sm_90 compiles timed on a 2-core CPU;
# `python bench/kernel_resources.py` lists them), 8 + 8 + 8 and 5 + 3 + 5 configs: for S and B
# about 25 CPU-minutes on the development machine, one after another in the autotuner of an
# eager launch (the op benchmarks), hence the `warm` step before them. A compiled model does
# not launch these kernels: Inductor re-emits their source in its own module and compiles the
# configs in its parallel compile workers (torch/_inductor/codegen/wrapper.py,
# define_user_defined_triton_kernel), and the model benchmarks' batch probe of a Triton
# variant runs SDPA and the plain pooling (bench/test_model.py), so `warm` comes after the
# compiled headline steps and is left out of the profile call.
# Every step also leaves NAME.log and NAME.cmd (its command line). run_info.json (with
# STEPS: run_info-<first step after pip>.json; likewise pip's and report's logs and
# throughput.md, so that the calls' archives unpack into one folder): device, commit,
# command, versions, nvidia-smi and every step's exit code (124: timed out, 125: not
# started). Each bench_*.json is pytest-benchmark's, with the row fields of
# bench/conftest.py `record_run` (device, versions, commit, dtype, batch, shape, TFLOP/s,
# peak memory) in every extra_info and, added at the end, "command" and "run_info" at the
# top level. A suite cut by its timeout keeps the cases it finished (pytest-benchmark
# saves on SIGINT). bench/test_data.py (DALI vs PyAV) runs only with the data wheels
# (~290 MB, carried in parts over several calls: bench/fetch_wheels.sh). MViTv2-L
# (bench/test_model.py -k L40x312, batch 1) is left out: its compilation alone would take
# much of the budget.
# The attention kernels autotune over their compact config lists (`_COMPACT` in
# kernels/pooled_attention.py); to revisit those lists, time the full space in a call of its own:
#   MVIT_FAST_TRITON_TUNE=full python3 -m pytest bench/test_attention.py --benchmark-only -k "S16x224 and triton"
#
# The device tool brings back at most 8 files from $OUT, and its copy of the repo has no
# .git; there, run it as
#   PACK=1 MVIT_FAST_COMMIT=<sha of HEAD, "-dirty" appended for uncommitted changes> bash bench/gpu_suite.sh
# with the sha from `echo $(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)`.
# PACK=1 packs everything under $OUT into gpu_suite.tar.gz (gpu_suite-<first step after pip>
# with STEPS), leaving the run info and throughput.md beside it.
# Commit the results (development machine; the device tool copies $OUT to its files_at,
# which holds the latest call's files only, so unpack after every call):
#   run=bench/results/$(date +%F)-<gpu, e.g. h100>-$(git rev-parse --short HEAD)
#   mkdir -p "$run" && tar xzf <files_at>/gpu_suite*.tar.gz -C "$run"
#   python -m mvit_fast.report throughput   # reads the newest GPU run under bench/results/
#   git add "$run"   # then list it in README.md "Performance"
# MVIT_FAST_COMMIT names the commit when the copy has no .git (the device tool's copy).
set -uo pipefail
export PYTHONUNBUFFERED=1
# The image's interpreter is `python3` (a bare `python` may be missing or another one).
export PY=${PY:-python3}
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export MVIT_FAST_COMMIT=${MVIT_FAST_COMMIT:-$(sha=$(git rev-parse --verify -q HEAD 2>/dev/null) \
  && { git diff --quiet HEAD && echo "$sha" || echo "$sha-dirty"; } || echo unknown)}
export MVIT_BENCH_MACS_CACHE="$OUT/macs_per_clip.json"  # fvcore counts once for all model steps
# One Triton cache for every step, the one `warm` fills: once a process compiles anything
# with Inductor (a compiled model, FlexAttention), Inductor points an unset TRITON_CACHE_DIR
# at its own folder (torch/_inductor/runtime/triton_heuristics.py, CachingAutotuner), and the
# plain Triton launches after it in that process (the op benchmarks after a flex case) would
# look for the warmed binaries there.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
DEADLINE=${DEADLINE:-570}
DEADLINE=${DEADLINE%.*}  # whole seconds (budget_left_s may come as a float)
if ! [[ $DEADLINE =~ ^[0-9]+$ ]]; then echo "DEADLINE must be seconds, got '$DEADLINE'" >&2; exit 2; fi
START=$SECONDS
EXIT_CODES=()

ALL_STEPS="pip tests model_eager train_compiled warm attention_S16x224 pool attention_B32x224
  profile_attention model_compiled_S16x224 profile_S16x224 model_compiled_B32x224 profile_B32x224 data_pip data report"
STEPS=${STEPS:-}
for s in $STEPS; do  # a misspelt step would be skipped without a word, its call wasted
  [[ " $(echo $ALL_STEPS) " == *" $s "* ]] || { echo "unknown step '$s'; the steps: $(echo $ALL_STEPS)" >&2; exit 2; }
done
# Calls with STEPS share one results folder: what every call writes (run_info, the archive,
# pip's and report's logs, throughput.md) is tagged with the call's first step after pip.
TAG=$(for s in $STEPS; do [ "$s" = pip ] || { echo "-$s"; break; }; done)
RUN_INFO="$OUT/run_info$TAG.json"

run_info() {  # $RUN_INFO: what ran where; exit codes as name=rc arguments once known
  "$PY" - "$@" > "$RUN_INFO" <<'PY'
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
    "steps": os.environ.get("STEPS") or "all",
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

RAN=0  # whether the last `step` started its command
step() {  # step NAME BUDGET_S CMD...: CMD under min(BUDGET_S, time to the deadline)
  local name=$1 budget=$2
  shift 2
  RAN=0
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  local file=$name
  case $name in pip|report) file=$name$TAG ;; esac  # every call runs these
  if [ -n "$NO_CUDA" ] && [ "$name" != pip ] && [ "$name" != report ]; then
    echo "== $name: not started, no CUDA device" | tee "$OUT/$file.log"
    EXIT_CODES+=("$name=125")
    return 0
  fi
  # Held back from the deadline: 20 s for the last run_info and packing; for every step but
  # the report also the report's 30 s and the 15 s a cut step may take to exit (INT, KILL).
  local reserve=20
  [ "$name" = report ] || reserve=65
  local left=$((DEADLINE - (SECONDS - START) - reserve))
  if [ "$left" -lt 30 ]; then
    echo "== $name: not started, ${left}s to the deadline" | tee "$OUT/$file.log"
    EXIT_CODES+=("$name=125")
    return 0
  fi
  local limit=$((budget < left ? budget : left))
  echo "== $name: timeout ${limit}s at $((SECONDS - START))s"
  printf '%q ' "$@" > "$OUT/$file.cmd"
  RAN=1
  [ -z "${BENCH_JSON:-}" ] || rm -f "$BENCH_JSON"  # an earlier call's: not what this step measured
  # pytest steps (-p tests.deadline) start no case past a quarter of the limit (15-90 s)
  # before it, so they end by themselves and write their reports: a case cut inside a long
  # compile outlives the INT's 15 s, and the KILL loses every result (the first H100 run's
  # pool step: 38 finished cases, no JSON).
  local margin=$((limit / 4 < 15 ? 15 : (limit / 4 > 90 ? 90 : limit / 4)))
  MVIT_FAST_DEADLINE=$(($(date +%s) + limit - margin)) \
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$file.log"
  EXIT_CODES+=("$name=${PIPESTATUS[0]}")
}

bench() {  # bench NAME BUDGET_S FILE PYTEST_ARGS...: one pytest-benchmark run into bench_NAME.json
  local name=$1 budget=$2 file=$3
  shift 3
  BENCH_JSON="$OUT/bench_$name.json" step "$name" "$budget" "$PY" -m pytest "$file" --benchmark-only \
    -p no:cacheprovider -p tests.deadline --benchmark-columns=min,median,mean,stddev,rounds \
    --benchmark-json="$OUT/bench_$name.json" "$@"
  if [ "$RAN" = 1 ] && [ ! -s "$OUT/bench_$name.json" ]; then  # every case skipped, or killed
    echo "== $name: wrote no benchmark JSON"
    EXIT_CODES+=("$name-json=1")
  fi
}

NO_CUDA=
run_info
# (timeout runs programs, not shell functions: the install is a `bash -c` script)
# pyproject's SPDX `license = "..."` needs setuptools >= 77 (an older one rejects the file),
# and without build isolation the image's own setuptools builds: the carried one stands in
# where the image's is older or missing.
step pip 90 bash -c 'if [ -d .whl ]; then
    v=$("$PY" -c "import setuptools; print(setuptools.__version__)" 2>/dev/null)
    if [ "${v%%.*}" -lt 77 ] 2>/dev/null || [ -z "$v" ]; then
      echo "setuptools ${v:-missing} < 77: installing the carried one"
      "$PY" -m pip install --no-index --no-deps .whl/setuptools-*.whl || exit
    fi
    "$PY" -m pip install --no-index --no-deps $(ls .whl/*.whl | grep -v /setuptools-) || exit
  fi
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . || exit
  "$PY" -c "import fvcore, mvit_fast.kernels" || { echo "fvcore (FLOP counts) is missing: carry .whl"; exit 1; }'
# Nothing but the install and the report measures anything without a GPU: say so, once,
# rather than as a run of skipped tests and benchmarks that exits 0 (MVIT_FAST_SUITE_CPU=1
# runs the steps anyway, to try the suite's plumbing on a CPU machine).
GPU_STEPS=$(for s in ${STEPS:-all}; do case $s in pip|report) ;; *) echo "$s" ;; esac; done)
if [ -n "$GPU_STEPS" ] && [ "${MVIT_FAST_SUITE_CPU:-0}" != 1 ] \
  && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "== no CUDA device visible to torch: the GPU steps are not started"
  NO_CUDA=1
  EXIT_CODES+=("cuda=1")
fi
# The numerics tests pin one launch config per kernel: autotuning every shape, dtype and
# head-dim layout of the suite would compile for many minutes (the benchmarks autotune).
# 32 x 32 tiles because they fit every case in shared memory: an sm_90 compile of the fp32
# d = 144 dq pass needs 141 KB at 32 x 32 but 311 KB (over the 227 KB limit) at 64 x 64.
# The step is compile-bound (~130 CUDA tests, most with kernel specializations of their own;
# ~1500 CPU-s of compiles timed for sm_90 on the development machine), so pytest-xdist (in
# the image) spreads the tests over one process per core, sharing the GPU; each compiles
# Inductor's code in one thread (its default pool of a worker per core, in every process,
# would oversubscribe the cores).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(nproc)")
step tests 300 env MVIT_FAST_TRITON_CONFIG=BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1 \
  MVIT_FAST_POOL_CONFIG=BLOCK_M=16,num_warps=8,num_stages=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
  "$PY" -m pytest tests -m cuda -p no:cacheprovider -p tests.deadline "${XDIST[@]}" --junitxml="$OUT/tests.xml"

# Attention and pooling ops: a few rounds of 0.1 s each (the tests warm up themselves).
OP_ROUNDS=(--benchmark-max-time=0.1 --benchmark-min-rounds=3)
# Whole-model steps take 0.1-2 s: three rounds after the case's own warm-up.
MODEL_ROUNDS=(--benchmark-max-time=0.5 --benchmark-min-rounds=3)
HEADLINE="train and compile-triton-bf16"
bench model_eager 100 bench/test_model.py -k "(S16x224 or B32x224) and eager-" "${MODEL_ROUNDS[@]}"
bench train_compiled 480 bench/test_model.py -k "(S16x224 or B32x224) and $HEADLINE" "${MODEL_ROUNDS[@]}"
# Every attention and pooling config at the S and B shapes, compiled into Triton's cache by 16
# processes at once: the autotuner of the op benchmarks would compile them one after another,
# one core busy, inside their warm-up (bench/kernel_resources.py --warm; the log has each
# config's registers, spills, shared memory and MMA instruction from this machine's Triton).
step warm 150 "$PY" bench/kernel_resources.py --sizes s b --warm --jobs 16
bench attention_S16x224 120 bench/test_attention.py -k S16x224 "${OP_ROUNDS[@]}"
if [ -f bench/test_pool.py ]; then
  bench pool 120 bench/test_pool.py -k "S16x224 or B32x224" "${OP_ROUNDS[@]}"
fi
bench attention_B32x224 90 bench/test_attention.py -k B32x224 "${OP_ROUNDS[@]}"
step profile_attention 120 "$PY" bench/profile_attention.py --suite S16x224 B32x224 --blocks 0 \
  --mode fwd+bwd --calls 10 --out "$OUT"
# The other compiled cases (the plain-pooling variant is timed by the profile steps, with
# the fused one, side by side), and where the time goes (bench/profile_step.py:
# torch.profiler, kernels by category): the compiled S training step with the fused vs the
# plain pooling (what the fused kernel saves), and the B training step compiled vs eager
# bf16. `report` tabulates the profile_*.json.
bench model_compiled_S16x224 200 bench/test_model.py \
  -k "S16x224 and compile- and not ($HEADLINE) and not plainpool" "${MODEL_ROUNDS[@]}"
step profile_S16x224 240 "$PY" bench/profile_step.py --suite S16x224 --mode train \
  --variants compile-triton-bf16 compile-triton-plainpool-bf16 --batch 8 --steps 5 --out "$OUT"
bench model_compiled_B32x224 250 bench/test_model.py \
  -k "B32x224 and compile- and not ($HEADLINE) and not plainpool" "${MODEL_ROUNDS[@]}"
step profile_B32x224 200 "$PY" bench/profile_step.py --suite B32x224 --mode train \
  --variants compile-triton-bf16 eager-bf16 --batch 4 --steps 5 --out "$OUT"

# DALI's GPU decoder vs PyAV (bench/test_data.py), where the DALI and PyAV wheels came along
# in parts (.carry1 ... .carryN: `bash bench/fetch_wheels.sh data` says how).
if [ -d .carry1 ]; then
  step data_pip 120 bash -c 'set -e; . .carry1/MANIFEST
    have=$(find .carry[0-9]* -name "part-*" | wc -l)
    [ "$have" = "$parts" ] || { echo "have $have of $parts wheel parts: carry the others"; exit 1; }
    find .carry[0-9]* -name "part-*" | sort -t/ -k2 | xargs cat > /tmp/data_wheels.tar
    echo "$sha256  /tmp/data_wheels.tar" | sha256sum -c
    mkdir -p /tmp/data_wheels && tar xf /tmp/data_wheels.tar -C /tmp/data_wheels
    "$PY" -m pip install --no-index --no-deps /tmp/data_wheels/*.whl'
  bench data 240 bench/test_data.py "${MODEL_ROUNDS[@]}"
fi

# Stamp every result file with its command and the run's info, then tabulate (and plot,
# where matplotlib is installed).
"$PY" - "$OUT" "$RUN_INFO" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
info = json.loads(pathlib.Path(sys.argv[2]).read_text())
for path in sorted(out.glob("bench_*.json")):
    cmd = out / (path.stem.removeprefix("bench_") + ".cmd")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # cut while writing: kept for a look, out of the report's way
        path.rename(path.with_suffix(".json.broken"))
        print(f"{path.name}: not JSON ({e}), renamed {path.name}.broken")
        continue
    data.update(command=cmd.read_text().strip() if cmd.exists() else None, run_info=info)
    path.write_text(json.dumps(data, indent=2))
    print(f"{path.name}: {len(data['benchmarks'])} cases")
PY
PLOTS=(--plot-dir "$OUT")
"$PY" -c "import matplotlib" 2>/dev/null || PLOTS=(--no-plots)
shopt -s nullglob  # a glob that matches nothing expands to nothing
RESULTS=("$OUT"/bench_*.json "$OUT"/profile_*.json "$OUT"/opprofile_*.json)
shopt -u nullglob
if [ "${#RESULTS[@]}" -gt 0 ]; then
  step report 30 sh -c '"$PY" -m mvit_fast.report throughput "$@" > "$0"; rc=$?; cat "$0"; exit $rc' \
    "$OUT/throughput$TAG.md" "${RESULTS[@]}" "${PLOTS[@]}"
fi

run_info "${EXIT_CODES[@]}"
if [ "${PACK:-0}" = 1 ]; then  # for the device tool, which brings back at most 8 files
  ARCHIVE=gpu_suite$TAG.tar.gz
  tar czf "/tmp/$ARCHIVE" -C "$OUT" . && find "$OUT" -mindepth 1 \
    ! -name "$(basename "$RUN_INFO")" ! -name "throughput$TAG.md" ! -name 'gpu_suite*.tar.gz' -delete \
    && mv "/tmp/$ARCHIVE" "$OUT/"
fi
echo "exit codes: ${EXIT_CODES[*]} (124: timed out, 125: not started); $((SECONDS - START))s"
for code in "${EXIT_CODES[@]}"; do [ "${code#*=}" = 0 ] || exit 1; done
