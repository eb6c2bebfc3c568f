"""`specguard calibrate --labels outcome|agreement|step` on any dataset: continuation planning,
judging, the label and input refusals, the jsonl loader, the frontier and its plot, and (slow)
the real engine end to end on the bundled pair: outcome labels, and GSM8K's clear refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.config import load_config
from specguard_vllm.evaluation.calibrate import (
    CannotCalibrate,
    StepSignal,
    frontier,
    predict,
)
from specguard_vllm.evaluation.calibrate_labels import (
    DraftedStep,
    check_labels,
    drafted_steps,
    judge_steps,
    plan_continuations,
)
from specguard_vllm.evaluation.calibrate_run import check_answers_found, choose_labels
from specguard_vllm.evaluation.datasets import (
    EvalItem,
    JsonlFormat,
    final_answer,
    is_correct,
    load_items,
    prompt_ids,
)

REPO = Path(__file__).resolve().parents[1]
FLOOR = -5.0
EOS = 2


def _jsonl_item(i: int, gold: str | None) -> EvalItem:
    return EvalItem(f"jsonl-dev-{i}", "jsonl", "q", gold, answer_regex=r"ANS=(\d+)")


def _decode(ids) -> str:
    """Token t is the character chr(t); EOS is dropped, like skip_special_tokens."""
    return "".join(chr(t) for t in ids if t != EOS)


def _enc(text: str) -> list[int]:
    return [ord(c) for c in text]


# --------------------------------------------------------------------------- planning
def test_plan_needs_continuations_only_where_the_step_leaves_the_target_trajectory():
    prompt = _enc("P:")
    own = _enc("a\nb\nANS=7") + [EOS]
    full = [prompt + own]
    ctx = tuple(prompt)
    steps = [
        DraftedStep(0, -0.1, 0.5, ctx, tuple(_enc("a\n"))),        # the target's own line
        DraftedStep(0, -2.0, 0.5, ctx, tuple(_enc("x\n"))),        # off the trajectory
        DraftedStep(0, -2.1, 0.4, ctx, tuple(_enc("x\n"))),        # the same step again
        DraftedStep(0, -3.0, 0.2, ctx, tuple(_enc("ANS=9") + [EOS])),  # ends the answer
        DraftedStep(0, -1.0, 0.3, ctx + tuple(_enc("a\n")), tuple(_enc("y\n"))),
    ]
    plan = plan_continuations(steps, full, [len(prompt)], [40], {EOS}, max_continuations=10)
    assert plan.source[0] == "target" and plan.source[3] == "as-is"
    assert plan.source[1] == plan.source[2] == 0 and plan.source[4] == 1
    assert plan.prompts == [list(ctx) + _enc("x\n"), list(ctx) + _enc("a\ny\n")]
    # budget left: 40 tokens minus what the step and its context have generated already
    assert plan.max_tokens == [38, 36]
    assert plan.counts["continuations"] == 2 and plan.counts["target"] == 1

    capped = plan_continuations(steps, full, [len(prompt)], [40], {EOS}, max_continuations=1)
    assert capped.counts["continuations"] == 1 and len(capped.prompts) == 1
    assert capped.source.count("over-budget") in (1, 2)  # the dropped continuation's steps
    # a step that uses up the problem's whole budget is judged as written
    short = plan_continuations(steps[1:2], full, [len(prompt)], [2], {EOS}, max_continuations=5)
    assert short.source == ["as-is"] and short.prompts == []


def test_outcome_and_agreement_labels_read_the_completions_final_answer():
    prompt = _enc("P:")
    own = _enc("a\nANS=7") + [EOS]
    full = [prompt + own]
    ctx = tuple(prompt)
    steps = [DraftedStep(0, -0.1, 0.5, ctx, tuple(_enc("a\n"))),
             DraftedStep(0, -2.0, 0.5, ctx, tuple(_enc("x\n"))),
             DraftedStep(0, -3.0, 0.5, ctx, tuple(_enc("z\n")))]
    plan = plan_continuations(steps, full, [len(prompt)], [40], {EOS}, max_continuations=10)
    continuations = [_enc("ANS=7") + [EOS], _enc("ANS=8") + [EOS]]  # after x, after z
    item = _jsonl_item(0, "7")
    outcome = judge_steps(plan, "outcome", [item], full, [len(prompt)], continuations, _decode,
                          ["7"])
    assert [r.right for r in outcome] == [True, True, False]
    # agreement: the target-only answer is the reference, whatever the gold says
    wrong_gold = _jsonl_item(0, "8")
    agree = judge_steps(plan, "agreement", [wrong_gold], full, [len(prompt)], continuations,
                        _decode, ["7"])
    assert [r.right for r in agree] == [True, True, False]
    assert [r.right for r in judge_steps(plan, "outcome", [wrong_gold], full, [len(prompt)],
                                         continuations, _decode, ["7"])] == [False, False, True]
    # no target answer: agreement cannot judge that problem's steps
    assert judge_steps(plan, "agreement", [item], full, [len(prompt)], continuations, _decode,
                       [None]) == []
    with pytest.raises(ValueError, match="outcome or agreement"):
        judge_steps(plan, "step", [item], full, [len(prompt)], continuations, _decode, ["7"])


def test_drafted_steps_cut_the_token_level_tail_and_keep_the_context():
    full = list(range(10, 30))
    entries = [{"context_len": 8, "drafted": [1, 2, 3, 4], "step_len": 2, "lpbv": -1, "abgv": 0.5},
               {"context_len": 5, "drafted": [7], "lpbv": -2, "abgv": 0.1},
               {"context_len": 9, "drafted": [], "step_len": 0, "lpbv": -2, "abgv": 0.1}]
    steps = drafted_steps(3, full, entries)
    assert [s.context for s in steps] == [tuple(full[:5]), tuple(full[:8])]
    assert [s.step for s in steps] == [(7,), (1, 2)] and {s.problem for s in steps} == {3}


# --------------------------------------------------------------------------- refusals
def test_no_positive_or_no_negative_labels_are_refused_with_the_issue_message():
    wrong = [StepSignal("p", -1.0, 0.5, False)] * 3
    with pytest.raises(CannotCalibrate, match="cannot calibrate: every drafted step was "
                                              "judged wrong"):
        check_labels(wrong, "outcome")
    with pytest.raises(CannotCalibrate, match="every drafted step was judged right"):
        check_labels([StepSignal("p", -1.0, 0.5, True)] * 3, "agreement")
    with pytest.raises(CannotCalibrate, match="no drafted step could be labelled"):
        check_labels([], "outcome")
    check_labels(wrong + [StepSignal("p", -0.1, 0.5, True)], "step")


def test_label_kind_defaults_to_the_best_the_data_allows():
    tiny = load_items("tiny", 2, split="dev")
    gsm = load_items("gsm8k", 2)
    no_gold = [_jsonl_item(0, None)]
    assert choose_labels("tiny", tiny, None) == "step"
    assert choose_labels("gsm8k", gsm, None) == "outcome"
    assert choose_labels("jsonl", no_gold, None) == "agreement"
    assert choose_labels("tiny", tiny, "outcome") == "outcome"
    with pytest.raises(CannotCalibrate, match="step grader"):
        choose_labels("gsm8k", gsm, "step")
    with pytest.raises(CannotCalibrate, match="needs gold answers"):
        choose_labels("jsonl", no_gold, "outcome")


def test_an_answer_regex_that_never_matches_is_refused():
    items = [_jsonl_item(i, "1") for i in range(3)]
    answers = [final_answer(item, "the answer is 1") for item in items]
    assert answers == [None, None, None]
    with pytest.raises(CannotCalibrate, match="matched none of the 3 target outputs"):
        check_answers_found(items, answers)
    check_answers_found(items, [None, "1", None])
    check_answers_found(load_items("gsm8k", 2), [None, None])  # built-in extractors: no regex


# --------------------------------------------------------------------------- jsonl loader
def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_loader_reads_given_fields_and_grades_with_the_regex(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"},
                                         {"q": "2+2?", "a": "work... FINAL: 4"}])
    fmt = JsonlFormat("q", "a", r"FINAL:\s*(-?\d+)")
    items = load_items("jsonl", None, split="dev", path=path, jsonl=fmt)
    assert [(i.id, i.question, i.answer) for i in items] == [("jsonl-dev-0", "1+1?", "2"),
                                                             ("jsonl-dev-1", "2+2?", "4")]
    assert is_correct(items[0], "so FINAL: 3\nFINAL: 2") and not is_correct(items[0], "2")
    assert final_answer(items[1], "FINAL: 4.0") == "4"
    no_gold = load_items("jsonl", 1, path=path, jsonl=JsonlFormat("q", None, r"FINAL: (\d+)"))
    assert no_gold[0].answer is None and not is_correct(no_gold[0], "FINAL: 2")


def test_jsonl_loader_refuses_missing_fields_and_bad_regexes(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"}, {"q": "3?"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field\(s\) a"):
        load_items("jsonl", None, path=path, jsonl=JsonlFormat("q", "a", r"(\d+)"))
    with pytest.raises(ValueError, match="missing field"):
        load_items("jsonl", None, path=path, jsonl=JsonlFormat("question", None, r"(\d+)"))
    with pytest.raises(ValueError, match="not a regular expression"):
        load_items("jsonl", None, path=path, jsonl=JsonlFormat("q", None, r"(\d+"))
    with pytest.raises(ValueError, match="at most one"):
        load_items("jsonl", None, path=path, jsonl=JsonlFormat("q", None, r"(\d)(\d)"))
    with pytest.raises(ValueError, match="needs a file"):
        load_items("jsonl", 3)


def test_prompts_use_the_chat_template_only_when_the_target_has_one():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "models" / "tiny-target"))
    item = EvalItem("jsonl-0", "jsonl", "How many?", "1", answer_regex="x")
    templated = tok.decode(prompt_ids(item, tok))
    assert templated.startswith("<bos><|user|>\nHow many?") and templated.endswith(
        "<|assistant|>\n")
    tok.chat_template = None
    assert "<|user|>" not in tok.decode(prompt_ids(item, tok))


# --------------------------------------------------------------------------- frontier
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(-6, 0), st.floats(0, 1), st.booleans()),
                min_size=1, max_size=30), st.lists(st.booleans(), min_size=5, max_size=5))
def test_frontier_is_the_best_accuracy_at_each_acceptance(rows, solved):
    records = [StepSignal(f"p{p}", lp, g, ok) for p, lp, g, ok in rows]
    correct = {f"p{i}": ok for i, ok in enumerate(solved)}
    betas = (0.0, 0.5, 1.0)
    hull = frontier(records, correct, lpbv_floor=FLOOR, betas=betas)
    acc = [q.acceptance for q in hull]
    assert acc == sorted(acc) and [q.accuracy for q in hull] == sorted(
        (q.accuracy for q in hull), reverse=True)
    for q in hull:  # each point is what its (tau, beta) predicts
        again = predict(records, correct, q.tau, q.beta, FLOOR)
        assert (again.n_correct, again.n_accepted) == (q.n_correct, q.n_accepted)
    # brute force: no grid point accepts at least as many steps with more problems kept
    for beta in betas:
        for tau in np.linspace(0, 1.01, 23):
            p = predict(records, correct, float(tau), beta, FLOOR)
            best = max(q.n_correct for q in hull if q.n_accepted >= p.n_accepted)
            assert p.n_correct <= best


def test_report_text_and_frontier_png(tmp_path):
    from specguard_vllm.evaluation.calibrate_report import format_report, plot_frontier

    point = {"tau": 0.6, "beta": 1.0, "accuracy": 0.9, "acceptance": 0.8, "n_correct": 9,
             "n_accepted": 8}
    measured = {"accuracy": 0.9, "acceptance": 0.7, "n_rejected": 3}
    report = {
        "n_problems": 10, "dataset": "tiny", "split": "dev", "labels": "outcome",
        "goal": "latency", "accuracy_reference": "gold", "max_continuations": 50,
        "collect": {"steps": {"logged": 12, "continuations": 4, "target": 7, "as-is": 1},
                    "n_records": 12, "n_wrong": 2},
        "auroc": {"lpbv_norm": 0.9, "abgv": 0.6, "ensemble": {"0.50": 0.85, "1.00": 0.9}},
        "fit": {"constraint": "c", "tau": 0.6, "beta": 1.0, "tau_grid": 0.61},
        "frontier": [dict(point, acceptance=a / 20, accuracy=1 - a / 40) for a in range(21)],
        "predicted": {"defaults": point, "fitted": point},
        "measured": {"target_only": measured, "defaults": measured, "fitted": measured},
        "verdict": {"summary": "Fitted beats the paper defaults."},
        "wall_seconds": {"total": 9, "engine_start": 3, "collect": 2, "label": 2, "validate": 2},
        "out": "x.yaml", "plot": None,
    }
    text = format_report(report)
    assert "labels outcome" in text and "4 continuations run (budget 50)" in text
    assert text.count("\n  ") >= 10 + 4  # 10 frontier rows (of 21) and the AUROC rows
    png = plot_frontier(report, tmp_path / "sub" / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- CLI refusals
@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "jsonl", "--data-path", "README.md"], "--prompt-field and --answer-regex"),
    (["--dataset", "math"], "needs --data-path"),
    (["--dataset", "gsm8k", "--answer-regex", "x"], "go with --dataset jsonl"),
    (["--dataset", "gsm8k", "--labels", "step"], "step grader"),
    (["--dataset", "gsm8k", "--n", "5000"], "only 1319"),
    (["--dataset", "jsonl", "--data-path", "README.md", "--prompt-field", "q",
      "--answer-regex", "(a"], "not a regular expression"),
    (["--max-continuations", "0"], "--max-continuations"),
    (["--dataset", "math", "--data-path", "missing.jsonl"], "no such file"),
])
def test_cli_refuses_bad_dataset_and_label_arguments(argv, needle, capsys):
    from specguard_vllm.evaluation.calibrate_cli import main

    assert main(["--target", str(REPO / "models" / "tiny-target"), *argv]) == 2, argv
    assert needle in capsys.readouterr().err


def test_cli_refuses_a_jsonl_without_the_named_field(tmp_path, capsys):
    from specguard_vllm.evaluation.calibrate_cli import main

    path = _write(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    argv = ["--target", str(REPO / "models" / "tiny-target"), "--dataset", "jsonl",
            "--data-path", path, "--prompt-field", "question", "--answer-field", "answer",
            "--answer-regex", r"(\d+)", "--n", "1", "--out", ""]
    assert main(argv) == 2
    assert "missing field(s) question" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end
def _calibrate(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr")
    return subprocess.run([sys.executable, "-m", "specguard_vllm.evaluation.calibrate_cli",
                           *args], check=False, capture_output=True, text=True, cwd=REPO,
                          timeout=1200, env=env)


@pytest.mark.slow
def test_outcome_labels_end_to_end_on_the_bundled_pair(tmp_path):
    out, report_path = tmp_path / "cal.yaml", tmp_path / "cal.json"
    log = tmp_path / "log.jsonl"
    result = _calibrate(["--n", "16", "--labels", "outcome", "--goal", "latency", "--out",
                         str(out), "--json", str(report_path), "--max-continuations", "40",
                         "--decision-log", str(log)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["labels"] == "outcome" and report["accuracy_reference"] == "gold"
    steps = report["collect"]["steps"]
    assert 0 < steps["continuations"] <= 40 and steps["target"] > 0
    assert steps["labelled"] == report["collect"]["n_records"] > report["collect"]["n_wrong"] > 0
    config = load_config(out)
    assert (config.specguard.tau, config.specguard.beta) == (report["fit"]["tau"],
                                                             report["fit"]["beta"])
    assert report["frontier"] and Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "continuations run" in result.stdout and "predicted frontier" in result.stdout
    assert report["measured"]["target_only"]["n_problems"] == 16
    # the validation engine is a fresh one (its request ids restart): its acceptance counts
    # only its own decisions, and the collect phase's log is kept beside it
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for name in ("defaults", "fitted"):
        keys = set(report["validation_request_ids"][name])
        mine = [e for e in entries if e.get("kind", "step") == "step"
                and e["req_id"].split("-", 1)[0] in keys]
        assert report["measured"][name]["n_steps"] == len(mine) > 0
        assert report["measured"][name]["n_accepted"] == sum(e["accepted"] for e in mine)
    collect = [json.loads(line) for line in
               log.with_suffix(".collect.jsonl").read_text().splitlines() if line.strip()]
    assert collect and not any(e["accepted"] for e in collect if e.get("kind", "step") == "step")


@pytest.mark.slow
def test_gsm8k_on_the_bundled_pair_ends_with_the_no_positive_labels_message(tmp_path):
    out = tmp_path / "cal.yaml"
    result = _calibrate(["--dataset", "gsm8k", "--n", "6", "--out", str(out),
                         "--max-tokens", "64", "--max-continuations", "60"], tmp_path)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "cannot calibrate: every drafted step was judged wrong" in result.stderr
    assert not out.exists()
