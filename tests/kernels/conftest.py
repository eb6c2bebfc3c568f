"""Kernel tests run compiled on a CUDA machine and in Triton's interpreter elsewhere.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is
imported, hence at conftest import time. The AOT compile test strips it again
for its subprocess, and every vLLM process the other tests start drops it
(``specguard_vllm.vllm_env.vllm_process_env``): vLLM must never run Triton's
interpreter.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="specguard-triton-"))


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
