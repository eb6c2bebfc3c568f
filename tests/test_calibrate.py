"""`specguard calibrate`: AUROC, the (tau, beta) fit, the written config, step labelling,
the CLI's argument checks, and (slow) one end-to-end run of the real engine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.config import ConfigError, load_config
from specguard_vllm.evaluation.calibrate import (
    BETA_GRID,
    StepSignal,
    auroc,
    ensemble_scores,
    fit,
    lpbv_norm,
    predict,
    signal_power,
    target_only_accuracy,
    write_calibrated_config,
)

REPO = Path(__file__).resolve().parents[1]
FLOOR = -5.0


def brute_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


scored = st.lists(st.tuples(st.integers(-6, 6), st.booleans()), min_size=0, max_size=60)


# --------------------------------------------------------------------------- AUROC
@settings(max_examples=200, deadline=None)
@given(scored)
def test_auroc_equals_pairwise_definition_with_ties(pairs):
    scores = [float(s) / 3 for s, _ in pairs]
    labels = [y for _, y in pairs]
    want = brute_auroc(scores, labels)
    got = auroc(scores, labels)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(scored)
def test_auroc_invariant_under_strictly_increasing_maps(pairs):
    x = np.array([s for s, _ in pairs], dtype=np.float64)
    y = [lab for _, lab in pairs]
    base = auroc(x, y)
    for f in (lambda v: 3 * v + 1, lambda v: v ** 3 + v, np.exp, lambda v: np.arctan(v) - 7):
        other = auroc(f(x), y)
        assert (math.isnan(base) and math.isnan(other)) or other == pytest.approx(base, abs=1e-12)


def test_auroc_extremes():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.4] * 7, [True, False, True, True, False, True, False]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    assert math.isnan(auroc([], []))
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [True])


def test_signal_power_parts():
    rng = np.random.default_rng(0)
    records = [StepSignal(f"p{i % 5}", float(-rng.uniform(0, 6)), float(rng.uniform()),
                          bool(rng.uniform() < 0.7)) for i in range(80)]
    power = signal_power(records, FLOOR, betas=(0.0, 0.5, 1.0))
    labels = [r.right for r in records]
    assert power["n_steps"] == 80 and power["n_wrong"] == sum(not y for y in labels)
    assert power["lpbv_norm"] == pytest.approx(
        brute_auroc(list(lpbv_norm([r.lpbv for r in records], FLOOR)), labels))
    assert power["abgv"] == pytest.approx(brute_auroc([r.abgv for r in records], labels))
    assert power["ensemble"]["1.00"] == pytest.approx(power["lpbv_norm"])
    assert power["ensemble"]["0.00"] == pytest.approx(power["abgv"])
    assert set(power["ensemble"]) == {"0.00", "0.50", "1.00"}


def test_scores_match_the_engine_formula():
    import torch

    from specguard_vllm.core.decision import ensemble_score

    rng = np.random.default_rng(1)
    lp = -rng.uniform(0, 8, 200).astype(np.float32)
    g = rng.uniform(0, 1, 200).astype(np.float32)
    for beta in (0.0, 0.35, 0.5, 0.95, 1.0):
        engine = ensemble_score(torch.tensor(lp), torch.tensor(g),
                                torch.tensor(beta, dtype=torch.float32), FLOOR).numpy()
        assert np.array_equal(ensemble_scores(lp, g, beta, FLOOR), engine)


# --------------------------------------------------------------------------- fitting
def known_case():
    """10 problems (8 solved by the target), 4 right + 1 wrong step each.

    Right: LPBV_norm 0.9, ABGV 0.1; wrong: LPBV_norm 0.3, ABGV 0.9. Score right = 0.1 + 0.8 b,
    wrong = 0.9 - 0.6 b: they separate only for beta > 4/7. Nearest grid beta to 0.5: 0.6
    (right 0.58, wrong 0.54), so tau lands in (0.54, 0.58].
    """
    records, correct = [], {}
    for p in range(10):
        pid = f"p{p}"
        correct[pid] = p < 8
        records += [StepSignal(pid, -0.5, 0.1, True) for _ in range(4)]
        records.append(StepSignal(pid, -3.5, 0.9, False))
    return records, correct


def test_fit_accuracy_goal_finds_the_known_optimum():
    records, correct = known_case()
    result = fit(records, correct, goal="accuracy", lpbv_floor=FLOOR, min_acceptance=0.8)
    assert result.best.beta == pytest.approx(0.6)
    assert 0.54 < result.best.tau <= 0.58 + 1e-6
    assert result.tau_grid == pytest.approx(0.58, abs=1e-6)
    assert result.best.accuracy == pytest.approx(0.8) == result.target_only_accuracy
    assert result.best.acceptance == pytest.approx(0.8)
    # the rounded tau partitions the records exactly like the grid's score
    again = predict(records, correct, result.best.tau, result.best.beta, FLOOR)
    assert (again.n_correct, again.n_accepted) == (result.best.n_correct, result.best.n_accepted)
    # the paper defaults accept every wrong step here (wrong 0.6 > tau 0.5 at beta 0.5)
    defaults = predict(records, correct, 0.5, 0.5, FLOOR)
    assert defaults.accuracy == 0.0 and defaults.acceptance >= 0.2


def test_fit_latency_goal_known_case():
    records, correct = known_case()
    result = fit(records, correct, goal="latency", lpbv_floor=FLOOR, max_accuracy_drop=0.0)
    assert result.best.accuracy == pytest.approx(0.8)
    assert result.best.acceptance == pytest.approx(0.8)  # every right step, no wrong one
    # with a 100-point budget the fit accepts everything (tau 0 or any tau below every score)
    loose = fit(records, correct, goal="latency", lpbv_floor=FLOOR, max_accuracy_drop=100.0)
    assert loose.best.acceptance == 1.0


def test_latency_ties_go_to_confidence_alone():
    """Right steps confident, wrong ones not, grounding uninformative: every beta >= some
    threshold separates them equally well. The latency fit takes beta = 1 (no grounding to
    compute); the accuracy fit keeps the paper-nearest tie rule."""
    records, correct = [], {}
    for p in range(6):
        pid = f"p{p}"
        correct[pid] = True
        records += [StepSignal(pid, -0.2, 0.5, True) for _ in range(3)]
        records.append(StepSignal(pid, -4.0, 0.5, False))
    latency = fit(records, correct, goal="latency", lpbv_floor=FLOOR, max_accuracy_drop=0.0)
    assert latency.best.beta == 1.0 and latency.best.acceptance == pytest.approx(0.75)
    assert all(p.n_accepted <= latency.best.n_accepted for p in latency.per_beta)
    accuracy = fit(records, correct, goal="accuracy", lpbv_floor=FLOOR, min_acceptance=0.75)
    assert accuracy.best.beta < 1.0


def test_fit_when_nothing_beats_target_only():
    # the wrong step scores above both right ones at every beta: with no accuracy budget the
    # latency fit can accept nothing without accepting it, so it rejects everything
    records = [StepSignal("a", -4.0, 0.1, True), StepSignal("a", -0.1, 0.95, False),
               StepSignal("b", -4.5, 0.2, True)]
    correct = {"a": True, "b": True}
    result = fit(records, correct, goal="latency", lpbv_floor=FLOOR, max_accuracy_drop=0.0)
    assert result.best.accuracy == 1.0
    assert result.best.n_accepted == 0 and result.best.tau == 1.01 == result.tau_grid


@st.composite
def record_sets(draw):
    n_problems = draw(st.integers(1, 6))
    correct = {f"p{i}": draw(st.booleans()) for i in range(n_problems)}
    records = draw(st.lists(st.builds(
        StepSignal,
        st.sampled_from(sorted(correct)),
        st.sampled_from([0.0, -0.3, -1.0, -2.5, -4.0, -7.0]),
        st.sampled_from([0.0, 0.1, 0.45, 0.5, 0.8, 1.0]),
        st.booleans()), min_size=1, max_size=25))
    return records, correct


def brute_force(records, correct, goal, min_acc, max_drop):
    """Best objective over the whole grid by calling `predict` at every candidate."""
    base = target_only_accuracy(correct)
    best = None
    for beta in BETA_GRID:
        scores = ensemble_scores([r.lpbv for r in records], [r.abgv for r in records], beta, FLOOR)
        for tau in {0.0, 1.01, *map(float, scores)}:
            p = predict(records, correct, tau, beta, FLOOR)
            if goal == "accuracy" and p.acceptance >= min_acc - 1e-9:
                value = p.n_correct
            elif goal == "latency" and p.accuracy >= base - max_drop / 100 - 1e-9:
                value = p.n_accepted
            else:
                continue
            best = value if best is None else max(best, value)
    return best


@settings(max_examples=40, deadline=None)
@given(record_sets(), st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
       st.sampled_from([0.0, 1.0, 20.0]))
def test_fit_respects_constraint_and_matches_brute_force(data, min_acc, max_drop):
    records, correct = data
    base = target_only_accuracy(correct)
    for goal in ("accuracy", "latency"):
        result = fit(records, correct, goal=goal, lpbv_floor=FLOOR, min_acceptance=min_acc,
                     max_accuracy_drop=max_drop)
        best = result.best
        check = predict(records, correct, best.tau, best.beta, FLOOR)
        assert (check.n_correct, check.n_accepted) == (best.n_correct, best.n_accepted)
        if goal == "accuracy":
            assert best.acceptance >= min_acc - 1e-9
            assert best.n_correct == brute_force(records, correct, goal, min_acc, max_drop)
        else:
            assert best.accuracy >= base - max_drop / 100 - 1e-9
            assert best.n_accepted == brute_force(records, correct, goal, min_acc, max_drop)
        # deterministic, and independent of record order
        again = fit(list(reversed(records)), dict(reversed(list(correct.items()))), goal=goal,
                    lpbv_floor=FLOOR, min_acceptance=min_acc, max_accuracy_drop=max_drop)
        assert again.best == best


def test_fit_refuses_bad_input():
    records, correct = known_case()
    with pytest.raises(ValueError):
        fit(records, correct, goal="speed", lpbv_floor=FLOOR)
    with pytest.raises(ValueError):
        fit(records, correct, goal="accuracy", lpbv_floor=FLOOR, min_acceptance=1.5)
    with pytest.raises(ValueError):
        fit([], correct, goal="accuracy", lpbv_floor=FLOOR)
    with pytest.raises(ValueError):
        fit(records + [StepSignal("nope", 0.0, 1.0, True)], correct, goal="accuracy",
            lpbv_floor=FLOOR)


# --------------------------------------------------------------------------- config
def test_written_config_validates_and_keeps_every_other_key(tmp_path):
    base = REPO / "configs" / "specguard.paper.yaml"
    out = tmp_path / "calibrated.yaml"
    write_calibrated_config(base, 0.37, 0.65, out, ["fitted on 20 dev problems", "", "line 3"])
    text = out.read_text()
    assert text.startswith("# fitted on 20 dev problems\n#\n# line 3\n")
    # the base's comments past its leading block are kept, the thresholds' own included
    base_lines = base.read_text().splitlines()
    first_key = next(i for i, line in enumerate(base_lines) if line and not line.startswith("#"))
    for line in base_lines[first_key:]:
        if "#" in line:
            comment = line[line.index("#"):]
            assert comment in text, comment
    assert "not carried over" not in text
    loaded = load_config(out)
    assert (loaded.specguard.tau, loaded.specguard.beta) == (0.37, 0.65)
    before, after = yaml.safe_load(base.read_text()), yaml.safe_load(text)
    assert after["specguard"].pop("tau") == 0.37 and after["specguard"].pop("beta") == 0.65
    before["specguard"].pop("tau"), before["specguard"].pop("beta")
    assert after == before
    assert load_config(base).model_copy(
        update={"specguard": load_config(base).specguard.model_copy(
            update={"tau": 0.37, "beta": 0.65})}) == loaded


def test_written_config_without_specguard_block_and_refusal(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("method: specguard\nmodel: d\nnum_speculative_tokens: 8\n")
    out = tmp_path / "out.yaml"
    write_calibrated_config(base, 1.01, 0.0, out)
    assert load_config(out).specguard.tau == 1.01
    # a layout the in-place edit does not handle (flow mapping) is re-dumped, and says so
    flow = tmp_path / "flow.yaml"
    flow.write_text("# about\nmethod: specguard  # m\nmodel: d\nnum_speculative_tokens: 8\n"
                    "specguard: {tau: 0.5, beta: 0.5, seed: 3}\n")
    write_calibrated_config(flow, 0.25, 0.75, out, ["head"])
    text = out.read_text()
    assert text.startswith("# head\n# Comments of the base config are not carried over")
    assert yaml.safe_load(text)["specguard"] == {"tau": 0.25, "beta": 0.75, "seed": 3}
    bad = tmp_path / "bad.yaml"
    with pytest.raises(ConfigError):
        write_calibrated_config(base, -0.1, 0.5, bad)
    assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".calibrated-")] == []


# --------------------------------------------------------------------------- labelling
@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "models" / "tiny-target"))


def test_label_steps_grades_lines_against_the_committed_prefix(tiny_tokenizer):
    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.evaluation.calibrate_labels import label_steps
    from specguard_vllm.tasks import canonical_solution, generate
    from specguard_vllm.training.tokenizer import EOS_ID, prompt_text

    tok = tiny_tokenizer
    problem = next(p for p in generate("dev", 50) if len(p.steps) >= 2)
    gold = canonical_solution(problem).split("\n")  # step lines, then "Answer: N"
    prompt = tok(prompt_text(problem.question), add_special_tokens=False).input_ids

    def enc(text):
        return tok(text, add_special_tokens=False).input_ids

    line0 = enc(gold[0] + "\n")
    full = prompt + line0 + enc("\n".join(gold[1:])) + [EOS_ID]
    s = problem.steps[1]
    wrong = f"{s.result + 1} + 1 = {s.result + 2}\n"
    answer_right = enc(f"Answer: {problem.answer}") + [EOS_ID]
    entries = [
        # first line, right, at the line start
        {"context_len": len(prompt), "drafted": line0, "lpbv": -0.1, "abgv": 0.5},
        # after the first line: a wrong line; the lead's `step_len` cuts a token-level tail
        {"context_len": len(prompt) + len(line0), "drafted": enc(wrong) + enc("9 9"),
         "step_len": len(enc(wrong)), "lpbv": -3.0, "abgv": 0.2},
        # the first line completed after the target's first token
        {"context_len": len(prompt) + 1, "drafted": line0[1:], "lpbv": -0.2, "abgv": 0.4},
        # cut before the end of its line: skipped
        {"context_len": len(prompt), "drafted": line0[:3], "lpbv": -0.2, "abgv": 0.4},
        # a premature answer: the last gold step is not computed yet -> wrong
        {"context_len": len(prompt) + len(line0), "drafted": answer_right, "lpbv": -1.0,
         "abgv": 0.3},
    ]
    seg = StepSegmenter.from_tokenizer(tok, ["\n"])
    counts = Counter()

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    recs = label_steps("dev:0", problem, len(prompt), full, entries, decode, seg, counts)
    by_ctx = [(r.lpbv, r.right) for r in recs]
    assert (-0.1, True) in by_ctx and (-3.0, False) in by_ctx and (-0.2, True) in by_ctx
    assert (-1.0, False) in by_ctx
    assert counts["logged"] == 5 and counts["incomplete"] == 1 and counts["joined"] == 1
    assert counts["graded"] == 4


def test_decision_log_keeps_judged_steps_only(tmp_path):
    from specguard_vllm.evaluation.calibrate_labels import step_ids
    from specguard_vllm.trace_records import read_decision_log

    log = tmp_path / "log.jsonl"
    rows = [{"kind": "step", "req_id": "3-ab", "context_len": 5, "drafted": [1, 2, 3],
             "step_len": 2, "lpbv": -1.0, "abgv": 0.5, "score": 0.6, "accepted": True},
            {"kind": "token", "req_id": "3-ab", "context_len": 8, "drafted": [4], "committed": 1},
            {"req_id": "4-cd", "context_len": 5, "drafted": [7, 8], "lpbv": -2.0, "abgv": 0.1,
             "score": 0.3, "accepted": False}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grouped = read_decision_log(log, steps_only=True)
    assert sorted(grouped) == ["3", "4"] and len(grouped["3"]) == 1
    assert step_ids(grouped["3"][0]) == [1, 2] and step_ids(grouped["4"][0]) == [7, 8]


def test_cli_refuses_bad_arguments(capsys, tmp_path):
    from specguard_vllm.evaluation.calibrate_cli import main

    cases = [
        (["--split", "test"], "test split"),
        (["--n", "0"], "--n"),
        (["--min-acceptance", "1.5"], "--min-acceptance"),
        (["--max-accuracy-drop", "-1"], "--max-accuracy-drop"),
        (["--target", str(tmp_path / "missing")], "--target"),
        (["--out", str(tmp_path / "no" / "dir.yaml")], "--out"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
    ]
    target = ["--target", str(REPO / "models" / "tiny-target")]
    for argv, needle in cases:
        assert main(target + argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
    with pytest.raises(SystemExit) as exc:
        main(["--goal", "speed"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_calibrate_end_to_end_on_the_bundled_pair(tmp_path):
    out, report_path, log = tmp_path / "cal.yaml", tmp_path / "cal.json", tmp_path / "log.jsonl"
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr")
    cmd = [sys.executable, "-m", "specguard_vllm.evaluation.calibrate_cli", "--n", "20",
           "--goal", "accuracy", "--out", str(out), "--json", str(report_path),
           "--decision-log", str(log)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "AUROC" in result.stdout and "fitted: tau=" in result.stdout
    report = json.loads(report_path.read_text())
    for key in ("auroc", "fit", "predicted", "measured", "verdict", "wall_seconds", "collect"):
        assert key in report
    assert set(report["auroc"]) >= {"lpbv_norm", "abgv", "ensemble", "n_steps", "n_wrong"}
    assert "0.50" in report["auroc"]["ensemble"]
    tau, beta = report["fit"]["tau"], report["fit"]["beta"]
    assert report["predicted"]["fitted"]["acceptance"] >= 0.5
    config = load_config(out)
    assert (config.specguard.tau, config.specguard.beta) == (tau, beta)

    # measured acceptance = what the decision log says for those requests
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    entries = [e for e in entries if e.get("kind", "step") == "step"]  # not token-level rows
    for name in ("defaults", "fitted"):
        keys = set(report["validation_request_ids"][name])
        mine = [e for e in entries if e["req_id"].split("-", 1)[0] in keys]
        measured = report["measured"][name]
        assert measured["n_steps"] == len(mine) > 0
        assert measured["n_accepted"] == sum(e["accepted"] for e in mine)
        assert measured["acceptance"] == pytest.approx(sum(e["accepted"] for e in mine) / len(mine))
    # every step of the collect run was rejected (tau 1.01), and the logged decisions of the
    # fitted requests follow the fitted threshold on the engine's own scores
    collect = set(report["collect"]["target_only"]["request_ids"])
    assert not any(e["accepted"] for e in entries if e["req_id"].split("-", 1)[0] in collect)
    fitted = set(report["validation_request_ids"]["fitted"])
    for e in entries:
        if e["req_id"].split("-", 1)[0] in fitted:
            want = ensemble_scores([e["lpbv"]], [e["abgv"]], beta, FLOOR)[0]
            assert e["score"] == pytest.approx(float(want), abs=1e-6)
            assert e["accepted"] == bool(np.float32(e["score"]) >= np.float32(tau))
    assert report["measured"]["target_only"]["accuracy"] == pytest.approx(
        report["fit"]["target_only_accuracy"])
    assert isinstance(report["verdict"]["fitted_beats_defaults"], bool)
    assert len(report["fit"]["per_beta"]) == 21  # one best feasible point per grid beta
