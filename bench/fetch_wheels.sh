#!/usr/bin/env bash
# Wheels that bench/gpu_suite.sh installs offline on the device machine, into ./.whl
# (git-ignored; name `.whl` in the device tool's `carry`). Run on the development machine.
#
# The device image (Python 3.12, torch 2.11, triton 3.6) already has pytest,
# pytest-benchmark, hypothesis, numpy, tqdm, pyyaml, pillow, tabulate, portalocker and
# matplotlib; it lacks fvcore (the FLOP counts behind every TFLOP/s column) and the three
# packages fvcore needs besides those. All four are pure Python (fvcore and iopath ship as
# sdists, hence `pip wheel`), about 120 KB together.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python -m pip wheel -q --no-deps -w .whl fvcore iopath yacs termcolor
ls -l .whl
