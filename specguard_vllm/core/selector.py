"""Self-consistency selection: keep the candidate most similar to the others.

Of k candidate steps, the one with the largest mean similarity to the other
k - 1 is the "central" one (the paper's self-consistency selector). Ties (a
centrality within ``TIE_TOLERANCE`` of the largest) go to the higher draft
log-likelihood, then to the lower index, so the choice is deterministic for a
given set of candidates. :func:`select_candidate` is the per-request reference;
:func:`select_candidates_batched` makes the same choice for a whole batch of
requests in tensor ops (the engine's path: no loop over requests or candidates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

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
    top = max(centrality)
    tied = [i for i in range(k) if centrality[i] >= top - TIE_TOLERANCE]
    return max(tied, key=lambda i: (log_likelihoods[i], -i))


def _lcs_lengths(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LCS length of each pair of rows ``a[p], b[p]`` (``[P, L]``; positions past a row's
    length hold values that match nothing). One pass per position of ``a``: with
    ``v[j] = max(dp[i-1][j], dp[i-1][j-1] + [a_i == b_j])``, the table's row i is the
    running maximum of ``v`` (``dp[i][j] = max(dp[i][j-1], v[j])``). A position of ``a``
    past its length matches nothing and leaves the row as it was (``dp`` is already
    nondecreasing along ``j``), so no mask is needed; ``dp`` sits behind a zero column so
    that its shift is a view, and the running maximum is written into it in place. Three
    ops per position: the loop runs on small tensors, so the op count is its cost."""
    pairs, width = a.shape
    matches = (a.unsqueeze(2) == b.unsqueeze(1)).to(torch.int64)  # [P, L(a), L(b)]
    padded = torch.zeros(pairs, width + 1, dtype=torch.int64, device=a.device)
    dp, shifted = padded[:, 1:], padded[:, :-1]
    argmax = torch.empty_like(dp)  # cummax's indices, unused
    for match in matches.unbind(1):
        torch.cummax(torch.maximum(dp, shifted + match), dim=1, out=(dp, argmax))
    return dp[:, -1]


def _multiset_overlaps(a: torch.Tensor, b: torch.Tensor, len_a: torch.Tensor,
                       len_b: torch.Tensor) -> torch.Tensor:
    """Size of the multiset intersection of each pair of rows: an occurrence of a token in
    ``a`` counts when fewer of its earlier copies in ``a`` than its copies in ``b``."""
    width = a.shape[1]
    pos = torch.arange(width, device=a.device)
    valid_a = pos < len_a.unsqueeze(1)
    valid_b = pos < len_b.unsqueeze(1)
    in_b = ((a.unsqueeze(2) == b.unsqueeze(1)) & valid_b.unsqueeze(1)).sum(-1)
    earlier = torch.ones(width, width, dtype=torch.bool, device=a.device).tril(-1)
    before = ((a.unsqueeze(2) == a.unsqueeze(1)) & earlier & valid_a.unsqueeze(1)).sum(-1)
    return (valid_a & (in_b > before)).sum(-1)


def select_candidates_batched(tokens: torch.Tensor, lengths: torch.Tensor,
                              log_likelihoods: torch.Tensor, measure: str = "rouge_l") -> torch.Tensor:
    """:func:`select_candidate` for ``G`` requests at once: ``tokens [G, k, L]`` (candidate
    ``c`` of request ``g`` is ``tokens[g, c, :lengths[g, c]]``), ``log_likelihoods [G, k]``;
    returns ``[G]`` indices. Every pair of every request in one set of tensor ops."""
    groups, k, width = tokens.shape
    if k == 1:
        return torch.zeros(groups, dtype=torch.int64, device=tokens.device)
    pos = torch.arange(width, device=tokens.device)
    lengths = lengths.to(torch.int64)
    valid = pos < lengths.unsqueeze(-1)  # [G, k, L]
    # Both measures are symmetric: each unordered pair once, then mirrored.
    first, second = torch.triu_indices(k, k, offset=1, device=tokens.device)
    # Positions past a candidate's length never match: -1 on the a side, -2 on the b side.
    a = torch.where(valid, tokens.to(torch.int64), -1)[:, first].reshape(-1, width)
    b = torch.where(valid, tokens.to(torch.int64), -2)[:, second].reshape(-1, width)
    len_a, len_b = lengths[:, first].reshape(-1), lengths[:, second].reshape(-1)
    if measure == "rouge_l":
        common = _lcs_lengths(a, b)
    elif measure == "token_f1":
        common = _multiset_overlaps(a, b, len_a, len_b)
    else:
        raise ValueError(f"unknown similarity measure {measure!r} (expected 'rouge_l' or 'token_f1')")
    total = (len_a + len_b).to(torch.float64)
    pair_sim = torch.where(total > 0, 2.0 * common.to(torch.float64) / total.clamp(min=1), 1.0)
    pair_sim = torch.where((len_a == 0) ^ (len_b == 0), 0.0, pair_sim).view(groups, -1)
    sim = torch.zeros(groups, k, k, dtype=torch.float64, device=tokens.device)
    sim[:, first, second] = pair_sim
    sim[:, second, first] = pair_sim
    centrality = sim.sum(-1) / (k - 1)
    tied = centrality >= centrality.max(dim=1, keepdim=True).values - TIE_TOLERANCE
    loglik = torch.where(tied, log_likelihoods.to(torch.float64), float("-inf"))
    return loglik.argmax(dim=1)  # the first of equal maxima: the lower index

