#!/usr/bin/env bash
# Wheels that bench/gpu_suite.sh installs offline on the device machine. Run on the
# development machine.
#
#   bash bench/fetch_wheels.sh          # ./.whl: fvcore and its deps; name `.whl` in `carry`
#   bash bench/fetch_wheels.sh data     # also ./.carry1 ... ./.carryN: DALI + PyAV (the `data` steps)
#
# The device image (Python 3.12, torch 2.11, triton 3.6) already has pytest,
# pytest-benchmark, hypothesis, numpy, tqdm, pyyaml, pillow, tabulate, portalocker and
# matplotlib; it lacks fvcore (the FLOP counts behind every TFLOP/s column) and the three
# packages fvcore needs besides those. All four are pure Python (fvcore and iopath ship as
# sdists, hence `pip wheel`), about 120 KB together. Plus setuptools 80 (1.2 MB), which the
# suite installs only where the image's setuptools is older than 77 (pyproject.toml's SPDX
# license string needs it; the install runs without build isolation).
#
# `data`: bench/test_data.py (DALI's GPU decoder vs PyAV) needs nvidia-dali-cuda130 (the
# image's CUDA is 13), the two NVIDIA libraries DALI loads, its pure-Python and small compiled
# dependencies, and PyAV: ~290 MB of wheels, over the 64 MiB a device call carries. They go
# into one tar split in parts of PART_MB (56: the repo's own files travel too), one folder
# each, .carry1 ... .carryN (git-ignored), with a manifest in .carry1. A device machine keeps
# the ignored paths of earlier calls while it stays warm (30 s idle), so the parts travel in
# N back-to-back calls, each naming one part in `carry` (command: `ls .carry*`), the last also
# `.whl` and running the data steps:
#   STEPS="pip data_pip data report" PACK=1 MVIT_FAST_COMMIT=<sha> bash bench/gpu_suite.sh
# data_pip checks the manifest (part count and sha256) before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python -m pip wheel -q --no-deps -w .whl fvcore iopath yacs termcolor
# pyproject.toml's SPDX license string needs setuptools >= 77 to build, which the image may lack
python -m pip download -q --no-deps --only-binary=:all: -d .whl setuptools==80.9.0
ls -l .whl
[ "${1:-}" = data ] || exit 0

PART_MB=${PART_MB:-56}
DATA_WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
             av astunparse gast makefun nvtx libcst optree)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/wheels" "${DATA_WHEELS[@]}"
tar cf "$work/data_wheels.tar" -C "$work/wheels" .
split -b "${PART_MB}M" -d -a 2 "$work/data_wheels.tar" "$work/part-"
rm -rf .carry[0-9]*
parts=("$work"/part-*)
for i in "${!parts[@]}"; do
  mkdir ".carry$((i + 1))" && mv "${parts[$i]}" ".carry$((i + 1))/"
done
printf 'parts=%d\nsha256=%s\n' "${#parts[@]}" "$(sha256sum "$work/data_wheels.tar" | cut -d' ' -f1)" \
  > .carry1/MANIFEST
ls "$work/wheels"
du -sh .carry[0-9]*
