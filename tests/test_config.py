"""Architecture derivation: parameter counts, per-block shapes, rel-pos table sizes."""

import pytest
import torch

import mvit_fast
from mvit_fast import block_specs, get_config


@pytest.mark.parametrize("size, dataset, params", [
    ("s", "k400", 34_537_744),
    ("s", "ssv2", 34_363_950),
    ("b", "k400", 51_230_128),
    ("b", "ssv2", 51_056_334),
    ("l", "k400", 213_390_112),
    ("l", "ssv2", 213_129_534),
])
def test_parameter_counts_match_slowfast(size, dataset, params):
    with torch.device("meta"):
        model = mvit_fast.build_model(size, dataset)
    assert sum(p.numel() for p in model.parameters()) == params


def test_s_block_shapes_match_design_list():
    # DESIGN section 3: (heads, q tokens, k tokens) per block of MViTv2-S at 16x224.
    expected = ([(1, 25089, 393), (2, 6273, 1569), (2, 6273, 393), (4, 1569, 1569)]
                + [(4, 1569, 393)] * 10 + [(8, 393, 1569), (8, 393, 393)])
    specs = block_specs(get_config("s"))
    assert [(s.num_heads, s.q_tokens, s.kv_tokens) for s in specs] == expected
    assert {s.head_dim for s in specs} == {96}
    assert all(s.kv_grid[0] == 8 for s in specs)
    assert [s.kv_grid[1] for s in specs] == [7, 14, 7, 14] + [7] * 10 + [14, 7]


@pytest.mark.parametrize("size, dims, starts", [
    ("s", (96, 192, 384, 768), (1, 3, 14)),
    ("b", (96, 192, 384, 768), (2, 5, 21)),
    ("l", (144, 288, 576, 1152), (2, 8, 44)),
])
def test_stage_changes(size, dims, starts):
    specs = block_specs(get_config(size))
    changes = [s.index for s in specs if s.dim_in != s.dim_out]
    assert tuple(changes) == starts
    assert all(specs[i].stride_q == (1, 2, 2) for i in starts)
    assert sorted({s.dim_out for s in specs}) == list(dims)
    assert {s.head_dim for s in specs} == {dims[0] // get_config(size).num_heads}
    # kv stride adapts: (1,8,8) -> (1,4,4) -> (1,2,2) -> (1,1,1)
    assert [specs[i].stride_kv for i in (0, *starts)] == [(1, 8, 8), (1, 4, 4), (1, 2, 2), (1, 1, 1)]


def test_l_at_312_tables_use_floor_while_grids_use_ceil():
    specs = block_specs(get_config("l"))
    assert specs[0].q_grid == (20, 78, 78) and specs[0].kv_grid == (20, 10, 10)
    stage3 = [s for s in specs if s.stage == 2]
    assert {s.q_grid[1] for s in stage3} == {20}  # conv: ceil(39 / 2)
    assert stage3[0].rel_pos_hw_len == 37  # table: 2 * (39 // 2) - 1, interpolated to 39
    assert {s.rel_pos_hw_len for s in stage3[1:]} == {37}
    assert {s.rel_pos_t_len for s in specs} == {39}


@pytest.mark.parametrize("size", ["s", "l"])
def test_model_tables_have_spec_lengths(size):
    with torch.device("meta"):
        model = mvit_fast.build_model(size)
    for spec, blk in zip(block_specs(model.cfg), model.blocks):
        assert blk.attn.rel_pos_t.shape == (spec.rel_pos_t_len, spec.head_dim)
        assert blk.attn.rel_pos_h.shape == (spec.rel_pos_hw_len, spec.head_dim)


def test_model_grids_follow_specs_at_another_input_size():
    cfg = get_config("s", num_frames=6, crop_size=52, num_classes=5)  # odd grids: 3x13x13
    model = mvit_fast.MViT(cfg).eval()
    seen = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda m, args, out: seen.append(tuple(out[1])))
    model(torch.randn(1, *cfg.input_shape))
    assert seen == [s.q_grid for s in block_specs(cfg)]


@pytest.mark.parametrize("size, k400, ssv2", [("s", 0.2, 0.4), ("b", 0.3, 0.4), ("l", 0.75, 0.75)])
def test_drop_path_rates_are_slowfasts(size, k400, ssv2):
    assert (get_config(size, "k400").drop_path_rate, get_config(size, "ssv2").drop_path_rate) == (k400, ssv2)


def test_drop_path_is_linear_over_depth():
    specs = block_specs(get_config("b", "k400"))
    rates = [s.drop_path for s in specs]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx(torch.linspace(0, 0.3, 24).tolist())


@pytest.mark.parametrize("kwargs, match", [
    (dict(size="xl"), "unknown MViTv2 size"),
    (dict(size="s", dataset="imagenet"), "unknown dataset"),
    (dict(size="s", heads=3), "unknown config field"),
])
def test_bad_config_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mvit_fast.build_model(**kwargs)


@pytest.mark.parametrize("override,message", [
    (dict(num_classes=0), "num_classes must be >= 1, got 0"),
    (dict(num_heads=0), "num_heads must be >= 1"),
    (dict(depths=()), "depths must be blocks per stage"),
    (dict(kv_stride_adaptive=(1, 2)), r"kv_stride_adaptive must be three sizes \(T, H, W\), got \(1, 2\)"),
    (dict(pool_kernel=(2, 2, 2)), "pool_kernel must be odd"),
    (dict(drop_path_rate=1.0), r"drop_path_rate and head_dropout must be in \[0, 1\)"),
    (dict(norm_eps=-1.0), "norm_eps > 0"),
])
def test_invalid_config_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        get_config("s", **override)


def test_a_clip_too_small_for_the_rel_pos_tables_is_refused():
    # 8 px: a 2x2 patch grid that the 3 spatial q strides floor to 0 (SlowFast's table sizes)
    with pytest.raises(ValueError, match=r"crop_size 8 x num_frames 4 is too small .* block 4"):
        mvit_fast.build_model("s", crop_size=8, num_frames=4)
    mvit_fast.build_model("s", crop_size=8, num_frames=4, rel_pos_spatial=False)  # no tables to size
