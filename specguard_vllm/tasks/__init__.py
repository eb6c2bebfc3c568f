"""The tiny pair's task: seeded multi-step word problems, their phrasings and a grader.

`problems` draws problems and assigns disjoint splits, `phrasing` writes and parses
step lines, `solutions` renders gold solutions, `grading` judges produced ones.
"""

from specguard_vllm.tasks.grading import SolutionGrade, StepGrade, grade_solution, grade_step
from specguard_vllm.tasks.phrasing import parse_answer_line, parse_step_line, render_step
from specguard_vllm.tasks.problems import (
    Problem,
    Step,
    as_record,
    generate,
    iter_problems,
    split_of,
)
from specguard_vllm.tasks.solutions import canonical_solution, render_solution

__all__ = [
    "Problem", "SolutionGrade", "Step", "StepGrade", "as_record", "canonical_solution", "generate",
    "grade_solution", "grade_step", "iter_problems", "parse_answer_line", "parse_step_line",
    "render_solution", "render_step", "split_of",
]
