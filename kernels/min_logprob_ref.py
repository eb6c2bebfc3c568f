"""PyTorch reference of the min-logprob kernel (and the CPU path of the dispatch)."""

from __future__ import annotations

import torch

from specguard_vllm.core.confidence import token_logprobs as core_token_logprobs


def step_min_logprob_ref(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
    min_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logit[token] - logsumexp(logits)`` per draft position, then the per-step minimum.

    Args:
        logits: ``[R, V]`` target logits (fp32/fp16/bf16).
        token_ids: ``[T]`` the draft token scored at each position.
        cu_num_tokens: ``[B+1]`` positions ``cu[b]:cu[b+1]`` form request b's step.
        rows: ``[T]`` row of ``logits`` for each position (vLLM's
            ``target_logits_indices``); default ``arange(T)``.

    Returns:
        ``(token_logprobs [T], min_logprob [B])`` in fp32; an empty step's
        minimum is 0.0 (no token to doubt), which keeps the output finite.
    """
    num_tokens = token_ids.numel()
    picked = logits[:num_tokens] if rows is None else logits[rows.long()]
    lp = core_token_logprobs(picked, token_ids)
    if token_logprobs is None:
        token_logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    token_logprobs[:num_tokens] = lp
    num_steps = cu_num_tokens.numel() - 1
    if min_logprob is None:
        min_logprob = torch.empty(num_steps, dtype=torch.float32, device=logits.device)
    counts = (cu_num_tokens[1:] - cu_num_tokens[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(num_steps, device=logits.device), counts)
    mins = torch.full((num_steps,), float("inf"), dtype=torch.float32, device=logits.device)
    mins.scatter_reduce_(0, owner, lp[: owner.numel()], reduce="amin")
    min_logprob[:num_steps] = torch.where(counts > 0, mins, torch.zeros_like(mins))
    return token_logprobs, min_logprob
