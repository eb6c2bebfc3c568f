"""Self-consistency selector: LCS, similarity and the deterministic choice."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.core.selector import (
    lcs_length,
    select_candidate,
    select_candidates_batched,
    similarity,
)

tokens = st.lists(st.integers(0, 6), max_size=40)


def lcs_table(a, b) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


@settings(max_examples=300, deadline=None)
@given(a=tokens, b=tokens)
def test_bit_parallel_lcs_equals_dynamic_programming(a, b):
    assert lcs_length(a, b) == lcs_table(a, b)


@settings(max_examples=200, deadline=None)
@given(a=tokens, b=tokens, measure=st.sampled_from(["rouge_l", "token_f1"]))
def test_similarity_is_symmetric_bounded_and_one_on_identity(a, b, measure):
    s = similarity(a, b, measure)
    assert 0.0 <= s <= 1.0
    assert s == pytest.approx(similarity(b, a, measure))
    assert similarity(a, a, measure) == 1.0


def test_most_central_candidate_wins():
    cands = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 8, 7], [1, 2, 3, 4]]
    # candidate 0 and 3 are identical and close to 1: they are the most central.
    assert select_candidate(cands, [0.0, 0.0, 0.0, 0.0]) in (0, 3)
    assert select_candidate(cands, [0.0, 0.0, 0.0, 0.0]) == 0  # tie -> lower index
    assert select_candidate(cands, [-5.0, 0.0, 0.0, -1.0]) == 3  # tie -> higher log-likelihood


def test_single_candidate_is_chosen_and_empty_is_refused():
    assert select_candidate([[4, 2]], [0.0]) == 0
    with pytest.raises(ValueError):
        select_candidate([], [])
    with pytest.raises(ValueError):
        select_candidate([[1], [2]], [0.0])


@settings(max_examples=100, deadline=None)
@given(
    cands=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=8), min_size=2, max_size=5),
    data=st.data(),
)
def test_choice_is_invariant_to_candidate_order_up_to_ties(cands, data):
    loglik = data.draw(st.lists(st.floats(-10, 0), min_size=len(cands), max_size=len(cands)))
    perm = data.draw(st.permutations(range(len(cands))))
    chosen = cands[select_candidate(cands, loglik)]
    chosen_perm = [cands[i] for i in perm][select_candidate([cands[i] for i in perm], [loglik[i] for i in perm])]
    k = len(cands)

    def centrality(c):
        return sum(similarity(c, o) for o in cands) - 1.0

    # Same centrality (the maximum) either way; identical unless an exact tie remains.
    assert centrality(chosen) == pytest.approx(centrality(chosen_perm))
    assert max(centrality(c) for c in cands) == pytest.approx(centrality(chosen))
    assert k >= 2


def central_candidate(cands, loglik) -> int:
    """The slow obvious selector: the highest exact mean ROUGE-L to the others, then the
    higher log-likelihood, then the lower index."""
    k = len(cands)

    def rouge_l(a, b):
        return Fraction(1) if not a and not b else Fraction(2 * lcs_table(a, b), len(a) + len(b))

    centrality = [sum(rouge_l(cands[i], cands[j]) for j in range(k) if j != i) / (k - 1)
                  for i in range(k)]
    return max(range(k), key=lambda i: (centrality[i], loglik[i], -i))


def test_selection_of_padded_rows_matches_the_exact_central_candidate():
    ids = torch.tensor([[[1, 2, 3, 0], [1, 2, 4, 0], [7, 7, 7, 7]],
                        [[5, 5, 0, 0], [6, 6, 6, 0], [6, 6, 6, 1]]])
    lengths = torch.tensor([[3, 3, 4], [2, 3, 4]])
    # What the proposer does: each candidate row cut to its step length, then selected.
    rows = [[ids[b, c, : lengths[b, c]].tolist() for c in range(3)] for b in range(2)]
    got = [select_candidate(cands, [0.0] * 3) for cands in rows]
    want = [central_candidate(cands, [0.0] * 3) for cands in rows]
    assert got == want


@settings(max_examples=200, deadline=None)
@given(
    cands=st.lists(st.lists(st.integers(0, 4), max_size=8), min_size=1, max_size=5),
    data=st.data(),
)
def test_choice_equals_the_exact_central_candidate(cands, data):
    loglik = data.draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0]), min_size=len(cands),
                                max_size=len(cands)))
    want = central_candidate(cands, loglik) if len(cands) > 1 else 0
    assert select_candidate(cands, loglik) == want


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 5),
    width=st.integers(1, 8),
    measure=st.sampled_from(["rouge_l", "token_f1"]),
    data=st.data(),
)
def test_batched_selection_equals_the_per_request_choice(k, width, measure, data):
    """The engine's batched selector picks, for every request of a batch at once, the
    candidate the per-request reference picks (ties to log-likelihood, then index)."""
    groups = data.draw(st.integers(1, 4))
    tokens = [[data.draw(st.lists(st.integers(0, 3), min_size=width, max_size=width))
               for _ in range(k)] for _ in range(groups)]
    lengths = [[data.draw(st.integers(1, width)) for _ in range(k)] for _ in range(groups)]
    loglik = [[data.draw(st.sampled_from([-2.0, -1.0, -0.5, 0.0])) for _ in range(k)]
              for _ in range(groups)]
    got = select_candidates_batched(torch.tensor(tokens), torch.tensor(lengths),
                                    torch.tensor(loglik), measure).tolist()
    want = [select_candidate([tokens[g][c][: lengths[g][c]] for c in range(k)], loglik[g], measure)
            for g in range(groups)]
    assert got == want


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 9), data=st.data())
def test_batched_lcs_lengths_equal_the_textbook_table(width, data):
    """The engine's LCS (four tensor ops per position, no mask) equals the classic table on
    every pair, with the rows padded past their lengths as the selector pads them."""
    from specguard_vllm.core.selector import _lcs_lengths

    pairs = data.draw(st.integers(1, 6))
    rows = [[data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=width)) for _ in range(2)]
            for _ in range(pairs)]
    a = torch.tensor([x + [-1] * (width - len(x)) for x, _ in rows])
    b = torch.tensor([y + [-2] * (width - len(y)) for _, y in rows])
    assert _lcs_lengths(a, b).tolist() == [lcs_table(x, y) for x, y in rows]
