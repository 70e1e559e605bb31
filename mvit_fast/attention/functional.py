"""`pooled_attention`: steps 3-6 of MViTv2 attention behind one API, many backends."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

from torch import Tensor

from . import autotune
from .peers import flex_rel_pos_attention, sdpa_attention, sdpa_aug_attention
from .reference import eager_attention

try:
    from .fused import triton_attention, triton_takes
except ImportError:  # triton is a Linux-only dependency
    triton_attention = triton_takes = None

__all__ = ["BACKENDS", "pooled_attention"]

# name -> implementation(q, k, v, q_thw, k_thw, rel_t, rel_h, rel_w, has_cls, residual, scale)
BACKENDS: dict[str, Callable[..., Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_rel_pos_attention,
    "sdpa_aug": sdpa_aug_attention,
}
if triton_attention is not None:
    BACKENDS["triton"] = triton_attention


def _resolve_backend(backend: str, args: tuple) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: expected 'auto' or one of "
                         f"{sorted(BACKENDS)}")
    if args[0].numel() == 0:
        # An empty batch (or no heads): nothing to compute or tune. The reference returns the
        # empty output and zero table gradients; kernel grids and flex's block mask cannot be empty.
        return "eager"
    if backend == "auto":
        q, _, _, _, k_thw, *tables = args[:8]
        candidates = BACKENDS
        if triton_takes is not None and not triton_takes(q, k_thw, tables):  # not even as a default
            candidates = {name: fn for name, fn in BACKENDS.items() if name != "triton"}
        return autotune.choose(candidates, args)
    return backend


def _check_inputs(q, k, v, q_thw, k_thw, tables, has_cls, residual_pooling, scale):
    for name, flag in (("has_cls", has_cls), ("residual_pooling", residual_pooling)):
        if not isinstance(flag, bool):  # a truthy string would silently change the math
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, N, head_dim), got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("expected q (B, heads, Nq, d) and k, v (B, heads, Nk, d), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")
    for name, thw, n in (("q_thw", q_thw, q.shape[2]), ("k_thw", k_thw, k.shape[2])):
        if len(thw) != 3 or any(isinstance(x, bool) or int(x) != x or x < 1 for x in thw):
            raise ValueError(f"{name} must be three positive sizes (T, H, W), got {tuple(thw)}")
        expected = int(has_cls) + thw[0] * thw[1] * thw[2]
        if n != expected:
            raise ValueError(f"{name}={tuple(thw)} with has_cls={has_cls} means {expected} tokens, "
                             f"but the tensor has {n}")
    for name, table in zip(("rel_pos_t", "rel_pos_h", "rel_pos_w"), tables):
        if table is None:
            continue
        if not isinstance(table, Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(table).__name__}")
        if table.ndim != 2 or table.shape[1] != q.shape[-1] or table.shape[0] < 1:
            raise ValueError(f"{name} must be (L, head_dim={q.shape[-1]}), got {tuple(table.shape)}")
        if not table.is_floating_point() or table.device != q.device:
            raise TypeError(f"{name} must be a floating-point tensor on {q.device}, "
                            f"got {table.dtype} on {table.device}")


def pooled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    rel_pos_t: Tensor | None = None,
    rel_pos_h: Tensor | None = None,
    rel_pos_w: Tensor | None = None,
    *,
    has_cls: bool = True,
    residual_pooling: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """MViTv2 pooling attention on pooled, normed q, k, v.

    Args:
        q: (B, heads, Nq, d) pooled and normed queries, Nq = has_cls + prod(q_thw).
        k, v: (B, heads, Nk, d) pooled and normed keys and values, Nk = has_cls + prod(k_thw).
        q_thw, k_thw: the (T, H, W) token grids of q and k (keys are t-major).
        rel_pos_t, rel_pos_h, rel_pos_w: raw rel-pos parameter tables (L, d) of any length,
            interpolated when L != 2*max(q, k)-1 along that axis; None disables that axis.
        has_cls: token 0 is a cls token: it gets no bias and no residual.
        residual_pooling: add the (unscaled) pooled q to the output, cls row excluded.
        scale: score scale; None means d**-0.5. The bias uses the unscaled q.
        backend: one of `BACKENDS` ("eager" is the materialized reference), or "auto": the
            fastest backend measured on the first call with this device, dtype and shape
            (forward, or forward + backward when gradients are needed), remembered on disk;
            see `mvit_fast.attention.autotune`.

    Returns:
        (B, heads, Nq, d) in q's dtype.
    """
    tables = (rel_pos_t, rel_pos_h, rel_pos_w)
    _check_inputs(q, k, v, q_thw, k_thw, tables, has_cls, residual_pooling, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, tuple(int(x) for x in q_thw), tuple(int(x) for x in k_thw), *tables, has_cls,
            residual_pooling, scale)
    return BACKENDS[_resolve_backend(backend, args)](*args)
