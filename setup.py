"""Build script for fastseg.

Install without build isolation so the build sees the torch that is already installed and never
replaces it:

    pip install --no-build-isolation -e .

`kernels/` (Triton kernels) is installed as the subpackage `fastseg.kernels`, never as a
top-level package named `kernels`.
"""
from setuptools import setup

PACKAGES = ["fastseg", "fastseg.models", "fastseg.ops", "fastseg.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"fastseg": "fastseg", "fastseg.kernels": "kernels"},
)
