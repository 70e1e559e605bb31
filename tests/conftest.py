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


@pytest.fixture(autouse=True, scope="session")
def _static_auto_backend(tmp_path_factory):
    """backend="auto" takes its static default here, with no cache file in ~/.cache.

    Measured choices follow timing noise, so which backend "auto" ran would change from
    run to run; tests/test_autotune.py turns measuring back on, in its own directories.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MVIT_FAST_AUTOTUNE", "0")
        mp.setenv("MVIT_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("autotune_cache")))
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
