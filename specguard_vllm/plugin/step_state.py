"""Per-request step bookkeeping in the worker, and the named values it exchanges.

After a rejected step the target writes the rest of that step itself, so the
request gets no drafts until the target has produced a step delimiter
(:attr:`StepMode.REGENERATING`). With ``fallback: speculative`` a request's draft runs
past the step's end (as token-level SD's does) and the part after the step, the
*tail*, is verified token by token; after a rejected step the request is verified
token-level until the step ends (:attr:`StepMode.TOKEN_LEVEL`).

The table is, with the :class:`DraftStepLengths` hand-off, the only SpecGuard state
that outlives one engine step; both are keyed by request id and dropped when vLLM
removes the request (finished, aborted, or a client that disconnected). The verifier
reports each row as a :class:`RowVerdict`; the proposer reads a :class:`DraftRowHint`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from specguard_vllm.config import SpecGuardParams
from specguard_vllm.core.decision import StepDecision
from specguard_vllm.core.steps import StepSegmenter


class StepMode(enum.Enum):
    """How a request's next drafted row is treated, until its open step ends."""

    DRAFTING = "drafting"  # draft a step; the verifier judges it
    REGENERATING = "regenerating"  # fallback "target": the target writes the rest of the step
    TOKEN_LEVEL = "token_level"  # fallback "speculative": token-level SD until the step ends
    # (a request that turned SpecGuard off stays here until it finishes: vLLM's own SD)


class Verdict(enum.Enum):
    """What the verifier did with one row of the verification batch."""

    NO_STEP = "no_step"  # no drafts in the row: the target's one token
    ACCEPTED = "accepted"  # the whole step kept (plus bonus, or a tail verified token-level)
    REJECTED = "rejected"  # fallback "target": only the target's token at the step's start
    TOKEN_LEVEL = "token_level"  # verified token by token (fallback "speculative")


@dataclass(frozen=True)
class RowVerdict:
    """One row's verdict, with what the step table needs to split its committed tokens."""

    verdict: Verdict
    step_len: int | None = None  # ACCEPTED: how many of the committed tokens are the step


NO_STEP = RowVerdict(Verdict.NO_STEP)


@dataclass(frozen=True)
class StepVerdicts:
    """What one engine step's verification decided, row by row, for the step table."""

    req_ids: list[str]
    rows: list[RowVerdict]

    def row(self, i: int, req_id: str) -> RowVerdict:
        """Row ``i``'s verdict; NO_STEP for a row this verification did not see."""
        if i < len(self.rows) and self.req_ids[i] == req_id:
            return self.rows[i]
        return NO_STEP


def row_verdict(decision: StepDecision | None, token_level: bool, step_len: int) -> RowVerdict:
    """The verdict of a row: verified token-level, not judged (no step), or judged."""
    if token_level:
        return RowVerdict(Verdict.TOKEN_LEVEL)
    if decision is None:
        return NO_STEP
    if decision.accepted:
        return RowVerdict(Verdict.ACCEPTED, step_len)
    return RowVerdict(Verdict.REJECTED)


@dataclass(frozen=True)
class DraftRowHint:
    """What the proposer needs to know about one request before drafting its row."""

    open_state: int = 0  # the step segmenter's automaton state after the open step's tokens
    needs_no_draft: bool = False  # regenerating: the target writes the rest of the step
    drafts_past_step: bool = False  # fallback "speculative": draft to K tokens, not to the step end
    opted_out: bool = False  # SpecGuard off: one greedy candidate, as vLLM's own SD drafts


@dataclass(frozen=True)
class TruncatedDraft:
    """A proposed row as it goes to the scheduler, and how much of it is the step."""

    tokens: list[int]
    step_len: int | None  # None: the whole row is the step (no tail to verify token-level)


@dataclass
class RequestSteps:
    mode: StepMode = StepMode.DRAFTING
    open_step: list[int] = field(default_factory=list)  # committed tokens of the unfinished step
    open_state: int = 0  # the segmenter's automaton state after open_step (0: a fresh step)
    params: SpecGuardParams | None = None  # the request's knobs (the runner state keeps them)
    opted_out: bool = False  # SpecGuard off (vllm_xargs): token-level SD, no steps, to the end


class StepStateTable:
    def __init__(self, segmenter: StepSegmenter):
        self.segmenter = segmenter
        self._requests: dict[str, RequestSteps] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, req_id: str) -> RequestSteps:
        state = self._requests.get(req_id)
        if state is None:
            state = self._requests[req_id] = RequestSteps()
        return state

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._requests.pop(req_id, None)

    def opt_out(self, req_id: str) -> None:
        """Run the request as vLLM's own SD: every row token-level, no step ever judged."""
        state = self.get(req_id)
        state.opted_out = True
        state.mode = StepMode.TOKEN_LEVEL
        state.open_step = []
        state.open_state = 0

    def _push_target_token(self, state: RequestSteps, token: int) -> None:
        next_state = self.segmenter.advance(state.open_state, token)
        if next_state == self.segmenter.END:
            state.open_step = []
            state.open_state = 0
            state.mode = StepMode.DRAFTING
        else:
            state.open_step.append(token)
            state.open_state = next_state

    def after_sampling(self, req_id: str, tokens: list[int], row: RowVerdict) -> None:
        """Update after one engine step from the tokens it committed and the row's verdict.

        For an accepted step, ``row.step_len`` says how many of ``tokens`` are the step; the
        rest (a token-level-verified tail and the target's last token) opens the next step.
        """
        if not tokens:
            return  # a partial prefill chunk: nothing committed
        state = self.get(req_id)
        if state.opted_out:
            return  # SpecGuard off: no steps to follow, token-level throughout
        if row.verdict is Verdict.TOKEN_LEVEL:
            state.mode = StepMode.TOKEN_LEVEL
            for token in tokens:
                self._push_target_token(state, token)
        elif row.verdict is Verdict.NO_STEP:
            for token in tokens:
                self._push_target_token(state, token)
        elif row.verdict is Verdict.ACCEPTED:
            # The verified step is closed; what follows it (the bonus token, or a verified
            # tail and its last token) opens the next one.
            state.open_step = []
            state.open_state = 0
            state.mode = StepMode.DRAFTING
            after = tokens[-1:] if row.step_len is None else tokens[row.step_len:]
            for token in after:
                self._push_target_token(state, token)
        else:
            # Rejected: only the target's own first token was committed.
            state.mode = StepMode.REGENERATING
            self._push_target_token(state, tokens[0])

    def truncate_draft(self, req_id: str, draft: list[int], keep_tail: bool = False,
                       step_end: int | None | bool = False,
                       eos_end: int | None | bool = False) -> TruncatedDraft:
        """The proposed step, cut after its delimiter; no tokens while regenerating.

        ``keep_tail`` (fallback ``speculative``): keep the draft past the step's end, up to
        and including an EOS, with the step's length (0 while the request finishes a
        rejected step token-level: then nothing in the row is judged as a step).
        ``step_end`` / ``eos_end``: where the step ends and the first EOS (position after
        it, None: nowhere) if the caller found them already (on the device); found here
        otherwise.
        """
        state = self.get(req_id)
        if state.mode is StepMode.REGENERATING:
            return TruncatedDraft([], None)
        end = self.segmenter.step_length(draft, state=state.open_state) \
            if step_end is False else step_end
        if not keep_tail:
            return TruncatedDraft(draft if end is None else draft[:end], None)
        if eos_end is False:
            eos_end = next((i + 1 for i, token in enumerate(draft)
                            if token in self.segmenter.eos_token_ids), None)
        if eos_end is not None:
            draft = draft[:eos_end]
        # EOS ends a step too, so ``end`` never passes the cut above.
        if state.mode is StepMode.TOKEN_LEVEL:
            return TruncatedDraft(draft, 0)
        return TruncatedDraft(draft, len(draft) if end is None else end)


class DraftStepLengths:
    """Hand-off from the draft truncation to the verifier: where each drafted step ends.

    Written when a request's row is proposed, taken (once) when that row is verified; a
    request whose drafts are not verified keeps its entry until it is proposed again.
    """

    def __init__(self) -> None:
        self._step_lens: dict[str, int | None] = {}

    def record(self, req_id: str, step_len: int | None) -> None:
        self._step_lens[req_id] = step_len

    def take(self, req_id: str) -> int | None:
        return self._step_lens.pop(req_id, None)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._step_lens.pop(req_id, None)
