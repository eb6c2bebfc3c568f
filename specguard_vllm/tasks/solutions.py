"""Gold solutions: a random valid order of the step DAG, each step in a random phrasing."""

from __future__ import annotations

import random

from specguard_vllm.tasks.phrasing import ANSWER_PREFIX, render_step
from specguard_vllm.tasks.problems import Problem, Ref


def random_step_order(problem: Problem, rng: random.Random) -> list[int]:
    """A topological order of the gold steps, choosing uniformly among ready steps."""
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(problem.steps):
        ready = [i for i, s in enumerate(problem.steps)
                 if i not in done and all(d in done for d in s.deps)]
        pick = rng.choice(ready)
        done.add(pick)
        order.append(pick)
    return order


def _value(x: int | Ref, problem: Problem) -> int:
    return problem.steps[x.step].result if isinstance(x, Ref) else x


def render_solution(problem: Problem, rng: random.Random) -> str:
    """One correct solution: step lines in a random valid order, then `Answer: N`."""
    lines = []
    for i in random_step_order(problem, rng):
        s = problem.steps[i]
        a, b = (_value(x, problem) for x in s.inputs)
        lines.append(render_step(s.op, a, b, s.result, problem.item, rng, first=not lines))
    lines.append(f"{ANSWER_PREFIX}{problem.answer}")
    return "\n".join(lines)


def canonical_solution(problem: Problem) -> str:
    """The story-order, symbolic solution (`a op b = c`): a fixed reference rendering."""
    lines = []
    for s in problem.steps:
        a, b = (_value(x, problem) for x in s.inputs)
        lines.append(f"{a} {s.op} {b} = {s.result}")
    lines.append(f"{ANSWER_PREFIX}{problem.answer}")
    return "\n".join(lines)
