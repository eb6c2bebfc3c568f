"""Read SpecGuard's worker-side counters from the front end (``LLM.collective_rpc``).

Benchmarks use this: it returns plain dicts. The worker side is the RPC methods that
patch P12 (:class:`~specguard_vllm.plugin.patches.WorkerBasePatch`) adds.
"""

from __future__ import annotations


def llm_counters(llm) -> dict:
    """Counters of the first worker of an offline ``vllm.LLM``."""
    results = llm.collective_rpc("specguard_counters")
    return results[0] if results else {}


def reset_llm_counters(llm) -> None:
    llm.collective_rpc("specguard_reset_counters")
