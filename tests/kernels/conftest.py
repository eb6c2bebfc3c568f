"""Kernel tests run compiled on a CUDA machine and in Triton's interpreter elsewhere.

The interpreter must be on before any module defining @triton.jit kernels is
imported, hence at conftest import time. It is switched on with Triton's
in-process knob, not the TRITON_INTERPRET environment variable, so the vLLM
engines that other tests start in subprocesses never inherit it.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    import triton

    triton.knobs.runtime.interpret = True
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="specguard-triton-"))


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
