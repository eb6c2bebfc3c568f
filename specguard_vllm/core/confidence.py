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


def segment_min(values: torch.Tensor, cu_lengths: torch.Tensor) -> torch.Tensor:
    """Minimum of each ragged segment ``values[cu[i]:cu[i+1]]``; every segment non-empty."""
    lengths = cu_lengths[1:] - cu_lengths[:-1]
    if (lengths <= 0).any():
        raise ValueError("every segment must have at least one value")
    segment_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = torch.full((lengths.numel(),), float("inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, segment_ids, values, reduce="amin", include_self=True)


def lpbv_normalised(l_min: torch.Tensor, lpbv_floor: float) -> torch.Tensor:
    """``clip(1 - L_min / floor, 0, 1)``: log-prob 0 -> 1, ``floor`` or lower -> 0."""
    if not lpbv_floor < 0:
        raise ValueError(f"lpbv_floor must be negative, got {lpbv_floor}")
    return (1.0 - l_min / lpbv_floor).clamp(0.0, 1.0)
