"""Step records from an engine's output tokens and its logged step decisions.

The vLLM engine logs each verified step (context length, drafted tokens,
scores); this rebuilds the same per-step records the reference decoder keeps,
so `specguard trace` prints one format whichever engine ran.
"""

from __future__ import annotations

from typing import Callable, Sequence

from specguard_vllm.core.decision import StepDecision
from specguard_vllm.core.steps import StepSegmenter


def step_records(
    prompt_len: int,
    generated: Sequence[int],
    decisions: Sequence[dict],
    segmenter: StepSegmenter,
    decode: Callable[[Sequence[int]], str],
    default_source: str = "target",
) -> list[dict]:
    """JSON step records ``{"text","source","lpbv","abgv","score","accepted"}``.

    ``decisions`` are the engine's log entries for this request: ``context_len``
    (prompt + committed tokens before the step), ``drafted``, ``lpbv``, ``abgv``,
    ``score``, ``accepted``.
    """
    by_context = {int(d["context_len"]): d for d in decisions}
    records: list[dict] = []
    open_tokens: list[int] = []
    pending: dict | None = None

    def close(source: str, decision: dict | None) -> None:
        nonlocal open_tokens
        if open_tokens:
            records.append({
                "text": decode(open_tokens), "source": source,
                "lpbv": None if decision is None else decision["lpbv"],
                "abgv": None if decision is None else decision["abgv"],
                "score": None if decision is None else decision["score"],
                "accepted": None if decision is None else decision["accepted"],
            })
        open_tokens = []

    j = 0
    tokens = list(generated)
    while j < len(tokens):
        decision = by_context.get(prompt_len + j)
        if decision is not None and decision["accepted"]:
            n = min(len(decision["drafted"]), len(tokens) - j)
            open_tokens.extend(tokens[j: j + n])
            close("draft", decision)
            j += n
            continue
        if decision is not None:
            pending = decision
        token = tokens[j]
        open_tokens.append(token)
        j += 1
        if segmenter.step_length([token], prefix=open_tokens[:-1]) is not None:
            close(default_source, pending)
            pending = None
    close(default_source, pending)
    return records


def decision_from_record(record: dict) -> StepDecision | None:
    if record["accepted"] is None:
        return None
    return StepDecision(record["lpbv"], record["abgv"], record["score"], record["accepted"])
