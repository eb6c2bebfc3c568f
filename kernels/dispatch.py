"""What the plugin calls: Triton on CUDA tensors, the PyTorch reference elsewhere.

The Triton modules are imported on first CUDA use only, so a CPU install never
compiles or even imports a kernel. ``SPECGUARD_KERNELS=torch`` forces the
reference on CUDA too (a switch for debugging numerics).
"""

from __future__ import annotations

import os

import torch

from .kv_layout import k_cache_view
from .min_logprob_ref import step_min_logprob_ref
from .step_grounding_ref import step_grounding_stats_ref
from .workspace import GroundingWorkspace

__all__ = ["GroundingWorkspace", "disable_triton", "k_cache_view", "step_grounding_stats",
           "step_min_logprob", "use_triton"]


_TRITON_DISABLED: str | None = None  # why this process stopped using the Triton kernels


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors unless SPECGUARD_KERNELS=torch or a self-check failed."""
    return (t.is_cuda and _TRITON_DISABLED is None
            and os.environ.get("SPECGUARD_KERNELS", "triton") != "torch")


def disable_triton(reason: str) -> None:
    """Use the PyTorch references from now on in this process (correct, slower)."""
    global _TRITON_DISABLED
    _TRITON_DISABLED = reason


def step_grounding_stats(
    query: torch.Tensor,
    k_view: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_step_lens: torch.Tensor,
    *,
    scale: float,
    sparsity: float,
    max_step_len: int,
    query_start: torch.Tensor | None = None,
    workspace: GroundingWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(prefix_mass [rows], block [rows, max_step_len])`` for every step row.

    ``k_view`` comes from ``k_cache_view(kv_cache, backend_name, head_size)``.
    Pass a ``workspace`` allocated once for the largest batch when the call is
    captured in a CUDA graph; its ``prefix_mass``/``block`` are then returned.
    Row ``cu_step_lens[b] + i`` is step token i of request b; feed one layer's
    rows of a request to ``core.grounding.rollout_grounding`` as ``[n]`` /
    ``[n, n]`` slices (``block[rows, :n]``).
    """
    if use_triton(query):
        from .step_grounding import step_grounding_stats_triton

        return step_grounding_stats_triton(
            query, k_view, block_table, seq_lens, cu_step_lens, scale=scale, sparsity=sparsity,
            max_step_len=max_step_len, query_start=query_start, workspace=workspace)
    out = {} if workspace is None else {"prefix_mass": workspace.prefix_mass,
                                         "block": workspace.block}
    return step_grounding_stats_ref(
        query, k_view, block_table, seq_lens, cu_step_lens, scale=scale, sparsity=sparsity,
        max_step_len=max_step_len, query_start=query_start, **out)


def step_min_logprob(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    *,
    max_step_len: int,
    rows: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
    min_logprob: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_logprobs [T], min_logprob [B])``: log p(draft token) and each step's minimum.

    ``counters`` (int32 zeros, one per step) is the kernel's static arrival counter,
    for callers that capture it in a CUDA graph; the reference ignores it.
    """
    if use_triton(logits):
        from .min_logprob import step_min_logprob_triton

        return step_min_logprob_triton(
            logits, token_ids, cu_num_tokens, max_step_len=max_step_len, rows=rows,
            token_logprobs=token_logprobs, min_logprob=min_logprob, counters=counters)
    return step_min_logprob_ref(logits, token_ids, cu_num_tokens, rows=rows,
                                token_logprobs=token_logprobs, min_logprob=min_logprob)
