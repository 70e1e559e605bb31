"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is decided
here from the driver's presence (nvidia-smi), without importing torch first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
