"""The vLLM plugin: registered as ``vllm.general_plugins: specguard``.

vLLM calls :func:`register` in every process it starts (API server / LLM,
engine core, each worker). It applies the patches listed in
:mod:`specguard_vllm.plugin.patches`, which first check the installed vLLM
release; applying them again changes nothing (each patched class records it).
Every patch is inert unless the engine's speculative config asks for SpecGuard.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.specguard")


def register() -> None:
    if os.environ.get("SPECGUARD_DISABLE_PLUGIN") == "1":
        logger.info("SpecGuard plugin disabled by SPECGUARD_DISABLE_PLUGIN=1")
        return
    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
