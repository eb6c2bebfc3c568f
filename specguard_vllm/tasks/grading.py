"""Grade produced solutions step by step against a problem's gold step DAG.

What "right" means for one step line, given the lines before it (the prefix):

1. It parses as one of the phrasings in `phrasing.py` (else: ``format``); a unit
   word after the result, if any, must be the problem's item (else: ``format``).
2. It performs a gold step that the prefix has not yet performed and whose inputs the
   prefix has all produced: same operation, and operands equal to that step's inputs,
   where a literal input must equal the question's number and a `Ref` input must
   equal the value *the prefix* wrote for the referenced step (so a step that
   correctly continues from an earlier mistake is judged right locally, which is
   what a step verifier is asked to judge). Order is free for + and *.
   Otherwise: ``operand`` (same operation as a ready step, one operand off, or both
   operands right with the wrong operation) or ``unmatched``.
3. Its arithmetic is exact: ``a op b == c`` (else: ``arithmetic``).

Lines that match a ready step structurally (cases ``arithmetic`` and ``operand``)
still bind that step to the value they wrote, so later lines are judged against it.
`Answer: N` is graded separately: the solution is correct iff N equals the gold answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from specguard_vllm.tasks.phrasing import StepClaim, parse_answer_line, parse_step_line
from specguard_vllm.tasks.problems import COMMUTATIVE, Problem, Ref

Verdict = Literal["right", "format", "operand", "unmatched", "arithmetic"]


@dataclass(frozen=True)
class StepGrade:
    """The verdict on one step line; `step` is the gold step it was bound to, if any."""

    line: str
    verdict: Verdict
    step: int | None

    @property
    def right(self) -> bool:
        return self.verdict == "right"


@dataclass
class GradingState:
    """What a prefix has produced: gold step index -> value the prefix wrote for it."""

    bound: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SolutionGrade:
    steps: tuple[StepGrade, ...]
    answer: int | None
    correct: bool
    well_formed: bool  # every line parsed and the last line is `Answer: N`

    @property
    def n_wrong(self) -> int:
        return sum(not s.right for s in self.steps)


def _operands_match(claim: StepClaim, op: str, expected: tuple[int, int]) -> int:
    """How many operands of `claim` agree with `expected` (0, 1 or 2), order-aware."""
    got = (claim.a, claim.b)
    straight = sum(g == e for g, e in zip(got, expected))
    if op in COMMUTATIVE:
        swapped = sum(g == e for g, e in zip(got[::-1], expected))
        return max(straight, swapped)
    return straight


def grade_step(problem: Problem, state: GradingState, line: str) -> StepGrade:
    """Grade one step line after the prefix summarised by `state`, and update `state`."""
    claim = parse_step_line(line)
    if claim is None or (claim.unit is not None and claim.unit != problem.item):
        return StepGrade(line, "format", None)
    best: tuple[int, int] | None = None  # (score, step index)
    for i, s in enumerate(problem.steps):
        if i in state.bound or any(d not in state.bound for d in s.deps):
            continue
        expected = tuple(state.bound[x.step] if isinstance(x, Ref) else x for x in s.inputs)
        n_ok = _operands_match(claim, s.op, expected)  # type: ignore[arg-type]
        score = 2 * n_ok + (claim.op == s.op)  # 5 = exact, 3-4 = one off / wrong op
        if score >= 3 and (best is None or score > best[0]):
            best = (score, i)
    if best is None:
        return StepGrade(line, "unmatched", None)
    score, i = best
    state.bound[i] = claim.c
    if score < 5:
        return StepGrade(line, "operand", i)
    return StepGrade(line, "right" if claim.arithmetic_ok else "arithmetic", i)


def split_solution(text: str) -> tuple[list[str], str | None]:
    """Step lines and the final line (None if the text has no `Answer:` line)."""
    lines = [ln for ln in text.strip().split("\n") if ln.strip()]
    if lines and lines[-1].strip().startswith("Answer:"):
        return lines[:-1], lines[-1]
    return lines, None


def grade_solution(problem: Problem, text: str) -> SolutionGrade:
    """Grade every step line in order, then the final answer."""
    step_lines, last = split_solution(text)
    state = GradingState()
    grades = tuple(grade_step(problem, state, ln) for ln in step_lines)
    answer = parse_answer_line(last) if last is not None else None
    well_formed = answer is not None and all(g.verdict != "format" for g in grades)
    return SolutionGrade(grades, answer, answer == problem.answer, well_formed)
