"""`python -m mvit_fast.report throughput`: tables and plots from a committed pytest-benchmark fixture.

tests/fixtures/bench_small.json is hand-made (round numbers, commit "fixture-not-a-commit"), in
pytest-benchmark's format with the extra_info that bench/test_model.py and bench/test_attention.py
write: a fixture for the report, not a measurement.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from mvit_fast.report import (
    attention_block_times,
    attention_io_bytes,
    device_peaks,
    load_benchmarks,
    main,
    newest_gpu_run,
    partial_backends,
    throughput_tables,
    timing_note,
    write_plots,
)

FIXTURE = Path(__file__).parent / "fixtures" / "bench_small.json"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_benchmarks([FIXTURE])


def test_model_table_values(rows):
    table = throughput_tables(rows)
    assert "### MViTv2-S 16x224 (NVIDIA H100 80GB HBM3; torch 2.11.0+cu130, triton 3.6.0" in table
    lines = table.splitlines()
    # train: eager fp32 8 clips/s; eager bf16 16; compiled Triton best at batch 32 (32 clips/s,
    # not the 20 clips/s of its batch-16 row); memory per clip = peak / batch
    assert "| train | eager-fp32 | 8 | 8.00 | 1.00x | 0.50x | 3.09 | 8.00 | 1.000 | 2.0 |" in lines
    assert "| train | eager-bf16 | 16 | 16.00 | 2.00x | 1.00x | 6.19 | 16.00 | 1.000 | 2.0 |" in lines
    assert ("| train | compile-triton-bf16 | 32 | 32.00 | 4.00x | 2.00x | 12.4 | 20.00 | 0.625 | 60.0 |"
            in lines)
    # infer has no eager-bf16 row: that speedup is "-"
    assert "| infer | compile-sdpa-bf16 | 32 | 256.00 | 4.00x | - | 33 | 4.00 | 0.125 | 30.0 |" in lines
    assert table.index("| train | eager-fp32") < table.index("| infer | eager-fp32")


def test_attention_times_weighted_by_blocks(rows):
    times = attention_block_times(rows)
    assert list(times) == [("S16x224", "fwd", 8)]
    by_backend = times["S16x224", "fwd", 8]
    # block 0 once, blocks 4-13 ten times
    assert by_backend["eager"] == pytest.approx({"b0 25089x393": 2e-3, "b4-13 1569x393": 5e-3})
    assert sum(by_backend["triton"].values()) == pytest.approx(1.5e-3)
    assert "| S16x224 | fwd | 8 | 7.00 | - | - | - | 1.50 |" in throughput_tables(rows).splitlines()


def test_a_backend_missing_shapes_is_marked_not_summed_as_a_total(rows):
    # an sdpa row at block 0 only (its blocks 4-13 case cut by a timeout or out of memory)
    block0 = next(r for r in rows if r.get("kind") == "attention" and r["blocks"] == [0])
    partial = rows + [dict(block0, backend="sdpa", median_s=0.4e-3)]
    assert partial_backends(attention_block_times(partial)["S16x224", "fwd", 8]) == {"sdpa": (1, 2)}
    assert "| S16x224 | fwd | 8 | 7.00 | 0.40 (1/2 shapes) | - | - | 1.50 |" in throughput_tables(partial)


def test_rows_of_two_devices_are_never_compared(rows, tmp_path):
    # one GPU run's calls on two machines: the compiled rows from an H200, the eager ones from an H100
    h200 = "NVIDIA H200"
    mixed = [dict(r, device=h200, commit="later") if str(r.get("variant", "")).startswith("compile")
             else r for r in rows]
    table = throughput_tables(mixed)
    h100_part, h200_part = table.split(f"## {h200}")
    assert h100_part.startswith("## NVIDIA H100 80GB HBM3")
    assert "compile-triton" not in h100_part
    # no eager rows on the H200: no speedups there, rather than 4.00x over the H100's eager fp32
    assert "| train | compile-triton-bf16 | 32 | 32.00 | - | - |" in h200_part
    assert "commit later)" in h200_part
    assert "| S16x224 | fwd | 8 | 7.00 | - | - | - | 1.50 |" in h100_part.splitlines()  # attention: H100
    # the data benchmark's PyAV rows ("cpu") beside one GPU's rows: one device, no sections
    pyav = dict(backend="pyav", sampling="16x4", clips_per_s=50.0, device="cpu", name="test_pyav_cpu[16x4]",
                median_s=1.0)
    assert throughput_tables(rows + [pyav]) == throughput_tables(rows)
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the `report` or `dev` extra)")
    made = write_plots(mixed, tmp_path)
    assert tmp_path / "NVIDIA_H200" / "throughput_vs_batch.png" in made
    assert tmp_path / "NVIDIA_H100_80GB_HBM3" / "throughput_vs_batch.png" in made


def test_roofline_inputs(rows):
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert device_peaks("NVIDIA H100 PCIe")[0] == 756e12
    assert device_peaks("cpu") is None
    assert device_peaks("NVIDIA H200")[1] == 4.8e12 and device_peaks("NVIDIA GH200 480GB") is None
    assert device_peaks("NVIDIA A100-SXM4-80GB")[1] == 2.039e12
    block0 = next(r for r in rows if r.get("kind") == "attention" and r["blocks"] == [0])
    # DESIGN's roofline: S block 0 moves q, k, v, out = (2 * 25089 + 2 * 393) * 96 bf16 per clip
    assert attention_io_bytes(block0) == 8 * (2 * 25089 + 2 * 393) * 96 * 2
    assert attention_io_bytes(dict(block0, mode="fwd+bwd")) == 3 * attention_io_bytes(block0)


def test_cli_writes_tables_and_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the `report` or `dev` extra)")
    assert main(["throughput", str(FIXTURE), "--plot-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "| infer | eager-fp32 | 32 | 64.00 | 1.00x |" in captured.out
    for name in ("attention_breakdown.png", "attention_roofline.png", "throughput_vs_batch.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"wrote {png}" in captured.err


def test_cli_tables_only(tmp_path, capsys):
    assert main(["throughput", str(FIXTURE), "--no-plots", "--plot-dir", str(tmp_path)]) == 0
    assert "| train | eager-bf16 | 16 |" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_default_reads_the_newest_gpu_run(tmp_path, capsys):
    data = json.loads(FIXTURE.read_text())
    for run, stamp in (("old", "2001-01-01T00:00:00"), ("new", "2002-01-01T00:00:00")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "bench_model.json").write_text(json.dumps(dict(data, datetime=stamp)))
    # a newer run without GPU rows (a CPU smoke run) is not a GPU result
    cpu_rows = [dict(b, extra_info=dict(b["extra_info"], device_type="cpu")) for b in data["benchmarks"]]
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "bench.json").write_text(
        json.dumps(dict(data, datetime="2003-01-01T00:00:00", benchmarks=cpu_rows)))
    shutil.copy(FIXTURE, tmp_path / "new" / "bench_attention.json")
    (tmp_path / "new" / "run_info.json").write_text("{}")  # not pytest-benchmark JSON: ignored
    assert newest_gpu_run(tmp_path) == [tmp_path / "new" / "bench_attention.json",
                                        tmp_path / "new" / "bench_model.json"]

    assert main(["throughput", "--results-dir", str(tmp_path / "empty"), "--no-plots"]) == 1
    assert "no GPU benchmark results under" in capsys.readouterr().err


def test_cli_reports_unreadable_inputs(tmp_path, capsys):
    (tmp_path / "truncated.json").write_text('{"benchmarks": [')
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "other.json").write_text('{"rows": []}')
    for name, message in (("gone.json", "No such file"), ("truncated.json", "truncated.json: not JSON"),
                          ("list.json", "list.json: a JSON list, not an object"),
                          ("other.json", "other.json: not a pytest-benchmark JSON file")):
        assert main(["throughput", str(tmp_path / name), "--no-plots"]) == 1, name
        assert message in capsys.readouterr().err, name


def test_cli_without_matplotlib_prints_the_tables_and_says_why_no_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["throughput", str(FIXTURE), "--plot-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "| train | eager-bf16 | 16 |" in captured.out
    assert "no plots: the throughput plots need matplotlib" in captured.err and not list(tmp_path.iterdir())
    (tmp_path / "null.json").write_text('{"benchmarks": null}')
    assert main(["throughput", str(tmp_path / "null.json"), "--no-plots"]) == 1
    assert "null.json: not a pytest-benchmark JSON file" in capsys.readouterr().err


def _data_row(sampling: str, backend: str, clips_per_s: float, gpu: str = "NVIDIA H100 80GB HBM3",
              source: str = "bench_data.json") -> dict:
    """A row as load_benchmarks makes it from bench/test_data.py's extra_info."""
    return dict(kind="data", sampling=sampling, backend=backend, device=gpu if backend == "dali" else "cpu",
                batch=8, clips_per_s=clips_per_s, device_type="cuda" if backend == "dali" else "cpu",
                source=source)


def test_data_table_against_pyav_and_the_training_step_it_feeds(rows, tmp_path, capsys):
    data = [_data_row("16x4", "dali", 96.0), _data_row("16x4", "pyav", 24.0), _data_row("32x3", "pyav", 10.0)]
    lines = throughput_tables(rows + data).splitlines()
    # the fixture's fastest S16x224 training step on that H100: compile-triton-bf16, 32 clips/s
    assert ("| 16x4 | dali | NVIDIA H100 80GB HBM3 | 8 | 96.00 | 4.00x | S16x224 compile-triton-bf16 (32.00) "
            "| 3.00x |") in lines
    assert "| 16x4 | pyav | cpu | 8 | 24.00 | - | - | - |" in lines
    assert "| 32x3 | pyav | cpu | 8 | 10.00 | - | - | - |" in lines
    # a data benchmark alone is a report (the suite's data call)
    only = {"benchmarks": [{"name": f"test_{i}", "stats": {"median": 1.0}, "extra_info": r}
                           for i, r in enumerate(data)]}
    (tmp_path / "bench_data.json").write_text(json.dumps(only))
    assert main(["throughput", str(tmp_path / "bench_data.json"), "--no-plots"]) == 0
    assert "| 16x4 | dali | NVIDIA H100 80GB HBM3 | 8 | 96.00 | 4.00x | - | - |" in capsys.readouterr().out
    # two machines' data calls: each DALI row against its own machine's PyAV
    h200 = [_data_row("16x4", "dali", 90.0, gpu="NVIDIA H200", source="b.json"),
            _data_row("16x4", "pyav", 45.0, source="b.json")]
    lines = throughput_tables(data[:2] + h200).splitlines()
    assert "| 16x4 | dali | NVIDIA H100 80GB HBM3 | 8 | 96.00 | 4.00x | - | - |" in lines
    assert "| 16x4 | dali | NVIDIA H200 | 8 | 90.00 | 2.00x | - | - |" in lines


def test_a_dirty_commit_is_shown_as_one():
    from mvit_fast.report import _short_commit

    assert _short_commit("0123456789abcdef" * 2 + "01234567-dirty") == "0123456789-dirty"
    assert _short_commit("0123456789abcdef") == "0123456789"
    assert _short_commit("abc1234-dirty") == "abc1234-dirty"


def _pool_row(provider: str, median_s: float, **extra) -> dict:
    """A row as load_benchmarks makes it from bench/test_pool.py's extra_info."""
    return dict(kind="pool", provider=provider, mode="fwd+bwd", suite="S16x224", batch=8, blocks=[0],
                n=25089, nq=25089, nkv=393, median_s=median_s, name=f"test_pool_qkv[{provider}]", **extra)


def test_pool_table_values():
    rows = [_pool_row("eager", 6e-3), _pool_row("compile", 3e-3),
            _pool_row("triton", 1e-3, gbps=2010.0, hbm_fraction=0.6),
            dict(_pool_row("eager", 1e-3), blocks=[4, 5, 6], n=1569, nq=1569, nkv=393)]
    table = throughput_tables(rows)
    assert "### q/k/v pooling of one block" in table
    lines = table.splitlines()
    fused = "| b0 | 25089 -> 25089, 393 | 8 | 6.000 | 3.000 | 1.000 | 3.00x | 2010 (60%) |"
    assert "| S16x224 | fwd+bwd " + fused in lines
    # data that fits in L2 (twice over): its bandwidth is no HBM measure
    in_l2 = throughput_tables(rows[:2] + [_pool_row("triton", 1e-3, gbps=2010.0, hbm_fraction=0.6,
                                                    fits_l2=True)])
    assert "| 3.00x | 2010 (L2) |" in in_l2
    # a shape without the fused kernel's row: no speedup, no bandwidth
    assert "| S16x224 | fwd+bwd | b4-6 | 1569 -> 1569, 393 | 8 | 1.000 | - | - | - | - |" in lines
    assert table.index("| b0 |") < table.index("| b4-6 |")  # block order


def test_timing_note_counts_rows_per_method(rows):
    # the fixture predates graph timing: every attention row is host-inclusive
    assert "one eager call per round" in throughput_tables(rows)
    graphed = dict(device_type="cuda", timing="cuda_graph")
    failed = dict(device_type="cuda", timing="eager: capture failed (RuntimeError: x)")
    note = timing_note([graphed, graphed, failed, dict(device_type="cpu", timing="eager")])
    assert note == ("Timing: GPU time per call, from CUDA-graph replays (2 of 4 rows); eager calls, "
                    "the op could not be captured (reason in the JSON's timing) (1 of 4 rows); "
                    "eager calls (1 of 4 rows).")
