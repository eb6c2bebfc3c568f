"""Evaluation datasets: loaders, prompts, answer extraction, normalisation and grading."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.evaluation.datasets import (
    DATASETS,
    EvalItem,
    extract_answer,
    is_correct,
    load_items,
    normalise_answer,
    prompt_ids,
)
from specguard_vllm.tasks import canonical_solution, grade_solution, render_solution

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = REPO_ROOT / "models" / "tiny-target"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TARGET), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_items():
    return load_items("tiny", 40, split="test", seed=0)


# --- tiny -------------------------------------------------------------------------


def test_tiny_loader_gives_n_items_with_problems_and_unique_ids(tiny_items):
    assert len(tiny_items) == 40
    assert len({it.id for it in tiny_items}) == 40
    for it in tiny_items:
        assert it.dataset == "tiny" and it.problem is not None
        assert it.question == it.problem.question and it.answer == str(it.problem.answer)
    assert load_items("tiny", 0) == []
    assert load_items("tiny", 5, seed=0) == tiny_items[:5]  # deterministic


def _corrupt(solution: str) -> str:
    """The same solution with a wrong final answer."""
    *steps, last = solution.split("\n")
    n = int(last.removeprefix("Answer: "))
    return "\n".join([*steps, f"Answer: {n + 1}"])


def test_tiny_is_correct_agrees_with_grade_solution(tiny_items):
    rng = random.Random(0)
    for it in tiny_items:
        for text in (canonical_solution(it.problem), render_solution(it.problem, rng)):
            for candidate in (text, _corrupt(text), text.rsplit("\n", 1)[0], text + "\n"):
                expected = grade_solution(it.problem, candidate).correct
                assert is_correct(it, candidate) == expected
            assert is_correct(it, text) and not is_correct(it, _corrupt(text))
            assert extract_answer("tiny", text) == it.answer


def test_tiny_prompt_ids_match_evaluate(tiny_items, tokenizer):
    from specguard_vllm.training.evaluate import prompt_ids as eval_prompt_ids

    problems = [it.problem for it in tiny_items[:10]]
    assert [prompt_ids(it, tokenizer) for it in tiny_items[:10]] == eval_prompt_ids(
        tokenizer, problems)


def test_tiny_rejects_unknown_split_and_missing_n():
    with pytest.raises(ValueError, match="'val'"):
        load_items("tiny", 3, split="val")
    with pytest.raises(ValueError, match="pass n"):
        load_items("tiny")


# --- gsm8k ------------------------------------------------------------------------


def test_gsm8k_loader_reads_the_bundled_test_split():
    items = load_items("gsm8k")
    assert len(items) == 1319
    assert items[0].id == "gsm8k-test-0" and items[0].answer == "18"
    assert items[0].question.startswith("Janet")
    assert all(re.fullmatch(r"-?\d+", it.answer) for it in items)  # commas removed
    assert load_items("gsm8k", 3) == items[:3]


def test_gsm8k_gold_solutions_grade_as_correct():
    lines = (REPO_ROOT / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]
    for it, line in zip(load_items("gsm8k", 50), lines):
        assert is_correct(it, json.loads(line)["answer"])


def test_gsm8k_only_ships_test():
    with pytest.raises(ValueError, match=r"'train'.*'test'"):
        load_items("gsm8k", split="train")


def test_data_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "q?", "answer": "so\n#### 1,234"}) + "\n")
    monkeypatch.setenv("SPECGUARD_DATA_DIR", str(tmp_path))
    assert load_items("gsm8k") == [EvalItem("gsm8k-test-0", "gsm8k", "q?", "1234")]


@pytest.mark.parametrize("text, expected", [
    ("48 / 2 = 24\n#### 1,234", "1,234"),
    ("She pays $18.", "18"),
    ("So 6 + 36 = 42. The answer is 42.", "42"),
    ("Answer: $7\nThat took 3 steps.", "7"),
    ("#### 5\nlater 9", "5"),
    ("It went from 3 to -4", "-4"),
    ("16-3-4", "4"),
    ("no numbers here", None),
    ("", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_answer("gsm8k", text) == expected


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_gsm8k_extractor_recovers_any_integer(n):
    got = extract_answer("gsm8k", f"Some steps, 12 + 3 = 15.\n#### {n:,}")
    assert got is not None and normalise_answer(got) == str(n)


def test_gsm8k_prompt_uses_chat_template_and_contains_question(tokenizer):
    item = load_items("gsm8k", 1)[0]
    ids = prompt_ids(item, tokenizer)
    assert all(isinstance(t, int) for t in ids)
    text = tokenizer.decode(ids)
    assert text.startswith("<bos><|user|>\n") and text.endswith("<|assistant|>\n")
    assert "####" in text and item.question in text
    q = tokenizer(item.question, add_special_tokens=False)["input_ids"]
    assert any(ids[i:i + len(q)] == q for i in range(len(ids) - len(q) + 1))


# --- math -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{ {a}^{2} } wins", " {a}^{2} "),
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 5$.", "5"),
    (r"\boxed {x+1}", "x+1"),
    (r"\boxed{\sqrt{2", None),
    ("no box here, 42", None),
])
def test_math_boxed_extraction(text, expected):
    assert extract_answer("math", text) == expected


_BALANCED = st.recursive(
    st.text(alphabet="abxy019+-^_=,.() ", max_size=6),
    lambda inner: st.lists(st.one_of(inner, inner.map(lambda s: "{" + s + "}")),
                           max_size=4).map("".join),
    max_leaves=12,
)


@given(_BALANCED)
def test_math_extraction_returns_any_balanced_content(s):
    assert extract_answer("math", f"We get \\boxed{{1}}, so \\boxed{{{s}}} is it.") == s


@pytest.mark.parametrize("a, b", [
    ("2.0", "2"), ("$1,234$", "1234"), ("18.", "18"), (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right)", "(1,2)"), (r"90^\circ", "90"), (r"90^{\circ}", "90"),
    ("x = 5", "5"), (r"5 \text{ cm}", "5"), (r"\text{(B)}", "(B)"), (r"1\,000", "1000"),
    ("0.50", "0.5"), (".5", "0.5"),
])
def test_normalise_equates(a, b):
    assert normalise_answer(a) == normalise_answer(b)


@pytest.mark.parametrize("a, b", [(r"\frac{1}{2}", "0.5"), ("12", "1,2"), ("(1,2)", "(2,1)")])
def test_normalise_is_conservative(a, b):
    assert normalise_answer(a) != normalise_answer(b)


@settings(max_examples=300)
@given(st.text(alphabet=" 0123456789.,-$x=\\{}^()abcdefghilmnoprtxz!", max_size=30))
def test_normalise_is_idempotent(s):
    once = normalise_answer(s)
    assert normalise_answer(once) == once


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_math_loader_reads_both_formats(tmp_path):
    math = _write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Half of 1?", "solution": r"It is $\boxed{\dfrac{1}{2}}$."},
        {"problem": "2+2?", "solution": r"\boxed{3} no, \boxed{4}"},
    ])
    items = load_items("math", path=math)
    assert [(it.id, it.answer) for it in items] == [
        ("math-test-0", r"\frac{1}{2}"), ("math-test-1", "4")]
    assert is_correct(items[0], r"so \boxed{\frac12} is wrong, \boxed{\frac{1}{2}}")
    assert not is_correct(items[1], r"\boxed{5}") and not is_correct(items[1], "4")
    math500 = _write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "3*3?", "solution": "long", "answer": "9"}])
    assert load_items("math", 1, path=math500)[0].answer == "9"


def test_math_prompt_asks_for_boxed(tokenizer):
    item = EvalItem("math-test-0", "math", "What is 2+2?", "4")
    text = tokenizer.decode(prompt_ids(item, tokenizer))
    assert "\\boxed" in text and "What is 2+2?" in text


# --- errors -----------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones():
    for call in (lambda: load_items("mmlu"), lambda: extract_answer("mmlu", "1")):
        with pytest.raises(ValueError, match=", ".join(DATASETS)):
            call()


def test_math_without_path_says_not_bundled():
    with pytest.raises(ValueError, match="not bundled"):
        load_items("math")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_items("math", path=str(missing))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": oops}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3")):
        load_items("gsm8k", path=str(path))
    path.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:1") + ".*answer"):
        load_items("gsm8k", path=str(path))
    path.write_text('{"problem": "p", "solution": "no box"}\n')
    with pytest.raises(ValueError, match="boxed"):
        load_items("math", path=str(path))
