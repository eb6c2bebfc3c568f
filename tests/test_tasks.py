"""Properties of the task generator, phrasings and grader."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.tasks import (
    canonical_solution,
    generate,
    grade_solution,
    parse_step_line,
    render_solution,
    split_of,
)
from specguard_vllm.tasks.grading import GradingState, grade_step
from specguard_vllm.tasks.problems import MAX_VALUE, Ref, apply_op
from specguard_vllm.tasks.solutions import random_step_order


def test_splits_are_disjoint_by_skeleton_and_by_question():
    splits = {s: generate(s, 2000, seed=0) for s in ("train", "dev", "test")}
    skeletons = {s: {p.skeleton for p in ps} for s, ps in splits.items()}
    questions = {s: {p.question for p in ps} for s, ps in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not skeletons[a] & skeletons[b]
        assert not questions[a] & questions[b]
    for s, ps in splits.items():
        assert all(split_of(p.skeleton) == s for p in ps)
        assert len(skeletons[s]) == len(ps)  # no duplicates inside a split


def test_split_membership_is_a_function_of_the_skeleton_across_seeds():
    seen: dict[tuple, str] = {}
    for split in ("train", "test"):
        for seed in (0, 1, 2):
            for p in generate(split, 300, seed=seed):
                assert seen.setdefault(p.skeleton, split) == split


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_generator_is_deterministic_per_seed(split):
    assert generate(split, 200, seed=7) == generate(split, 200, seed=7)
    assert generate(split, 200, seed=7) != generate(split, 200, seed=8)


def test_every_gold_step_is_exact_and_in_range():
    for p in generate("train", 3000, seed=3):
        assert 2 <= len(p.steps) <= 5
        for s in p.steps:
            a, b = (p.steps[x.step].result if isinstance(x, Ref) else x for x in s.inputs)
            assert apply_op(s.op, a, b) == s.result
            assert 1 <= s.result <= MAX_VALUE
        assert p.answer == p.steps[-1].result


@functools.cache
def _dev(n: int, seed: int):
    return generate("dev", n, seed=seed)


@settings(max_examples=200, deadline=None)
@given(idx=st.integers(0, 499), seed=st.integers(0, 2**32 - 1))
def test_grader_accepts_every_random_phrasing_of_gold(idx, seed):
    p = _dev(500, 1)[idx]
    text = render_solution(p, random.Random(seed))
    g = grade_solution(p, text)
    assert g.correct and g.well_formed
    assert [s.verdict for s in g.steps] == ["right"] * len(p.steps)


def test_solutions_really_vary():
    p = next(p for p in generate("dev", 100) if len(p.steps) >= 3)
    texts = {render_solution(p, random.Random(s)) for s in range(50)}
    assert len(texts) > 20
    lines = {ln for t in texts for ln in t.split("\n")}
    assert any(" + " in ln or " * " in ln for ln in lines)
    assert any(ln.split(" ")[0] in ("add", "take", "multiply", "divide") for ln in lines)


def test_independent_steps_appear_in_several_orders():
    p = next(p for p in generate("dev", 2000) if any(len(s.deps) == 2 for s in p.steps))
    orders = {tuple(random_step_order(p, random.Random(s))) for s in range(40)}
    assert len(orders) > 1


@pytest.mark.parametrize("line, claim", [
    ("7 + 5 = 12", (7, "+", 5, 12)),
    ("so add 5 to 7 to get 12 apples", (7, "+", 5, 12)),
    ("then take 3 from 10 to get 7", (10, "-", 3, 7)),
    ("10 divided by 2 is 5 coins", (10, "/", 2, 5)),
    ("multiply 4 by 6 to get 24", (4, "*", 6, 24)),
])
def test_parse_step_line_reads_each_phrasing(line, claim):
    c = parse_step_line(line)
    assert c is not None and (c.a, c.op, c.b, c.c) == claim


def _corruptions(line: str) -> list[str]:
    """Lines that change one number in the claim (result or an operand) by +1."""
    out = []
    words = line.split(" ")
    for i, w in enumerate(words):
        if w.isdigit():
            out.append(" ".join(words[:i] + [str(int(w) + 1)] + words[i + 1:]))
    return out


def test_grader_catches_every_single_number_corruption_of_a_gold_step():
    rng = random.Random(0)
    n_checked = 0
    for p in generate("dev", 300, seed=2):
        text = canonical_solution(p) if rng.random() < 0.3 else render_solution(p, rng)
        lines = text.split("\n")[:-1]
        for k, line in enumerate(lines):
            for bad in _corruptions(line):
                state = GradingState()
                for prior in lines[:k]:
                    assert grade_step(p, state, prior).right
                verdict = grade_step(p, state, bad).verdict
                assert verdict in ("arithmetic", "operand", "unmatched"), (p.question, bad)
                n_checked += 1
    assert n_checked > 1000


def test_grader_flags_format_and_wrong_unit():
    p = generate("dev", 1)[0]
    s = p.steps[0]
    a, b = s.inputs
    assert grade_step(p, GradingState(), f"{a} {s.op} {b} equals {s.result}").verdict == "format"
    other = "rocks" if p.item != "rocks" else "coins"
    assert grade_step(p, GradingState(), f"{a} {s.op} {b} = {s.result} {other}").verdict == "format"


def test_step_after_a_wrong_step_is_judged_against_the_written_value():
    p = next(p for p in generate("dev", 500) if len(p.steps) == 2 and not p.steps[0].deps
             and p.steps[1].op == "+" and isinstance(p.steps[1].inputs[1], int))
    s0, s1 = p.steps
    wrong = s0.result + 1
    state = GradingState()
    assert grade_step(p, state, f"{s0.inputs[0]} {s0.op} {s0.inputs[1]} = {wrong}").verdict \
        == "arithmetic"
    b = s1.inputs[1]
    assert grade_step(p, state, f"{wrong} + {b} = {wrong + b}").right
    # without the wrong prefix, the same line uses a value no step produced
    assert not grade_step(p, GradingState(), f"{wrong} + {b} = {wrong + b}").right


def test_final_answer_is_checked():
    p = generate("test", 1)[0]
    text = canonical_solution(p)
    assert grade_solution(p, text).correct
    wrong = text.rsplit("\n", 1)[0] + f"\nAnswer: {p.answer + 1}"
    assert not grade_solution(p, wrong).correct
    assert not grade_solution(p, text.rsplit("\n", 1)[0]).correct  # no Answer line
