"""bench/gpu_suite.sh without a GPU: its bookkeeping, which a GPU session cannot afford to debug.

The report step runs over a results folder holding the committed benchmark fixture, as in a
call with STEPS on the device machine (PACK=1, MVIT_FAST_COMMIT, no .git needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "bench_small.json"


def _suite(out: Path, steps: str, deadline: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), STEPS=steps, PACK="1", MVIT_FAST_COMMIT="abc1234",
               DEADLINE=str(deadline), PY=sys.executable)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_call_with_steps_reports_packs_and_tags_what_every_call_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(FIXTURE, out / "bench_fixture.json")
    (out / "bench_cut.json").write_text(FIXTURE.read_text()[:5000])  # killed while writing
    run = _suite(out, "report", deadline=200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bench_cut.json: not JSON" in run.stdout  # and out of the report's way
    # The device tool brings back 8 files: the archive, the run info and the table.
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_suite-report.tar.gz", "run_info-report.json", "throughput-report.md"]
    info = json.loads((out / "run_info-report.json").read_text())
    assert info["commit"] == "abc1234" and info["exit_codes"] == {"report": 0}
    assert "### MViTv2-S 16x224" in (out / "throughput-report.md").read_text()
    with tarfile.open(out / "gpu_suite-report.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"bench_fixture.json", "bench_cut.json.broken", "report-report.log", "report-report.cmd",
            "run_info-report.json", "throughput-report.md"} <= names
    # the fixture was stamped with the run's info
    with tarfile.open(out / "gpu_suite-report.tar.gz") as archive:
        stamped = json.load(archive.extractfile("./bench_fixture.json"))
    assert stamped["run_info"]["commit"] == "abc1234"


def test_a_step_the_deadline_leaves_no_time_for_is_not_started(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(FIXTURE, out / "bench_fixture.json")
    run = _suite(out, "report", deadline=45)  # 45 - 20 held back < 30 s
    assert run.returncode == 1
    assert json.loads((out / "run_info-report.json").read_text())["exit_codes"] == {"report": 125}


CUT_IN_FIRST_ROUND = '''
import os, signal, time

def test_finished(benchmark):
    benchmark(time.sleep, 0.001)

calls = []

def cut():  # slow enough that one call calibrates
    calls.append(1)
    time.sleep(0.3)
    if len(calls) == 2:  # the 1st call calibrates; the 2nd is the first timed round
        os.kill(os.getpid(), signal.SIGINT)  # as a step's timeout does
        time.sleep(1)

def test_cut(benchmark):
    benchmark(cut)
'''


def test_a_benchmark_cut_in_its_first_round_keeps_the_finished_cases(tmp_path):
    # pytest-benchmark saves on SIGINT, but a case cut before its first timed round has no
    # data, and saving it would raise and write no JSON at all (bench/conftest.py drops it)
    (tmp_path / "test_cut.py").write_text(CUT_IN_FIRST_ROUND)
    (tmp_path / "conftest.py").write_text("from bench.conftest import pytest_sessionfinish  # noqa: F401\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                          f"--benchmark-json={tmp_path / 'out.json'}", "--rootdir", str(tmp_path)],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=120)
    assert (tmp_path / "out.json").exists(), run.stdout + run.stderr
    saved = json.loads((tmp_path / "out.json").read_text())["benchmarks"]
    assert [b["name"] for b in saved] == ["test_finished"]
