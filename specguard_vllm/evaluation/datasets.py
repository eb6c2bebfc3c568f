"""Evaluation datasets: load items, build prompts, extract and grade final answers.

Four datasets share one interface (`EvalItem`, `load_items`, `prompt_ids`,
`final_answer`, `is_correct`) so `specguard bench` and `specguard calibrate` treat them alike:

* ``tiny``: the tiny pair's own generated task (`specguard_vllm.tasks`), prompted and
  graded exactly as training and `evaluate.py` do.
* ``gsm8k``: the GSM8K test split bundled under ``data/gsm8k/`` (gold after ``####``).
* ``math``: MATH-style JSONL supplied by the user (gold in the last ``\\boxed{}``).
* ``jsonl``: any JSONL with a prompt field and (optionally) a gold-answer field; the final
  answer of a completion is the last match of a user-given regex (`JsonlFormat`).

Data is read relative to the repository (``<repo>/data``), which is why the package
is meant to be installed editable; ``SPECGUARD_DATA_DIR`` points elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from specguard_vllm.tasks import generate, grade_solution, parse_answer_line
from specguard_vllm.tasks.grading import split_solution
from specguard_vllm.tasks.problems import SPLITS
from specguard_vllm.training.tokenizer import prompt_text

DATASETS = ("tiny", "gsm8k", "math", "jsonl")

INSTRUCTIONS = {
    "gsm8k": (
        "Solve the following problem. Reason step by step, one step per line. "
        "On the last line, write the final answer as `#### N`, where N is a number.\n\n"
    ),
    "math": (
        "Solve the following problem. Reason step by step, one step per line. "
        "On the last line, write the final answer inside \\boxed{...}.\n\n"
    ),
}


@dataclass(frozen=True)
class EvalItem:
    id: str  # stable id, e.g. "tiny-test-17", "gsm8k-test-42"
    dataset: str  # one of DATASETS
    question: str
    answer: str | None  # gold final answer, already `normalise_answer`ed; None: no gold
    problem: object | None = None  # the `specguard_vllm.tasks.Problem` for "tiny", else None
    answer_regex: str | None = None  # "jsonl": extracts a completion's final answer


@dataclass(frozen=True)
class JsonlFormat:
    """Where a user's JSONL keeps its prompt and gold answer, and how answers are written.

    ``answer_field`` None: no gold (only agreement with the target can be judged).
    ``answer_regex``: the final answer of a completion is its last match (group 1 if the
    pattern has a group, else the whole match); it is applied to the gold field too when
    it matches there, so a field holding a worked solution works as well as a bare answer.
    """

    prompt_field: str
    answer_field: str | None
    answer_regex: str

    def compiled(self) -> re.Pattern:
        try:
            pattern = re.compile(self.answer_regex)
        except re.error as error:
            raise ValueError(f"--answer-regex {self.answer_regex!r} is not a regular "
                             f"expression: {error}") from None
        if pattern.groups > 1:
            raise ValueError(f"--answer-regex {self.answer_regex!r} has {pattern.groups} "
                             "groups; use at most one (the answer)")
        return pattern


def data_dir() -> Path:
    """``$SPECGUARD_DATA_DIR`` if set, else the repository's ``data/`` folder."""
    env = os.environ.get("SPECGUARD_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def _check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Records of a JSONL file (blank lines skipped), each checked to have `fields`."""
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e})") from None
            missing = [k for k in fields if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            records.append(rec)
    return records


def _math_gold(rec: dict, where: str) -> str:
    """MATH500 records carry `answer`; MATH records only the boxed answer in `solution`."""
    if "answer" in rec:
        return str(rec["answer"])
    boxed = _last_boxed(str(rec.get("solution", "")))
    if boxed is None:
        raise ValueError(f"{where}: record has neither `answer` nor a \\boxed{{}} in `solution`")
    return boxed


def load_items(
    name: str, n: int | None = None, *, split: str = "test", seed: int = 0,
    path: str | None = None, jsonl: JsonlFormat | None = None,
) -> list[EvalItem]:
    """The first `n` items (all if None) of a dataset, in a deterministic order.

    ``tiny`` is generated (`seed` picks the stream, `n` is required); ``gsm8k`` and
    ``math`` are read in file order from `path`, or for gsm8k from the bundled test
    split (the only one shipped); ``jsonl`` from `path` as `jsonl` says. `split` only
    labels ids when `path` is given.
    """
    _check_dataset(name)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if name == "tiny":
        if split not in SPLITS:
            raise ValueError(f"unknown tiny split {split!r}; expected one of {SPLITS}")
        if n is None:
            raise ValueError("the tiny task is generated without end: pass n")
        problems = generate(split, n, seed=seed) if n else []  # type: ignore[arg-type]
        return [EvalItem(f"tiny-{split}-{i}", "tiny", p.question, str(p.answer), p)
                for i, p in enumerate(problems)]
    if name == "gsm8k":
        if path is None and split != "test":
            raise ValueError(f"gsm8k split {split!r} is not bundled; only 'test' is "
                             f"(in {data_dir() / 'gsm8k'}), or pass path=")
        file = Path(path) if path else data_dir() / "gsm8k" / "test.jsonl"
        recs = _read_jsonl(file, ("question", "answer"))[:n]
        return [EvalItem(f"gsm8k-{split}-{i}", "gsm8k", r["question"],
                         normalise_answer(r["answer"].rsplit("####", 1)[-1]))
                for i, r in enumerate(recs)]
    if name == "jsonl":
        if path is None or jsonl is None:
            raise ValueError("the jsonl dataset needs a file (--data-path) and its "
                             "--prompt-field / --answer-field / --answer-regex")
        pattern = jsonl.compiled()
        fields = tuple(f for f in (jsonl.prompt_field, jsonl.answer_field) if f)
        recs = _read_jsonl(Path(path), fields)[:n]
        return [EvalItem(f"jsonl-{split}-{i}", "jsonl", str(r[jsonl.prompt_field]),
                         None if jsonl.answer_field is None
                         else _gold_by_regex(str(r[jsonl.answer_field]), pattern),
                         answer_regex=jsonl.answer_regex)
                for i, r in enumerate(recs)]
    if path is None:
        raise ValueError("MATH data is not bundled: pass path= to a JSONL with `problem` "
                         "and `solution` (MATH) or `problem` and `answer` (MATH500) fields")
    file = Path(path)
    recs = _read_jsonl(file, ("problem",))[:n]
    return [EvalItem(f"math-{split}-{i}", "math", r["problem"],
                     normalise_answer(_math_gold(r, f"{file} record {i}")))
            for i, r in enumerate(recs)]


def _last_match(text: str, pattern: re.Pattern) -> str | None:
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return matches[-1].group(1 if pattern.groups else 0)


def _gold_by_regex(text: str, pattern: re.Pattern) -> str:
    found = _last_match(text, pattern)
    return normalise_answer(found if found is not None else text)


def prompt_ids(item: EvalItem, tokenizer) -> list[int]:
    """Prompt token ids: tiny exactly as training saw it, others via the chat template when
    the tokenizer has one (plain text otherwise)."""
    if item.dataset == "tiny":
        return list(tokenizer(prompt_text(item.question), add_special_tokens=False)["input_ids"])
    _check_dataset(item.dataset)
    content = INSTRUCTIONS.get(item.dataset, "") + item.question
    if not getattr(tokenizer, "chat_template", None):
        return [int(t) for t in tokenizer(content)["input_ids"]]
    messages = [{"role": "user", "content": content}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers 5: BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


# A number as written in prose: optional sign (not a minus between operands), digits
# with optional thousands commas, optional decimals. "$18." yields "18".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_ANSWER_MARKER = re.compile(r"answer:|the answer is", re.IGNORECASE)


def _first_number_on_line(text: str) -> str | None:
    m = _NUMBER.search(text.split("\n", 1)[0])
    return m.group(0) if m else None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed``/``\\fbox``: braces balanced, or ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    command = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    rest = text[start + len(command):]
    body = rest.lstrip()
    if not body.startswith("{"):  # `\boxed 5` needs the space: `\boxedx` is another command
        m = re.match(r"[^\s$]+", body)
        return m.group(0) if m and len(body) < len(rest) else None
    depth = 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return body[1:i]
    return None  # unbalanced, e.g. a truncated generation


def extract_answer(dataset: str, text: str, answer_regex: str | None = None) -> str | None:
    """The final answer as written in a completion (not normalised), or None.

    tiny: N of a final ``Answer: N`` line, as `grade_solution` reads it. gsm8k: the
    number after the last ``####``, else after the last ``Answer:``/"The answer is",
    else the last number. math: the content of the last ``\\boxed{}``/``\\fbox{}``.
    jsonl: the last match of ``answer_regex`` (its group if it has one).
    """
    _check_dataset(dataset)
    if dataset == "jsonl":
        if answer_regex is None:
            raise ValueError("the jsonl dataset needs an answer regex")
        return _last_match(text, re.compile(answer_regex))
    if dataset == "tiny":
        last = split_solution(text)[1]
        answer = parse_answer_line(last) if last is not None else None
        return None if answer is None else str(answer)
    if dataset == "math":
        return _last_boxed(text)
    if "####" in text and (num := _first_number_on_line(text.rsplit("####", 1)[1])):
        return num
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers and (num := _first_number_on_line(text[markers[-1].end():])):
        return num
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_UNITS = re.compile(r"(?<=\S)\s*\\text\{\s[^{}]*\}\s*$")  # "5 \text{ cm}": trailing units
_TEXT = re.compile(r"\\text\{([^{}]*)\}")
_DROP = re.compile(r"\\(?:left|right)(?![a-zA-Z])|\\[!,]|\^\{?\\circ\}?")
_GROUPED = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def _normalise_once(s: str) -> str:
    s = s.strip().replace("\\$", "").replace("$", "")
    s = _TEXT.sub(r"\1", _UNITS.sub("", s))
    s = _DROP.sub("", re.sub(r"\s+", "", s))
    s = re.sub(r"\\[dt]frac", r"\\frac", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        d = Decimal(s)
        s = str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")
    return s


def normalise_answer(text: str) -> str:
    """A canonical form of a final answer, so equal answers compare equal as strings.

    Conservative on purpose (a miss is a wrong answer, never a false right one): drops
    whitespace, ``$``, ``\\left``/``\\right``, ``\\!``, ``\\,``, ``^\\circ``, trailing
    dots, a leading ``x=``, trailing ``\\text{ unit}`` and the ``\\text{}`` wrapper;
    maps ``\\dfrac``/``\\tfrac`` to ``\\frac``; writes plain numbers canonically
    ("1,234" -> "1234", "2.0" -> "2", "0.50" -> "0.5"). Fractions and decimals are not
    unified ("\\frac{1}{2}" != "0.5"). Rules repeat until nothing changes, so the
    result is a fixed point (idempotent).
    """
    while (new := _normalise_once(text)) != text:
        text = new
    return text


def final_answer(item: EvalItem, completion: str) -> str | None:
    """The completion's final answer, normalised (None: it wrote none)."""
    answer = extract_answer(item.dataset, completion, item.answer_regex)
    return None if answer is None else normalise_answer(answer)


def has_gold(item: EvalItem) -> bool:
    return item.answer is not None


def is_correct(item: EvalItem, completion: str) -> bool:
    """Whether the completion's final answer equals the gold one (tiny: `grade_solution`)."""
    if item.dataset == "tiny" and item.problem is not None:
        return grade_solution(item.problem, completion).correct  # type: ignore[arg-type]
    answer = final_answer(item, completion)
    return answer is not None and item.answer is not None and answer == item.answer
