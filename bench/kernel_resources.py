"""Registers, spills and shared memory of every kernel config at the MViTv2 shapes, for a GPU
this machine need not have.

    python bench/kernel_resources.py                                   # MViTv2-S, bf16, sm_90
    python bench/kernel_resources.py --sizes s b l --arch 80 --json resources.json
    python bench/kernel_resources.py --blocks 0 1                      # the shapes of blocks 0, 1

Every distinct attention shape (`conftest.attention_shapes`) and pooling shape
(`test_pool.pool_shapes`) of the models goes through the real launchers (`attention_forward`,
`attention_backward`, `pool_norm_forward`, `pool_norm_backward`) under
`mvit_fast.kernels.compile_only`: each autotune config (or the pinned MVIT_FAST_TRITON_CONFIG /
MVIT_FAST_POOL_CONFIG) is compiled for sm_`arch` with the argument specialization of a
contiguous launch, as the model makes it, and nothing runs. Batch 1: the batch changes the
grid, not the strides, so the compiled code is the batch-8 code.

Printed per kernel and shape: each config's registers per thread, spill stores/loads (bytes
per thread), shared memory and compile time; a config over the target's shared memory is
marked (the autotuner skips it; a pass with none that fits fails). The exit code is 1 when a
config fails to compile or a pass has no config that fits. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest.py, test_pool.py

import torch  # noqa: E402
from conftest import AttentionShape, attention_shapes  # noqa: E402
from mvit_fast.kernels.compile_only import CompileRecorder, compile_only  # noqa: E402
from mvit_fast.kernels.pool_norm import pool_norm_backward, pool_norm_forward  # noqa: E402
from mvit_fast.kernels.pooled_attention import attention_backward, attention_forward  # noqa: E402
from test_pool import PoolShape, pool_shapes  # noqa: E402

from mvit_fast.config import get_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LN_EPS = 1e-6


def compile_attention(rec: CompileRecorder, shape: AttentionShape, dtype: torch.dtype) -> None:
    """The three attention passes at `shape`: q, k, v contiguous as the pooling leaves them,
    the per-query tables (t | h | w) concatenated in float32 as `triton_attention` builds them."""
    d, heads = shape.head_dim, shape.heads
    q = torch.empty(1, heads, shape.nq, d, dtype=dtype)
    k = torch.empty(1, heads, shape.nk, d, dtype=dtype)
    v = torch.empty_like(k)
    rel = torch.empty(1, heads, shape.nq - 1, sum(shape.kv_grid), dtype=torch.float32)
    args = (list(shape.kv_grid), (True, True, True), True, True, d ** -0.5)
    out, lse = attention_forward(q, k, v, rel, *args, wrap=rec.wrap)
    attention_backward(torch.empty_like(q), q, k, v, rel, out, lse, *args, wrap=rec.wrap)


def compile_pool(rec: CompileRecorder, shape: PoolShape, dtype: torch.dtype) -> None:
    """Forward and backward pooling of q (stride_q) and k (stride_kv; v compiles the same)
    straight from a contiguous (1, N, 3, heads, d) projection output."""
    d = shape.head_dim
    qkv = torch.empty(1, shape.n, 3, shape.heads, d, dtype=dtype)
    weight = torch.empty(d, 1, *shape.kernel, dtype=dtype)
    gamma, beta = torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype)
    for member, stride in ((0, shape.stride_q), (1, shape.stride_kv)):
        y = pool_norm_forward(qkv, member, weight, gamma, beta, shape.input_grid, stride, True, LN_EPS,
                              wrap=rec.wrap)
        pool_norm_backward(y, qkv, member, weight, gamma, shape.input_grid, stride, True, LN_EPS,
                           wrap=rec.wrap)


def _config_text(config: dict) -> str:
    tiles = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config)
    split = " split" if config.get("SPLIT_D") else ""
    return f"{tiles} w{config['num_warps']} s{config['num_stages']}{split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s"], choices=["s", "b", "l"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--kernels", nargs="+", default=["attention", "pool"], choices=["attention", "pool"])
    parser.add_argument("--blocks", nargs="+", type=int,
                        help="only the shapes of these block indices (default: every block)")
    parser.add_argument("--json", type=Path, help="also write every compiled config here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels are not compiled")

    dtype = DTYPES[args.dtype]
    rows, failed = [], False
    start = time.perf_counter()
    with compile_only(args.arch) as rec:  # one context: shapes that specialize alike compile once
        for size in args.sizes:
            failed |= _compile_suite(rec, size, dtype, args.kernels, args.blocks, rows)
    print(f"{len(rows)} configs in {time.perf_counter() - start:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "triton": _triton_version(),
                                         "rows": rows}, indent=1))
    return int(failed)


def _compile_suite(rec: CompileRecorder, size: str, dtype: torch.dtype, kernels: list[str],
                   blocks: list[int] | None, rows: list[dict]) -> bool:
    """Compile and print one model's shapes into `rows`; True when something failed."""
    failed = False
    cfg = get_config(size)
    suite = f"{size.upper()}{cfg.num_frames}x{cfg.crop_size}"
    work = []
    if "attention" in kernels:
        work += [(shape.id, shape, compile_attention) for shape in attention_shapes(cfg)]
    if "pool" in kernels:
        work += [(_pool_id(shape), shape, compile_pool) for shape in pool_shapes(cfg)]
    if blocks is not None:
        work = [w for w in work if set(w[1].blocks) & set(blocks)]
    for shape_id, shape, compile_shape in work:
        first = len(rec.results)
        compile_shape(rec, shape, dtype)
        by_kernel: dict[str, list] = {}
        for c in rec.results[first:]:
            by_kernel.setdefault(c.kernel, []).append(c)
        for kernel, configs in by_kernel.items():
            fits = [c for c in configs if c.fits]
            print(f"{suite} {shape_id} {kernel}: {len(fits)}/{len(configs)} configs fit sm_{rec.arch}, "
                  f"{sum(c.spill_stores == 0 for c in fits)} without spills", flush=True)
            for c in configs:
                note = c.error or ("" if c.fits else "over the shared memory limit")
                print(f"    {_config_text(c.config):22s} regs {c.registers} spill {c.spill_stores}/"
                      f"{c.spill_loads} smem {c.shared} {c.compile_s:5.1f}s {note}")
                rows.append({"suite": suite, "shape": shape_id, "dtype": str(dtype).removeprefix("torch."),
                             "arch": rec.arch, **asdict(c)})
            failed |= not fits or any(c.error for c in configs)
    return failed


def _pool_id(shape: PoolShape) -> str:
    stride = lambda s: "x".join(map(str, s))
    return f"{shape.id}-q{stride(shape.stride_q)}-kv{stride(shape.stride_kv)}"


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
