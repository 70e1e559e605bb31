"""The benchmark's shape derivation reproduces DESIGN section 3's MViTv2-S shape list."""

from __future__ import annotations

from bench.conftest import SUITES, attention_flops, attention_shapes
from mvit_fast.config import get_config


def test_mvit_s_shapes_match_design():
    shapes = attention_shapes(get_config("s"))
    got = [(s.blocks, s.heads, s.nq, s.nk) for s in shapes]
    assert got == [
        ((0,), 1, 25089, 393),
        ((1,), 2, 6273, 1569),
        ((2,), 2, 6273, 393),
        ((3,), 4, 1569, 1569),
        (tuple(range(4, 14)), 4, 1569, 393),
        ((14,), 8, 393, 1569),
        ((15,), 8, 393, 393),
    ]
    assert {s.head_dim for s in shapes} == {96}
    assert {(s.kv_grid[0], s.kv_grid[1]) for s in shapes} == {(8, 7), (8, 14)}  # Kt = 8, Kh = 7 or 14


def test_every_block_in_exactly_one_shape():
    for cfg, _ in SUITES.values():
        blocks = sorted(b for s in attention_shapes(cfg) for b in s.blocks)
        assert blocks == list(range(cfg.depth))


def test_flops_block0():
    """DESIGN's roofline: S block 0 is 3.78 GFLOP per clip forward (4 * 25089 * 393 * 96 = 3.786e9)."""
    block0 = attention_shapes(get_config("s"))[0]
    assert attention_flops(block0, batch=1, mode="fwd") == 4 * 25089 * 393 * 96
    assert attention_flops(block0, batch=8, mode="fwd+bwd") == 2.5 * 8 * attention_flops(block0, 1, "fwd")
