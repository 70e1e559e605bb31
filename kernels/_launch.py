"""Launch settings shared by the kernels: interpreter detection and pinned configs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

# CUDA grids: at most 65535 programs on axes 1 and 2. Both kernels put batch x heads on axis 1.
MAX_BATCH_HEADS = 65535


def is_interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter.

    triton.jit decides at decoration time (TRITON_INTERPRET set before triton's import),
    so ask the kernel, not the environment of the call.
    """
    return not isinstance(kernel, triton.runtime.JITFunction)


def pinned_config(env: str, required: Sequence[str], defaults: Mapping[str, int],
                  fallback: Mapping[str, int] | None) -> dict[str, int] | None:
    """A fixed launch config from the variable `env` ("BLOCK_M=64,num_warps=4"), else `fallback`.

    None means: let the autotuner choose. Tests and the interpreter pin one config.
    """
    spec = os.environ.get(env)
    if not spec:
        return dict(fallback) if fallback is not None else None
    try:
        cfg = {key.strip(): int(val) for key, val in (item.split("=") for item in spec.split(","))}
    except ValueError as err:
        raise ValueError(f"{env}={spec!r}: expected NAME=integer items joined by commas, "
                         f"e.g. {','.join(f'{k}=64' for k in required)},num_warps=4") from err
    missing = sorted(set(required) - cfg.keys())
    if missing:
        raise ValueError(f"{env}={spec!r} lacks {missing}")
    return {**defaults, **cfg}


# The target architecture while `compile_only.compile_only` compiles launches instead of
# running them (the launchers' device checks then accept CPU tensors); None otherwise.
COMPILE_ONLY_ARCH: ContextVar[int | None] = ContextVar("mvit_fast_compile_only_arch", default=None)


def compiling_only() -> bool:
    """Whether launches compile without running (inside `compile_only.compile_only`)."""
    return COMPILE_ONLY_ARCH.get() is not None


# Row alignment. Triton hints an int argument only when it is divisible by 16, so at a head
# dim of 72 (MViTv2-L) nothing proves a (rows, d) tile of a contiguous tensor 16-byte aligned:
# the row stride 72, the head stride N * 72 and D = 72 are multiples of 8 only, and
# tl.multiple_of is dropped on kernel arguments. Every access then compiles to scalar loads
# (and, from the extra address registers, spills). A kernel given ROW_ALIGN = 8 (`row_align`,
# checked by its launcher) rebuilds its offsets, row strides and D as x // 8 * 8, which the
# alignment analysis sees as multiples of 8 (the mask `cols < D` then constant in groups of
# 8); ROW_ALIGN = 1 leaves the code as it was.
@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """x (an offset, row stride or D; a multiple of ALIGN) in a form the compiler sees is one."""
    if ALIGN > 1:
        x = x // ALIGN * ALIGN
    return x


def row_align(*xs: torch.Tensor) -> int:
    """ROW_ALIGN for a kernel that reads or writes the tensors `xs` along their last dim d (that
    of xs[0]): 8 where each has unit last stride and d and every other stride are multiples of 8
    but not all of 16 (those Triton's own specialization proves aligned); else 1."""
    ints = [xs[0].shape[-1], *(s for x in xs for s in x.stride()[:-1])]
    if any(x.stride(-1) != 1 for x in xs) or any(n % 8 for n in ints):
        return 1
    return 1 if all(n % 16 == 0 for n in ints) else 8
