"""PyTorch reference of the min-logprob kernel (and the CPU path of the dispatch).

Both halves are the core's definitions (``core.confidence``): the kernel is
tested against the very LPBV the reference decoder computes.
"""

from __future__ import annotations

import torch

from specguard_vllm.core.confidence import min_logprob_per_step
from specguard_vllm.core.confidence import token_logprobs as core_token_logprobs


def step_min_logprob_ref(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    *,
    max_step_len: int | None = None,
    rows: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
    min_logprob: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logit[token] - logsumexp(logits)`` per draft position, then the per-step minimum.

    Args:
        logits: ``[R, V]`` target logits (fp32/fp16/bf16).
        token_ids: ``[T]`` the draft token scored at each position.
        cu_num_tokens: ``[B+1]`` positions ``cu[b]:cu[b+1]`` form request b's step.
        rows: ``[T]`` row of ``logits`` for each position (vLLM's
            ``target_logits_indices``); default ``arange(T)``.
        token_logprobs, min_logprob: output buffers written in place when given.
        max_step_len, counters: the kernel's grid bound and its static arrival
            counter (int32 zeros, one per step, for a CUDA graph); the reference
            reads the lengths from ``cu_num_tokens`` and needs neither.

    Returns:
        ``(token_logprobs [T], min_logprob [B])`` in fp32; an empty step's
        minimum is 0.0 (``core.confidence.min_logprob_per_step``).
    """
    num_tokens, num_steps = token_ids.numel(), cu_num_tokens.numel() - 1
    picked = logits[:num_tokens] if rows is None else logits[rows.long()]
    lp = core_token_logprobs(picked, token_ids)
    if token_logprobs is None:
        token_logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    if min_logprob is None:
        min_logprob = torch.empty(num_steps, dtype=torch.float32, device=logits.device)
    token_logprobs[:num_tokens] = lp
    min_logprob[:num_steps] = min_logprob_per_step(lp, cu_num_tokens)
    return token_logprobs, min_logprob
