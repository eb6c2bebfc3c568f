"""Seeded GSM8K-flavoured word problems with a gold step graph.

A problem is a short story about one person's pile of items. Every sentence is one
arithmetic operation; the gold solution is a small DAG of steps (`Step`), each of
whose operands is either a literal from the question or the result of an earlier
step. Most steps consume the running total; a "side" purchase (`k bags with n each`)
is computed from literals alone, so it may be written anywhere before the step that
adds it in. That freedom, plus the phrasings in `phrasing.py`, gives each problem
many correct solutions while the answer and every step stay checkable.

Splits are assigned by hashing the problem's *numeric skeleton* (operations and
numbers, not names or items), so train, dev and test can never share a computation:
disjointness follows from `split_of` being a function of the skeleton.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "dev", "test"]
SPLITS: tuple[Split, ...] = ("train", "dev", "test")
OPS = ("+", "-", "*", "/")
COMMUTATIVE = frozenset({"+", "*"})

MAX_VALUE = 200  # every intermediate value lies in [1, MAX_VALUE]
MAX_STEPS = 5  # gold steps per problem (2 to 5)
MAX_OPERAND = 99  # question operands (amounts gained or lost, starting counts)

NAMES = {
    "Mia": "she", "Ivy": "she", "Ava": "she", "Zoe": "she", "Amy": "she", "Emma": "she",
    "Lily": "she", "Nora": "she", "Leo": "he", "Sam": "he", "Max": "he", "Ben": "he",
    "Eli": "he", "Tom": "he", "Kai": "he", "Omar": "he",
}
ITEMS = ("marbles", "stickers", "apples", "coins", "shells", "cards", "rocks", "pencils",
         "beads", "stamps")
CONTAINERS = ("boxes", "bags", "jars", "crates", "packs")


@dataclass(frozen=True)
class Ref:
    """An operand that is the result of gold step `step` (an index into `Problem.steps`)."""

    step: int


Operand = int | Ref


@dataclass(frozen=True)
class Step:
    """One gold operation: `inputs[0] op inputs[1] = result`."""

    op: str
    inputs: tuple[Operand, Operand]
    result: int

    @property
    def deps(self) -> tuple[int, ...]:
        return tuple(x.step for x in self.inputs if isinstance(x, Ref))


@dataclass(frozen=True)
class Problem:
    """A question, its gold step DAG (in story order) and the answer (last step's result)."""

    question: str
    steps: tuple[Step, ...]
    answer: int
    item: str
    skeleton: tuple = field(repr=False)

    @property
    def split(self) -> Split:
        return split_of(self.skeleton)


def split_of(skeleton: tuple) -> Split:
    """Deterministic split from the numeric skeleton: 90% train, 5% dev, 5% test."""
    bucket = int.from_bytes(hashlib.sha256(repr(skeleton).encode()).digest()[:4], "big") % 100
    if bucket < 5:
        return "test"
    if bucket < 10:
        return "dev"
    return "train"


def apply_op(op: str, a: int, b: int) -> int | None:
    """Exact integer arithmetic; None when division is inexact or by zero."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b and a % b == 0 else None
    raise ValueError(op)


def _in_range(v: int) -> bool:
    return 1 <= v <= MAX_VALUE


def _sample(rng: random.Random) -> Problem | None:
    """Draw one problem, or None when the random walk leaves [1, MAX_VALUE]."""
    name = rng.choice(sorted(NAMES))
    pron = NAMES[name]
    cap = pron.capitalize()
    item = rng.choice(ITEMS)
    steps: list[Step] = []
    sentences: list[str] = []
    skeleton: list[tuple] = []

    if rng.random() < 0.5:
        k, n = rng.randint(2, 9), rng.randint(2, 30)
        container = rng.choice(CONTAINERS)
        steps.append(Step("*", (k, n), k * n))
        sentences.append(f"{name} has {k} {container} with {n} {item} in each.")
        skeleton.append(("start*", k, n))
    else:
        a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
        steps.append(Step("+", (a, b), a + b))
        sentences.append(f"{name} has {a} red {item} and {b} blue {item}.")
        skeleton.append(("start+", a, b))
    if not _in_range(steps[0].result):
        return None

    n_events = rng.randint(1, 3)
    for _ in range(n_events):
        cur = Ref(len(steps) - 1)
        v = steps[-1].result
        kind = rng.choice(("gain", "gain", "lose", "lose", "mul", "div", "side"))
        if kind == "gain":
            b = rng.randint(2, MAX_OPERAND)
            verb = rng.choice(("finds", "buys", "wins", "gets"))
            steps.append(Step("+", (cur, b), v + b))
            sentences.append(f"{cap} {verb} {b} more.")
        elif kind == "lose":
            if v < 3:
                return None
            b = rng.randint(1, min(MAX_OPERAND, v - 1))
            verb = rng.choice(("loses", "sells", "gives away", "uses"))
            steps.append(Step("-", (cur, b), v - b))
            sentences.append(f"{cap} {verb} {b}.")
        elif kind == "mul":
            k = rng.randint(2, 9)
            steps.append(Step("*", (cur, k), v * k))
            sentences.append(f"Then {pron} has {k} times as many.")
        elif kind == "div":
            divisors = [d for d in range(2, 10) if v % d == 0]
            if not divisors:
                return None
            d = rng.choice(divisors)
            container = rng.choice(CONTAINERS)
            steps.append(Step("/", (cur, d), v // d))
            sentences.append(f"{cap} splits them into {d} equal {container} and keeps one.")
        else:  # side purchase: an independent product, then added to the total
            k, n = rng.randint(2, 9), rng.randint(2, 12)
            container = rng.choice(CONTAINERS)
            side = len(steps)
            steps.append(Step("*", (k, n), k * n))
            steps.append(Step("+", (cur, Ref(side)), v + k * n))
            sentences.append(f"{cap} also gets {k} {container} with {n} {item} in each.")
        skeleton.append((kind, *[x for x in steps[-1].inputs if isinstance(x, int)],
                         *(steps[-2].inputs if kind == "side" else ())))
        if not _in_range(steps[-1].result) or len(steps) > MAX_STEPS:
            return None
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), tuple(steps), steps[-1].result, item, tuple(skeleton))


def iter_problems(split: Split, seed: int) -> Iterator[Problem]:
    """Endless stream of distinct problems of one split, deterministic in (split, seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    rng = random.Random(f"specguard-tasks/{split}/{seed}")
    seen: set[tuple] = set()
    while True:
        p = _sample(rng)
        if p is None or p.split != split or p.skeleton in seen:
            continue
        seen.add(p.skeleton)
        yield p


def generate(split: Split, n: int, seed: int = 0) -> list[Problem]:
    """The first `n` problems of `iter_problems(split, seed)`."""
    out = []
    for p in iter_problems(split, seed):
        out.append(p)
        if len(out) == n:
            break
    return out


def as_record(problem: Problem) -> dict:
    """A JSON-ready record (question, answer, gold steps with literal operand values)."""
    steps = []
    for s in problem.steps:
        a, b = (problem.steps[x.step].result if isinstance(x, Ref) else x for x in s.inputs)
        steps.append({"op": s.op, "a": a, "b": b, "result": s.result, "deps": list(s.deps)})
    return {"question": problem.question, "answer": problem.answer, "item": problem.item,
            "split": problem.split, "steps": steps}
