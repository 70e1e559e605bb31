"""mvit-fast: exact MViTv2 for video with fused pooling-attention kernels."""

from .attention import MultiScaleAttention, pooled_attention
from .checkpoint import load_checkpoint
from .config import BlockSpec, MViTConfig, block_specs, get_config
from .model import MViT, build_model

__version__ = "0.1.0"

__all__ = [
    "BlockSpec",
    "MViT",
    "MViTConfig",
    "MultiScaleAttention",
    "block_specs",
    "build_model",
    "get_config",
    "load_checkpoint",
    "pooled_attention",
]
