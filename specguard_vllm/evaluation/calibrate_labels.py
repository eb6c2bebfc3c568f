"""Step labels for `specguard calibrate`: was a drafted step on the target's trajectory good?

* ``step``: the step's line graded by the tiny task's step grader (`tasks.grade_step`), given
  the committed lines before it; only the bundled task has such a grader.
* ``outcome``: the target, continuing greedily from the context plus the step, reaches the
  gold final answer (any dataset with final answers).
* ``agreement``: that continuation reaches the target-only run's final answer (no gold).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from specguard_vllm.evaluation.calibrate import CannotCalibrate, StepSignal


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


# --------------------------------------------------------------------------- outcome labels
LABELS = ("outcome", "agreement", "step")


@dataclass(frozen=True)
class DraftedStep:
    """A step the draft proposed at one position of the target's own trajectory."""

    problem: int  # index of the item
    lpbv: float
    abgv: float
    context: tuple[int, ...]  # prompt + the target's tokens before the step
    step: tuple[int, ...]


def drafted_steps(problem: int, full_ids: list[int], entries: list[dict]) -> list[DraftedStep]:
    """Every logged step of one collect request, in trajectory order."""
    steps = []
    for entry in sorted(entries, key=lambda e: e["context_len"]):
        ids = step_ids(entry)
        if ids:
            context = tuple(full_ids[: int(entry["context_len"])])
            steps.append(DraftedStep(problem, float(entry["lpbv"]), float(entry["abgv"]),
                                     context, tuple(ids)))
    return steps


@dataclass
class ContinuationPlan:
    """Which continuations the labels need, within the budget.

    A step equal to the target's own next tokens needs none (the target's greedy run from
    there is the collect run itself); nor does a step that ends with EOS or leaves no token
    budget. Equal (context, step) pairs share one continuation. Over the budget, a seeded
    sample of the distinct continuations is kept and the other steps stay unlabelled.
    """

    steps: list[DraftedStep]
    source: list[str | int]  # per step: "target", "as-is", a request index, or "over-budget"
    prompts: list[list[int]]  # continuation prompts: context + step
    max_tokens: list[int]  # per continuation prompt
    counts: Counter = field(default_factory=Counter)


def plan_continuations(steps: list[DraftedStep], full_ids: list[list[int]],
                       prompt_lens: list[int], max_new: list[int], eos_ids,
                       max_continuations: int, seed: int = 0) -> ContinuationPlan:
    """Sort each step into the target's run, judged as written, or a continuation to run.

    ``max_new[i]``: how many tokens problem i may generate in all (as in the collect run).
    """
    eos = set(eos_ids)
    source: list[str | tuple] = []
    wanted: dict[tuple, int] = {}
    for s in steps:
        n_ctx = len(s.context)
        own = tuple(full_ids[s.problem][n_ctx: n_ctx + len(s.step)])
        left = max_new[s.problem] - (n_ctx + len(s.step) - prompt_lens[s.problem])
        if own == s.step:
            source.append("target")
        elif s.step[-1] in eos or left < 1:
            source.append("as-is")
        else:
            key = s.context + s.step
            wanted.setdefault(key, left)
            source.append(key)
    keys = list(wanted)
    if len(keys) > max_continuations:
        keep = set(random.Random(seed).sample(range(len(keys)), max_continuations))
        keys = [k for i, k in enumerate(keys) if i in keep]
    index = {k: i for i, k in enumerate(keys)}
    final = [s if isinstance(s, str) else index.get(s, "over-budget") for s in source]
    counts = Counter("continued" if isinstance(s, int) else s for s in final)
    counts["continuations"] = len(keys)
    return ContinuationPlan(steps, final, [list(k) for k in keys],
                            [wanted[k] for k in keys], counts)


def completion_ids(plan: ContinuationPlan, i: int, full_ids: list[list[int]],
                   prompt_lens: list[int], continuations: list[list[int]]) -> list[int] | None:
    """The generated tokens the target ends with after step i (None: unlabelled)."""
    s, src = plan.steps[i], plan.source[i]
    plen = prompt_lens[s.problem]
    if src == "target":
        return list(full_ids[s.problem][plen:])
    if src == "over-budget":
        return None
    written = list(s.context[plen:]) + list(s.step)
    return written if src == "as-is" else written + list(continuations[src])


def judge_steps(plan: ContinuationPlan, kind: str, items, full_ids: list[list[int]],
                prompt_lens: list[int], continuations: list[list[int]], decode,
                target_answers: list[str | None]) -> list[StepSignal]:
    """StepSignal records: ``outcome`` right when the completion reaches the gold final
    answer, ``agreement`` when it reaches the target-only run's final answer."""
    from specguard_vllm.evaluation.datasets import final_answer, is_correct

    records = []
    for i, s in enumerate(plan.steps):
        ids = completion_ids(plan, i, full_ids, prompt_lens, continuations)
        if ids is None:
            continue
        item, text = items[s.problem], decode(ids)
        if kind == "outcome":
            right = is_correct(item, text)
        elif kind == "agreement":
            want = target_answers[s.problem]
            if want is None:  # the target wrote no answer: nothing to agree with
                plan.counts["no-target-answer"] += 1
                continue
            right = final_answer(item, text) == want
        else:
            raise ValueError(f"judge_steps labels outcome or agreement, not {kind!r}")
        records.append(StepSignal(item.id, s.lpbv, s.abgv, bool(right)))
    return records


def check_labels(records: list[StepSignal], kind: str) -> None:
    """Refuse labels a fit cannot separate: no steps, or all of one class."""
    if not records:
        raise CannotCalibrate(f"cannot calibrate: no drafted step could be labelled "
                              f"(--labels {kind}); raise --n or --max-continuations")
    n_right = sum(r.right for r in records)
    if n_right == 0:
        raise CannotCalibrate(
            f"cannot calibrate: every drafted step was judged wrong ({len(records)} steps, "
            f"--labels {kind}): the target reaches the {_reference(kind)} from none of them. "
            "The pair does not solve this dataset: use a stronger pair or an easier dataset")
    if n_right == len(records):
        raise CannotCalibrate(
            f"cannot calibrate: every drafted step was judged right ({len(records)} steps, "
            f"--labels {kind}): no wrong step to separate from the right ones; raise --n, "
            "or accept every step (tau 0)")


def _reference(kind: str) -> str:
    return {"outcome": "gold final answer", "agreement": "target-only answer"}.get(
        kind, "right line")
