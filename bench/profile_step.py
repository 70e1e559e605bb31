"""Where the time of one model step goes: torch.profiler over a few steps of each variant.

    python bench/profile_step.py --suite S16x224 --mode train \
        --variants compile-sdpa-bf16 compile-triton-bf16 --batch 8 --steps 5 --out DIR [--trace]

The model, its optimizer and its step are bench/test_model.py's (same variants, same
construction, same compilation and warm-up). After the warm-up, `--steps` steps are timed
without the profiler (the wall time, each step ending in a device sync), then `--steps` more
run under torch.profiler. One JSON per (suite, mode, variant), `profile_<suite>-<mode>-<variant>.json`:
device, versions, commit, command, batch, steps, `step_ms` (median wall time), `total_ms`
(the profiled time per step: CUDA kernel time on a GPU, the ops' self CPU time on a CPU), the
time per step by category (`mvit_fast.report.kernel_category`) and the top kernels (or CPU
ops). `--trace` also writes the Chrome trace, `trace_<suite>-<mode>-<variant>.json.gz`.
`python -m mvit_fast.report throughput` tabulates the profiles it finds beside the benchmark
JSON ("Where the time goes").

Without a GPU the defaults are the CPU smoke suite (S4x64), its eager variants and batch 1;
the cases test_model skips here are skipped with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_model, conftest: from any directory
from conftest import describe_run  # noqa: E402
from test_model import (  # noqa: E402
    CUDA,
    MODEL_SUITES,
    MODES,
    VARIANTS,
    WARMUP_STEPS,
    ModelSuite,
    Variant,
    _inputs,
    _release,
    _skip_reason,
    build_case,
)

from mvit_fast.report import time_breakdown  # noqa: E402

SUITES = {suite.name: suite for suite in MODEL_SUITES}
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
TOP_KERNELS = 25


def profiled_ops(prof: profile) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of what the profiled steps spent their time in: on a GPU each
    CUDA kernel's device time (user annotations, which span kernels, left out, as the profiler's
    own table does); on a CPU each op's self CPU time, which adds up to the steps' CPU time. On
    a CPU the optimizer runs per tensor (aten::sqrt, addcdiv_, ...), ops named like any other:
    those inside its step are named "optimizer: <op>", so that the step is counted as one."""
    if CUDA:
        return [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    totals: dict[str, tuple[int, float]] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("Optimizer.step#"):
            parent = parent.cpu_parent
        name = event.name if parent is None else f"optimizer: {event.name}"
        calls, us = totals.get(name, (0, 0.0))
        totals[name] = (calls + 1, us + event.self_cpu_time_total)
    return [(name, calls, us) for name, (calls, us) in totals.items()]


def profile_case(suite: ModelSuite, variant: Variant, mode: str, batch: int, steps: int,
                 trace: Path | None = None) -> dict:
    """Build, compile (if the variant says so) and warm up one case as test_model does; time
    `steps` steps, profile `steps` more; the profile's fields (see the module docstring)."""
    device = torch.device("cuda" if CUDA else "cpu")
    model, _, step = build_case(suite, variant, mode, device)
    if variant.compiled:
        model.compile(fullgraph=True, dynamic=False)
    inputs = _inputs(suite.cfg, batch, device)
    for _ in range(1 + WARMUP_STEPS):  # the first compiles (or allocates)
        step(*inputs)
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        step(*inputs)
        step_s.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if CUDA else [])]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(*inputs)
        profiled_s = time.perf_counter() - start
    if trace is not None:
        prof.export_chrome_trace(str(trace))  # gzipped: the name ends in .gz
    variant_fields = {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant)}
    variant_fields["variant"] = variant_fields.pop("name")
    variant_fields["dtype"] = str(variant.dtype).removeprefix("torch.")
    return {"kind": "profile", "suite": suite.name, "model": f"MViTv2-{suite.size.upper()}", "mode": mode,
            **variant_fields, "batch": batch, "steps": steps,
            "timed": "CUDA kernel time" if CUDA else "CPU ops' self time",
            "step_ms": 1e3 * statistics.median(step_s), "profiled_step_ms": 1e3 * profiled_s / steps,
            **time_breakdown(profiled_ops(prof), steps, top=TOP_KERNELS)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    suite = next(s for s in MODEL_SUITES if s.needs_cuda == CUDA)
    runnable = [v.name for v in VARIANTS if _skip_reason(suite, v) is None]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=[suite.name],
                        help=f"model suites (default: {suite.name}, the first this device runs)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["train"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS_BY_NAME), default=runnable,
                        help=f"default: those this device runs ({' '.join(runnable)})")
    parser.add_argument("--batch", type=int, default=8 if CUDA else 1,
                        help="clips per step (default: 8 on a GPU, as the op benchmarks; 1 on a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled")
    parser.add_argument("--out", type=Path, required=True, help="folder for the profile JSONs")
    parser.add_argument("--trace", action="store_true", help="also write gzipped Chrome traces")
    return parser.parse_args(argv)


def run_case(suite: ModelSuite, mode: str, variant: Variant, args: argparse.Namespace,
             info: dict) -> bool:
    """Profile one case into args.out, printing what happens; False when it ran out of memory."""
    case = f"{suite.name}-{mode}-{variant.name}"
    reason = _skip_reason(suite, variant)
    if reason:
        print(f"{case}: skipped: {reason}", flush=True)
        return True
    print(f"{case}: batch {args.batch}, {args.steps} steps ...", flush=True)
    trace = args.out / f"trace_{case}.json.gz" if args.trace else None
    result = None
    if not CUDA:  # AdamW's subnormal second moments slow x86 ~40x (test_model_step)
        torch.set_flush_denormal(True)
    try:
        result = profile_case(suite, variant, mode, args.batch, args.steps, trace)
    except torch.OutOfMemoryError:
        pass  # reported below, once the error (and the tensors its traceback holds) is gone
    finally:
        torch.set_flush_denormal(False)
    _release()
    if result is None:
        print(f"{case}: out of memory at batch {args.batch}", flush=True)
        return False
    path = args.out / f"profile_{case}.json"
    path.write_text(json.dumps(dict(info, **result), indent=1))
    largest = ", ".join(f"{c} {ms:.2f}" for c, ms in list(result["categories"].items())[:4])
    print(f"{case}: {result['step_ms']:.2f} ms per step; profiled {result['total_ms']:.2f} ms "
          f"({largest}, ...) -> {path}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """Profile every requested case; 0 when none ran out of memory."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/profile_step.py", *(sys.argv[1:] if argv is None else argv)])
    info = dict(describe_run(torch.device("cuda" if CUDA else "cpu")), command=command)
    threads = torch.get_num_threads()
    if not CUDA:  # small shapes on a shared CPU: one thread (bench/conftest.py `_cpu_smoke_threads`)
        torch.set_num_threads(1)
    try:
        ran = [run_case(SUITES[suite], mode, VARIANTS_BY_NAME[variant], args, info)
               for suite in args.suite for mode in args.mode for variant in args.variants]
    finally:
        torch.set_num_threads(threads)
    return 0 if all(ran) else 1


if __name__ == "__main__":
    sys.exit(main())
