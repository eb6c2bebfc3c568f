"""Per-request step bookkeeping in the worker, as host arrays indexed by request slot.

After a rejected step the target writes the rest of that step itself, so the
request gets no drafts until the target has produced a step delimiter
(:attr:`StepMode.REGENERATING`). With ``fallback: speculative`` a request's draft runs
past the step's end (as token-level SD's does) and the part after the step, the
*tail*, is verified token by token; after a rejected step the request is verified
token-level until the step ends (:attr:`StepMode.TOKEN_LEVEL`).

The table is the only SpecGuard state that outlives one engine step. Each request gets
a slot when it first appears (its knobs resolved then, once) and loses it when vLLM
removes it (finished, aborted, or a client that disconnected); every field is a NumPy
array over slots, so an engine step reads and updates the whole batch in array ops:
no loop over requests (the automaton's advance over committed tokens loops over token
positions, at most K + 1, each one gather for the whole batch). The verifier reports its
rows as :class:`StepVerdicts`; the proposer reads :class:`DraftRows`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from specguard_vllm.config import SpecGuardParams
from specguard_vllm.core.steps import StepSegmenter


class StepMode(enum.IntEnum):
    """How a request's next drafted row is treated, until its open step ends."""

    DRAFTING = 0  # draft a step; the verifier judges it
    REGENERATING = 1  # fallback "target": the target writes the rest of the step
    TOKEN_LEVEL = 2  # fallback "speculative": token-level SD until the step ends
    # (a request that turned SpecGuard off stays here until it finishes: vLLM's own SD)


class Verdict(enum.IntEnum):
    """What the verifier did with one row of the verification batch."""

    NO_STEP = 0  # no drafts in the row: the target's one token
    ACCEPTED = 1  # the whole step kept (plus bonus, or a tail verified token-level)
    REJECTED = 2  # fallback "target": only the target's token at the step's start
    TOKEN_LEVEL = 3  # verified token by token (fallback "speculative")


@dataclass(frozen=True)
class RowVerdict:
    """One row's verdict, with what the step table needs to split its committed tokens."""

    verdict: Verdict
    step_len: int | None = None  # ACCEPTED: how many of the committed tokens are the step


NO_STEP = RowVerdict(Verdict.NO_STEP)
NO_LENGTH = -1  # in the int arrays: no step length (None)


@dataclass(frozen=True)
class StepVerdicts:
    """What one engine step's verification decided, row by row (host arrays)."""

    req_ids: list[str]
    kinds: np.ndarray  # [B] int8 Verdict
    step_lens: np.ndarray  # [B] int64: ACCEPTED rows' step length, NO_LENGTH otherwise

    @classmethod
    def of(cls, req_ids: list[str], rows: Sequence[RowVerdict]) -> StepVerdicts:
        return cls(list(req_ids), np.array([r.verdict for r in rows], dtype=np.int8),
                   np.array([NO_LENGTH if r.step_len is None else r.step_len for r in rows],
                            dtype=np.int64))

    def row(self, i: int, req_id: str) -> RowVerdict:
        """Row ``i``'s verdict; NO_STEP for a row this verification did not see."""
        if i < len(self.req_ids) and self.req_ids[i] == req_id:
            length = int(self.step_lens[i])
            return RowVerdict(Verdict(int(self.kinds[i])), None if length < 0 else length)
        return NO_STEP

    def for_batch(self, req_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(kinds, step_lens)`` for the rows ``req_ids`` (NO_STEP where a row is not the
        one this verification saw there): one list comparison when they are the same rows."""
        n = len(req_ids)
        kinds = np.zeros(n, dtype=np.int8)
        lens = np.full(n, NO_LENGTH, dtype=np.int64)
        m = min(n, len(self.req_ids))
        if m and req_ids[:m] == self.req_ids[:m]:
            kinds[:m], lens[:m] = self.kinds[:m], self.step_lens[:m]
        elif m:
            same = np.array(req_ids[:m], dtype=object) == np.array(self.req_ids[:m], dtype=object)
            kinds[:m] = np.where(same, self.kinds[:m], Verdict.NO_STEP)
            lens[:m] = np.where(same, self.step_lens[:m], NO_LENGTH)
        return kinds, lens


def row_verdicts(judged: np.ndarray, accepted: np.ndarray, token_level: np.ndarray,
                 cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's verdict (host arrays): verified token-level, else not judged (no step),
    else accepted (its step length: the cut) or rejected. ``(kinds, step_lens)``."""
    kinds = np.where(token_level, Verdict.TOKEN_LEVEL,
                     np.where(judged, np.where(accepted, Verdict.ACCEPTED, Verdict.REJECTED),
                              Verdict.NO_STEP)).astype(np.int8)
    lens = np.where(kinds == Verdict.ACCEPTED, cut, NO_LENGTH).astype(np.int64)
    return kinds, lens


@dataclass(frozen=True)
class DraftRows:
    """What the proposer needs to know about the batch's rows before drafting (host, [B])."""

    open_states: np.ndarray  # int64: the segmenter's automaton state after the open step's tokens
    needs_no_draft: np.ndarray  # bool: regenerating, the target writes the rest of the step
    drafts_past_step: np.ndarray  # bool: fallback "speculative": draft to K tokens, not the step end
    opted_out: np.ndarray  # bool: SpecGuard off: one greedy candidate, as vLLM's own SD drafts
    streams: np.ndarray | None = None  # [B, k] int64: each candidate's random stream (None: the proposer's)

    @property
    def num_rows(self) -> int:
        return int(self.open_states.shape[0])

    @classmethod
    def uniform(cls, n: int) -> DraftRows:
        """``n`` fresh requests drafting a step (warm-up runs, tests)."""
        return cls(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool),
                   np.zeros(n, dtype=bool))

    @classmethod
    def of(cls, *, open_states=None, needs_no_draft=None, drafts_past_step=None,
           opted_out=None) -> DraftRows:
        """From per-row lists (tests); absent fields are the defaults of a fresh request."""
        n = len(next(v for v in (open_states, needs_no_draft, drafts_past_step, opted_out)
                     if v is not None))
        base = cls.uniform(n)
        return cls(base.open_states if open_states is None else np.asarray(open_states, np.int64),
                   base.needs_no_draft if needs_no_draft is None else np.asarray(needs_no_draft, bool),
                   base.drafts_past_step if drafts_past_step is None
                   else np.asarray(drafts_past_step, bool),
                   base.opted_out if opted_out is None else np.asarray(opted_out, bool))


@dataclass(frozen=True)
class TruncatedDraft:
    """A proposed row as it goes to the scheduler, and how much of it is the step."""

    tokens: list[int]
    step_len: int | None  # None: the whole row is the step (no tail to verify token-level)


class RequestSteps:
    """One request's row of the table (a view: reads and writes go to the arrays)."""

    def __init__(self, table: StepStateTable, slot: int):
        self._table, self.slot = table, slot

    @property
    def mode(self) -> StepMode:
        return StepMode(int(self._table.mode[self.slot]))

    @property
    def open_state(self) -> int:
        return int(self._table.open_state[self.slot])

    @property
    def open_len(self) -> int:
        """How many committed tokens the open step has (0: a fresh step)."""
        return int(self._table.open_len[self.slot])

    @property
    def opted_out(self) -> bool:
        return bool(self._table.opted_out[self.slot])

    @property
    def params(self) -> SpecGuardParams:
        return self._table.params[self.slot]


# Resolves a new request's knobs, opt-out and its k candidates' random streams (from its
# vLLM request state); None: the defaults (streams 0).
Resolver = Callable[[str], "tuple[SpecGuardParams, bool, Sequence[int]] | None"]


class StepStateTable:
    """Every tracked request's step state, one slot each, in NumPy arrays over slots."""

    def __init__(self, segmenter: StepSegmenter, base: SpecGuardParams | None = None,
                 resolve: Resolver | None = None, capacity: int = 64):
        self.segmenter = segmenter
        self.base = base if base is not None else SpecGuardParams()
        self.resolve = resolve
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._last_req_ids: list[str] | None = None
        self._last_slots = np.zeros(0, dtype=np.int64)
        self._allocate(capacity)

    # ------------------------------------------------------------------ slots
    def _allocate(self, capacity: int) -> None:
        old = getattr(self, "mode", None)
        fields = {"mode": np.int8, "open_state": np.int64, "open_len": np.int64,
                  "opted_out": bool, "tau": np.float64, "beta": np.float64,
                  "speculative": bool, "proposed_step_len": np.int64, "streams": np.int64}
        k = max(self.base.num_candidates, 1)
        for name, dtype in fields.items():
            grown = np.zeros((capacity, k) if name == "streams" else capacity, dtype=dtype)
            if name == "proposed_step_len":
                grown[:] = NO_LENGTH
            if old is not None:
                previous = getattr(self, name)
                grown[: previous.shape[0]] = previous
            setattr(self, name, grown)
        params = getattr(self, "params", [])
        self.params: list[SpecGuardParams | None] = params + [None] * (capacity - len(params))
        self._free.extend(range(capacity - 1, len(params) - 1, -1))

    def _new_slot(self, req_id: str) -> int:
        if not self._free:
            self._allocate(2 * len(self.params))
        slot = self._free.pop()
        self._slot_of[req_id] = slot
        resolved = self.resolve(req_id) if self.resolve is not None else None
        params, opted_out, streams = resolved if resolved is not None else (self.base, False, ())
        self.params[slot] = params
        self.streams[slot] = 0
        self.streams[slot, : len(streams)] = streams
        self.mode[slot] = StepMode.TOKEN_LEVEL if opted_out else StepMode.DRAFTING
        self.open_state[slot] = 0
        self.open_len[slot] = 0
        self.opted_out[slot] = opted_out
        self.tau[slot], self.beta[slot] = params.tau, params.beta
        self.speculative[slot] = params.fallback == "speculative"
        self.proposed_step_len[slot] = NO_LENGTH
        return slot

    def slots(self, req_ids: list[str]) -> np.ndarray:
        """The slots of ``req_ids`` (new requests get one). The batch's rows change only when
        requests come, go or move, so the previous call's slots are reused while the ids
        are the same list of strings (one list comparison)."""
        if req_ids == self._last_req_ids:
            return self._last_slots
        slot_of = self._slot_of
        slots = np.fromiter((slot_of[r] if r in slot_of else self._new_slot(r) for r in req_ids),
                            dtype=np.int64, count=len(req_ids))
        self._last_req_ids, self._last_slots = list(req_ids), slots
        return slots

    def __len__(self) -> int:
        return len(self._slot_of)

    def get(self, req_id: str) -> RequestSteps:
        slot = self._slot_of.get(req_id)
        return RequestSteps(self, self._new_slot(req_id) if slot is None else slot)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            slot = self._slot_of.pop(req_id, None)
            if slot is not None:
                self.params[slot] = None
                self._free.append(slot)
        self._last_req_ids = None

    def opt_out(self, req_id: str) -> None:
        """Run the request as vLLM's own SD: every row token-level, no step ever judged."""
        slot = self.get(req_id).slot
        self.opted_out[slot] = True
        self.mode[slot] = StepMode.TOKEN_LEVEL
        self.open_state[slot] = 0
        self.open_len[slot] = 0

    # ------------------------------------------------------------------ after sampling
    def after_sampling_rows(self, slots: np.ndarray, tokens: np.ndarray, counts: np.ndarray,
                            kinds: np.ndarray, step_lens: np.ndarray) -> None:
        """Update the rows ``slots`` after one engine step: ``tokens [B, T]`` (each row's
        ``counts`` committed tokens first), the verifier's ``kinds`` and ``step_lens``.

        For an accepted step, ``step_lens`` says how many committed tokens are the step
        (NO_LENGTH: all but the last); the rest (a token-level-verified tail and the
        target's last token) opens the next step. A rejected step commits only the
        target's own first token, and the request regenerates until the step ends.
        """
        live = (counts > 0) & ~self.opted_out[slots]  # a partial prefill chunk commits nothing
        if not live.any():
            return
        s, tokens, counts = slots[live], tokens[live], counts[live]
        kinds, step_lens = kinds[live], step_lens[live]
        accepted, rejected = kinds == Verdict.ACCEPTED, kinds == Verdict.REJECTED
        mode = self.mode[s]
        mode = np.where(kinds == Verdict.TOKEN_LEVEL, StepMode.TOKEN_LEVEL, mode)
        mode = np.where(rejected, StepMode.REGENERATING, mode)
        # The verified step is closed; what follows it opens the next one.
        mode = np.where(accepted, StepMode.DRAFTING, mode)
        state = np.where(accepted, 0, self.open_state[s])
        open_len = np.where(accepted, 0, self.open_len[s])
        # Each row pushes its committed tokens start .. stop - 1 through the automaton.
        start = np.where(accepted, np.where(step_lens < 0, counts - 1, step_lens), 0)
        stop = np.where(rejected, np.minimum(counts, 1), counts)
        width = int(stop.max(initial=0))
        positions = np.arange(width)
        pushed = (positions >= start[:, None]) & (positions < stop[:, None])  # [B, width]
        # Column t: the row's token there, or 0 (a valid id) where it pushes none.
        flat_tokens = np.where(pushed, tokens[:, :width], 0)
        table, vocab, end = self.segmenter.restarting_table_host, self.segmenter.vocab_size, \
            self.segmenter.END
        last_end = np.zeros_like(state)  # position after the last step end pushed (0: none)
        for t in range(width):  # one gather per position for the whole batch
            state = np.where(pushed[:, t], table[state * vocab + flat_tokens[:, t]], state)
            last_end = np.where(pushed[:, t] & (state == end), t + 1, last_end)
        ended = last_end > 0
        mode = np.where(ended, StepMode.DRAFTING, mode)
        open_len = np.where(ended, stop - last_end, open_len + np.maximum(stop - start, 0))
        self.mode[s] = mode
        self.open_state[s] = np.where(state == end, 0, state)
        self.open_len[s] = open_len

    def after_sampling(self, req_id: str, tokens: list[int], row: RowVerdict) -> None:
        """:meth:`after_sampling_rows` for one request."""
        slots = np.array([self.get(req_id).slot], dtype=np.int64)
        width = max(len(tokens), 1)
        padded = np.zeros((1, width), dtype=np.int64)
        padded[0, : len(tokens)] = tokens
        self.after_sampling_rows(slots, padded, np.array([len(tokens)]),
                                 np.array([row.verdict], dtype=np.int8),
                                 np.array([NO_LENGTH if row.step_len is None else row.step_len]))

    # ------------------------------------------------------------------ drafting
    def draft_rows(self, slots: np.ndarray) -> DraftRows:
        return DraftRows(open_states=self.open_state[slots],
                         needs_no_draft=self.mode[slots] == StepMode.REGENERATING,
                         drafts_past_step=self.speculative[slots] | self.opted_out[slots],
                         opted_out=self.opted_out[slots], streams=self.streams[slots])

    def truncate_rows(self, slots: np.ndarray, draft_lens: np.ndarray, step_ends: np.ndarray,
                      eos_ends: np.ndarray, keep_tail: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Where each proposed row is cut, and how much of it is the step (host, [B]).

        ``draft_lens``: the row's drafted length; ``step_ends`` / ``eos_ends``: the position
        after the step's delimiter / the first EOS (0: none in the row). A regenerating
        request proposes nothing. Without ``keep_tail`` (default: the request drafts past its
        step, fallback "speculative" or SpecGuard off) the row ends with its step. With it
        the draft past the step's end is kept, up to and including an EOS, with the step's
        length: 0 while the request finishes a rejected step token-level (nothing in the row
        is judged as a step then), the whole row where no step ends in it; NO_LENGTH for rows
        without a tail (the whole row is the step).
        """
        mode = self.mode[slots]
        if keep_tail is None:
            keep_tail = self.speculative[slots] | self.opted_out[slots]
        cut_at_step = np.where(step_ends > 0, np.minimum(step_ends, draft_lens), draft_lens)
        with_tail = np.where(eos_ends > 0, np.minimum(eos_ends, draft_lens), draft_lens)
        regenerating = mode == StepMode.REGENERATING
        lengths = np.where(regenerating, 0, np.where(keep_tail, with_tail, cut_at_step))
        # EOS ends a step too, so a step end never passes the EOS cut.
        tail_step = np.where(mode == StepMode.TOKEN_LEVEL, 0,
                             np.where(step_ends > 0, step_ends, lengths))
        step_lens = np.where(keep_tail & ~regenerating, tail_step, NO_LENGTH)
        return lengths, step_lens

    def truncate_draft(self, req_id: str, draft: list[int], keep_tail: bool = False) -> TruncatedDraft:
        """:meth:`truncate_rows` for one request's row, its step end and EOS found here."""
        slot = self.get(req_id).slot
        step_end = self.segmenter.step_length(draft, state=int(self.open_state[slot])) or 0
        eos_end = next((i + 1 for i, token in enumerate(draft)
                        if token in self.segmenter.eos_token_ids), 0)
        lengths, step_lens = self.truncate_rows(
            np.array([slot]), np.array([len(draft)]), np.array([step_end]), np.array([eos_end]),
            keep_tail=np.array([keep_tail]))
        step_len = int(step_lens[0])
        return TruncatedDraft(list(draft[: int(lengths[0])]), None if step_len < 0 else step_len)

    # ------------------------------------------------------------------ proposed steps
    def record_proposed(self, slots: np.ndarray, step_lens: np.ndarray) -> None:
        """Hand-off to the verifier: each proposed row's step length (the whole row unless
        it has a tail), so it can tell a step the scheduler truncated."""
        self.proposed_step_len[slots] = step_lens

    def take_proposed(self, slots: np.ndarray, has_drafts: np.ndarray) -> np.ndarray:
        """The recorded step lengths of the rows with drafts (NO_LENGTH where none), taken
        once: a request whose drafts are not verified keeps its entry until it is proposed
        again."""
        taken = np.where(has_drafts, self.proposed_step_len[slots], NO_LENGTH)
        self.proposed_step_len[slots[has_drafts]] = NO_LENGTH
        return taken
