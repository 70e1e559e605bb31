"""Checkpoint formats: key mapping round trips, interpolation, heads, errors, convert CLI."""

import os
from pathlib import Path

import pytest
import torch

import mvit_fast
from mvit_fast import load_checkpoint
from mvit_fast.checkpoint import (
    FORMATS,
    CheckpointReadError,
    atomic_save,
    detect_format,
    export_state_dict,
    read_checkpoint,
    save_checkpoint,
)
from mvit_fast.convert import main as convert_main

# Every stage and dim change of MViTv2, at a width that builds in milliseconds.
MINI = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1, num_frames=4, crop_size=32)
CONTAINERS = {"slowfast": "model_state", "mmaction2": "state_dict"}

# Keys as each home codebase names them (one per mapping rule).
FOREIGN_KEYS = {
    "slowfast": ["patch_embed.proj.weight", "cls_token", "blocks.1.attn.pool_q.weight",
                 "blocks.1.attn.norm_q.weight", "blocks.1.mlp.fc1.weight", "blocks.1.proj.weight",
                 "head.projection.weight", "norm.weight"],
    "mmaction2": ["backbone.patch_embed.projection.weight", "backbone.cls_token",
                  "backbone.blocks.1.attn.pool_q.weight", "backbone.blocks.1.attn.norm_q.weight",
                  "backbone.blocks.1.mlp.fc1.weight", "backbone.blocks.1.proj.weight",
                  "cls_head.fc_cls.weight", "backbone.norm3.weight"],
    "torchvision": ["conv_proj.weight", "pos_encoding.class_token",
                    "blocks.1.attn.pool_q.pool.weight", "blocks.1.attn.pool_q.norm_act.0.weight",
                    "blocks.1.mlp.0.weight", "blocks.1.project.weight", "head.1.weight", "norm.weight"],
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mvit_fast.build_model("s", **MINI).eval()


def _wrap(sd, fmt):
    return {CONTAINERS[fmt]: sd, "epoch": 3} if fmt in CONTAINERS else sd


@pytest.mark.parametrize("fmt", ["slowfast", "mmaction2", "torchvision"])
def test_foreign_key_names(model, fmt):
    sd = export_state_dict(model.state_dict(), fmt)
    assert set(FOREIGN_KEYS[fmt]) <= set(sd)
    assert detect_format(sd) == fmt
    if fmt == "torchvision":
        assert sd["pos_encoding.class_token"].shape == (16,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_a_file(model, fmt, tmp_path):
    path = tmp_path / f"ckpt_{fmt}.pt"
    if fmt == "mvit_fast":
        save_checkpoint(path, model, epoch=3)
    else:
        torch.save(_wrap(export_state_dict(model.state_dict(), fmt), fmt), path)
    fresh = mvit_fast.build_model("s", **MINI).eval()
    report = load_checkpoint(fresh, path)
    assert report.format == fmt
    assert not (report.missing or report.unexpected or report.interpolated or report.reinitialized)
    assert len(report.loaded) == len(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(clip), model(clip))


def test_ddp_prefix_is_stripped(model):
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert load_checkpoint(mvit_fast.build_model("s", **MINI), {"model_state": sd}).format == "slowfast"


def test_k400_into_ssv2_needs_reinit_head(model):
    ssv2 = mvit_fast.build_model("s", "ssv2", **MINI)
    with pytest.raises(ValueError, match="reinit_head=True"):
        load_checkpoint(ssv2, model.state_dict())
    head_before = ssv2.head.projection.weight.clone()
    report = load_checkpoint(ssv2, model.state_dict(), reinit_head=True)
    assert report.reinitialized == ["head.projection.bias", "head.projection.weight"]
    assert torch.equal(ssv2.head.projection.weight, head_before)
    assert torch.equal(ssv2.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    assert "re-initialized (not loaded): head.projection.weight" in report.summary()
    # a backbone without a head (e.g. from pretraining) takes reinit_head too
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match=r"missing \['head.projection.bias', 'head.projection.weight'\]"):
        load_checkpoint(ssv2, backbone)
    report = load_checkpoint(ssv2, backbone, reinit_head=True)
    assert report.reinitialized == ["head.projection.bias", "head.projection.weight"] and not report.missing
    assert torch.equal(ssv2.head.projection.weight, head_before)


def test_rel_pos_tables_interpolate_to_another_input_size(model):
    bigger = mvit_fast.build_model("s", **{**MINI, "num_frames": 6, "crop_size": 48})
    report = load_checkpoint(bigger, model.state_dict())
    assert report.interpolated["blocks.0.attn.rel_pos_h"] == (15, 23)
    assert report.interpolated["blocks.0.attn.rel_pos_t"] == (3, 5)
    assert "interpolated: blocks.0.attn.rel_pos_h 15 -> 23 rows" in report.summary()


def test_strict_and_non_strict_reports(model):
    sd = dict(model.state_dict())
    del sd["blocks.2.attn.rel_pos_t"]
    sd["blocks.2.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['blocks.2.attn.rel_pos_t'\].*extra"):
        load_checkpoint(mvit_fast.build_model("s", **MINI), sd)
    report = load_checkpoint(mvit_fast.build_model("s", **MINI), sd, strict=False)
    assert report.missing == ["blocks.2.attn.rel_pos_t"]
    assert report.unexpected == ["blocks.2.attn.extra"]
    assert "left out (not in model): blocks.2.attn.extra" in report.summary()


def test_checkpoint_of_another_architecture(model):
    deeper = mvit_fast.build_model("s", **{**MINI, "depths": (1, 2, 2, 1)})
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(deeper, model.state_dict())
    wider = mvit_fast.build_model("s", **{**MINI, "embed_dim": 32})
    with pytest.raises(ValueError, match="another architecture"):
        load_checkpoint(wider, model.state_dict())
    # A head of another width is another architecture, not another class count.
    sd = dict(model.state_dict())
    sd["head.projection.weight"] = torch.zeros(sd["head.projection.weight"].shape[0], 3)
    for reinit_head in (False, True):
        with pytest.raises(ValueError, match="another architecture: head.projection.weight"):
            load_checkpoint(mvit_fast.build_model("s", **MINI), sd, reinit_head=reinit_head)


def test_our_checkpoints_config_must_match_where_the_tensors_cannot_tell(model, tmp_path):
    # k/v strides, residual pooling, norm eps: same tensors, another model
    save_checkpoint(tmp_path / "a.pt", model)
    for change in (dict(kv_stride_adaptive=(1, 4, 4)), dict(residual_pooling=False), dict(norm_eps=1e-5)):
        other = mvit_fast.build_model("s", **MINI, **change)
        ((name, value),) = change.items()
        with pytest.raises(ValueError, match=f"another architecture: its saved config has {name}="):
            load_checkpoint(other, tmp_path / "a.pt")
        report = load_checkpoint(other, tmp_path / "a.pt", strict=False)
        assert report.config_differs == {name: (getattr(model.cfg, name), value)}
        assert f"architecture differs: {name}" in report.summary()
    # the clip size, the classes and the regularization may differ
    other = mvit_fast.build_model("s", **{**MINI, "num_frames": 6, "crop_size": 48}, drop_path_rate=0.5,
                                  head_dropout=0.1)
    assert load_checkpoint(other, tmp_path / "a.pt").config_differs == {}
    assert load_checkpoint(other, model.state_dict()).config_differs == {}  # a bare state_dict: no config


def test_unreadable_inputs(tmp_path):
    model = mvit_fast.build_model("s", **MINI)
    with pytest.raises(FileNotFoundError, match="missing.pyth: no such file"):
        load_checkpoint(model, tmp_path / "missing.pyth")
    with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint file$"):
        load_checkpoint(model, tmp_path)
    save_checkpoint(tmp_path / "run" / "best.pt", model)
    with pytest.raises(FileNotFoundError, match=r"checkpoint file \(a run.s best weights: .*run/best.pt\)"):
        load_checkpoint(model, tmp_path / "run")
    with pytest.raises(ValueError, match="not a state_dict: the checkpoint's weights are a NoneType"):
        load_checkpoint(model, {"state_dict": None})
    (tmp_path / "garbage.pyth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="garbage.pyth is not a PyTorch checkpoint"):
        load_checkpoint(model, tmp_path / "garbage.pyth")
    torch.save({"model_state": model.state_dict()}, tmp_path / "whole.pyth")
    whole = (tmp_path / "whole.pyth").read_bytes()
    (tmp_path / "cut.pyth").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(CheckpointReadError, match=r"cut.pyth: truncated or corrupt \(PytorchStreamReader"):
        load_checkpoint(model, tmp_path / "cut.pyth")
    torch.save({"model_state": model.state_dict(), "cfg": Path("x")}, tmp_path / "pickled.pyth")
    with pytest.raises(CheckpointReadError, match=r"more than tensors .*PosixPath.* --allow-pickle"):
        load_checkpoint(model, tmp_path / "pickled.pyth")
    raw, fmt = read_checkpoint(tmp_path / "pickled.pyth", weights_only=False)
    assert raw.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="unrecognized checkpoint"):
        load_checkpoint(model, {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not tensors"):
        read_checkpoint({"model_state": {"a": 1}})


def test_saved_files_get_the_umasks_permissions_like_a_plain_open(tmp_path):
    """Checkpoints, converted files and --dump files go through atomic_save: a group that
    reads a run's logs reads its weights too, as it would a torch.save'd file."""
    previous = os.umask(0o027)
    try:
        atomic_save({"w": torch.zeros(2)}, tmp_path / "saved.pt")
        torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "saved.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plain.pt").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt", "saved.pt"]  # no temp file left


def test_convert_cli(model, tmp_path, capsys):
    src = tmp_path / "tv.pth"
    torch.save(export_state_dict(model.state_dict(), "torchvision"), src)
    assert convert_main([str(src), str(tmp_path / "ours.pt")]) == 0
    out = capsys.readouterr().out
    assert "depths (1, 2, 1, 1), width 16" in out and "format: torchvision" in out
    assert "every model tensor loaded" in out
    converted = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert converted["format"] == "mvit-fast"
    assert {k: converted["config"][k] for k in ("depths", "embed_dim", "num_frames", "crop_size")} == {
        "depths": (1, 2, 1, 1), "embed_dim": 16, "num_frames": 4, "crop_size": 32}
    assert convert_main([str(tmp_path / "ours.pt"), str(tmp_path / "mm.pth"), "--to", "mmaction2"]) == 0
    sd, fmt = read_checkpoint(tmp_path / "mm.pth")
    assert fmt == "mmaction2" and torch.equal(sd["cls_head.fc_cls.weight"], model.head.projection.weight)
    assert convert_main([str(tmp_path / "nope.pth"), str(tmp_path / "x.pt")]) == 2
    assert "nope.pth: no such file" in capsys.readouterr().err
    assert convert_main([str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert "is a folder, not a checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # refused before SRC is read
        convert_main([str(tmp_path / "nope.pth"), str(tmp_path)])
    assert exit_.value.code == 2
    assert f"cannot write {tmp_path}: {tmp_path} is a folder" in capsys.readouterr().err
    assert convert_main([str(src), str(tmp_path / "new" / "ours.pt")]) == 0  # folders are made
    pooling_less = {k: v for k, v in model.state_dict().items() if ".pool_" not in k}  # e.g. avg pooling
    torch.save(pooling_less, tmp_path / "avg.pt")
    assert convert_main([str(tmp_path / "avg.pt"), str(tmp_path / "y.pt")]) == 2
    assert "not an MViTv2 state_dict with conv pooling" in capsys.readouterr().err


def test_convert_keeps_the_config_and_recipe_of_our_checkpoints(tmp_path, capsys):
    from mvit_fast.config import MViTConfig

    torch.manual_seed(0)
    # unpooled k/v (as the quickstart model): the weights cannot show it, the saved config does
    narrow = mvit_fast.build_model("s", **MINI, kv_stride_adaptive=(1, 1, 1)).eval()
    save_checkpoint(tmp_path / "run.pt", narrow, recipe={"size": "s", "dataset": "synthetic"})
    assert convert_main([str(tmp_path / "run.pt"), str(tmp_path / "copy.pt")]) == 0
    out = capsys.readouterr().out
    assert "(its saved config)" in out and "format: mvit_fast" in out
    copy = torch.load(tmp_path / "copy.pt", weights_only=True)
    assert copy["config"]["kv_stride_adaptive"] == (1, 1, 1)
    assert copy["recipe"] == {"size": "s", "dataset": "synthetic"}
    rebuilt = mvit_fast.MViT(MViTConfig(**copy["config"])).eval()
    load_checkpoint(rebuilt, tmp_path / "copy.pt")
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(clip), narrow(clip))
    # a tensor the model has no place for is left out and named, not an error
    state = export_state_dict(narrow.state_dict(), "slowfast")
    torch.save({"model_state": {**state, "ema.decay": torch.ones(1)}}, tmp_path / "extra.pyth")
    assert convert_main([str(tmp_path / "extra.pyth"), str(tmp_path / "extra.pt")]) == 0
    out = capsys.readouterr().out
    assert "format: slowfast" in out and "left out (not in model): ema.decay" in out
    # a tensor the model needs and the checkpoint lacks is an error
    del state["norm.weight"]
    torch.save({"model_state": state}, tmp_path / "short.pyth")
    assert convert_main([str(tmp_path / "short.pyth"), str(tmp_path / "short.pt")]) == 2
    assert "short.pyth lacks tensors of the model it describes: ['norm.weight']" in capsys.readouterr().err


@pytest.mark.parametrize("size, dataset", [("s", "k400"), ("b", "ssv2"), ("l", "k400")])
def test_infer_config_recognizes_published_models(size, dataset):
    from mvit_fast.checkpoint import infer_config, preset_name

    with torch.device("meta"):
        model = mvit_fast.build_model(size, dataset)
    cfg = infer_config(model.state_dict())
    ref = mvit_fast.get_config(size, dataset)
    assert (cfg.depths, cfg.embed_dim, cfg.num_heads, cfg.num_classes, cfg.num_frames, cfg.crop_size) == (
        ref.depths, ref.embed_dim, ref.num_heads, ref.num_classes, ref.num_frames, ref.crop_size)
    assert preset_name(cfg) == f"MViTv2-{size.upper()}"
    assert cfg.drop_path_rate == ref.drop_path_rate  # the published regularization, not S-K400's


def test_model_built_on_meta_device_is_assigned(model, tmp_path):
    with torch.device("meta"):
        empty = mvit_fast.build_model("s", **MINI)
    load_checkpoint(empty, model.state_dict())
    assert not any(p.is_meta for p in empty.parameters())
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(empty.eval()(clip), model(clip))
    # the caller's tensors are copied: the two models do not share weights
    weight = model.blocks[0].attn.qkv.weight
    assert empty.blocks[0].attn.qkv.weight.data_ptr() != weight.data_ptr()
    # a half-precision checkpoint gives the float32 model a normal build would
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with torch.device("meta"):
        from_half = mvit_fast.build_model("s", **MINI)
    load_checkpoint(from_half, half)
    assert {p.dtype for p in from_half.parameters()} == {torch.float32}
    torch.save(half, tmp_path / "half.pt")
    with torch.device("meta"):
        from_file = mvit_fast.build_model("s", **MINI)
    load_checkpoint(from_file, tmp_path / "half.pt")
    pairs = zip(from_half.state_dict().values(), from_file.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    with torch.device("meta"):
        ssv2 = mvit_fast.build_model("s", "ssv2", **MINI)
    with pytest.raises(ValueError, match="meta device"):
        load_checkpoint(ssv2, model.state_dict(), reinit_head=True)


MEASURE_CONVERT = """
import sys
import mvit_fast.convert as convert

def rss_anon_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon:")).split()[1])

before, at_save = rss_anon_kb(), []
save = convert.save_checkpoint
convert.save_checkpoint = lambda *a, **k: (at_save.append(rss_anon_kb()), save(*a, **k))
assert convert.main(sys.argv[1:]) == 0
print(at_save[0] - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_convert_holds_one_copy_of_the_tensors_in_memory(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "s.pyth"  # MViTv2-S: 138 MB of fp32 tensors
    torch.save({"model_state": export_state_dict(mvit_fast.build_model("s").state_dict(), "slowfast")}, src)
    size_kb = src.stat().st_size / 1024
    grown_kb = int(subprocess.run([sys.executable, "-c", MEASURE_CONVERT, str(src), str(tmp_path / "s.pt")],
                                  capture_output=True, text=True, check=True).stdout.split()[-1])
    # the model's copy; the file's tensors are mapped (page cache), not read into process memory
    assert grown_kb < 1.4 * size_kb, (grown_kb, size_kb)
