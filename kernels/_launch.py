"""Launch settings shared by the kernels: interpreter detection and pinned configs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar

import triton


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
