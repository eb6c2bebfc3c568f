"""Several correct ways to write one step line, and the parser that reads them all back.

Real draft/target pairs disagree on wording far more often than on correctness, so the
training data writes each step in a randomly drawn phrasing: a template (symbolic,
"plus/is", or an imperative such as "add 5 to 7 to get 12"), operand order where the
operation commutes, an optional connective ("so", "then") and an optional unit after
the result. Whatever the phrasing, `parse_step_line` recovers `(a, op, b, c)` meaning
the claim `a op b = c`, which is what the grader checks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from specguard_vllm.tasks.problems import COMMUTATIVE

WORD = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
CONNECTIVES = ("", "", "so ", "then ")
ANSWER_PREFIX = "Answer: "


def _imperative(op: str, a: int, b: int) -> str:
    if op == "+":
        return f"add {b} to {a} to get"
    if op == "-":
        return f"take {b} from {a} to get"
    if op == "*":
        return f"multiply {a} by {b} to get"
    return f"divide {a} by {b} to get"


def render_step(
    op: str, a: int, b: int, c: int, item: str, rng: random.Random, first: bool = False
) -> str:
    """One step line claiming `a op b = c`, in a phrasing drawn from `rng`.

    The first line of a solution gets no connective ("so" has nothing to follow).
    """
    if op in COMMUTATIVE and rng.random() < 0.5:
        a, b = b, a
    template = rng.randrange(3)
    if template == 0:
        body = f"{a} {op} {b} = {c}"
    elif template == 1:
        body = f"{a} {WORD[op]} {b} is {c}"
    else:
        body = f"{_imperative(op, a, b)} {c}"
    if rng.random() < 0.5:
        body += f" {item}"
    return ("" if first else rng.choice(CONNECTIVES)) + body


@dataclass(frozen=True)
class StepClaim:
    """What a step line asserts: `a op b = c`, plus the unit word if one was written."""

    a: int
    op: str
    b: int
    c: int
    unit: str | None

    @property
    def arithmetic_ok(self) -> bool:
        from specguard_vllm.tasks.problems import apply_op

        return apply_op(self.op, self.a, self.b) == self.c


_N = r"(\d{1,4})"
_UNIT = r"(?: ([a-z]+))?"
_PATTERNS: list[tuple[re.Pattern[str], str, tuple[int, int, int]]] = [
    # (regex, op or "" when the op is a captured symbol, group indices of a, b, c)
    (re.compile(rf"^{_N} ([-+*/]) {_N} = {_N}{_UNIT}$"), "", (1, 3, 4)),
    (re.compile(rf"^{_N} plus {_N} is {_N}{_UNIT}$"), "+", (1, 2, 3)),
    (re.compile(rf"^{_N} minus {_N} is {_N}{_UNIT}$"), "-", (1, 2, 3)),
    (re.compile(rf"^{_N} times {_N} is {_N}{_UNIT}$"), "*", (1, 2, 3)),
    (re.compile(rf"^{_N} divided by {_N} is {_N}{_UNIT}$"), "/", (1, 2, 3)),
    (re.compile(rf"^add {_N} to {_N} to get {_N}{_UNIT}$"), "+", (2, 1, 3)),
    (re.compile(rf"^take {_N} from {_N} to get {_N}{_UNIT}$"), "-", (2, 1, 3)),
    (re.compile(rf"^multiply {_N} by {_N} to get {_N}{_UNIT}$"), "*", (1, 2, 3)),
    (re.compile(rf"^divide {_N} by {_N} to get {_N}{_UNIT}$"), "/", (1, 2, 3)),
]


def parse_step_line(line: str) -> StepClaim | None:
    """The claim a step line makes, or None if it is in none of the known phrasings."""
    body = line.strip()
    for conn in ("so ", "then "):
        if body.startswith(conn):
            body = body[len(conn):]
            break
    for pattern, op, (ia, ib, ic) in _PATTERNS:
        m = pattern.match(body)
        if m:
            groups = m.groups()
            real_op = op or m.group(2)
            return StepClaim(int(m.group(ia)), real_op, int(m.group(ib)), int(m.group(ic)),
                             groups[-1])
    return None


def parse_answer_line(line: str) -> int | None:
    """N from a final line `Answer: N`, else None."""
    m = re.fullmatch(r"Answer: (\d{1,6})", line.strip())
    return int(m.group(1)) if m else None
