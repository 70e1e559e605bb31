"""`MultiScaleAttention`: a drop-in for SlowFast's module, on top of `pooled_attention`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import autotune
from .functional import BACKENDS, pooled_attention

try:
    from ..kernels.pool_norm import INTERPRETED, MAX_HEAD_DIM
    from .fused_pool import can_fuse_pool, fused_pool_qkv
except ImportError:  # triton is a Linux-only dependency
    INTERPRETED = MAX_HEAD_DIM = can_fuse_pool = fused_pool_qkv = None

__all__ = ["POOL_BACKENDS", "MultiScaleAttention", "attention_pool"]

# How `MultiScaleAttention` pools q, k and v (its `pool_backend`).
POOL_BACKENDS = ("auto", "eager", "triton")


def attention_pool(
    x: Tensor,
    pool: nn.Module | None,
    thw: Sequence[int],
    has_cls: bool = True,
    norm: nn.Module | None = None,
) -> tuple[Tensor, list[int]]:
    """Pool (B, heads, N, d) or (B, N, d) tokens on their (T, H, W) grid; the cls token
    skips the pool. Returns the pooled tokens in the input's layout and their grid.

    The norm, if any, runs over all tokens, cls included (SlowFast's `attention_pool`).
    """
    if pool is None:
        return x, list(thw)
    if x.ndim == 3:
        pooled, thw = attention_pool(x.unsqueeze(1), pool, thw, has_cls, norm)
        return pooled.squeeze(1), thw
    if x.ndim != 4:
        raise ValueError(f"attention_pool takes (B, heads, N, d) or (B, N, d) tokens, "
                         f"got shape {tuple(x.shape)}")
    batch, heads, tokens, dim = x.shape
    if tokens != int(has_cls) + math.prod(thw):
        raise ValueError(f"attention_pool: {tokens} tokens do not fit the grid {list(thw)}"
                         f"{' plus the cls token' if has_cls else ''}")
    cls_tok, x = (x[:, :, :1], x[:, :, 1:]) if has_cls else (None, x)
    # A dense copy, as SlowFast's `.contiguous()` but with dense strides on the size-1 axes
    # too. torch 2.13's CPU bf16 depthwise Conv3d returns a wrong weight gradient for a
    # channels-last input (off by its own magnitude, run to run). On a 1x1x1 grid the
    # permuted view already passes is_contiguous() (size-1 axes are not checked) with strides
    # of d on T, H and W, and torch's CUDA depthwise Conv3d (torch 2.11, any dtype) starts its
    # window at those strides but steps through it with the dense ones: the one in-grid tap
    # read another channel's value (the pooled token off by O(1)).
    x = x.reshape(batch * heads, *thw, dim).permute(0, 4, 1, 2, 3)
    x = x.clone(memory_format=torch.contiguous_format)
    x = pool(x)
    thw = list(x.shape[2:])
    x = x.reshape(batch, heads, dim, thw[0] * thw[1] * thw[2]).transpose(2, 3)
    if cls_tok is not None:
        x = torch.cat((cls_tok, x), dim=2)
    if norm is not None:
        x = norm(x)
    return x, thw


def _pool_qkv_eager(q: Tensor, k: Tensor, v: Tensor, thw: Sequence[int], has_cls: bool,
                    pools: Sequence[nn.Module | None], norms: Sequence[nn.Module | None]):
    """`attention_pool` of q, k and v (B, heads, N, d): (q, k, v, q_thw, kv_thw)."""
    q, q_thw = attention_pool(q, pools[0], thw, has_cls, norms[0])
    k, kv_thw = attention_pool(k, pools[1], thw, has_cls, norms[1])
    v, _ = attention_pool(v, pools[2], thw, has_cls, norms[2])
    return q, k, v, q_thw, kv_thw


def _pool_projection_eager(qkv: Tensor, thw: Sequence[int], has_cls: bool,
                           pools: Sequence[nn.Module | None], norms: Sequence[nn.Module | None]):
    """`_pool_qkv_eager` from the qkv projection's (B, N, 3, heads, d) layout, as `fused_pool_qkv`."""
    return _pool_qkv_eager(*qkv.permute(2, 0, 3, 1, 4).unbind(0), thw, has_cls, pools, norms)


class MultiScaleAttention(nn.Module):
    """Drop-in for `slowfast.models.attention.MultiScaleAttention` (MViTv1/v2).

    Same constructor arguments and state_dict keys, plus two keyword-only choices:
    `backend` picks the `pooled_attention` implementation; `pool_backend` picks how q, k
    and v are pooled and normed before it:

    - "auto": follows `backend`: the fused Triton conv + LayerNorm kernel (`fused_pool_qkv`)
      wherever it applies under "triton"; under "auto", on CUDA, whichever of it and the
      plain ops measured faster (`autotune.choose_pool`); the plain ops otherwise.
    - "eager": always the plain ops (nn.Conv3d / pooling + nn.LayerNorm, `attention_pool`).
    - "triton": always the fused kernel; raises where it cannot apply (see `can_fuse_pool`).

    Supported pooling modes: "conv", "avg", "max"; `pool_first=True` and mode
    "conv_unshared" raise NotImplementedError.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        input_size: Sequence[int],
        num_heads: int = 8,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        kernel_q: Sequence[int] = (1, 1, 1),
        kernel_kv: Sequence[int] = (1, 1, 1),
        stride_q: Sequence[int] = (1, 1, 1),
        stride_kv: Sequence[int] = (1, 1, 1),
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        has_cls_embed: bool = True,
        mode: str = "conv",
        pool_first: bool = False,
        rel_pos_spatial: bool = False,
        rel_pos_temporal: bool = False,
        rel_pos_zero_init: bool = False,
        residual_pooling: bool = False,
        separate_qkv: bool = False,
        *,
        backend: str = "auto",
        pool_backend: str = "auto",
    ) -> None:
        super().__init__()
        if pool_first:
            raise NotImplementedError("pool_first=True (MViTv1-style pooling before the qkv "
                                      "projection) is not supported")
        if mode not in ("conv", "avg", "max"):
            raise NotImplementedError(f"pooling mode {mode!r} is not supported: use 'conv', "
                                      "'avg' or 'max'")
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} is not divisible by num_heads={num_heads}")
        self.pool_first = pool_first
        self.separate_qkv = separate_qkv
        self.drop_rate = drop_rate
        self.num_heads = num_heads
        self.dim = dim
        self.dim_out = dim_out
        head_dim = dim_out // num_heads
        self.scale = head_dim ** -0.5
        self.has_cls_embed = bool(has_cls_embed)
        self.mode = mode
        self.residual_pooling = bool(residual_pooling)
        self.rel_pos_spatial = rel_pos_spatial
        self.rel_pos_temporal = rel_pos_temporal
        self.backend = backend
        self.pool_backend = pool_backend

        if separate_qkv:
            self.q = nn.Linear(dim, dim_out, bias=qkv_bias)
            self.k = nn.Linear(dim, dim_out, bias=qkv_bias)
            self.v = nn.Linear(dim, dim_out, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim_out * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        if drop_rate > 0.0:
            self.proj_drop = nn.Dropout(drop_rate)

        def prod(xs):
            out = 1
            for x in xs:
                out *= x
            return out

        # Kernel and stride 1 means no pooling at all (no conv, no norm), as in SlowFast.
        kernel_q = () if prod(kernel_q) == 1 and prod(stride_q) == 1 else tuple(kernel_q)
        kernel_kv = () if prod(kernel_kv) == 1 and prod(stride_kv) == 1 else tuple(kernel_kv)

        def make_pool(kernel, stride):
            if not kernel:
                return None, None
            padding = [k // 2 for k in kernel]
            if mode == "conv":
                conv = nn.Conv3d(head_dim, head_dim, kernel, stride=stride, padding=padding,
                                 groups=head_dim, bias=False)
                return conv, norm_layer(head_dim)
            pool_op = nn.MaxPool3d if mode == "max" else nn.AvgPool3d
            return pool_op(kernel, stride, padding, ceil_mode=False), None

        self.pool_q, norm_q = make_pool(kernel_q, stride_q)
        self.pool_k, norm_k = make_pool(kernel_kv, stride_kv)
        self.pool_v, norm_v = make_pool(kernel_kv, stride_kv)
        # Registered only when present, so the state_dict keys are SlowFast's.
        for name, norm in (("norm_q", norm_q), ("norm_k", norm_k), ("norm_v", norm_v)):
            if norm is not None:
                self.add_module(name, norm)

        if rel_pos_spatial:
            if input_size[1] != input_size[2]:
                raise ValueError(f"rel_pos_spatial needs a square input_size, got {tuple(input_size)}")
            size = input_size[1]
            q_size = size // stride_q[1] if len(stride_q) > 0 else size
            kv_size = size // stride_kv[1] if len(stride_kv) > 0 else size
            length = 2 * max(q_size, kv_size) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(length, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(length, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        if rel_pos_temporal:
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_t, std=0.02)

    @property
    def backend(self) -> str:
        """The `pooled_attention` implementation: "auto" or one of `functional.BACKENDS`."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        # Checked when set (constructor, `MViT.set_attention_backend`), not at the first forward.
        if value != "auto" and value not in BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}: expected 'auto' or one of "
                             f"{sorted(BACKENDS)}")
        self._backend = value

    @property
    def pool_backend(self) -> str:
        """How q, k and v are pooled: "auto", "eager" or "triton" (see the class docstring)."""
        return self._pool_backend

    @pool_backend.setter
    def pool_backend(self, value: str) -> None:
        # A setter, so a later switch (`MViT.set_attention_backend`) is checked like the constructor.
        if value not in POOL_BACKENDS:
            raise ValueError(f"unknown pool_backend {value!r}: expected one of {POOL_BACKENDS}")
        if value == "triton":
            if fused_pool_qkv is None:
                raise RuntimeError("pool_backend='triton' needs triton, which is not installed")
            if self.separate_qkv:
                raise ValueError("pool_backend='triton' needs the fused qkv projection: the kernel "
                                 "reads its (B, N, 3, heads, d) output, and separate_qkv=True has none")
        self._pool_backend = value

    def forward(self, x: Tensor, thw_shape: Sequence[int]) -> tuple[Tensor, list[int]]:
        """x (B, cls + T*H*W, dim) on the grid `thw_shape` -> (B, Nq, dim_out), q grid."""
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if len(thw_shape) != 3 or min(thw_shape) < 1:
            raise ValueError(f"thw_shape must be 3 sizes >= 1 (T, H, W), got {tuple(thw_shape)}")
        batch, n, _ = x.shape
        expected = int(self.has_cls_embed) + thw_shape[0] * thw_shape[1] * thw_shape[2]
        if n != expected:
            raise ValueError(f"x has {n} tokens but thw_shape={tuple(thw_shape)} with "
                             f"has_cls_embed={self.has_cls_embed} means {expected}")
        heads, head_dim = self.num_heads, self.dim_out // self.num_heads
        cls = self.has_cls_embed
        pools = (self.pool_q, self.pool_k, self.pool_v)
        norms = tuple(getattr(self, name, None) for name in ("norm_q", "norm_k", "norm_v"))
        if self.separate_qkv:
            q, k, v = (proj(x).reshape(batch, n, heads, head_dim).transpose(1, 2)
                       for proj in (self.q, self.k, self.v))
            q, k, v, q_shape, k_shape = _pool_qkv_eager(q, k, v, thw_shape, cls, pools, norms)
        else:
            qkv = self.qkv(x).reshape(batch, n, 3, heads, head_dim)
            if self._fused_pool(qkv, thw_shape, pools, norms):
                # One kernel per q/k/v: conv + LayerNorm straight from the projection's layout.
                q, k, v, q_shape, k_shape = fused_pool_qkv(qkv, thw_shape, cls, pools, norms)
            else:
                q, k, v, q_shape, k_shape = _pool_projection_eager(qkv, thw_shape, cls, pools, norms)
        x = pooled_attention(
            q, k, v, q_shape, k_shape,
            self.rel_pos_t if self.rel_pos_temporal else None,
            self.rel_pos_h if self.rel_pos_spatial else None,
            self.rel_pos_w if self.rel_pos_spatial else None,
            has_cls=cls, residual_pooling=self.residual_pooling, scale=self.scale,
            backend=self.backend)
        x = self.proj(x.transpose(1, 2).reshape(batch, x.shape[2], self.dim_out))
        if self.drop_rate > 0.0:
            x = self.proj_drop(x)
        return x, q_shape

    def _fused_pool(self, qkv: Tensor, thw: Sequence[int], pools: tuple, norms: tuple) -> bool:
        """Whether to pool with the fused Triton kernel rather than the plain ops: per
        `pool_backend`, as the class docstring lists."""
        if self.pool_backend == "eager":
            return False
        if self.pool_backend == "triton":
            self._check_fusable(qkv, pools, norms)
            return True
        # "auto": the choice follows `backend`
        if self.backend not in ("triton", "auto") or fused_pool_qkv is None:
            return False
        if not can_fuse_pool(pools, norms, qkv):
            return False
        if self.backend == "triton":
            return True
        if not qkv.is_cuda:  # under TRITON_INTERPRET=1 the kernel runs on the CPU, but only for tests
            return False
        params = [t for m in (*pools, *norms) for t in m.parameters()]
        geometry = (f"thw={'x'.join(map(str, thw))}|cls={int(self.has_cls_embed)}|strides="
                    + ",".join("x".join(map(str, p.stride)) for p in pools))
        candidates = {"eager": _pool_projection_eager, "triton": fused_pool_qkv}
        args = (thw, self.has_cls_embed, pools, norms)
        return autotune.choose_pool(candidates, qkv, args, params, geometry) == "triton"

    def _check_fusable(self, qkv: Tensor, pools: tuple, norms: tuple) -> None:
        """Raise, naming the reason, where `fused_pool_qkv` cannot pool qkv (pool_backend "triton")."""
        if can_fuse_pool(pools, norms, qkv):
            return
        if not (qkv.is_cuda or (INTERPRETED and qkv.device.type == "cpu")):
            raise RuntimeError(f"pool_backend='triton' got qkv on {qkv.device}: the fused pooling kernel "
                               "runs on CUDA (on the CPU only under TRITON_INTERPRET=1)")
        raise ValueError(
            f"pool_backend='triton' cannot pool this module (mode={self.mode!r}, qkv {qkv.dtype}): the "
            "fused kernel takes float32/float16/bfloat16 and conv pooling of q, k and v (depthwise, no "
            f"bias, kernel sizes 1 or 3, padding kernel // 2, head_dim <= {MAX_HEAD_DIM}) followed by "
            "affine LayerNorms of one eps; use pool_backend='auto' or 'eager'")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend: str = "auto",
                    pool_backend: str = "auto") -> MultiScaleAttention:
        """A copy of a SlowFast or mmaction2 MViTv2 `MultiScaleAttention`, weights included.

        Reads the geometry from the module's layers, so any instance of either
        codebase's class (same state_dict keys as ours) can be swapped in place: the copy
        has the module's device, dtype, train/eval mode and frozen parameters.
        `backend` and `pool_backend` are the new module's (see the class docstring).
        """
        sd = module.state_dict()
        pools = [getattr(module, f"pool_{x}", None) for x in "qkv"]
        if ("qkv.weight" not in sd or not hasattr(module, "num_heads")
                or any(p is not None and not isinstance(p, nn.Conv3d) for p in pools)):
            raise ValueError(f"{type(module).__name__} is not a conv-pooling MultiScaleAttention "
                             "with a fused qkv projection")
        # A tensor that is neither pooled nor strided has no pool layer (SlowFast sets it to None).
        (kernel_q, stride_q), (kernel_kv, stride_kv) = (
            (p.kernel_size, p.stride) if p is not None else ((1, 1, 1), (1, 1, 1)) for p in pools[:2])
        norms = [n for n in (getattr(module, f"norm_{x}", None) for x in "qkv") if n is not None]
        eps = norms[0].eps if norms else 1e-6
        dim_out = sd["proj.weight"].shape[0]
        has_cls = getattr(module, "has_cls_embed", getattr(module, "with_cls_token", True))
        rel_t = "rel_pos_t" in sd
        rel_sp = "rel_pos_h" in sd
        # Table lengths come from the state_dict itself, so input_size only needs to
        # reproduce them: T = (L_t + 1) / 2, and an H whose floor-divided sizes give L_hw.
        size = (sd["rel_pos_t"].shape[0] + 1) // 2 if rel_t else 1
        hw = 1
        if rel_sp:
            hw = (sd["rel_pos_h"].shape[0] + 1) // 2 * min(stride_q[1], stride_kv[1])
        new = cls(
            dim=sd["qkv.weight"].shape[1], dim_out=dim_out, input_size=(size, hw, hw),
            num_heads=module.num_heads, qkv_bias="qkv.bias" in sd,
            drop_rate=float(getattr(module, "drop_rate", 0.0)),
            kernel_q=kernel_q, kernel_kv=kernel_kv, stride_q=stride_q, stride_kv=stride_kv,
            norm_layer=lambda d: nn.LayerNorm(d, eps=eps),
            has_cls_embed=has_cls, rel_pos_spatial=rel_sp, rel_pos_temporal=rel_t,
            residual_pooling=bool(module.residual_pooling), backend=backend,
            pool_backend=pool_backend)
        weight = module.qkv.weight
        new = new.to(device=weight.device, dtype=weight.dtype)
        new.load_state_dict(sd)
        frozen = dict(module.named_parameters())
        for name, p in new.named_parameters():
            p.requires_grad_(frozen.get(name, p).requires_grad)
        return new.train(module.training)
