"""Per-request step bookkeeping in the worker: which requests are regenerating.

After a rejected step the target writes the rest of that step itself, so the
request gets no drafts until the target has produced a step delimiter. With
``fallback: speculative`` a request's draft runs past the step's end (as token-level
SD's does) and the part after the step, the *tail*, is verified token by token; the
table remembers where the step ends in the drafted row until the verifier reads it.
This table is the only SpecGuard state that outlives one engine step; it is keyed by
request id and dropped when vLLM removes the request (finished, aborted, or a
client that disconnected).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specguard_vllm.config import SpecGuardParams
from specguard_vllm.core.steps import StepSegmenter


@dataclass
class RequestSteps:
    regenerating: bool = False  # fallback "target": the target writes the rest of the step
    token_level: bool = False  # fallback "speculative": token-level SD until the step ends
    open_step: list[int] = field(default_factory=list)  # committed tokens of the unfinished step
    draft_step_len: int | None = None  # tokens of the last drafted row that form the step
    params: SpecGuardParams | None = None  # the request's knobs (request_params keeps them)


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

    def _push_target_token(self, state: RequestSteps, token: int) -> None:
        if self.segmenter.step_length([token], prefix=state.open_step) is not None:
            state.open_step = []
            state.regenerating = False
            state.token_level = False
        else:
            state.open_step.append(token)

    def after_sampling(self, req_id: str, tokens: list[int], verified: bool | str | None,
                       step_len: int | None = None) -> None:
        """Update after one engine step.

        ``verified``: True (step accepted), False (step rejected, the target finishes it),
        ``"token"`` (verified token-level: the speculative fallback), None (no step drafted).
        ``step_len``: for an accepted step, how many of ``tokens`` are the step; the rest
        (a token-level-verified tail and the target's last token) opens the next step.
        """
        if not tokens:
            return  # a partial prefill chunk: nothing committed
        state = self.get(req_id)
        if verified == "token":
            state.token_level = True
            for token in tokens:
                self._push_target_token(state, token)
        elif verified is None:
            for token in tokens:
                self._push_target_token(state, token)
        elif verified:
            # The verified step is closed; what follows it (the bonus token, or a verified
            # tail and its last token) opens the next one.
            state.open_step = []
            state.regenerating = False
            state.token_level = False
            after = tokens[-1:] if step_len is None else tokens[step_len:]
            for token in after:
                self._push_target_token(state, token)
        else:
            # Rejected: only the target's own first token was committed.
            state.regenerating = True
            self._push_target_token(state, tokens[0])

    def truncate_draft(self, req_id: str, draft: list[int], keep_tail: bool = False) -> list[int]:
        """The proposed step, cut after its delimiter; [] while regenerating.

        ``keep_tail`` (fallback ``speculative``): keep the draft past the step's end, up to
        and including an EOS, and remember the step's length (0 while the request finishes
        a rejected step token-level: then nothing in the row is judged as a step).
        """
        state = self.get(req_id)
        if state.regenerating:
            state.draft_step_len = None
            return []
        end = self.segmenter.step_length(draft, prefix=state.open_step)
        if not keep_tail:
            state.draft_step_len = None
            return draft if end is None else draft[:end]
        for i, token in enumerate(draft):
            if token in self.segmenter.eos_token_ids:
                draft = draft[: i + 1]
                break
        # EOS ends a step too, so ``end`` never passes the cut above.
        state.draft_step_len = 0 if state.token_level else (len(draft) if end is None else end)
        return draft
