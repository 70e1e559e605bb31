"""Compile the kernels for a GPU this machine does not have: registers, spills, shared memory,
tensor-core instructions, load widths and machine-code instruction counts.

Triton compiles for any NVIDIA target with the ptxas its package carries, so the machine
code of every autotune config can be checked without a GPU: that it compiles at all (the
interpreter runs the Python, not the compiler), whether its shared memory fits the target
(a config over the limit is skipped by the autotuner; a pass none of whose configs fit
fails), and how many registers it takes and spills.

    with compile_only(arch=90) as recorder:
        attention_forward(q, k, v, rel, ..., wrap=recorder.wrap)   # CPU tensors, not run
    for c in recorder.results: print(c.kernel, c.config, c.registers, c.spill_stores, c.shared)

Inside the context every launch made through `recorder.wrap` (the launchers' `wrap`
argument) compiles its kernel, with Triton's own argument specialization of the launch's
actual arguments, once per autotune config (or the pinned config), and runs nothing. The
launchers' device checks accept CPU tensors meanwhile (`_launch.compiling_only`). Triton's
interpreter (TRITON_INTERPRET=1) must be off: interpreted kernels have no compiler.

On a GPU machine the same compiles can fill Triton's cache ahead of a run (`warm_cache`),
in parallel processes: the autotuner compiles its configs one after another, one core busy.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler.errors import CompilationError
from triton.runtime.driver import driver

from ._launch import COMPILE_ONLY_ARCH

__all__ = ["CompiledConfig", "CompileRecorder", "SHARED_MEMORY_LIMIT", "compile_only"]

# Largest dynamic shared memory per block (opt-in), bytes: CUDA C Programming Guide,
# "Technical Specifications per Compute Capability". Another target is held to the least.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                       120: 101376}


@dataclass
class CompiledConfig:
    """One kernel compiled at one launch with one config."""

    kernel: str
    config: dict[str, int]  # the tile meta-parameters, num_warps and num_stages
    shared: int | None  # bytes of shared memory per program
    registers: int | None  # per thread (ptxas)
    spill_stores: int | None  # bytes per thread (ptxas)
    spill_loads: int | None
    fits: bool  # shared memory within the target's limit, and it compiled
    compile_s: float  # wall time of the compile (ptxas included) on this machine
    error: str | None = None  # why it did not compile
    # The tensor-core instruction of its `tl.dot`s in the PTX: "wgmma" (Hopper's asynchronous
    # warpgroup MMA, what reaches its peak), "mma" (the synchronous per-warp one), both
    # ("wgmma+mma"), or None (no tensor-core dot). Triton falls back to "mma" for tiles wgmma cannot take.
    mma: str | None = None
    # Global loads by width in bytes ({16: n, 4: m, ...}, counted in the PTX): 16 is a full
    # vector per thread; 2-byte loads of fp16/bf16 rows mean the compiler could not prove the
    # rows aligned and loads them one element at a time.
    load_bytes: dict[int, int] = field(default_factory=dict)
    # The machine code (SASS, from the CUDA toolkit's cuobjdump that Triton carries): its
    # instructions (NOPs left out) and barriers (BAR.*, each a stop for all of the program's
    # warps). Static counts, not executed ones: a static measure of the issue work of one
    # block where a kernel has no loop (and of the loop body, where the loop dominates).
    sass_instructions: int | None = None
    barriers: int | None = None


@dataclass
class CompileRecorder:
    """What `compile_only` compiled; `wrap` is the launchers' `wrap` argument."""

    arch: int
    results: list[CompiledConfig] = field(default_factory=list)
    # ptxas' counts by compiled-kernel hash: a launch that Triton serves from its cache
    # (an earlier shape with the same specialization) prints no log.
    ptxas: dict[str, tuple[int | None, int | None, int | None]] = field(default_factory=dict)

    def wrap(self, kernel) -> _CompileOnLaunch:
        return _CompileOnLaunch(self, kernel)


class _CompileOnLaunch:
    """Stands in for `kernel[grid]`: compiles every config of the launch instead of running."""

    def __init__(self, recorder: CompileRecorder, kernel) -> None:
        self.recorder, self.kernel = recorder, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._compile(grid, args, kwargs)

    def _compile(self, grid, args, kwargs) -> None:
        if isinstance(self.kernel, triton.runtime.Autotuner):
            fn, configs = self.kernel.fn, self.kernel.configs
        else:  # a pinned config: the tile sizes are in kwargs already
            fn, configs = self.kernel, [None]
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError("compile_only needs compiled kernels: unset TRITON_INTERPRET")
        for cfg in configs:
            meta = dict(kwargs) if cfg is None else {**kwargs, **cfg.all_kwargs()}
            shown = {k: v for k, v in meta.items() if k.startswith(("BLOCK_", "GROUP_", "SPLIT_", "num_"))}
            shown.setdefault("num_warps", 4)  # Triton's defaults, when a pinned config names none
            shown.setdefault("num_stages", 3)
            self.recorder.results.append(_compile_one(fn, grid, args, meta, shown, self.recorder))


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(fn, grid, args, meta, shown, recorder: CompileRecorder) -> CompiledConfig:
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # ptxas' log is printed (knobs.nvidia.dump_ptxas_log)
            compiled = fn.run(*args, grid=grid, warmup=True, **meta)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, reported per config
        return CompiledConfig(fn.__name__, shown, None, None, None, None, False,
                              time.perf_counter() - start, _compile_error(e, fn))
    text = log.getvalue()
    regs, spills = _PTXAS.search(text), _SPILLS.search(text)
    if regs and spills:
        recorder.ptxas[compiled.hash] = (int(regs.group(1)), int(spills.group(1)), int(spills.group(2)))
    shared, ptx = compiled.metadata.shared, compiled.asm.get("ptx", "")
    return CompiledConfig(
        fn.__name__, shown, shared, *recorder.ptxas.get(compiled.hash, (None, None, None)),
        fits=shared <= SHARED_MEMORY_LIMIT.get(recorder.arch, min(SHARED_MEMORY_LIMIT.values())),
        compile_s=time.perf_counter() - start, mma=_mma_kind(ptx), load_bytes=_load_bytes(ptx),
        **_sass_counts(compiled))


def _compile_error(error: BaseException, kernel) -> str:
    """A failed compile on one line: the root cause, where it happened, and the calls there.

    Triton wraps an error inside a called @jit helper in one CompilationError per call level,
    each `from` the one below, and the outermost one's message names only the kernel's line
    of the outermost call. The cause is at the bottom of the chain.
    """
    frames, root = [], error
    while True:
        if isinstance(root, CompilationError) and hasattr(root.node, "lineno"):
            frames.append(_source_location(root, kernel))
        if root.__cause__ is None:
            break
        root = root.__cause__
    if isinstance(root, CompilationError):
        cause = f"{type(root).__name__}: {root.error_message or ''}"
    else:
        cause = f"{type(root).__name__}: {root}"
    cause = " ".join(cause.split())
    if not frames:
        return cause[:600]
    where = f"{cause} at {frames[-1]}"
    if len(frames) > 1:
        where += "; called from " + " <- ".join(location.split(" `")[0] for location in frames[-2::-1])
    return where[:600]


def _source_location(error: CompilationError, kernel) -> str:
    """`file:line (function) `source``, for a CompilationError of `kernel` or a helper it calls
    by name (its node's line counts from the function's `def`)."""
    src = error.src or ""
    name = re.match(r"\s*def\s+(\w+)", src)
    name = name.group(1) if name else "?"
    line = error.node.lineno
    code = src.splitlines()[line - 1].strip() if 0 < line <= len(src.splitlines()) else ""
    jit = kernel if name == kernel.__name__ else kernel.fn.__globals__.get(name)
    python = getattr(jit, "fn", None)
    try:
        lines, first = inspect.getsourcelines(python)
        first += next(i for i, text in enumerate(lines) if text.lstrip().startswith("def "))
        place = f"{python.__code__.co_filename.rsplit('/', 1)[-1]}:{first + line - 1} ({name})"
    except (TypeError, OSError, StopIteration):  # a helper from another module: relative line
        place = f"{name}, line {line} from its def"
    return f"{place} `{code}`"


def _mma_kind(ptx: str) -> str | None:
    kinds = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if op in ptx]
    return "+".join(kinds) or None


_GLOBAL_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def _load_bytes(ptx: str) -> dict[int, int]:
    widths: dict[int, int] = {}
    for vector, bits in _GLOBAL_LOAD.findall(ptx):
        width = int(vector or 1) * int(bits) // 8
        widths[width] = widths.get(width, 0) + 1
    return dict(sorted(widths.items()))


# One cuobjdump SASS line: "/*0a70*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" (Triton's own
# listing, `asm["sass"]`, stops at four-digit addresses: 4096 instructions).
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


def _sass_counts(compiled) -> dict[str, int | None]:
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin.name], check=True,
                                  capture_output=True, text=True).stdout
    except Exception:  # noqa: BLE001 - no cuobjdump: the counts are unknown, not an error
        return {"sass_instructions": None, "barriers": None}
    opcodes = _SASS_LINE.findall(sass)
    return {"sass_instructions": sum(op != "NOP" for op in opcodes),
            "barriers": sum(op.startswith("BAR") for op in opcodes)}


class _TargetOnlyDriver:
    """The parts of Triton's active driver that compiling (not launching) asks for."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def compile_only(arch: int = 90, *, warm_cache: bool = False) -> Iterator[CompileRecorder]:
    """Within: launches through `recorder.wrap` compile for sm_`arch` and record, not run.

    Triton's driver is replaced by a stand-in that names the target, and every kernel's
    in-memory cache of compiled code and target is restored on exit, so nothing compiled
    here is launched by this process. Triton's disk cache is a temporary one (a cached
    kernel prints no ptxas log), unless `warm_cache`: then the binaries go to Triton's own
    cache, where a later launch of the same specialization on an sm_`arch` GPU finds them
    (ptxas counts then only for what was not cached yet).
    """
    from . import pool_norm, pooled_attention

    kernels = [*pooled_attention._KERNELS.values(), *pool_norm._KERNELS.values()]
    saved_caches = [(k, k.device_caches) for k in kernels if isinstance(k, triton.runtime.JITFunction)]
    saved_driver = driver._active
    saved_log, saved_dir = knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    token = COMPILE_ONLY_ARCH.set(arch)
    with tempfile.TemporaryDirectory(prefix="mvit_fast_compile_") as cache_dir:
        try:
            for kernel, caches in saved_caches:
                kernel.device_caches = type(caches)(kernel.create_binder)
            driver.set_active(_TargetOnlyDriver(arch))
            knobs.nvidia.dump_ptxas_log = True
            if not warm_cache:
                knobs.cache.dir = cache_dir
            yield CompileRecorder(arch)
        finally:
            COMPILE_ONLY_ARCH.reset(token)
            driver._active = saved_driver
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir = saved_log, saved_dir
            for kernel, caches in saved_caches:
                kernel.device_caches = caches
