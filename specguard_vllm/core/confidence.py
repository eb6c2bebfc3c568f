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
    device = logprobs.device
    cu = cu_num_tokens.long().to(device)
    counts = cu[1:] - cu[:-1]
    if device.type == "cpu" and (counts < 0).any():  # checked where it costs no device sync
        raise ValueError("cu_num_tokens must be non-decreasing")
    num_steps = counts.numel()
    if num_steps == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    # logprobs[i] is token cu[0] + i. Each token's step by a search over the step ends (no
    # host read of the lengths, which repeat_interleave would need); tokens past cu[-1]
    # belong to none.
    position = cu[:1] + torch.arange(logprobs.shape[0], device=device)
    owner = torch.searchsorted(cu[1:], position, right=True)
    values = torch.where(owner < num_steps, logprobs.float(), float("inf"))
    mins = torch.full((num_steps,), float("inf"), dtype=torch.float32, device=device)
    mins.scatter_reduce_(0, owner.clamp(max=num_steps - 1), values, reduce="amin")
    return torch.where(counts > 0, mins, torch.zeros_like(mins))


def lpbv_normalised(l_min: torch.Tensor, lpbv_floor: float) -> torch.Tensor:
    """``clip(1 - L_min / floor, 0, 1)``: log-prob 0 -> 1, ``floor`` or lower -> 0."""
    if not lpbv_floor < 0:
        raise ValueError(f"lpbv_floor must be negative, got {lpbv_floor}")
    return (1.0 - l_min / lpbv_floor).clamp(0.0, 1.0)
