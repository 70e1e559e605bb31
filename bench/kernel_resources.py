"""Registers, spills and shared memory of every kernel config at the MViTv2 shapes, for a GPU
this machine need not have.

    python bench/kernel_resources.py                                   # MViTv2-S, bf16, sm_90
    python bench/kernel_resources.py --sizes s b l --arch 80 --json resources.json
    python bench/kernel_resources.py --blocks 0 1                      # the shapes of blocks 0, 1
    python bench/kernel_resources.py --sizes s b --warm --jobs 16      # on a GPU machine: fill
                                                                       # Triton's cache ahead of a run

Every distinct attention shape (`conftest.attention_shapes`) and pooling shape
(`test_pool.pool_shapes`) of the models goes through the real launchers (`attention_forward`,
`attention_backward`, `pool_norm_forward`, `pool_norm_backward`) under
`mvit_fast.kernels.compile_only`: each autotune config (or the pinned MVIT_FAST_TRITON_CONFIG /
MVIT_FAST_POOL_CONFIG) is compiled for sm_`arch` with the argument specialization of a
contiguous launch, as the model makes it under bf16 autocast (activations in `--dtype`, the
pooling's conv and LayerNorm parameters in `--param-dtype`: float32 master weights), and
nothing runs. Batch 1: the batch changes the grid, not the strides, so the compiled code is
the batch-8 code, except for the dkdv pass's query chunks (`dkdv_chunks`: one chunk or
several specialize apart), which follow `--batch` and `--sms`. q, k and v pool separately:
their member index specializes apart.

`--warm` compiles for the GPU present into Triton's own cache (`compile_only(warm_cache=True)`),
so the autotuner of a later eager launch on it loads binaries instead of compiling them one
after another (a compiled model's launches are Inductor's copies of the kernels, compiled by
its own workers); `--jobs` spreads the shapes (each pooled member q, k, v apart) over processes.

Printed per kernel and shape: each config's registers per thread, spill stores/loads (bytes
per thread), shared memory, its tensor-core instruction (wgmma | mma), its global loads by
width (16B: a full vector per thread), its machine code's instructions and barriers (static
counts: for the one-block passes, the issue work of a block) and compile time; a config over
the target's shared memory is marked (the autotuner skips it; a pass with none that fits
fails). The exit code is 1 when a config fails to compile or a pass has no config that fits.
Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest.py, test_pool.py

import torch  # noqa: E402
from conftest import AttentionShape, attention_shapes  # noqa: E402
from mvit_fast.kernels.compile_only import CompileRecorder, compile_only  # noqa: E402
from mvit_fast.kernels.pool_norm import pool_norm_backward, pool_norm_forward  # noqa: E402
from mvit_fast.kernels.pooled_attention import (  # noqa: E402
    attention_backward,
    attention_forward,
    dkdv_chunks,
)
from test_pool import PoolShape, pool_shapes  # noqa: E402

from mvit_fast.config import get_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LN_EPS = 1e-6


def compile_attention(rec: CompileRecorder, shape: AttentionShape, dtype: torch.dtype,
                      param_dtype: torch.dtype, chunks: int = 1) -> None:
    """The three attention passes at `shape`: q, k, v contiguous as the pooling leaves them,
    the per-query tables (t | h | w) concatenated in float32 as `triton_attention` builds them;
    the dkdv pass in `chunks` query chunks."""
    d, heads = shape.head_dim, shape.heads
    q = torch.empty(1, heads, shape.nq, d, dtype=dtype)
    k = torch.empty(1, heads, shape.nk, d, dtype=dtype)
    v = torch.empty_like(k)
    rel = torch.empty(1, heads, shape.nq - 1, sum(shape.kv_grid), dtype=torch.float32)
    args = (list(shape.kv_grid), (True, True, True), True, True, d ** -0.5)
    out, lse = attention_forward(q, k, v, rel, *args, wrap=rec.wrap)
    attention_backward(torch.empty_like(q), q, k, v, rel, out, lse, *args, wrap=rec.wrap, chunks=chunks)


MEMBERS = "qkv"  # the projection output's member index: 0 q, 1 k, 2 v


def compile_pool(rec: CompileRecorder, shape: PoolShape, dtype: torch.dtype,
                 param_dtype: torch.dtype, members: str = MEMBERS) -> None:
    """Forward and backward pooling of `members` (q at stride_q, k and v at stride_kv)
    straight from a contiguous (1, N, 3, heads, d) projection output."""
    d = shape.head_dim
    qkv = torch.empty(1, shape.n, 3, shape.heads, d, dtype=dtype)
    weight = torch.empty(d, 1, *shape.kernel, dtype=param_dtype)
    gamma, beta = torch.empty(d, dtype=param_dtype), torch.empty(d, dtype=param_dtype)
    for name in members:
        member = MEMBERS.index(name)
        stride = shape.stride_q if name == "q" else shape.stride_kv
        y = pool_norm_forward(qkv, member, weight, gamma, beta, shape.input_grid, stride, True, LN_EPS,
                              wrap=rec.wrap)
        pool_norm_backward(y, qkv, member, weight, gamma, shape.input_grid, stride, True, LN_EPS,
                           wrap=rec.wrap)


def _config_text(config: dict) -> str:
    tiles = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config)
    split = " split" if config.get("SPLIT_D") else ""
    group = f" g{config['GROUP_W']}" if "GROUP_W" in config else ""  # pooling: w positions per row
    return f"{tiles}{group} w{config['num_warps']} s{config['num_stages']}{split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s"], choices=["s", "b", "l"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activations")
    parser.add_argument("--param-dtype", default="fp32", choices=sorted(DTYPES),
                        help="the pooling's conv and LayerNorm parameters")
    parser.add_argument("--arch", type=int, help="compute capability x 10 (default: the GPU's, else 90)")
    parser.add_argument("--kernels", nargs="+", default=["attention", "pool"], choices=["attention", "pool"])
    parser.add_argument("--blocks", nargs="+", type=int,
                        help="only the shapes of these block indices (default: every block)")
    parser.add_argument("--batch", type=int, default=8,
                        help="the batch whose dkdv query chunks to compile (the benchmarks': 8)")
    parser.add_argument("--sms", type=int, help="SMs of the GPU the chunks are for (default: the "
                        "GPU's, else 132: an H100 SXM)")
    parser.add_argument("--warm", action="store_true", help="compile into Triton's own cache")
    parser.add_argument("--jobs", type=int, default=1, help="processes (shapes split among them)")
    parser.add_argument("--json", type=Path, help="also write every compiled config here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels are not compiled")
    if args.arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        args.arch = 10 * major + minor
    if args.sms is None:
        cuda = torch.cuda.is_available()
        args.sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 132

    work = []
    for size in args.sizes:
        cfg = get_config(size)
        suite = f"{size.upper()}{cfg.num_frames}x{cfg.crop_size}"
        if "attention" in args.kernels:
            work += [(suite, shape.id, "attention", shape, "") for shape in attention_shapes(cfg)]
        if "pool" in args.kernels:  # one item per member: q, k and v compile apart anyway
            work += [(suite, _pool_id(shape), "pool", shape, member)
                     for shape in pool_shapes(cfg) for member in MEMBERS]
    if args.blocks is not None:
        work = [w for w in work if set(w[3].blocks) & set(args.blocks)]
    options = (args.arch, args.warm, args.dtype, args.param_dtype, args.batch, args.sms)
    start = time.perf_counter()
    if args.jobs > 1:  # round-robin, so each process gets attention and pooling items
        chunks = [work[i::args.jobs] for i in range(args.jobs)]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_shapes, chunks, [options] * len(chunks)))
    else:
        results = [compile_shapes(work, options)]
    rows, failed = [], False
    for text, chunk_rows, chunk_failed in results:
        print(text, end="", flush=True)
        rows += chunk_rows
        failed |= chunk_failed
    print(f"{len(rows)} configs in {time.perf_counter() - start:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "triton": _triton_version(),
                                         "rows": rows}, indent=1))
    return int(failed)


def compile_shapes(work: list[tuple], options: tuple) -> tuple[str, list[dict], bool]:
    """Compile (suite, shape id, kind, shape, pooled member) items in one `compile_only`
    context (shapes that specialize alike compile once): the printed table, its rows, whether
    anything failed."""
    arch, warm, dtype, param_dtype, batch, sms = options
    lines, rows, failed = [], [], False
    with compile_only(arch, warm_cache=warm) as rec:
        for suite, shape_id, kind, shape, member in work:
            first = len(rec.results)
            if kind == "pool":
                compile_pool(rec, shape, DTYPES[dtype], DTYPES[param_dtype], member)
            else:
                q_chunks = dkdv_chunks(shape.nq, shape.nk, batch * shape.heads, sms)
                compile_attention(rec, shape, DTYPES[dtype], DTYPES[param_dtype], q_chunks)
            by_kernel: dict[str, list] = {}
            for c in rec.results[first:]:
                by_kernel.setdefault(c.kernel, []).append(c)
            for kernel, configs in by_kernel.items():
                fits = [c for c in configs if c.fits]
                chunked = kind == "attention" and kernel == "_attn_bwd_dkdv" and q_chunks > 1
                label = " ".join(filter(None, (suite, shape_id, member, kernel,
                                               f"({q_chunks} query chunks)" if chunked else "")))
                lines.append(f"{label}: {len(fits)}/{len(configs)} configs fit "
                             f"sm_{arch}, {sum(c.spill_stores == 0 for c in fits)} without spills")
                for c in configs:
                    note = c.error or ("" if c.fits else "over the shared memory limit")
                    lines.append(f"    {_config_text(c.config):22s} regs {c.registers} spill "
                                 f"{c.spill_stores}/{c.spill_loads} smem {c.shared} "
                                 f"{c.mma or '-':9s} ld {_widths_text(c.load_bytes):14s} "
                                 f"sass {c.sass_instructions} bar {c.barriers} "
                                 f"{c.compile_s:5.1f}s {note}")
                    rows.append({"suite": suite, "shape": shape_id, "member": member, "dtype": dtype,
                                 "param_dtype": param_dtype, "arch": arch, **asdict(c)})
                failed |= not fits or any(c.error for c in configs)
    return "".join(line + "\n" for line in lines), rows, failed


def _widths_text(load_bytes: dict[int, int]) -> str:
    """Global loads by width, widest first: "16Bx112 4Bx28"."""
    return " ".join(f"{w}Bx{n}" for w, n in sorted(load_bytes.items(), reverse=True)) or "-"


def _pool_id(shape: PoolShape) -> str:
    stride = lambda s: "x".join(map(str, s))
    return f"{shape.id}-q{stride(shape.stride_q)}-kv{stride(shape.stride_kv)}"


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
