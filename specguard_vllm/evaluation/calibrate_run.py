"""`specguard calibrate`: fit tau and beta on labelled dev problems, then check by decoding.

1. **Collect.** One SpecGuard engine decodes the problems greedily at ``tau = 1.01`` with
   ``fallback: target``: every step is rejected, so the output is exactly the target's own
   greedy output, while the draft's proposal at every step is still verified, scored and
   logged (``SPECGUARD_DECISION_LOG``).
2. **Label** each proposal (`calibrate_labels`): ``step`` by the tiny task's step grader;
   ``outcome`` / ``agreement`` by continuing the target greedily from the context plus the
   step (a target-only engine, prefix caching on, at most ``max_continuations``) and asking
   whether it reaches the gold answer / the target-only run's answer.
3. **Fit** (`calibrate.fit`, fixed-trajectory approximation) for the chosen goal, and the
   predicted accuracy-vs-acceptance frontier.
4. **Validate.** Decode the same problems again under the paper defaults (0.5, 0.5) and
   under the fitted pair; accuracy from the graded outputs, step acceptance from the
   decision log entries of those requests.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

from specguard_vllm.evaluation.calibrate import (
    PAPER_BETA,
    PAPER_TAU,
    TAU_REJECT_ALL,
    CannotCalibrate,
    StepSignal,
    fit,
    frontier,
    predict,
    signal_power,
    target_only_accuracy,
    write_calibrated_config,
)
from specguard_vllm.evaluation.calibrate_engine import (
    Decoded,
    continue_greedily,
    open_session,
    prepare,
)
from specguard_vllm.evaluation.calibrate_labels import (
    LABELS,
    check_labels,
    drafted_steps,
    judge_steps,
    label_steps,
    plan_continuations,
)


def choose_labels(dataset: str, items, requested: str | None) -> str:
    """The requested label kind if the data allows it, else the best available one:
    step (a step grader exists: the tiny task), then outcome (gold answers), then agreement."""
    from specguard_vllm.evaluation.datasets import has_gold

    gold = all(has_gold(item) for item in items)
    if requested is None:
        return "step" if dataset == "tiny" else "outcome" if gold else "agreement"
    if requested not in LABELS:
        raise CannotCalibrate(f"--labels must be one of {', '.join(LABELS)}, got {requested!r}")
    if requested == "step" and dataset != "tiny":
        raise CannotCalibrate(f"--labels step needs a step grader, which only the tiny dataset "
                              f"has (not {dataset}): use --labels outcome or agreement")
    if requested == "outcome" and not gold:
        raise CannotCalibrate("--labels outcome needs gold answers (--answer-field): use "
                              "--labels agreement, which needs none")
    return requested


def check_answers_found(items, answers: list[str | None]) -> None:
    """A user's answer regex that matched no target output would label every step alike."""
    regexes = {item.answer_regex for item in items if item.answer_regex}
    if regexes and all(a is None for a in answers):
        raise CannotCalibrate(f"--answer-regex {min(regexes)!r} matched none of the "
                              f"{len(answers)} target outputs: no final answer could be read")


def calibrate(*, config_path: str, target: str, dataset: str = "tiny", split: str = "dev",
              n: int, goal: str, min_acceptance: float, max_accuracy_drop: float,
              out: str | None, labels: str | None = None, data_path: str | None = None,
              jsonl=None, plot: str | None = None, max_continuations: int = 4000,
              max_tokens: int = 160, max_num_seqs: int = 256, seed: int = 0,
              decision_log: str | None = None) -> dict:
    """Collect, label, fit, validate; returns the full report (what ``--json`` writes)."""
    from specguard_vllm.config import load_config
    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.evaluation.datasets import final_answer, has_gold, is_correct, load_items

    started = time.perf_counter()
    config = load_config(config_path)
    floor = config.specguard.lpbv_floor
    try:
        items = load_items(dataset, n, split=split, seed=seed, path=data_path, jsonl=jsonl)
    except ValueError as error:
        raise CannotCalibrate(str(error)) from None
    if len(items) < n:
        raise CannotCalibrate(f"the {dataset} {split} data has only {len(items)} problems "
                              f"(asked {n})")
    kind = choose_labels(dataset, items, labels)
    data = prepare(target, items, max_tokens)
    items = data.items
    gold = all(has_gold(item) for item in items)
    tmp = None
    if decision_log:
        log_path = Path(decision_log)
        if log_path.exists():
            log_path.unlink()
    else:
        tmp = tempfile.TemporaryDirectory()
        log_path = Path(tmp.name) / "decisions.jsonl"
    session = None
    seconds: dict[str, float] = {}
    counts: Counter = Counter()
    try:
        t0 = time.perf_counter()
        session = open_session(target, config, data, log_path=log_path,
                               max_num_seqs=max_num_seqs, seed=seed)
        seconds["engine_start"] = time.perf_counter() - t0

        # 1. collect: the target's own trajectories, every draft step scored and rejected
        (base,) = session.run([{"tau": TAU_REJECT_ALL, "beta": PAPER_BETA, "fallback": "target"}],
                              lambda i, text: is_correct(items[i], text) if gold else True)
        seconds["collect"] = base.seconds
        target_answers = [final_answer(item, text) for item, text in zip(items, base.texts)]
        check_answers_found(items, target_answers)

        # 2. label
        t0 = time.perf_counter()
        prompt_lens = [len(p) for p in data.prompts]
        segmenter = StepSegmenter.from_tokenizer(data.tokenizer, config.specguard.step_delimiters)
        if kind == "step":
            records: list[StepSignal] = []
            for item, plen, full, entries in zip(items, prompt_lens, base.full_ids, base.entries):
                records += label_steps(item.id, item.problem, plen, full, entries, data.decode,
                                       segmenter, counts)
        else:
            session.close()  # one engine at a time: the continuations get their own
            session = None
            steps = [s for i, (full, entries) in enumerate(zip(base.full_ids, base.entries))
                     for s in drafted_steps(i, full, entries)]
            plan = plan_continuations(steps, base.full_ids, prompt_lens, data.max_tokens,
                                      segmenter.eos_token_ids, max_continuations, seed)
            continuations = continue_greedily(target, plan.prompts, plan.max_tokens,
                                              max_model_len=data.max_model_len,
                                              max_num_seqs=max_num_seqs, seed=seed)
            records = judge_steps(plan, kind, items, base.full_ids, prompt_lens, continuations,
                                  data.decode, target_answers)
            counts.update(plan.counts)
            counts["logged"] = len(steps)
            counts["labelled"] = len(records)
        seconds["label"] = time.perf_counter() - t0
        check_labels(records, kind)
        if kind == "agreement":  # the reference is the target itself
            target_correct = {item.id: True for item, a in zip(items, target_answers)
                              if a is not None}
        else:
            target_correct = {item.id: ok for item, ok in zip(items, base.correct)}

        # 3. fit
        result = fit(records, target_correct, goal=goal, lpbv_floor=floor,
                     min_acceptance=min_acceptance, max_accuracy_drop=max_accuracy_drop)
        tau, beta = result.best.tau, result.best.beta
        power = signal_power(records, floor, betas=sorted({PAPER_BETA, beta}))
        predicted_defaults = predict(records, target_correct, PAPER_TAU, PAPER_BETA, floor)
        hull = frontier(records, target_correct, lpbv_floor=floor)

        # 4. validate: accuracy against gold, or (no gold) against the target's answers
        if session is None:
            # A new engine numbers its requests from 0 again: keep the collect phase's
            # decisions apart, or they would be read as the validation requests' own.
            if decision_log and log_path.exists():
                log_path.replace(log_path.with_suffix(".collect.jsonl"))
            log_path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            session = open_session(target, config, data, log_path=log_path,
                                   max_num_seqs=max_num_seqs, seed=seed)
            seconds["engine_start"] += time.perf_counter() - t0

        def grade(i: int, text: str) -> bool:
            if gold:
                return is_correct(items[i], text)
            return target_answers[i] is not None and final_answer(items[i], text) == \
                target_answers[i]

        defaults, fitted = session.run([{"tau": PAPER_TAU, "beta": PAPER_BETA},
                                        {"tau": tau, "beta": beta}], grade)
        seconds["validate"] = defaults.seconds
    finally:
        if session is not None:
            session.close()
        if tmp is not None:
            tmp.cleanup()

    target_acc = target_only_accuracy(target_correct)
    measured_target_acc = base.accuracy if gold else 1.0
    verdict = _verdict(goal, defaults, fitted, measured_target_acc, min_acceptance,
                       max_accuracy_drop)
    report = {
        "config": str(config_path), "target": str(target), "draft": config.model,
        "dataset": dataset, "data_path": data_path, "split": split,
        "n_problems": len(items), "n_skipped_long_prompts": data.skipped, "seed": seed,
        "labels": kind, "accuracy_reference": "gold" if gold else "target-only answer",
        "goal": goal, "min_acceptance": min_acceptance,
        "max_accuracy_drop_points": max_accuracy_drop, "lpbv_floor": floor,
        "max_continuations": max_continuations,
        "collect": {"target_only": base.summary(), "steps": dict(counts),
                    "n_records": len(records), "n_wrong": sum(not r.right for r in records)},
        "auroc": power,
        "fit": result.to_json(),
        "frontier": [p.to_json() for p in hull],
        "predicted": {"defaults": predicted_defaults.to_json(), "fitted": result.best.to_json()},
        "measured": {"target_only": base.brief(), "defaults": defaults.brief(),
                     "fitted": fitted.brief()},
        "validation_request_ids": {"defaults": defaults.req_keys, "fitted": fitted.req_keys},
        "verdict": verdict,
        "wall_seconds": seconds,
        "decision_log": str(log_path) if decision_log else None,
        "out": None, "plot": None,
    }
    if out:
        header = [
            f"Calibrated by `specguard calibrate --labels {kind} --goal {goal}` from {config_path}",
            f"on {len(items)} {dataset} {split} problems (seed {seed}), target {target}.",
            (f"Fit: {result.constraint}; fixed-trajectory prediction: accuracy "
             f"{result.best.accuracy:.3f}, step acceptance {result.best.acceptance:.3f}."),
            (f"Measured by decoding the same problems: tau={tau:g} beta={beta:g}: accuracy "
             f"{fitted.accuracy:.3f}, acceptance {fitted.acceptance:.3f}; paper defaults "
             f"(0.5, 0.5): accuracy {defaults.accuracy:.3f}, acceptance "
             f"{defaults.acceptance:.3f};"),
            f"target-only accuracy {target_acc:.3f}. {verdict['summary']}",
            (f"AUROC right-vs-wrong steps: LPBV {power['lpbv_norm']:.3f}, ABGV "
             f"{power['abgv']:.3f}, "
             + ", ".join(f"ensemble@{b} {auc:.3f}" for b, auc in power["ensemble"].items())
             + "."),
            "Serve it (relative paths resolve from the directory you run the command in):",
            f"  vllm serve {target} --speculative-config {out}",
        ]
        write_calibrated_config(config_path, tau, beta, out, header)
        report["out"] = str(out)
    if plot:
        from specguard_vllm.evaluation.calibrate_report import plot_frontier

        report["plot"] = str(plot_frontier(report, plot))
    report["wall_seconds"]["total"] = time.perf_counter() - started
    return report


def _verdict(goal, defaults: Decoded, fitted: Decoded, target_acc: float,
             min_acceptance: float, max_drop: float) -> dict:
    """Whether the fitted pair beats the paper defaults on the goal, as decoded."""
    eps = 1e-12
    if goal == "accuracy":
        def ok(d):
            return d.acceptance >= min_acceptance - eps
        better = fitted.accuracy > defaults.accuracy + eps
        same = abs(fitted.accuracy - defaults.accuracy) <= eps
        what = f"accuracy with acceptance >= {min_acceptance:.2f}"
    else:
        def ok(d):
            return d.accuracy >= target_acc - max_drop / 100.0 - eps
        better = fitted.acceptance > defaults.acceptance + eps
        same = abs(fitted.acceptance - defaults.acceptance) <= eps
        what = f"acceptance with accuracy >= target-only - {max_drop:g} points"
    f_ok, d_ok = ok(fitted), ok(defaults)
    beats = f_ok and (better or not d_ok)
    if beats:
        summary = f"Fitted beats the paper defaults on {what}."
    elif not f_ok:
        summary = f"Fitted does NOT meet its constraint when decoded ({what})."
    elif same:
        summary = f"Fitted ties the paper defaults on {what}."
    else:
        summary = f"Fitted does NOT beat the paper defaults on {what}."
    return {"fitted_beats_defaults": bool(beats), "fitted_meets_constraint": bool(f_ok),
            "defaults_meet_constraint": bool(d_ok), "summary": summary}
