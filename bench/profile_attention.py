"""Where the time of one `pooled_attention` call goes: torch.profiler per backend and shape.

    python bench/profile_attention.py --suite S16x224 --blocks 0 --mode fwd+bwd \
        --backends triton triton_unchunked sdpa_aug eager --batch 8 --calls 10 --out DIR

The inputs and backends are bench/test_attention.py's (its Triton variants included). After
two untimed calls (compilation, autotuning), `--calls` calls are timed without the profiler,
each ending in a device sync, then `--calls` more run under torch.profiler. One JSON per case,
`opprofile_attention-<suite>-<shape>-<mode>-<backend>.json` (kind "op_profile"): device,
versions, commit, command, the shape, `call_ms` (median wall time of a call), `total_ms` (the
profiled time per call: CUDA kernel time on a GPU, the ops' self CPU time on a CPU), the time
per call by category (`mvit_fast.report.kernel_category`) and the top kernels (or CPU ops), where
the Triton passes `_attn_fwd`, `_attn_bwd_dq` and `_attn_bwd_dkdv` appear by name (the fields
of `mvit_fast.report.time_breakdown`, a call counting as its step).
`python -m mvit_fast.report throughput` tabulates the op profiles it finds beside the benchmark
JSON ("Where the attention op's time goes"): what the kernels take, and what the tables, copies
and casts around them take.

Without a GPU the defaults are the CPU smoke suite (S4x64), the backends that run there and
batch 1; a case the benchmark would skip is skipped with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, test_attention, profile_step
from conftest import CUDA, SUITES, WARMUP_CALLS, AttentionShape, attention_shapes, describe_run  # noqa: E402
from mvit_fast.kernels.pooled_attention import launch_configs  # noqa: E402
from profile_step import profiled_ops  # noqa: E402
from test_attention import TRITON_VARIANTS, _inputs, _skip_reason, _variant_skip_reason  # noqa: E402

from mvit_fast.attention import pooled_attention  # noqa: E402
from mvit_fast.report import time_breakdown  # noqa: E402

BACKENDS = ("eager", "sdpa", "flex", "sdpa_aug", *TRITON_VARIANTS)
MODES = ("fwd", "fwd+bwd")
TOP_KERNELS = 15


def profile_call(shape: AttentionShape, backend: str, mode: str, batch: int, calls: int,
                 device: torch.device, dtype: torch.dtype) -> dict:
    """Warm up, time and profile one backend at one shape; the profile's fields (module docstring)."""
    op_backend = "triton" if backend in TRITON_VARIANTS else backend
    torch.manual_seed(0)
    leaves = _inputs(shape, batch, dtype, device, requires_grad=mode == "fwd+bwd")
    q, k, v, rel_t, rel_h, rel_w = leaves
    grad_out = torch.randn_like(q)

    def call():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = pooled_attention(q, k, v, shape.q_grid, shape.kv_grid, rel_t, rel_h, rel_w,
                                   has_cls=True, residual_pooling=True, backend=op_backend)
            if mode == "fwd+bwd":
                torch.autograd.grad(out, leaves, grad_out)
        if CUDA:
            torch.cuda.synchronize()

    for _ in range(WARMUP_CALLS):
        call()
    call_s = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        call_s.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if CUDA else [])]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
    result = {"call_ms": 1e3 * statistics.median(call_s),
              **time_breakdown(profiled_ops(prof), calls, top=TOP_KERNELS)}
    if op_backend == "triton":
        result["triton_configs"] = launch_configs()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    suite = next(name for name, (_, needs_cuda) in SUITES.items() if needs_cuda == CUDA)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=[suite],
                        help=f"model suites (default: {suite}, the first this device runs)")
    parser.add_argument("--blocks", nargs="+", type=int, default=[0],
                        help="the shapes of these block indices (default: 0)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["fwd+bwd"])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        default=["triton", "triton_unchunked", "sdpa_aug", "eager"])
    parser.add_argument("--batch", type=int, default=8 if CUDA else 1,
                        help="clips per call (default: 8 on a GPU, as the op benchmarks; 1 on a CPU)")
    parser.add_argument("--calls", type=int, default=10, help="calls timed, then as many profiled")
    parser.add_argument("--out", type=Path, required=True, help="folder for the profile JSONs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Profile every requested case; 0 when none ran out of memory."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32  # the op benchmarks' dtypes
    command = shlex.join(["python", "bench/profile_attention.py", *(sys.argv[1:] if argv is None else argv)])
    info = dict(describe_run(device), command=command)
    threads = torch.get_num_threads()
    if not CUDA:  # small shapes on a shared CPU: one thread (bench/conftest.py `_cpu_smoke_threads`)
        torch.set_num_threads(1)
    out_of_memory = False
    try:
        for suite in args.suite:
            shapes = [s for s in attention_shapes(SUITES[suite][0]) if set(s.blocks) & set(args.blocks)]
            for shape in shapes:
                for mode in args.mode:
                    for backend in args.backends:
                        out_of_memory |= not run_case(suite, shape, backend, mode, args, device, dtype, info)
    finally:
        torch.set_num_threads(threads)
    return int(out_of_memory)


def run_case(suite: str, shape: AttentionShape, backend: str, mode: str, args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype, info: dict) -> bool:
    """Profile one case into args.out, printing what happens; False when it ran out of memory."""
    case = f"{suite}-{shape.id}-{mode}-{backend}"
    op_backend = "triton" if backend in TRITON_VARIANTS else backend
    reason = (_skip_reason(op_backend, mode, device)
              or _variant_skip_reason(backend, mode, shape, args.batch, device))
    if reason:
        print(f"{case}: skipped: {reason}", flush=True)
        return True
    result = None
    try:
        with _environment(TRITON_VARIANTS.get(backend, {})):
            result = profile_call(shape, backend, mode, args.batch, args.calls, device, dtype)
    except torch.OutOfMemoryError:
        pass  # reported below, once the error (and the tensors its traceback holds) is gone
    if CUDA:
        torch.cuda.empty_cache()
    if result is None:
        print(f"{case}: out of memory at batch {args.batch}", flush=True)
        return False
    record = dict(info, kind="op_profile", op="pooled_attention", suite=suite, shape=shape.id,
                  heads=shape.heads, head_dim=shape.head_dim, nq=shape.nq, nk=shape.nk,
                  blocks=list(shape.blocks), mode=mode, backend=backend, batch=args.batch,
                  dtype=str(dtype).removeprefix("torch."), calls=args.calls,
                  timed="CUDA kernel time" if CUDA else "CPU ops' self time", **result)
    path = args.out / f"opprofile_attention-{case}.json"
    path.write_text(json.dumps(record, indent=1))
    largest = ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.3f}" for k in result["top"][:3])
    print(f"{case}: {result['call_ms']:.3f} ms per call; profiled {result['total_ms']:.3f} ms "
          f"({largest}, ...) -> {path}", flush=True)
    return True


@contextlib.contextmanager
def _environment(pinned: dict[str, str]):
    """The variables `pinned` set inside, as they were after."""
    saved = {name: os.environ.get(name) for name in pinned}
    os.environ.update(pinned)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
