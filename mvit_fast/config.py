"""MViTv2 architecture as one frozen config, and the per-block settings derived from it.

Every block's dims, heads, strides, token grids and rel-pos table lengths come from
`block_specs(cfg)`: the model, the tests and the benchmarks all read them from there.
The derivation follows SlowFast's `MViT.__init__` for the MViTv2 video configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

Triple = tuple[int, int, int]

SIZES = ("s", "b", "l")
DATASETS = {"k400": 400, "ssv2": 174}


@dataclass(frozen=True)
class MViTConfig:
    """MViTv2 for video. Defaults are MViTv2-S 16x4 on Kinetics-400."""

    depths: tuple[int, ...] = (1, 2, 11, 2)  # blocks per stage
    embed_dim: int = 96
    num_heads: int = 1
    num_frames: int = 16
    crop_size: int = 224
    num_classes: int = 400
    in_chans: int = 3
    patch_kernel: Triple = (3, 7, 7)
    patch_stride: Triple = (2, 4, 4)
    patch_padding: Triple = (1, 3, 3)
    pool_kernel: Triple = (3, 3, 3)  # q, k and v pooling kernel, in every block
    stage_q_stride: Triple = (1, 2, 2)  # q stride of each stage's first block (after stage 0)
    kv_stride_adaptive: Triple = (1, 8, 8)  # kv stride of block 0, divided by every q stride
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    rel_pos_spatial: bool = True
    rel_pos_temporal: bool = True
    residual_pooling: bool = True
    drop_path_rate: float = 0.2
    head_dropout: float = 0.5
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("embed_dim", "num_heads", "num_frames", "crop_size", "num_classes", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be blocks per stage, each >= 1, got {self.depths}")
        triples = ("patch_kernel", "patch_stride", "patch_padding", "pool_kernel", "stage_q_stride",
                   "kv_stride_adaptive")
        for name in triples:
            value = getattr(self, name)
            if len(value) != 3 or min(value) < (0 if name == "patch_padding" else 1):
                raise ValueError(f"{name} must be three sizes (T, H, W), got {value}")
        if any(k % 2 == 0 for k in self.pool_kernel):
            raise ValueError(f"pool_kernel must be odd (its padding k // 2 keeps the grid), got "
                             f"{self.pool_kernel}")
        if not (0 <= self.drop_path_rate < 1 and 0 <= self.head_dropout < 1 and self.norm_eps > 0):
            raise ValueError(f"drop_path_rate and head_dropout must be in [0, 1) and norm_eps > 0, got "
                             f"{self.drop_path_rate}, {self.head_dropout}, {self.norm_eps}")

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the clip this config is sized for."""
        return (self.in_chans, self.num_frames, self.crop_size, self.crop_size)

    @property
    def patch_grid(self) -> Triple:
        """Token grid (T, H, W) after the stem at the configured input."""
        size = (self.num_frames, self.crop_size, self.crop_size)
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - k) // s + 1
            for n, k, s, p in zip(size, self.patch_kernel, self.patch_stride, self.patch_padding)
        )


# Presets as deltas from the default; drop path per dataset from SlowFast's released configs
# (configs/{Kinetics,SSv2}/MVITv2_*.yaml: SSv2-B uses 0.4, where mmaction2's port uses 0.3).
_PRESETS: dict[str, dict] = {
    "s": dict(depths=(1, 2, 11, 2)),
    "b": dict(depths=(2, 3, 16, 3), num_frames=32),
    "l": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, num_frames=40, crop_size=312),
}
_DROP_PATH = {("s", "k400"): 0.2, ("s", "ssv2"): 0.4, ("b", "k400"): 0.3, ("b", "ssv2"): 0.4,
              ("l", "k400"): 0.75, ("l", "ssv2"): 0.75}


def from_saved(cls, saved: Mapping):
    """`cls(**saved)` for a dataclass saved as JSON or in a checkpoint: lists back to tuples,
    entries `cls` has no field for dropped (fields newer than the file keep their defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})


def get_config(size: str = "s", dataset: str = "k400", **overrides) -> MViTConfig:
    """The published MViTv2 config for `size` ("s", "b", "l") and `dataset` ("k400", "ssv2")."""
    if size not in _PRESETS:
        raise ValueError(f"unknown MViTv2 size {size!r}: expected one of {SIZES}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {tuple(DATASETS)}")
    fields = {f.name for f in dataclasses.fields(MViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}: expected some of {sorted(fields)}")
    kwargs = dict(_PRESETS[size], num_classes=DATASETS[dataset],
                  drop_path_rate=_DROP_PATH[size, dataset])
    kwargs.update(overrides)
    return MViTConfig(**kwargs)


@dataclass(frozen=True)
class BlockSpec:
    """Everything one MViTv2 block needs, at the config's input size.

    Grids are (T, H, W) token grids without the cls token. `table_grid` is the
    block-input size SlowFast sizes the rel-pos tables from: it propagates with
    floor division (`size // stride`) while the pooling convs round up, so for
    L at 312 the stored tables are shorter than the grids need and get
    interpolated on every forward, exactly as in the official model. It starts from
    the patch embedding's grid, as mmaction2's; SlowFast's starts from the clip size over
    the patch stride, the same grid wherever the stride divides the clip (every published
    size; SlowFast and torchvision run no other).
    """

    index: int
    stage: int
    dim_in: int
    dim_out: int
    num_heads: int
    head_dim: int
    kernel: Triple
    stride_q: Triple
    stride_kv: Triple
    input_grid: Triple
    q_grid: Triple
    kv_grid: Triple
    table_grid: Triple
    rel_pos_t_len: int
    rel_pos_hw_len: int
    drop_path: float

    @property
    def q_tokens(self) -> int:
        return 1 + _prod(self.q_grid)

    @property
    def kv_tokens(self) -> int:
        return 1 + _prod(self.kv_grid)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def pooled_grid(grid: Triple, kernel: Triple, stride: Triple) -> Triple:
    """Output grid of a pooling conv with padding kernel // 2 (rounds up for kernel 3)."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride))  # type: ignore[return-value]


def block_specs(cfg: MViTConfig) -> list[BlockSpec]:
    """Per-block settings of `cfg` at its configured input size (SlowFast's derivation)."""
    depth = cfg.depth
    drop_path = [cfg.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    stage_starts = {sum(cfg.depths[:i]) for i in range(1, len(cfg.depths))}
    specs = []
    dim, heads, stage = cfg.embed_dim, cfg.num_heads, 0
    stride_kv = cfg.kv_stride_adaptive
    grid = table_grid = cfg.patch_grid
    for i in range(depth):
        if i in stage_starts:  # dim and heads double together with the q stride
            stage, heads, dim_out, stride_q = stage + 1, heads * 2, dim * 2, cfg.stage_q_stride
        else:
            dim_out, stride_q = dim, (1, 1, 1)
        stride_kv = tuple(max(s // q, 1) for s, q in zip(stride_kv, stride_q))
        q_grid = pooled_grid(grid, cfg.pool_kernel, stride_q)
        kv_grid = pooled_grid(grid, cfg.pool_kernel, stride_kv)
        hw = table_grid[1]
        if (cfg.rel_pos_spatial and min(table_grid[1:]) < 1) or (cfg.rel_pos_temporal and table_grid[0] < 1):
            raise ValueError(
                f"crop_size {cfg.crop_size} x num_frames {cfg.num_frames} is too small for this "
                f"architecture: block {i}'s rel-pos tables would be sized for a {table_grid} grid "
                f"(the patch grid {cfg.patch_grid} floor-divided by the q strides, as in SlowFast)")
        specs.append(BlockSpec(
            index=i, stage=stage, dim_in=dim, dim_out=dim_out, num_heads=heads,
            head_dim=dim_out // heads, kernel=cfg.pool_kernel, stride_q=stride_q,
            stride_kv=stride_kv, input_grid=grid, q_grid=q_grid, kv_grid=kv_grid,
            table_grid=table_grid, rel_pos_t_len=2 * table_grid[0] - 1,
            rel_pos_hw_len=2 * max(hw // stride_q[1], hw // stride_kv[1]) - 1,
            drop_path=drop_path[i]))
        grid = q_grid
        table_grid = tuple(n // s for n, s in zip(table_grid, stride_q))
        dim = dim_out
    return specs
