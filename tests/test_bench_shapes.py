"""The benchmark's shape derivation reproduces DESIGN section 3's MViTv2-S shape list; the op timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.conftest import ROUND_MIN_S, SUITES, attention_flops, attention_shapes
from mvit_fast.config import get_config

ROOT = Path(__file__).resolve().parents[1]


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
    # forward + backward: the forward's 2 matmuls and the backward's 5 (QK^T recomputed, dV, dP, dQ, dK)
    assert attention_flops(block0, batch=8, mode="fwd+bwd") == 3.5 * 8 * attention_flops(block0, 1, "fwd")


def test_op_benchmarks_time_rounds_on_the_device_clock(tmp_path):
    """Rounds of ROUND_MIN_S on a clock that waits for the device; without a GPU the calls
    run eagerly (CUDA-graph replays are `test_capture_...`'s)."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "pytest", "bench/test_attention.py", "--benchmark-only", "-q",
                    "-p", "no:cacheprovider", "-k", "S4x64 and b15 and eager and not bwd",
                    f"--benchmark-json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (case,) = json.loads(out.read_text())["benchmarks"]
    assert case["options"]["timer"] == "device_clock" and case["options"]["min_time"] == ROUND_MIN_S
    assert case["options"]["max_time"] == 0.2  # the CPU smoke case's own limit stays
    assert case["extra_info"]["timing"] == "eager"  # CUDA graphs need a GPU


@pytest.mark.cuda
def test_capture_times_graph_replays_and_falls_back_where_an_op_syncs():
    """`_capture` replays a captured call (it recomputes from the inputs' current values),
    and an op that syncs the host (.item()) is timed eagerly with the reason."""
    from bench.conftest import _capture

    device = torch.device("cuda")
    x = torch.ones(1024, device=device)
    out = {}

    def add():
        out["y"] = x * 2 + 1

    replay, timing = _capture(add, device)
    assert timing == "cuda_graph"
    x.fill_(3.0)
    replay()
    torch.cuda.synchronize()
    assert out["y"].eq(7.0).all()

    def syncs():
        out["v"] = (x * 2).sum().item()

    step, timing = _capture(syncs, device)
    assert step is syncs and timing.startswith("eager: capture failed")
    step()  # the device is usable after the failed capture
    assert out["v"] == 6.0 * 1024


def test_results_name_a_modified_tree_dirty(tmp_path, monkeypatch):
    # what ran is not the commit when tracked files differ from it
    import importlib.util
    import shutil

    monkeypatch.delenv("MVIT_FAST_COMMIT", raising=False)
    (tmp_path / "bench").mkdir()
    shutil.copy(Path(__file__).parent.parent / "bench" / "conftest.py", tmp_path / "bench" / "conftest.py")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
           "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    sha = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_file_location("copied_conftest", tmp_path / "bench" / "conftest.py")
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_conftest", copied)  # its dataclasses look themselves up
    spec.loader.exec_module(copied)
    sha = sha.strip()
    assert copied._git_commit() == sha
    with open(tmp_path / "bench" / "conftest.py", "a") as f:
        f.write("# an edit\n")
    assert copied._git_commit() == sha + "-dirty"


def test_pool_shapes_match_design():
    """DESIGN section 3: pooling reads the block's input grid; S block 0 keeps 25089 query
    tokens and pools k, v to 393, block 1 pools 25089 tokens to 6273 and 1569."""
    from bench.test_pool import pool_bytes, pool_shapes

    shapes = pool_shapes(get_config("s"))
    got = [(s.blocks, s.heads, s.n, s.nq, s.nkv) for s in shapes[:3]]
    assert got == [((0,), 1, 25089, 25089, 393), ((1,), 2, 25089, 6273, 1569), ((2,), 2, 6273, 6273, 393)]
    # forward: read q|k|v (3 N C) once, write q, k, v; the backward reads them back as dq, dk, dv
    c = 96
    fwd = 3 * 25089 * c + (25089 + 2 * 393) * c
    assert pool_bytes(shapes[0], batch=8, mode="fwd", itemsize=2) == 8 * 2 * fwd
    assert pool_bytes(shapes[0], batch=8, mode="fwd+bwd", itemsize=2) == 8 * 2 * (fwd + fwd + 3 * 25089 * c)
