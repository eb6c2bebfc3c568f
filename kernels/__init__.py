"""Triton kernels of SpecGuard's verifier and proposer, each beside its PyTorch reference.

* ``step_grounding`` / ``step_grounding_ref``: per layer, the prefix mass and the
  in-step block of the head-averaged, sparsified attention of every step row,
  read straight from vLLM's paged K cache (SPECGUARD.md section 3).
* ``min_logprob`` / ``min_logprob_ref``: ``logit[token] - logsumexp(logits)`` per
  draft position in one pass over the vocabulary, then the per-step minimum.
* ``draft_sampling`` / ``draft_sampling_ref``: one draft position of the proposer: per row a
  token at the draft temperature drawn by its keyed uniform (inverse CDF) or the argmax
  for greedy rows, and its temperature-1 log-prob, in one launch (``draft_greedy``: a
  position where every row is a greedy tail, through the same kernel branch;
  ``draft_position``: the same launch also moves each row's drafting state on: the
  tail stop and the step automaton).
* ``kv_layout``: the K-cache readers of vLLM 0.32's attention backends.
* ``dispatch``: what the plugin calls; Triton on CUDA, the reference elsewhere.

The Triton modules are imported lazily by ``dispatch`` so that a CPU-only
install never needs a working Triton.
"""

from .dispatch import (
    GroundingWorkspace,
    draft_greedy,
    draft_position,
    draft_sample,
    k_cache_view,
    step_grounding_stats,
    step_min_logprob,
)

__all__ = ["GroundingWorkspace", "draft_greedy", "draft_position", "draft_sample", "k_cache_view",
           "step_grounding_stats", "step_min_logprob"]
