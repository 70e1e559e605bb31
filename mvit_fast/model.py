"""MViTv2 for video, as SlowFast defines it (same modules, same state_dict keys).

    clip (B, 3, T, H, W) -> patch_embed -> [cls] + tokens -> blocks -> norm(cls) -> head -> logits

Block i's settings come from `block_specs(cfg)[i]`. The model returns logits in
training and evaluation alike (SlowFast's head applies a softmax in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import MultiScaleAttention, attention_pool
from .config import MViTConfig, block_specs, get_config

__all__ = ["MViT", "MultiScaleBlock", "build_model"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> tuple[Tensor, list[int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), list(x.shape[2:])


class MultiScaleBlock(nn.Module):
    """MViTv2 block with the dim change inside attention (SlowFast's dim_mul_in_att=True).

    x -> norm1 -> attn (pools q to the new grid) -> + skip -> norm2 -> mlp -> +
    The skip is proj(norm1(x)) when the dim changes, else x, max-pooled to the q grid
    when q is strided (kernel stride+1 on strided axes, cls token passed through).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, input_size: Sequence[int], *,
                 kernel: Sequence[int], stride_q: Sequence[int], stride_kv: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, rel_pos_spatial: bool = True,
                 rel_pos_temporal: bool = True, residual_pooling: bool = True,
                 has_cls: bool = True, backend: str = "auto", pool_backend: str = "auto") -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.has_cls = has_cls
        self.norm1 = norm_layer(dim)
        self.attn = MultiScaleAttention(
            dim, dim_out, input_size, num_heads=num_heads, qkv_bias=qkv_bias, kernel_q=kernel,
            kernel_kv=kernel, stride_q=stride_q, stride_kv=stride_kv, norm_layer=norm_layer,
            has_cls_embed=has_cls, rel_pos_spatial=rel_pos_spatial,
            rel_pos_temporal=rel_pos_temporal, residual_pooling=residual_pooling, backend=backend,
            pool_backend=pool_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        if any(s > 1 for s in stride_q):
            kernel_skip = [s + 1 if s > 1 else s for s in stride_q]
            self.pool_skip = nn.MaxPool3d(kernel_skip, stride_q, [k // 2 for k in kernel_skip],
                                          ceil_mode=False)
        else:
            self.pool_skip = None

    def forward(self, x: Tensor, thw: Sequence[int]) -> tuple[Tensor, list[int]]:
        x_norm = self.norm1(x)
        x_attn, q_thw = self.attn(x_norm, thw)
        skip = self.proj(x_norm) if hasattr(self, "proj") else x
        if self.pool_skip is not None:
            skip = attention_pool(skip, self.pool_skip, thw, self.has_cls)[0]
        x = skip + self.drop_path(x_attn)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, q_thw


class TransformerHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.dropout(x))


class MViT(nn.Module):
    """MViTv2 video classifier: (B, 3, T, H, W) float clip -> (B, num_classes) logits.

    Any T, H, W is accepted; rel-pos tables are interpolated to the grids a clip
    produces, as SlowFast does. `attention_backend` is passed to every block's
    `pooled_attention`; `pool_backend` picks every block's q/k/v pooling ("auto": follows
    the attention backend, "eager": the plain conv + LayerNorm ops, "triton": the fused
    kernel; see `MultiScaleAttention`); `checkpoint_activations` recomputes each block in
    backward.
    """

    def __init__(self, cfg: MViTConfig, *, attention_backend: str = "auto", pool_backend: str = "auto",
                 checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.checkpoint_activations = checkpoint_activations
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel,
                                      cfg.patch_stride, cfg.patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            MultiScaleBlock(
                s.dim_in, s.dim_out, s.num_heads, s.table_grid, kernel=s.kernel,
                stride_q=s.stride_q, stride_kv=s.stride_kv, mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias, drop_path=s.drop_path, norm_eps=cfg.norm_eps,
                rel_pos_spatial=cfg.rel_pos_spatial, rel_pos_temporal=cfg.rel_pos_temporal,
                residual_pooling=cfg.residual_pooling, backend=attention_backend,
                pool_backend=pool_backend)
            for s in block_specs(cfg))
        dim = self.blocks[-1].norm2.normalized_shape[0]
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head = TransformerHead(dim, cfg.num_classes, cfg.head_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SlowFast's init: trunc-normal(0.02) weights, Linear and LayerNorm biases 0.02,
        conv biases at PyTorch's default."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                if isinstance(m, nn.Conv3d):
                    m.reset_parameters()
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, MultiScaleAttention):
                for name in ("rel_pos_t", "rel_pos_h", "rel_pos_w"):
                    if hasattr(m, name):
                        nn.init.trunc_normal_(getattr(m, name), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def set_attention_backend(self, backend: str, pool_backend: str | None = None) -> None:
        """Switch every block's attention implementation and, unless `pool_backend` is None
        (keep each block's), its q/k/v pooling (weights untouched)."""
        for blk in self.blocks:
            blk.attn.backend = backend
            if pool_backend is not None:
                blk.attn.pool_backend = pool_backend

    def forward_features(self, clip: Tensor) -> Tensor:
        """The normed cls token, (B, dim)."""
        if not isinstance(clip, Tensor) or clip.ndim != 5 or clip.shape[1] != self.cfg.in_chans:
            shape = tuple(clip.shape) if isinstance(clip, Tensor) else type(clip).__name__
            raise ValueError(f"expected a clip of shape (B, {self.cfg.in_chans}, T, H, W), "
                             f"got {shape}")
        if not clip.is_floating_point():
            raise TypeError(f"expected a floating-point clip (normalized), got {clip.dtype}")
        x, thw = self.patch_embed(clip)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        for blk in self.blocks:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x, thw = checkpoint(blk, x, thw, use_reentrant=False)
            else:
                x, thw = blk(x, thw)
        return self.norm(x[:, 0])

    def forward(self, clip: Tensor) -> Tensor:
        return self.head(self.forward_features(clip))


def build_model(size: str = "s", dataset: str = "k400", *, attention_backend: str = "auto",
                pool_backend: str = "auto", checkpoint_activations: bool = False, **overrides) -> MViT:
    """MViTv2-S/B/L ("s", "b", "l") for "k400" (400 classes) or "ssv2" (174).

    `attention_backend`, `pool_backend` and `checkpoint_activations` are `MViT`'s; `overrides`
    replace fields of the published config (see `MViTConfig`), e.g.
    `num_frames=8, crop_size=160, num_classes=10, drop_path_rate=0.0`.
    """
    cfg = get_config(size, dataset, **overrides)
    return MViT(cfg, attention_backend=attention_backend, pool_backend=pool_backend,
                checkpoint_activations=checkpoint_activations)
