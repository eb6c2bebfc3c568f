"""Shim so `pip install -e .` works with older tooling; metadata lives in pyproject.toml.

It also maps the top-level ``kernels/`` folder (Triton kernels beside their references,
the design's layout) to the package ``specguard_vllm.kernels``.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["specguard_vllm", "specguard_vllm.*"]) + ["specguard_vllm.kernels"],
    package_dir={"specguard_vllm.kernels": "kernels"},
)
