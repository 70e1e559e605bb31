"""FLOPs/params report: per-block counting equals fvcore on the whole model."""

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

import mvit_fast
from mvit_fast.report import count_model, flops_table, main


def test_per_block_count_equals_whole_model_count():
    cfg = mvit_fast.get_config("s", depths=(1, 2, 1, 1), embed_dim=16, num_frames=4, crop_size=32)
    model = mvit_fast.MViT(cfg, attention_backend="eager").eval()
    rows = count_model(model)
    whole = (FlopCountAnalysis(model, torch.zeros(1, *cfg.input_shape)).unsupported_ops_warnings(False)
             .uncalled_modules_warnings(False).tracer_warnings("none"))
    assert sum(r.macs for r in rows) == whole.total()
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert [r.name for r in rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    # fvcore counts the attention matmuls: the op is a real share of each stage
    assert all(0 < r.attention_op_macs < r.attention_macs < r.macs for r in rows[1:5])


def test_s_report_matches_the_published_table(capsys):
    assert main(["flops", "--sizes", "s"]) == 0
    out = capsys.readouterr().out
    assert "| total | 34,537,744 | 64.46 |" in out  # torchvision-built model under fvcore: 64.46G
    assert "Published: 64G, 34.5M; measured 64.46G (+0.71%)" in out


def test_flops_json_that_cannot_be_written_is_refused_before_counting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--json", str(tmp_path / "missing" / "flops.json")])
    assert exit_.value.code == 2 and "missing is not a folder" in capsys.readouterr().err


def test_table_format():
    rows = count_model(mvit_fast.MViT(mvit_fast.get_config(
        "s", depths=(1, 1, 1, 1), embed_dim=8, num_frames=2, crop_size=16)))
    table = flops_table("s", "k400", rows)
    assert table.splitlines()[2] == "| part | params | GFLOPs (MACs) | attention modules | attention op |"


def test_ssv2_is_held_against_the_ssv2_row_of_the_table():
    rows = count_model(mvit_fast.MViT(mvit_fast.get_config(
        "s", depths=(1, 1, 1, 1), embed_dim=8, num_frames=2, crop_size=16)))
    assert "Published: 64G, 34.4M;" in flops_table("s", "ssv2", rows)  # 174 classes, not 400
    assert "Published: 225G, 51.2M;" in flops_table("b", "k400", rows)


@pytest.mark.cuda
def test_counts_on_the_gpu_equal_the_cpus():
    cfg = mvit_fast.get_config("s", depths=(1, 1, 1, 1), embed_dim=8, num_frames=2, crop_size=16)
    cpu = count_model(mvit_fast.MViT(cfg, attention_backend="eager"))
    gpu = count_model(mvit_fast.MViT(cfg, attention_backend="eager").cuda())
    assert gpu == cpu
