"""Which candidate rows still draft: the host side of the proposer's row compaction.

A request's k candidate rows are drafted until all of them have ended the step. From
then on only one row of it is worth a forward: the chosen candidate, when the request
drafts on to K tokens (fallback ``speculative``, or SpecGuard off), none otherwise (its
tokens past the step are cut). Dropping those rows as soon as the request's own
candidates are done, not when the whole batch's are, cuts the draft's row-positions
(on a CPU its compute; on a GPU the candidates' attention reads).

Narrowing the batch has a fixed cost (a selector call and new attention metadata), so
done requests are settled in groups: once they would free at least a quarter of the
rows still drafting, or every one of them. All state here is small host arrays, [B] per
batch, in NumPy: the plan runs at every draft position, and a NumPy op on a few dozen
values costs a fraction of a PyTorch dispatch. No loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Settle done requests once they free at least this fraction of the rows still drafting.
MIN_FREED_FRACTION = 0.25


@dataclass(frozen=True)
class Narrowing:
    """One compaction: the requests settled now and the rows left afterwards (host)."""

    settled: np.ndarray  # [B] bool: requests settled by this narrowing
    choose: np.ndarray  # [C] int64: settled requests whose k rows are chosen among now
    rows_after: np.ndarray  # [B] int64: rows each request drafts after it
    bound_rows: np.ndarray  # [R_after] int64: for each row left, a current row of its request

    @property
    def total_after(self) -> int:
        return int(self.rows_after.sum())


class RowCompaction:
    """Rows per request while drafting one propose call (candidates in request order).

    ``counts``: rows per request at the start (k, or 1); ``keeps_one``: the request drafts
    on to K tokens after its step, so its chosen row stays; ``drops_now``: the request
    needs no draft at all (regenerating: its row is cut to nothing), so it goes at once.
    """

    def __init__(self, counts: list[int], keeps_one: list[bool], drops_now: list[bool],
                 greedy: list[bool] | None = None):
        self.rows = np.asarray(counts, dtype=np.int64)
        # Rows known on the host to draft greedily: SpecGuard off (``greedy``) from the start,
        # and a settled request's kept row (its step has ended: the rest is its tail).
        self.tail_only = np.zeros(self.rows.shape, dtype=bool) if greedy is None \
            else np.asarray(greedy, dtype=bool)
        self.all_tails = self._all_tails()
        self.keeps_one = np.asarray(keeps_one, dtype=bool) & ~np.asarray(drops_now, dtype=bool)
        self.multi = self.rows > 1
        # Settled: reduced to the final form (one kept row, or none). A one-row request that
        # keeps its row has nothing to settle.
        self.settled = ~self.multi & self.keeps_one
        self.chosen = np.zeros_like(self.multi)  # its candidate was chosen while drafting

    @property
    def total(self) -> int:
        return int(self.rows.sum())

    def plan(self, done) -> Narrowing | None:
        """The narrowing to make now, given which requests' candidates have all ended their
        step (``done``, [B] bool, host: an array or a CPU tensor); None: keep drafting every
        row as it is."""
        newly = np.asarray(done, dtype=bool) & ~self.settled
        if not newly.any():
            return None
        after = np.where(newly, self.keeps_one.astype(np.int64), self.rows)
        total, left = self.total, int(after.sum())
        freed = total - left
        if freed == 0 or (left > 0 and freed < MIN_FREED_FRACTION * total):
            return None
        starts = self.rows.cumsum(0) - self.rows
        return Narrowing(settled=newly, choose=np.flatnonzero(newly & self.multi & self.keeps_one),
                         rows_after=after, bound_rows=np.repeat(starts, after))

    def apply(self, narrowing: Narrowing) -> None:
        self.settled |= narrowing.settled
        self.chosen[narrowing.choose] = True
        self.rows = narrowing.rows_after
        self.tail_only |= narrowing.settled  # settled: every candidate of it ended the step
        self.all_tails = self._all_tails()

    def _all_tails(self) -> bool:
        """Every row left drafts greedily (a tail, or SpecGuard off): nothing to sample."""
        return not ((self.rows > 0) & ~self.tail_only).any()

    def unchosen(self) -> np.ndarray:
        """Requests with several candidates whose choice is still to make (host indices)."""
        return np.flatnonzero(self.multi & ~self.chosen)

    def request_of_rows(self) -> np.ndarray:
        """The request of every row drafting now, in row order (host)."""
        return np.repeat(np.arange(self.rows.shape[0]), self.rows)
