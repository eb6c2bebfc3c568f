"""What the plugin calls: Triton on CUDA tensors, the PyTorch reference elsewhere.

Each kernel's launch wrapper and its reference share one contract (arguments,
results, output buffers), documented on the reference; the dispatch only picks
one of the two, so it adds no signature of its own. The Triton modules are
imported on first CUDA use only, so a CPU install never compiles or even imports
a kernel. ``SPECGUARD_KERNELS=torch`` forces the reference on CUDA too (a switch
for debugging numerics).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from .kv_layout import k_cache_view
from .draft_sampling_ref import draft_greedy_ref, draft_position_ref, draft_sample_ref
from .min_logprob_ref import step_min_logprob_ref
from .step_grounding_ref import step_grounding_stats_ref, step_head_share_rows_ref
from .workspace import GroundingWorkspace

__all__ = ["GroundingWorkspace", "disable_triton", "draft_greedy", "draft_position", "draft_sample",
           "k_cache_view",
           "step_grounding_stats",
           "step_head_share_rows", "step_min_logprob", "use_triton"]

F = TypeVar("F", bound=Callable)

_TRITON_DISABLED: str | None = None  # why this process stopped using the Triton kernels


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors unless SPECGUARD_KERNELS=torch or a self-check failed."""
    return (t.is_cuda and _TRITON_DISABLED is None
            and os.environ.get("SPECGUARD_KERNELS", "triton") != "torch")


def disable_triton(reason: str) -> None:
    """Use the PyTorch references from now on in this process (correct, slower)."""
    global _TRITON_DISABLED
    _TRITON_DISABLED = reason


def triton_on_cuda(reference: F, module: str, launch: str) -> F:
    """``reference``, except that CUDA inputs go to the Triton launch ``module.launch``.

    The choice follows the first argument (the query or the logits), and the
    result keeps the reference's name, signature and docstring.
    """

    @functools.wraps(reference)
    def dispatched(first: torch.Tensor, *args, **kwargs):
        if use_triton(first):
            kernel = getattr(importlib.import_module(module, __package__), launch)
            return kernel(first, *args, **kwargs)
        return reference(first, *args, **kwargs)

    return dispatched  # type: ignore[return-value]


# One layer's ``(prefix_mass [rows], block [rows, max_step_len])`` for every step row.
# Row ``cu_step_lens[b] + i`` is step token i of request b; feed one layer's rows of a
# request to ``core.grounding.rollout_grounding`` as ``[n]`` / ``[n, n]`` slices
# (``block[rows, :n]``). Pass a ``workspace`` allocated once for the largest batch when
# the call is captured in a CUDA graph; its ``prefix_mass`` / ``block`` are returned.
step_grounding_stats = triton_on_cuda(step_grounding_stats_ref, ".step_grounding",
                                      "step_grounding_stats_triton")

# Tensor parallelism: this rank's heads' share of each step row's head average, unthresholded
# (the verifier sums the shares over the TP group, then thresholds): pass 1 and a head-share
# pass on CUDA (the TP=1 kernel fuses the threshold into its second pass, which needs all heads).
step_head_share_rows = triton_on_cuda(step_head_share_rows_ref, ".step_grounding",
                                      "step_head_share_rows_triton")

# ``(token_logprobs [T], min_logprob [B])``: log p(draft token) and each step's minimum.
# ``max_step_len`` sizes the kernel's grid; ``counters`` (int32 zeros, one per step) is its
# static arrival counter, for callers that capture it in a CUDA graph.
step_min_logprob = triton_on_cuda(step_min_logprob_ref, ".min_logprob", "step_min_logprob_triton")

# ``(tokens [R], logprobs [R])``: one draft position of the proposer, sampled or greedy rows.
draft_sample = triton_on_cuda(draft_sample_ref, ".draft_sampling", "draft_sample_triton")
# ``(tokens [R], logprobs [R])``: a position where every row is a greedy tail.
draft_greedy = triton_on_cuda(draft_greedy_ref, ".draft_sampling", "draft_greedy_triton")
# ``(tokens [R], logprobs [R])`` of a whole draft position, the rows' state moved on in place
# (tail stop, step automaton): one launch on CUDA.
draft_position = triton_on_cuda(draft_position_ref, ".draft_sampling", "draft_position_triton")
