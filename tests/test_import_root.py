"""From the repository root (on sys.path as ''), the top-level kernels/ directory must not hide
Hugging Face's ``kernels`` package, which transformers >= 5.25 imports (every HF model import
failed with "cannot import name 'CUDAProperties' from 'kernels'" before kernels/__init__.py
handed the name over)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_imports_from_the_repository_root():
    code = ("import importlib.util, kernels, lensjax.kernels.ntk as n\n"
            "from transformers.models.llama import modeling_llama\n"
            "print(kernels.__file__); print(n.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    top, ours = r.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "ntk.py"
    import importlib.metadata as md
    try:
        md.version("kernels")
    except md.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here")
    assert Path(top).resolve().parent != ROOT / "kernels"
