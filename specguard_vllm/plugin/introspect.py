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


def llm_kv_memory(llm) -> dict:
    """The first worker's KV memory report (:func:`kv_memory_report`) of an offline ``vllm.LLM``."""
    results = llm.collective_rpc("specguard_kv_memory")
    return results[0] if results else {}


def kv_memory_report(runner, cache_config) -> dict:
    """What a worker's KV cache occupies, to check it against vLLM's KV budget.

    ``kv_bytes`` counts every KV allocation bound to an attention layer once (vLLM 0.32 views
    one backing buffer per layer); ``budget_bytes`` is the explicit KV budget
    (``--kv-cache-memory-bytes`` / ``VLLM_CPU_KVCACHE_SPACE``), None when vLLM sized it
    from free memory. Scratch figures are 0 without SpecGuard k > 1.
    """
    import torch

    context = runner.compilation_config.static_forward_context
    storages: dict[int, int] = {}
    draft_blocks, draft_page = [], 0
    for name, layer in context.items():
        kv = getattr(layer, "kv_cache", None)
        if not isinstance(kv, torch.Tensor) or kv.numel() == 0:
            continue
        storage = kv.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        if name.startswith("draft_model."):
            draft_blocks.append(kv.shape[0])
            draft_page += kv[0].numel() * kv.element_size()
    drafter = getattr(runner, "drafter", None)
    scratch = getattr(drafter, "scratch_blocks", 0)
    return {
        "kv_bytes": sum(storages.values()),
        "kv_allocations": len(storages),
        "budget_bytes": cache_config.kv_cache_memory_bytes,
        "num_blocks": runner.kv_cache_config.num_blocks,
        "draft_layer_blocks": min(draft_blocks, default=0),
        "scratch_blocks": scratch,
        "scratch_base": getattr(drafter, "_scratch_base", None),
        "scratch_draft_bytes": scratch * draft_page,
    }
