"""Step records from an engine's output tokens and its logged step decisions.

The vLLM engine logs each verified step (context length, drafted tokens,
scores); this rebuilds the same per-step records the reference decoder keeps,
so `specguard trace` prints one format whichever engine ran.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from specguard_vllm.core.decision import StepDecision
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.reference import origin_counts


def request_key(req_id) -> str:
    """The part of a vLLM request id that the output and the worker's log share."""
    return str(req_id).split("-", 1)[0]


def is_step(entry: dict) -> bool:
    """A judged step (``kind`` "step", or a log written before ``kind`` existed); rows of
    kind "token" (a rejected step finished token-level) carry no scores or decision."""
    return entry.get("kind", "step") == "step"


def read_decision_log(path: str | Path, *, steps_only: bool = False) -> dict[str, list[dict]]:
    """The worker's decision log (``SPECGUARD_DECISION_LOG``) grouped by request key, in the
    order written; ``steps_only`` keeps judged steps."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    file = Path(path)
    if file.exists():
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if not steps_only or is_step(entry):
                    grouped[request_key(entry["req_id"])].append(entry)
    return grouped


def step_records(
    prompt_len: int,
    generated: Sequence[int],
    decisions: Sequence[dict],
    segmenter: StepSegmenter,
    decode: Callable[[Sequence[int]], str],
    default_source: str = "target",
) -> list[dict]:
    """JSON step records ``{"text","source","lpbv","abgv","score","accepted","tokens"}``.

    ``decisions`` are the engine's log entries for this request: ``kind`` ("step": a
    judged step, ``committed_step`` of its drafts committed; "token": a row verified
    token-level, finishing a rejected step or a step the scheduler truncated),
    ``context_len`` (prompt + committed tokens before the row), ``drafted``,
    ``step_len`` (drafted tokens that form the step; the rest is a tail), ``committed``
    (tokens the row committed: kept drafts, then the target's own), and for steps
    ``lpbv``, ``abgv``, ``score``, ``accepted``. ``tokens`` counts each record's tokens
    by origin, as the reference decoder does.
    """
    by_context = {int(d["context_len"]): d for d in decisions}
    records = _Records(segmenter, decode, default_source)
    tokens = list(generated)
    j = 0
    while j < len(tokens):
        entry = by_context.get(prompt_len + j)
        if entry is None:  # a token the target wrote on its own pass
            records.push(tokens[j], "target")
            j += 1
            continue
        kind = entry.get("kind", "step")
        committed = entry.get("committed")
        drafted_origin = "sd" if kind == "token" else "prefix"
        if kind == "step" and entry["accepted"]:
            kept = entry.get("committed_step")  # less than step_len: cut at a forbidden token
            if kept is None:
                kept = entry.get("step_len") or len(entry["drafted"])
            n = min(int(kept), len(tokens) - j)
            records.push_step(tokens[j: j + n], entry)
            j += n
            rest = 1 if committed is None else int(committed) - n  # tail drafts + last token
            drafted_origin = "sd"
        else:
            if kind == "step":
                records.pending = entry
            rest = 1 if committed is None else int(committed)
        for r in range(rest):
            if j >= len(tokens):
                break
            records.push(tokens[j], drafted_origin if r < rest - 1 else "target")
            j += 1
    records.close(default_source, records.pending)
    return records.records


class _Records:
    """The records so far and the open one, closed at every step end as the reference closes
    them; ``pending`` is the judged-and-rejected step the open record will carry."""

    def __init__(self, segmenter: StepSegmenter, decode: Callable[[Sequence[int]], str],
                 default_source: str):
        self.segmenter, self.decode, self.default_source = segmenter, decode, default_source
        self.records: list[dict] = []
        self.tokens: list[int] = []
        self.origins: list[str] = []
        self.pending: dict | None = None

    def push(self, token: int, origin: str) -> None:
        self.tokens.append(token)
        self.origins.append(origin)
        if self.segmenter.step_length([token], prefix=self.tokens[:-1]) is not None:
            self.close(self.default_source, self.pending)
            self.pending = None

    def push_step(self, step: list[int], entry: dict) -> None:
        """An accepted step: its drafts close the open record, judged by ``entry``."""
        self.tokens.extend(step)
        self.origins.extend(["step"] * len(step))
        self.close("draft", entry)

    def close(self, source: str, decision: dict | None) -> None:
        if self.tokens:
            self.records.append({
                "text": self.decode(self.tokens), "source": source,
                "lpbv": None if decision is None else decision["lpbv"],
                "abgv": None if decision is None else decision["abgv"],
                "score": None if decision is None else decision["score"],
                "accepted": None if decision is None else decision["accepted"],
                "tokens": origin_counts(self.origins),
            })
        self.tokens, self.origins = [], []


def decision_from_record(record: dict) -> StepDecision | None:
    if record["accepted"] is None:
        return None
    return StepDecision(record["lpbv"], record["abgv"], record["score"], record["accepted"])
