"""The kernels' machine code for Hopper (sm_90), compiled on this machine.

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every
numerics test here and still fail to compile, need more shared memory than an H100 has,
spill its registers, or take a slow path: per-warp `mma` instead of Hopper's `wgmma`, rows
loaded element by element instead of as 16-byte vectors. `bench/kernel_resources.py`
compiles every autotune config of the attention and pooling passes at the block-0 shapes of
MViTv2-S (d = 96) and -L (d = 72, the 8-element row alignment path) with Triton's own ptxas
(`mvit_fast.kernels.compile_only`): no GPU needed; ~3 min on 2 cores.
It runs in a subprocess without TRITON_INTERPRET (interpreted kernels have no compiler).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mvit_fast.kernels.pooled_attention as pooled_attention_kernels
import pytest

from bench.conftest import attention_shapes
from bench.test_pool import pool_shapes
from mvit_fast.config import get_config

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_PASSES = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
POOL_PASSES = ("_pool_norm_fwd", "_pool_norm_bwd_dz", "_pool_norm_bwd_dx")
# Bytes of spill stores per thread allowed in any pooling config. The kept configs measured
# 0-276 (sm_90, Triton 3.9, bf16, d = 96 and 72; the most in the dz pass at 32 rows x 8
# warps); the tiles and group widths `pool_norm._configs` leaves out spill 0.8-38 KB.
POOL_SPILL_LIMIT = 512
SIZES = ("s", "l")
BLOCKS = (0,)


def _compiled_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MVIT_FAST_TRITON_CONFIG", "MVIT_FAST_POOL_CONFIG")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; fusion is its default
    return env


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    command = [sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--sizes", *SIZES,
               "--blocks", *map(str, BLOCKS), "--jobs", str(min(4, os.cpu_count() or 1)),
               "--json", str(out)]
    run = subprocess.run(command, env=_compiled_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


def _by_pass(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["kernel"]), []).append(row)
    return groups


def test_every_config_compiles_for_sm90_at_mvit_shapes(resources):
    groups = _by_pass(resources["rows"])
    shapes = lambda passes: {shape for shape, kernel in groups if kernel in passes}
    wanted = lambda derive: [s for size in SIZES for s in derive(get_config(size))
                             if set(s.blocks) & set(BLOCKS)]
    assert len(shapes(ATTENTION_PASSES)) == len(wanted(attention_shapes)) == 2
    assert len(shapes(POOL_PASSES)) == len(wanted(pool_shapes)) == 2
    for (shape, kernel), configs in groups.items():
        assert not [c["error"] for c in configs if c["error"]], (shape, kernel)
        assert any(c["fits"] for c in configs), f"{shape} {kernel}: no config fits sm_90's shared memory"
        # ptxas' counts, also for configs Triton served from its cache (an earlier shape's code)
        assert all(c["registers"] is not None and c["spill_stores"] is not None for c in configs)
        # cuobjdump's machine code (Triton's own listing stops at 4096 instructions)
        assert all(c["sass_instructions"] and c["barriers"] is not None for c in configs)
        if kernel == "_pool_norm_bwd_dz":  # the per-tap weight-gradient loop is past 4096
            assert max(c["sass_instructions"] for c in configs) > 4096, (shape, kernel)
    kernels = {kernel for _, kernel in groups}
    assert kernels == set(ATTENTION_PASSES + POOL_PASSES)


def _is_fallback(config: dict) -> bool:
    """The 16 x 16 tile every attention search space has for GPUs with little shared memory."""
    tile = tuple(config.get(k) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    return tile == pooled_attention_kernels._FALLBACK


def test_attention_dots_use_hopper_wgmma(resources):
    """Hopper's peak needs wgmma: every forward config but the 16-row fallback (wgmma takes 64
    rows), and at least one config of each backward pass, must compile its dots to it (Triton
    falls back to per-warp mma.sync for tile shapes wgmma cannot take, at a fraction of the
    throughput). The pooling has no dots."""
    for (shape, kernel), configs in _by_pass(resources["rows"]).items():
        configs = [c for c in configs if not _is_fallback(c["config"])]
        if kernel == "_attn_fwd":
            assert all(c["mma"] == "wgmma" for c in configs), (shape, [c["mma"] for c in configs])
        elif kernel in ATTENTION_PASSES:
            assert any(c["mma"] == "wgmma" and c["fits"] for c in configs), shape
        else:
            assert all(c["mma"] is None for c in configs), (shape, kernel)


def test_bf16_rows_load_as_vectors(resources):
    """No global load of a single bf16 element: at d = 72 (L) the rows are 144 bytes apart,
    which Triton's own specialization (multiples of 16) does not prove aligned; without the
    kernels' ROW_ALIGN every row loads element by element (measured at L block 0: 224-896
    2-byte loads per config, against 16-byte vectors at d = 96). The 4-byte loads are the
    fp32 tables, statistics and conv weights."""
    for (shape, kernel), configs in _by_pass(resources["rows"]).items():
        for c in configs:
            narrow = {int(w): n for w, n in c["load_bytes"].items() if int(w) < 4}
            assert not narrow, (shape, kernel, c["config"], narrow)
            assert c["load_bytes"].get("16"), (shape, kernel, c["config"], c["load_bytes"])


def test_forward_attention_has_spill_free_configs_and_pooling_spills_little(resources):
    for (shape, kernel), configs in _by_pass(resources["rows"]).items():
        if kernel == "_attn_fwd":
            assert any(c["spill_stores"] == 0 for c in configs), shape
        if kernel in POOL_PASSES:
            worst = max(configs, key=lambda c: c["spill_stores"])
            assert worst["spill_stores"] <= POOL_SPILL_LIMIT, (shape, kernel, worst["config"])


def test_compile_only_restores_triton_and_accepts_cpu_tensors_only_inside(tmp_path):
    """Nothing compiled for the stand-in target stays in the process; binaries reach Triton's
    own cache (TRITON_CACHE_DIR here) only with warm_cache."""
    script = """
import os, torch, triton
from triton.runtime.driver import driver
from mvit_fast.kernels import pooled_attention as pa
from mvit_fast.kernels.compile_only import compile_only
q = torch.empty(1, 2, 33, 32, dtype=torch.float16)
k = torch.empty(1, 2, 10, 32, dtype=torch.float16)
rel = torch.empty(1, 2, 32, 1 + 3 + 3)  # Kt + Kh + Kw columns
args = ([1, 3, 3], (True, True, True), True, True, 0.2)
caches, active = pa._attn_fwd.device_caches, driver._active
with compile_only(90) as rec:
    pa.attention_forward(q, k, k, rel, *args, wrap=rec.wrap)
assert pa._attn_fwd.device_caches is caches and driver._active is active
assert [c.kernel for c in rec.results] == ["_attn_fwd"], rec.results
assert rec.results[0].registers and rec.results[0].fits and rec.results[0].error is None
cache = os.environ["TRITON_CACHE_DIR"]
assert not os.listdir(cache), "compile_only() must not write Triton's cache"
with compile_only(90, warm_cache=True) as rec:
    pa.attention_forward(q, k, k, rel, *args, wrap=rec.wrap)
assert any(name.endswith(".cubin") for _, _, names in os.walk(cache) for name in names)
try:
    pa.attention_forward(q, k, k, rel, *args)
except ValueError as e:
    assert "needs CUDA tensors" in str(e)
else:
    raise AssertionError("a CPU launch outside compile_only must be refused")
print("ok")
"""
    env = _compiled_env()
    env["MVIT_FAST_TRITON_CONFIG"] = "BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-3000:] + run.stderr[-3000:]


def test_the_fallback_tile_fits_a_gpu_with_less_shared_memory():
    """On sm_89 (99 KB of shared memory per block) the tuned tiles of the dq pass do not fit at
    fp32 (119 KB and more at d = 96); the 16 x 16 fallback must, for every pass, up to d = 256."""
    script = """
import torch
from mvit_fast.kernels import pooled_attention as pa
from mvit_fast.kernels.compile_only import compile_only
q = torch.empty(1, 1, 65, 256)
k = torch.empty(1, 1, 1 + 8 * 14 * 14, 256)
rel = torch.empty(1, 1, 64, 8 + 14 + 14)
args = ([8, 14, 14], (True, True, True), True, True, 0.0625)
with compile_only(89) as rec:
    pa.attention_forward(q, k, k, rel, *args, wrap=rec.wrap)
    pa.attention_backward(q, q, k, k, rel, q, torch.empty(1, 1, 65), *args, wrap=rec.wrap)
for r in rec.results:
    print(r.kernel, r.shared, r.fits, r.error)
"""
    env = _compiled_env()
    env["MVIT_FAST_TRITON_CONFIG"] = ",".join(
        f"{k}={v}" for k, v in zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
                                   pooled_attention_kernels._FALLBACK))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == list(ATTENTION_PASSES)
    assert all(r[2] == "True" and int(r[1]) <= 101376 for r in rows), rows


BAD_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def _inner(x):
    offsets = tl.arange(0, 3)
    return x + offsets


@triton.jit
def _outer(x):
    return _inner(x) * 2


@triton.jit
def _bad_kernel(ptr):
    x = tl.load(ptr)
    tl.store(ptr, _outer(x))
'''


def test_compile_error_names_the_root_cause_and_the_innermost_line(tmp_path):
    """A compile error two @jit helpers deep: Triton's own message starts at the kernel's call
    line; the recorded error is the cause, the helper's file line and source, then the calls."""
    (tmp_path / "bad_kernel.py").write_text(BAD_KERNEL)
    script = """
import torch, bad_kernel
from mvit_fast.kernels.compile_only import compile_only
with compile_only(90) as rec:
    rec.wrap(bad_kernel._bad_kernel)[(1,)](torch.empty(4))
[result] = rec.results
assert not result.fits and result.registers is None
print(result.error)
"""
    env = {**_compiled_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip() == (
        "ValueError: arange's range must be a power of 2 at bad_kernel.py:8 (_inner) "
        "`offsets = tl.arange(0, 3)`; called from bad_kernel.py:14 (_outer) <- "
        "bad_kernel.py:20 (_bad_kernel)")


def test_kernels_compile_with_the_float_arguments_torch_compile_passes():
    """Under torch.compile, Inductor launches its own copy of each kernel with Python floats
    typed fp64 (torch/_inductor/codegen/triton_utils.py `signature_of`), where Triton's own
    launch types them fp32. An fp64 softmax scale made the scores fp64, and the bias dot
    (fp32 accumulator expected) failed to compile: every compiled Triton model failed on the
    GPU. Here Triton's specialization is made to type floats fp64, and all six passes, bf16,
    must compile for sm_90."""
    script = """
import torch
import triton.runtime.jit as jit
native = jit.native_specialize_impl
def as_inductor(backend, arg, *flags):
    return ("fp64", None) if isinstance(arg, float) else native(backend, arg, *flags)
jit.native_specialize_impl = as_inductor  # read when a kernel builds its binder, on first launch
from mvit_fast.kernels import pool_norm as pn, pooled_attention as pa
from mvit_fast.kernels.compile_only import compile_only
bf16 = dict(dtype=torch.bfloat16)
q, k = torch.empty(1, 2, 33, 96, **bf16), torch.empty(1, 2, 10, 96, **bf16)
rel = torch.empty(1, 2, 32, 1 + 3 + 3)
args = ([1, 3, 3], (True, True, True), True, True, 0.2)
qkv, weight = torch.empty(1, 10, 3, 2, 96, **bf16), torch.empty(96, 1, 3, 3, 3, **bf16)
norm = torch.empty(96, **bf16)
pool = (0, weight, norm, norm, (1, 3, 3), (1, 2, 2), True, 1e-6)
with compile_only(90) as rec:
    pa.attention_forward(q, k, k, rel, *args, wrap=rec.wrap)
    pa.attention_backward(q, q, k, k, rel, q, torch.empty(1, 2, 33), *args, wrap=rec.wrap)
    y = pn.pool_norm_forward(qkv, *pool, wrap=rec.wrap)
    pn.pool_norm_backward(y, qkv, 0, weight, norm, *pool[4:], wrap=rec.wrap)
for r in rec.results:
    print(r.kernel, r.error)
"""
    env = _compiled_env()
    env["MVIT_FAST_TRITON_CONFIG"] = "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=1"
    env["MVIT_FAST_POOL_CONFIG"] = "BLOCK_M=16,num_warps=4"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split(" ", 1) for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == list(ATTENTION_PASSES + POOL_PASSES), rows
    assert all(r[1] == "None" for r in rows), rows
