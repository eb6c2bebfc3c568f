"""The vLLM plugin: registered as ``vllm.general_plugins: specguard``.

vLLM calls :func:`register` in every process it starts (API server / LLM,
engine core, each worker), so it is idempotent. It checks the installed vLLM
version, then applies the patches listed in :mod:`specguard_vllm.plugin.patches`.
Every patch is inert unless the engine's speculative config asks for SpecGuard.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.specguard")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    if os.environ.get("SPECGUARD_DISABLE_PLUGIN") == "1":
        logger.info("SpecGuard plugin disabled by SPECGUARD_DISABLE_PLUGIN=1")
        _registered = True
        return
    from specguard_vllm.plugin.version import check_vllm_version

    check_vllm_version()
    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
    _registered = True
