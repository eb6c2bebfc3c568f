"""Row compaction's host bookkeeping: which requests keep how many draft rows, and when."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.plugin.row_compaction import MIN_FREED_FRACTION, RowCompaction


@st.composite
def batches(draw):
    """Requests (k or 1 rows, keeps one row or not, needs no draft or not) and the position
    at which each one's candidates have all ended (None: never within the call)."""
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 5))
    counts = [draw(st.sampled_from([1, k])) for _ in range(n)]
    keeps = [draw(st.booleans()) for _ in range(n)]
    drops = [draw(st.booleans()) and draw(st.booleans()) for _ in range(n)]
    done_at = [0 if drop else draw(st.one_of(st.none(), st.integers(0, 8)))
               for drop in drops]
    return counts, keeps, drops, done_at


@settings(max_examples=300, deadline=None)
@given(batches())
def test_compaction_settles_done_requests_to_one_row_or_none_and_never_earlier(batch):
    counts, keeps, drops, done_at = batch
    n = len(counts)
    compaction = RowCompaction(counts, keeps, drops)
    keeps_one = [keep and not drop for keep, drop in zip(keeps, drops)]
    rows = list(counts)
    settled = [count == 1 and keep for count, keep in zip(counts, keeps_one)]
    for position in range(10):
        done = torch.tensor([at is not None and at <= position for at in done_at])
        narrowing = compaction.plan(done)
        newly = [bool(d) and not s for d, s in zip(done, settled)]
        after = [int(keep) if new else r for new, keep, r in zip(newly, keeps_one, rows)]
        freed = sum(rows) - sum(after)
        expect = freed > 0 and (sum(after) == 0 or freed >= MIN_FREED_FRACTION * sum(rows))
        assert (narrowing is not None) == expect
        if narrowing is None:
            continue
        assert narrowing.settled.tolist() == newly
        assert narrowing.rows_after.tolist() == after and narrowing.total_after == sum(after)
        # Chosen now: settled requests with several candidates that keep a row.
        assert narrowing.choose.tolist() == [i for i in range(n)
                                             if newly[i] and counts[i] > 1 and keeps_one[i]]
        # Each row left reads its host bound at a current row of its own request.
        starts = [sum(rows[:i]) for i in range(n)]
        owner = [i for i in range(n) for _ in range(rows[i])]
        kept_owner = [i for i in range(n) for _ in range(after[i])]
        assert [owner[r] for r in narrowing.bound_rows.tolist()] == kept_owner
        assert all(r == starts[owner[r]] for r in narrowing.bound_rows.tolist())
        compaction.apply(narrowing)
        rows, settled = after, [s or new for s, new in zip(settled, newly)]
        assert compaction.total == sum(rows)
    # A request is never cut before its candidates are done, nor left with more than one
    # row after them once settled.
    for i in range(n):
        if settled[i]:
            assert rows[i] == int(keeps_one[i])
        else:
            assert rows[i] == counts[i]
    chosen_now = {i for i in range(n) if settled[i] and counts[i] > 1 and keeps_one[i]}
    assert set(compaction.unchosen().tolist()) == {i for i in range(n) if counts[i] > 1} - chosen_now


def test_a_lone_request_is_settled_as_soon_as_its_candidates_are_done():
    compaction = RowCompaction([4], [True], [False])
    assert compaction.plan(torch.tensor([False])) is None
    narrowing = compaction.plan(torch.tensor([True]))
    assert narrowing.total_after == 1 and narrowing.choose.tolist() == [0]
    compaction.apply(narrowing)
    assert compaction.plan(torch.tensor([True])) is None  # settled: nothing more to do
    assert compaction.unchosen().tolist() == []


def test_small_gains_wait_until_a_quarter_of_the_rows_is_freed():
    compaction = RowCompaction([4] * 8, [True] * 8, [False] * 8)  # 32 rows
    assert compaction.plan(torch.tensor([True] + [False] * 7)) is None  # 3 of 32
    narrowing = compaction.plan(torch.tensor([True] * 3 + [False] * 5))  # 9 of 32
    assert narrowing is not None and narrowing.total_after == 23


def test_only_tails_are_left_once_every_request_with_candidates_is_settled():
    """``all_tails``: every row left is a settled request's chosen row (its step ended) or a
    greedy one (SpecGuard off), so the proposer samples nothing at that position."""
    compaction = RowCompaction([4, 1, 4], [True, True, True], [False, False, False],
                               greedy=[False, True, False])
    assert not compaction.all_tails
    compaction.apply(compaction.plan(torch.tensor([True, False, False])))
    assert not compaction.all_tails  # request 2 still samples its candidates
    compaction.apply(compaction.plan(torch.tensor([True, False, True])))
    assert compaction.all_tails and compaction.total == 3


def test_a_one_candidate_row_is_no_tail_before_its_step_ends():
    """k = 1: the row is settled from the start (nothing to choose) but still samples its
    step, so it is not known to be a tail."""
    compaction = RowCompaction([1, 4], [True, True], [False, False])
    compaction.apply(compaction.plan(torch.tensor([False, True])))
    assert compaction.total == 2 and not compaction.all_tails
    assert RowCompaction([1], [True], [False], greedy=[True]).all_tails  # SpecGuard off
