"""Per-configuration figures of a bench run, from per-problem measurements.

Wall-clock figures are what this machine measured. The hardware-independent ones are
counts: target forward passes (engine iterations of a request run alone), draft forward
passes (a batched pass over the k candidates counts once: in the memory-bound regime a
k-row pass costs about what a 1-row pass does), and committed tokens per target forward.
The modelled speedup over target-only for a draft/target cost ratio c is

    speedup(c) = (target-only cost per token) / ((target_forwards + c * draft_forwards) / tokens)

with target-only's cost per token measured in the same run (1 target forward per token).
Per token, not per problem: a lossy configuration may write longer or shorter answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

COST_RATIOS = (0.02, 0.05, 0.1, 0.2)


@dataclass
class ProblemResult:
    """One configuration on one problem."""

    config: str
    item_id: str
    correct: bool
    output_tokens: int
    latency_s: float
    ttft_s: float | None
    target_forwards: float
    draft_forwards: float
    accepted_draft_tokens: float
    proposed_draft_tokens: float
    steps_accepted: float = 0.0
    steps_rejected: float = 0.0
    scorer_s: float = 0.0
    error: str | None = None
    text: str = ""
    extra: dict = field(default_factory=dict)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The exact bounds at 0 and n (the formula gives them up to rounding).
    low = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes == n else max(p, min(1.0, centre + half))
    return (low, high)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(config: str, results: list[ProblemResult], *, mode: str = "offline",
              params: dict | None = None, group: str = "") -> dict:
    """One row of the bench table for ``config``."""
    ok = [r for r in results if r.error is None]
    n = len(ok)
    correct = sum(r.correct for r in ok)
    tokens = sum(r.output_tokens for r in ok)
    wall = sum(r.latency_s for r in ok)
    target_f = sum(r.target_forwards for r in ok)
    draft_f = sum(r.draft_forwards for r in ok)
    steps = sum(r.steps_accepted + r.steps_rejected for r in ok)
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
             if r.ttft_s is not None and r.output_tokens > 1]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    low, high = wilson_interval(correct, n)
    return {
        "config": config, "mode": mode, "group": group, "params": params or {},
        "n": n, "errors": len(results) - n,
        "accuracy": correct / n if n else math.nan, "accuracy_ci95": [low, high],
        "latency_s_per_problem": wall / n if n else math.nan,
        "tokens_per_s": tokens / wall if wall else math.nan,
        "tpot_s": sum(tpots) / len(tpots) if tpots else None,
        "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "output_tokens": tokens,
        "step_acceptance": _ratio(sum(r.steps_accepted for r in ok), steps),
        "steps_verified": steps,
        "draft_token_acceptance": _ratio(sum(r.accepted_draft_tokens for r in ok),
                                         sum(r.proposed_draft_tokens for r in ok)),
        "draft_token_share": _ratio(sum(r.accepted_draft_tokens for r in ok), tokens),
        "scorer_overhead": _ratio(sum(r.scorer_s for r in ok), wall),
        "target_forwards": target_f,
        "draft_forwards": draft_f,
        "tokens_per_target_forward": _ratio(tokens, target_f),
    }


def add_comparisons(rows: list[dict]) -> list[dict]:
    """Modelled speedups and same-run ratios against `target` and `sd` (per mode)."""
    by_mode: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], {})[row["config"]] = row
    for row in rows:
        peers = by_mode[row["mode"]]
        target, sd = peers.get("target"), peers.get("sd")
        base_cost = None
        if target and target["output_tokens"] and target["target_forwards"] is not None:
            base_cost = target["target_forwards"] / target["output_tokens"]
        speedups = {}
        counted = row["target_forwards"] is not None  # server rows: no per-request counts
        for c in COST_RATIOS:
            cost = (row["target_forwards"] + c * row["draft_forwards"]) if counted else None
            speedups[f"{c:g}"] = (base_cost * row["output_tokens"] / cost
                                  if base_cost and cost else None)
        row["modelled_speedup"] = speedups
        row["tokens_per_s_vs_target"] = _ratio(row["tokens_per_s"], target["tokens_per_s"]) \
            if target else None
        row["tokens_per_target_forward_vs_sd"] = (
            _ratio(row["tokens_per_target_forward"] or 0.0, sd["tokens_per_target_forward"])
            if sd and sd["tokens_per_target_forward"] else None)
        row["accuracy_vs_target_points"] = (100 * (row["accuracy"] - target["accuracy"])
                                            if target else None)
    return rows


def paired_outcomes(results: dict[str, list[ProblemResult]], reference: str = "target") -> dict:
    """Per configuration: problems it got right that ``reference`` got wrong, and vice versa."""
    ref = {r.item_id: r.correct for r in results.get(reference, []) if r.error is None}
    out = {}
    for config, rs in results.items():
        if config == reference:
            continue
        wins = sum(1 for r in rs if r.error is None and r.correct and not ref.get(r.item_id, True))
        losses = sum(1 for r in rs if r.error is None and not r.correct and ref.get(r.item_id, False))
        out[config] = {"right_where_target_wrong": wins, "wrong_where_target_right": losses}
    return out
