"""The vLLM plugin: registered as ``vllm.general_plugins: specguard``.

vLLM calls :func:`register` in every process it starts (API server / LLM,
engine core, each worker). On the vLLM release it was written for, it applies the
patches listed in :mod:`specguard_vllm.plugin.patches`; applying them again
changes nothing (each patched class records it). Every patch is inert unless the
engine's speculative config asks for SpecGuard. On any other release it logs one
line and patches only the refusal of ``method: specguard``
(:class:`~specguard_vllm.plugin.version.UnsupportedReleaseGuard`), so installing
the package next to another vLLM never breaks an engine that does not use it.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.specguard")


def register() -> None:
    if os.environ.get("SPECGUARD_DISABLE_PLUGIN") == "1":
        logger.info("SpecGuard plugin disabled by SPECGUARD_DISABLE_PLUGIN=1")
        return
    from specguard_vllm.plugin.version import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        logger.warning("SpecGuard is off: %s", reason)
        from specguard_vllm.plugin.version import UnsupportedReleaseGuard

        UnsupportedReleaseGuard.apply()  # imports nothing of vLLM's but EngineArgs
        return
    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
