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
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "bench_small.json"


def _suite(out: Path, steps: str, deadline: int | str, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), STEPS=steps, PACK="1", MVIT_FAST_COMMIT="abc1234",
               DEADLINE=str(deadline), PY=sys.executable, **env_vars)
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


def test_unknown_steps_and_a_bad_deadline_stop_the_call_before_anything_runs(tmp_path):
    run = _suite(tmp_path, "pip attention_s16x224 report", deadline=200)  # S, not s
    assert run.returncode == 2 and "unknown step 'attention_s16x224'" in run.stderr
    run = _suite(tmp_path, "report", deadline="570s")
    assert run.returncode == 2 and "DEADLINE must be seconds, got '570s'" in run.stderr
    assert list(tmp_path.iterdir()) == []
    shutil.copy(FIXTURE, tmp_path / "bench_fixture.json")
    run = _suite(tmp_path, "report", deadline="200.7")  # as a budget may come
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the suite does without a GPU")
def test_without_a_gpu_the_gpu_steps_are_not_started_and_the_call_fails(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "bench_fixture.json")
    run = _suite(tmp_path, "warm report", deadline=200)
    assert run.returncode == 1 and "no CUDA device visible to torch" in run.stdout
    codes = json.loads((tmp_path / "run_info-warm.json").read_text())["exit_codes"]
    assert codes == {"cuda": 1, "warm": 125, "report": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="B's attention cases all skip on a CPU")
def test_a_benchmark_step_that_measured_nothing_fails(tmp_path):
    (tmp_path / "bench_attention_B32x224.json").write_text(FIXTURE.read_text())  # an earlier call's
    run = _suite(tmp_path, "attention_B32x224", deadline=200, MVIT_FAST_SUITE_CPU="1")
    codes = json.loads((tmp_path / "run_info-attention_B32x224.json").read_text())["exit_codes"]
    assert run.returncode == 1 and codes == {"attention_B32x224": 0, "attention_B32x224-json": 1}, run.stdout


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


def test_tests_past_the_deadline_skip_and_the_report_is_written(tmp_path: Path) -> None:
    # the first test runs under a far deadline and moves it into the past (the plugin reads
    # it before each test): the second is skipped, and pytest still writes its report
    (tmp_path / "test_two.py").write_text(
        "import os, time\n\n\n"
        "def test_first():\n    os.environ['MVIT_FAST_DEADLINE'] = str(time.time() - 1)\n\n\n"
        "def test_second():\n    pass\n")
    report = tmp_path / "report.xml"
    env = {**os.environ, "MVIT_FAST_DEADLINE": str(time.time() + 3600)}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.deadline", "-p", "no:cacheprovider", "-q",
                    "--rootdir", str(tmp_path), f"--junitxml={report}", str(tmp_path / "test_two.py")],
                   cwd=ROOT, env=env, check=False, capture_output=True, timeout=120)
    outcomes = {case.get("name"): "skipped" if case.find("skipped") is not None else "ran"
                for case in ET.parse(report).iter("testcase")}
    assert outcomes == {"test_first": "ran", "test_second": "skipped"}
