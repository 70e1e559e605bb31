"""Packaging: the kernels folder imports as mvit_fast.kernels, never as a bare `kernels`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_import_only_under_mvit_fast(tmp_path):
    # Run outside the repo so the working directory does not put `kernels/` on sys.path.
    code = (
        "import importlib.util, mvit_fast.kernels\n"
        "print(mvit_fast.kernels.__file__)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True, env={"PATH": "", "TRITON_INTERPRET": "1"}).stdout.split()
    assert Path(out[0]).resolve() == REPO / "kernels" / "__init__.py"
    assert out[1] == "None" or not Path(out[1]).resolve().is_relative_to(REPO), out[1]
