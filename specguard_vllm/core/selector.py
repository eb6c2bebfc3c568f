"""Self-consistency selection: keep the candidate most similar to the others.

Of k candidate steps, the one with the largest mean similarity to the other
k - 1 is the "central" one (the paper's self-consistency selector). Ties go to
the higher draft log-likelihood, then to the lower index, so the choice is
deterministic for a given set of candidates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# Similarities equal up to float rounding count as a tie.
TIE_TOLERANCE = 1e-9


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004).

    One pass over ``a`` with big-integer bit operations over ``b``'s positions:
    O(len(a)) word operations instead of the O(len(a) * len(b)) table.
    """
    if not a or not b:
        return 0
    match_masks: dict[int, int] = {}
    for j, token in enumerate(b):
        match_masks[token] = match_masks.get(token, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & match_masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def similarity(a: Sequence[int], b: Sequence[int], measure: str = "rouge_l") -> float:
    """Token-level similarity in [0, 1] of two candidate steps (token ids)."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    if measure == "rouge_l":
        # F1 of LCS precision and recall simplifies to 2 * LCS / (|a| + |b|).
        return 2.0 * lcs_length(a, b) / (len(a) + len(b))
    if measure == "token_f1":
        overlap = sum((Counter(a) & Counter(b)).values())
        return 2.0 * overlap / (len(a) + len(b))
    raise ValueError(f"unknown similarity measure {measure!r} (expected 'rouge_l' or 'token_f1')")


def select_candidate(
    candidates: Sequence[Sequence[int]],
    log_likelihoods: Sequence[float],
    measure: str = "rouge_l",
) -> int:
    """Index of the most central candidate (see module docstring for tie-breaks)."""
    k = len(candidates)
    if k == 0:
        raise ValueError("need at least one candidate")
    if len(log_likelihoods) != k:
        raise ValueError(f"{k} candidates but {len(log_likelihoods)} log-likelihoods")
    if k == 1:
        return 0
    sims = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            sims[i][j] = sims[j][i] = similarity(candidates[i], candidates[j], measure)
    centrality = [sum(row) / (k - 1) for row in sims]
    best = 0
    for i in range(1, k):
        tie = abs(centrality[i] - centrality[best]) <= TIE_TOLERANCE
        if centrality[i] > centrality[best] + TIE_TOLERANCE or (
            tie and log_likelihoods[i] > log_likelihoods[best]
        ):
            best = i
    return best

