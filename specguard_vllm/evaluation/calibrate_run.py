"""`specguard calibrate`: fit tau and beta on a labelled dev split, then check by decoding.

Three phases, one offline vLLM engine (per-request ``extra_args`` overrides):

1. **Collect.** Greedy decode of the split's problems at ``tau = 1.01`` with
   ``fallback: target``: every step is rejected, so the output is exactly the target's own
   greedy output (target-only accuracy per problem), while the draft's proposal at the
   start of every target line is still verified, scored and logged
   (``SPECGUARD_DECISION_LOG``). Each proposal is labelled (`calibrate_labels`) ->
   `calibrate.StepSignal` records.
2. **Fit** (`calibrate.fit`, fixed-trajectory approximation) for the chosen goal.
3. **Validate.** Decode the same problems again under the paper defaults (0.5, 0.5) and
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
    predict,
    signal_power,
    target_only_accuracy,
    write_calibrated_config,
)
from specguard_vllm.evaluation.calibrate_engine import Decoded, open_session
from specguard_vllm.evaluation.calibrate_labels import label_steps


def calibrate(*, config_path: str, target: str, split: str, n: int, goal: str,
              min_acceptance: float, max_accuracy_drop: float, out: str | None,
              max_tokens: int = 160, max_num_seqs: int = 256, seed: int = 0,
              decision_log: str | None = None) -> dict:
    """Run the three phases; returns the full report (what ``--json`` writes)."""
    from specguard_vllm.config import load_config
    from specguard_vllm.tasks import generate

    started = time.perf_counter()
    config = load_config(config_path)
    floor = config.specguard.lpbv_floor
    problems = generate(split, n, seed=seed)
    if len(problems) < n:
        raise CannotCalibrate(f"the {split} split has only {len(problems)} problems (asked {n})")
    ids = [f"{split}:{i}" for i in range(len(problems))]
    tmp = None
    if decision_log:
        log_path = Path(decision_log)
        if log_path.exists():
            log_path.unlink()
    else:
        tmp = tempfile.TemporaryDirectory()
        log_path = Path(tmp.name) / "decisions.jsonl"
    session = None
    try:
        t0 = time.perf_counter()
        session = open_session(target, config, problems, log_path=log_path,
                               max_tokens=max_tokens, max_num_seqs=max_num_seqs, seed=seed)
        engine_seconds = time.perf_counter() - t0

        # 1. collect
        (base,) = session.run([{"tau": TAU_REJECT_ALL, "beta": PAPER_BETA, "fallback": "target"}])
        counts: Counter = Counter()
        records: list[StepSignal] = []
        for pid, problem, prompt, full, entries in zip(ids, problems, session.prompts,
                                                       base.full_ids, base.entries):
            records += label_steps(pid, problem, len(prompt), full, entries, session.decode,
                                   session.segmenter, counts)
        target_correct = dict(zip(ids, base.correct))
        if not records:
            raise RuntimeError("the collect run produced no gradable draft steps")

        # 2. fit
        result = fit(records, target_correct, goal=goal, lpbv_floor=floor,
                     min_acceptance=min_acceptance, max_accuracy_drop=max_accuracy_drop)
        tau, beta = result.best.tau, result.best.beta
        power = signal_power(records, floor, betas=sorted({PAPER_BETA, beta}))
        predicted_defaults = predict(records, target_correct, PAPER_TAU, PAPER_BETA, floor)

        # 3. validate
        defaults, fitted = session.run([{"tau": PAPER_TAU, "beta": PAPER_BETA},
                                        {"tau": tau, "beta": beta}])
    finally:
        if session is not None:
            session.close()
        if tmp is not None:
            tmp.cleanup()

    target_acc = target_only_accuracy(target_correct)
    verdict = _verdict(goal, defaults, fitted, target_acc, min_acceptance, max_accuracy_drop)
    report = {
        "config": str(config_path), "target": str(target), "draft": config.model,
        "split": split, "n_problems": len(problems), "seed": seed, "goal": goal,
        "min_acceptance": min_acceptance, "max_accuracy_drop_points": max_accuracy_drop,
        "lpbv_floor": floor,
        "collect": {"target_only": base.summary(), "steps": dict(counts),
                    "n_records": len(records), "n_wrong": sum(not r.right for r in records)},
        "auroc": power,
        "fit": result.to_json(),
        "predicted": {"defaults": predicted_defaults.to_json(), "fitted": result.best.to_json()},
        "measured": {"target_only": base.brief(), "defaults": defaults.brief(),
                     "fitted": fitted.brief()},
        "validation_request_ids": {"defaults": defaults.req_keys, "fitted": fitted.req_keys},
        "verdict": verdict,
        "wall_seconds": {"engine_start": engine_seconds, "collect": base.seconds,
                         "validate": defaults.seconds},
        "decision_log": str(log_path) if decision_log else None,
        "out": None,
    }
    if out:
        header = [
            f"Calibrated by `specguard calibrate --goal {goal}` from {config_path}",
            f"on {len(problems)} {split} problems (seed {seed}), target {target}.",
            (f"Fit: {result.constraint}; fixed-trajectory prediction: accuracy "
            f"{result.best.accuracy:.3f}, step acceptance {result.best.acceptance:.3f}."),
            (f"Measured by decoding the same problems: tau={tau:g} beta={beta:g}: accuracy "
            f"{fitted.accuracy:.3f}, acceptance {fitted.acceptance:.3f}; paper defaults "
            f"(0.5, 0.5): accuracy {defaults.accuracy:.3f}, acceptance {defaults.acceptance:.3f};"),
            f"target-only accuracy {target_acc:.3f}. {verdict['summary']}",
            f"AUROC right-vs-wrong steps: LPBV {power['lpbv_norm']:.3f}, ABGV "
            f"{power['abgv']:.3f}, "
            + ", ".join(f"ensemble@{b} {auc:.3f}" for b, auc in power["ensemble"].items()) + ".",
            "Comments of the base config are not carried over (see configs/specguard.yaml).",
        ]
        write_calibrated_config(config_path, tau, beta, out, header)
        report["out"] = str(out)
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
