"""Step labels for `specguard calibrate`: was a drafted step on the target's trajectory good?

``step`` labels grade the step's line with the tiny task's step grader (`tasks.grade_step`),
given the committed lines before it; only the bundled task has such a grader.
"""

from __future__ import annotations

from collections import Counter

from specguard_vllm.evaluation.calibrate import StepSignal


def step_ids(entry: dict) -> list[int]:
    """The step's own tokens: ``drafted[:step_len]`` when the log has ``step_len``."""
    drafted = list(entry["drafted"])
    n = entry.get("step_len")
    return drafted if n is None else drafted[: int(n)]


def _grade_line(problem, state, line: str) -> bool:
    """Right/wrong of one produced line after the prefix summarised by ``state``.

    A step line goes to `grade_step`. An ``Answer: N`` line is right iff the prefix has
    computed the last gold step and N is the value it wrote for it (locally right, like
    `grade_step`; on a correct prefix that is the gold answer).
    """
    from specguard_vllm.tasks import grade_step, parse_answer_line

    if line.strip().startswith("Answer:"):
        value = parse_answer_line(line)
        last = len(problem.steps) - 1
        return value is not None and state.bound.get(last) == value
    return grade_step(problem, state, line).right


def _state_after(problem, prefix_text: str):
    from specguard_vllm.tasks import grade_step
    from specguard_vllm.tasks.grading import GradingState

    state = GradingState()
    for line in prefix_text.split("\n"):
        if line.strip() and not line.strip().startswith("Answer:"):
            grade_step(problem, state, line)
    return state


def label_steps(problem_id: str, problem, prompt_len: int, full_ids: list[int],
                entries: list[dict], decode, segmenter, counts: Counter) -> list[StepSignal]:
    """StepSignal records of one request's logged steps.

    The step's tokens are ``drafted[:step_len]`` (all of ``drafted`` without ``step_len``);
    its line is the text after the last committed newline plus the step's text (a step
    whose context ends mid-line, e.g. after the target's first token, completes that
    line: counted as ``joined``). Graded with the committed lines before it as prefix.
    Skipped, and counted in ``counts``: steps that do not end their line (``incomplete``:
    no delimiter / EOS at the end, e.g. cut at ``num_speculative_tokens``) and blank lines.
    """
    records = []
    for entry in sorted(entries, key=lambda e: e["context_len"]):
        counts["logged"] += 1
        ids = step_ids(entry)
        ends_with_eos = bool(ids) and ids[-1] in segmenter.eos_token_ids
        if not ids or segmenter.step_length(ids) != len(ids):
            counts["incomplete"] += 1
            continue
        committed = list(full_ids[prompt_len: int(entry["context_len"])])
        text = decode(committed + ids)
        if not (text.endswith("\n") or ends_with_eos):
            counts["incomplete"] += 1
            continue
        body = text.removesuffix("\n")
        prefix, _, line = body.rpartition("\n")
        if decode(committed) and not decode(committed).endswith("\n"):
            counts["joined"] += 1
        if not line.strip():
            counts["blank"] += 1
            continue
        right = _grade_line(problem, _state_after(problem, prefix), line)
        counts["graded"] += 1
        records.append(StepSignal(problem_id, float(entry["lpbv"]), float(entry["abgv"]), right))
    return records
