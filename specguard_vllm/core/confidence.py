"""LPBV: the step's confidence, its minimum target token log-prob.

Computed from the target's raw logits (temperature 1): the signal measures the
model's belief, independent of how a user chose to sample.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(tokens[t])`` under ``logits[t]``: ``[T, V], [T] -> [T]`` (float32)."""
    if logits.dim() != 2 or tokens.dim() != 1 or logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    logits = logits.float()
    picked = logits.gather(1, tokens.long().unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def min_logprob_per_step(logprobs: torch.Tensor, cu_num_tokens: torch.Tensor) -> torch.Tensor:
    """``L_min`` of every step of a ragged batch: the minimum of ``logprobs[cu[b]:cu[b+1]]``.

    An empty step's minimum is 0.0 (no token to doubt): it stays finite, and a
    step without tokens is never judged anyway. Returns ``[B]`` float32.
    """
    counts = (cu_num_tokens[1:] - cu_num_tokens[:-1]).long().to(logprobs.device)
    if (counts < 0).any():
        raise ValueError("cu_num_tokens must be non-decreasing")
    num_steps = counts.numel()
    owner = torch.repeat_interleave(torch.arange(num_steps, device=logprobs.device), counts)
    mins = torch.full((num_steps,), float("inf"), dtype=torch.float32, device=logprobs.device)
    mins.scatter_reduce_(0, owner, logprobs[: owner.numel()].float(), reduce="amin")
    return torch.where(counts > 0, mins, torch.zeros_like(mins))


def lpbv_normalised(l_min: torch.Tensor, lpbv_floor: float) -> torch.Tensor:
    """``clip(1 - L_min / floor, 0, 1)``: log-prob 0 -> 1, ``floor`` or lower -> 0."""
    if not lpbv_floor < 0:
        raise ValueError(f"lpbv_floor must be negative, got {lpbv_floor}")
    return (1.0 - l_min / lpbv_floor).clamp(0.0, 1.0)
