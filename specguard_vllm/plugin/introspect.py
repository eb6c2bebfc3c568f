"""Read SpecGuard's worker-side counters from the front end (``LLM.collective_rpc``).

Benchmarks use this: it returns plain dicts, one per worker.
"""

from __future__ import annotations


def worker_counters(worker) -> dict:
    """Run on a worker: SpecGuard's totals, or {} when SpecGuard is not active there."""
    runner = getattr(worker, "model_runner", None)
    state = getattr(runner, "_specguard", None)
    if state is None:
        return {}
    return state.metrics.counters.as_dict()


def reset_worker_counters(worker) -> bool:
    runner = getattr(worker, "model_runner", None)
    state = getattr(runner, "_specguard", None)
    if state is None:
        return False
    from specguard_vllm.plugin.metrics import StepCounters

    state.metrics.counters = StepCounters()
    return True


def llm_counters(llm) -> dict:
    """Counters of the first worker of an offline ``vllm.LLM`` (RPC method added by P12)."""
    results = llm.collective_rpc("specguard_counters")
    return results[0] if results else {}


def reset_llm_counters(llm) -> None:
    llm.collective_rpc("specguard_reset_counters")
