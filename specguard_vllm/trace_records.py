"""Step records from an engine's output tokens and its logged step decisions.

The vLLM engine logs each verified step (context length, drafted tokens,
scores); this rebuilds the same per-step records the reference decoder keeps,
so `specguard trace` prints one format whichever engine ran.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from specguard_vllm.core.decision import StepDecision
from specguard_vllm.core.steps import StepSegmenter


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
    judged step; "token": a row verified token-level while finishing a rejected step),
    ``context_len`` (prompt + committed tokens before the row), ``drafted``,
    ``step_len`` (drafted tokens that form the step; the rest is a tail), ``committed``
    (tokens the row committed: kept drafts, then the target's own), and for steps
    ``lpbv``, ``abgv``, ``score``, ``accepted``. ``tokens`` counts each record's tokens
    by origin, as the reference decoder does.
    """
    from specguard_vllm.reference import origin_counts

    by_context = {int(d["context_len"]): d for d in decisions}
    records: list[dict] = []
    open_tokens: list[int] = []
    open_origins: list[str] = []
    pending: dict | None = None

    def close(source: str, decision: dict | None) -> None:
        nonlocal open_tokens, open_origins
        if open_tokens:
            records.append({
                "text": decode(open_tokens), "source": source,
                "lpbv": None if decision is None else decision["lpbv"],
                "abgv": None if decision is None else decision["abgv"],
                "score": None if decision is None else decision["score"],
                "accepted": None if decision is None else decision["accepted"],
                "tokens": origin_counts(open_origins),
            })
        open_tokens, open_origins = [], []

    def push(token: int, origin: str) -> None:
        nonlocal pending
        open_tokens.append(token)
        open_origins.append(origin)
        if segmenter.step_length([token], prefix=open_tokens[:-1]) is not None:
            close(default_source, pending)
            pending = None

    tokens = list(generated)
    j = 0
    while j < len(tokens):
        entry = by_context.get(prompt_len + j)
        if entry is None:
            push(tokens[j], "target")
            j += 1
            continue
        kind = entry.get("kind", "step")
        committed = entry.get("committed")
        drafted_origin = "sd" if kind == "token" else "prefix"
        if kind == "step" and entry["accepted"]:
            n = min(int(entry.get("step_len") or len(entry["drafted"])), len(tokens) - j)
            open_tokens.extend(tokens[j: j + n])
            open_origins.extend(["step"] * n)
            close("draft", entry)
            j += n
            rest = 1 if committed is None else int(committed) - n  # tail drafts + last token
            drafted_origin = "sd"
        else:
            if kind == "step":
                pending = entry
            rest = 1 if committed is None else int(committed)
        for r in range(rest):
            if j >= len(tokens):
                break
            push(tokens[j], drafted_origin if r < rest - 1 else "target")
            j += 1
    close(default_source, pending)
    return records


def decision_from_record(record: dict) -> StepDecision | None:
    if record["accepted"] is None:
        return None
    return StepDecision(record["lpbv"], record["abgv"], record["score"], record["accepted"])
