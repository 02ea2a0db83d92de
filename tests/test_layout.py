"""The repository root holds no Python package but `fastseg`.

Python puts the working directory first on sys.path for `python -m pytest` and `python -m fastseg`.
A package folder at the root then shadows an installed package of the same name: a root
`kernels/` once hid HuggingFace's `kernels`, which transformers ≥ 5.25 imports, and every test
that built an HF model failed.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_only_fastseg_is_a_package_at_the_root():
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["fastseg"]


def test_transformers_imports_its_dependencies_from_the_root():
    pytest.importorskip("transformers")
    code = "import transformers.activations"  # imports the hub-kernels integration
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
