"""`specguard calibrate`, the pure part: signal power (AUROC) and fitting tau and beta.

The paper fixes ``tau = beta = 0.5`` and gives no way to choose them for another model
pair. Here they are fitted on a labelled dev split: for every step the draft proposed
on the target's own greedy trajectory we know the target's signals (LPBV, ABGV) and
whether the step was right (`tasks.grade_step`); for every problem we know whether the
target alone solved it. `calibrate_run.py` collects those records with the vLLM engine;
this module has no vLLM import and works on plain records.

Conventions
-----------
* **AUROC** is ``P(score of a right step > score of a wrong step)``, ties counting 1/2
  (the Mann-Whitney statistic). The verifier must flag WRONG steps by LOW scores, so 1.0
  means every wrong step scores below every right one, 0.5 is chance, and below 0.5 the
  signal points the wrong way. It is undefined (nan) when either class is empty.
* **Scores** are computed exactly as the engine computes them (`core/decision.py`), in
  float32: ``beta * clip(1 - lpbv / lpbv_floor, 0, 1) + (1 - beta) * abgv``, so a tau
  chosen at one of these values partitions the steps the same way inside the engine.

Prediction model (the fixed-trajectory approximation)
-----------------------------------------------------
Each candidate ``(tau, beta)`` is judged on the records alone, as if accepting a draft
step never changed what comes after it:

* predicted step acceptance = share of the recorded steps with ``score >= tau``;
* predicted accuracy: a problem stays correct iff the target alone got it right AND none
  of its recorded wrong draft steps is accepted. Accepting a right step changes nothing;
  accepting a wrong one is assumed fatal; a problem the target got wrong stays wrong.

So predicted accuracy never exceeds target-only accuracy: the ``accuracy`` goal picks the
pair, nearest the paper default, that loses the fewest target-solved problems while
meeting the acceptance floor. Real decoding departs from this (an accepted step moves the
trajectory; a wrong step may be harmless; later proposals differ), which is why
`calibrate_run` re-measures both the paper defaults and the fitted pair by decoding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Goal = Literal["accuracy", "latency"]
GOALS: tuple[Goal, ...] = ("accuracy", "latency")
BETA_GRID: tuple[float, ...] = tuple(round(i * 0.05, 2) for i in range(21))  # 0, 0.05, ..., 1
TAU_REJECT_ALL = 1.01  # > 1: no score reaches it (every step rejected: target-only output)
PAPER_TAU = 0.5
PAPER_BETA = 0.5


class CannotCalibrate(ValueError):
    """Input the command cannot fit on (bad arguments, data or labels): one line, exit 2."""


# --------------------------------------------------------------------------- AUROC
def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """``P(score[right] > score[wrong]) + 0.5 * P(tie)``; ``labels`` True = right step.

    Computed from mid-ranks (Mann-Whitney U) in O(n log n). Low score is meant to flag a
    wrong step, so 1.0 = perfect detection, 0.5 = chance. nan if either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain nan")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # mid-rank of every run of equal scores (1-based ranks)
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mid = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StepSignal:
    """One drafted step verified on the target's trajectory, with its label."""

    problem: str  # problem id (e.g. "dev:17")
    lpbv: float  # L_min, raw minimum target log-prob of the step
    abgv: float  # G_min, in [0, 1]
    right: bool  # the step line is right given the committed lines before it


def lpbv_norm(lpbv: np.ndarray | Sequence[float], lpbv_floor: float) -> np.ndarray:
    """``clip(1 - lpbv / lpbv_floor, 0, 1)`` in float32, as `core.confidence` computes it."""
    if not lpbv_floor < 0:
        raise ValueError(f"lpbv_floor must be negative, got {lpbv_floor}")
    l32 = np.asarray(lpbv, dtype=np.float32)
    return np.clip(np.float32(1.0) - l32 / np.float32(lpbv_floor), np.float32(0.0), np.float32(1.0))


def ensemble_scores(lpbv: np.ndarray | Sequence[float], abgv: np.ndarray | Sequence[float],
                    beta: float, lpbv_floor: float) -> np.ndarray:
    """The engine's float32 ``beta * LPBV_norm + (1 - beta) * ABGV`` per step."""
    b = np.float32(beta)
    g = np.asarray(abgv, dtype=np.float32)
    return (b * lpbv_norm(lpbv, lpbv_floor) + (np.float32(1.0) - b) * g).astype(np.float32)


def _arrays(records: Sequence[StepSignal]):
    lpbv = np.array([r.lpbv for r in records], dtype=np.float32)
    abgv = np.array([r.abgv for r in records], dtype=np.float32)
    right = np.array([r.right for r in records], dtype=bool)
    return lpbv, abgv, right


def beta_key(beta: float) -> str:
    return f"{beta:.2f}"


def signal_power(records: Sequence[StepSignal], lpbv_floor: float,
                 betas: Iterable[float] = (PAPER_BETA,)) -> dict:
    """AUROC (right vs wrong steps) of LPBV_norm alone, ABGV alone and the ensemble.

    Returns ``{"n_steps", "n_wrong", "lpbv_norm", "abgv", "ensemble": {"0.50": auc, ...}}``
    with one ensemble entry per beta in ``betas`` (e.g. the paper's 0.5 and the fitted one).
    """
    lpbv, abgv, right = _arrays(records)
    return {
        "n_steps": len(records),
        "n_wrong": int((~right).sum()),
        "lpbv_norm": auroc(lpbv_norm(lpbv, lpbv_floor), right),
        "abgv": auroc(abgv, right),
        "ensemble": {beta_key(b): auroc(ensemble_scores(lpbv, abgv, b, lpbv_floor), right)
                     for b in betas},
    }


# --------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class OperatingPoint:
    """One (tau, beta) and what the fixed-trajectory approximation predicts for it."""

    tau: float
    beta: float
    accuracy: float  # predicted share of problems solved
    acceptance: float  # predicted share of steps accepted
    n_correct: int
    n_accepted: int

    def to_json(self) -> dict:
        return asdict(self)


class _Grid:
    """Pre-sorted per-beta arrays: prediction at any tau in O(log n)."""

    def __init__(self, records: Sequence[StepSignal], target_correct: Mapping[str, bool],
                 beta: float, lpbv_floor: float):
        lpbv, abgv, right = _arrays(records)
        self.scores = ensemble_scores(lpbv, abgv, beta, lpbv_floor)
        self.sorted_scores = np.sort(self.scores)
        self.n_steps = len(records)
        self.n_problems = len(target_correct)
        # worst (highest) scored wrong step of each problem the target solved
        worst: dict[str, float] = {p: -math.inf for p, ok in target_correct.items() if ok}
        for r, s, ok in zip(records, self.scores, right):
            if not ok and r.problem in worst:
                worst[r.problem] = max(worst[r.problem], float(s))
        self.sorted_worst = np.sort(np.array(list(worst.values()), dtype=np.float64))

    def counts(self, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(problems still correct, steps accepted) at each tau (accept iff score >= tau)."""
        t32 = np.asarray(taus, dtype=np.float32)
        accepted = self.n_steps - np.searchsorted(self.sorted_scores, t32, side="left")
        correct = np.searchsorted(self.sorted_worst, t32.astype(np.float64), side="left")
        return correct.astype(np.int64), accepted.astype(np.int64)

    def point(self, tau: float, beta: float) -> OperatingPoint:
        c, a = self.counts(np.array([tau]))
        return OperatingPoint(float(tau), float(beta), int(c[0]) / self.n_problems,
                              int(a[0]) / max(self.n_steps, 1), int(c[0]), int(a[0]))


def _check_inputs(records: Sequence[StepSignal], target_correct: Mapping[str, bool]) -> None:
    if not target_correct:
        raise ValueError("no problems: target_correct is empty")
    if not records:
        raise ValueError("no step records to calibrate on")
    unknown = {r.problem for r in records} - set(target_correct)
    if unknown:
        raise ValueError(f"records name problems without a target result: {sorted(unknown)[:5]}")


def predict(records: Sequence[StepSignal], target_correct: Mapping[str, bool], tau: float,
            beta: float, lpbv_floor: float) -> OperatingPoint:
    """Predicted accuracy and step acceptance of one (tau, beta) (fixed trajectory)."""
    _check_inputs(records, target_correct)
    return _Grid(records, target_correct, beta, lpbv_floor).point(tau, beta)


def target_only_accuracy(target_correct: Mapping[str, bool]) -> float:
    return sum(bool(v) for v in target_correct.values()) / len(target_correct)


# --------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class FitResult:
    goal: Goal
    constraint: str  # human-readable, e.g. "predicted acceptance >= 0.50"
    best: OperatingPoint  # the fitted pair; `best.tau` is the tau to use
    tau_grid: float  # the achievable score the grid chose; `best.tau` partitions alike
    target_only_accuracy: float
    n_steps: int
    n_problems: int
    per_beta: list[OperatingPoint] = field(default_factory=list)  # best feasible per beta

    def to_json(self) -> dict:
        return {"goal": self.goal, "constraint": self.constraint, "tau": self.best.tau,
                "beta": self.best.beta, "tau_grid": self.tau_grid,
                "predicted": self.best.to_json(),
                "target_only_accuracy": self.target_only_accuracy,
                "n_steps": self.n_steps, "n_problems": self.n_problems,
                "per_beta": [p.to_json() for p in self.per_beta]}


def _tau_candidates(scores: np.ndarray) -> np.ndarray:
    """0, every distinct achievable score, and TAU_REJECT_ALL (float32 values, ascending)."""
    values = np.unique(scores.astype(np.float32)).astype(np.float64)
    values = values[(values > 0.0) & (values < TAU_REJECT_ALL)]
    return np.concatenate([[0.0], values, [TAU_REJECT_ALL]])


def _round_tau(chosen: float, lower: float | None) -> float:
    """A short decimal tau in (lower, chosen] near the middle of the gap.

    Every tau in that half-open gap accepts exactly the same recorded steps as ``chosen``;
    the middle leaves a margin for scores that differ slightly on other trajectories.
    """
    if lower is None or chosen >= TAU_REJECT_ALL:  # keep 0 and 1.01 as they are
        return float(chosen)
    mid = (lower + chosen) / 2.0
    for digits in range(1, 9):
        cand = round(mid, digits)
        c32 = float(np.float32(cand))
        if lower < c32 <= chosen:
            return float(cand)
    return float(chosen)


def fit(records: Sequence[StepSignal], target_correct: Mapping[str, bool], *, goal: Goal,
        lpbv_floor: float, min_acceptance: float = 0.5, max_accuracy_drop: float = 1.0,
        betas: Sequence[float] = BETA_GRID) -> FitResult:
    """Best (tau, beta) on the grid for ``goal`` under the fixed-trajectory approximation.

    * ``accuracy``: highest predicted accuracy with predicted step acceptance
      ``>= min_acceptance`` (a share in [0, 1]).
    * ``latency``: highest predicted step acceptance (fewest rejected steps, each of which
      costs target passes) with predicted accuracy ``>= target-only accuracy -
      max_accuracy_drop / 100`` (``max_accuracy_drop`` is in percentage points).

    Grid: beta in ``betas`` (default 0, 0.05, ..., 1); tau over 0, every distinct score
    the records reach at that beta, and 1.01 (reject all). Both goals are always feasible
    (tau 0 accepts every step; tau 1.01 keeps target-only accuracy). Ties on the objective
    go, for ``latency``, to beta = 1 (the engine then computes no grounding at all), then to
    the point nearest the paper default (smallest ``|tau-0.5| + |beta-0.5|``), then
    to the better other metric, then to the smaller beta and smaller tau. The returned
    ``best.tau`` is moved from the chosen score to a short decimal inside the same score
    gap (same partition of the recorded steps, so the same predictions).
    """
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    if not 0.0 <= min_acceptance <= 1.0:
        raise ValueError(f"min_acceptance must be in [0, 1], got {min_acceptance}")
    if not max_accuracy_drop >= 0.0:
        raise ValueError(f"max_accuracy_drop must be >= 0 points, got {max_accuracy_drop}")
    _check_inputs(records, target_correct)
    base_acc = target_only_accuracy(target_correct)
    n_problems = len(target_correct)
    n_steps = len(records)
    # integer thresholds: no float ties between equal counts
    min_accepted = math.ceil(min_acceptance * n_steps - 1e-9)
    min_correct = math.ceil((base_acc - max_accuracy_drop / 100.0) * n_problems - 1e-9)
    if goal == "accuracy":
        constraint = f"predicted step acceptance >= {min_acceptance:.2f}"
    else:
        constraint = (f"predicted accuracy >= target-only {base_acc:.3f} - "
                      f"{max_accuracy_drop:g} points")

    best_key, best = None, None
    per_beta: list[OperatingPoint] = []
    for beta in betas:
        grid = _Grid(records, target_correct, beta, lpbv_floor)
        taus = _tau_candidates(grid.scores)
        correct, accepted = grid.counts(taus)
        if goal == "accuracy":
            feasible = accepted >= min_accepted
            primary, secondary = correct, accepted
        else:
            feasible = correct >= min_correct
            primary, secondary = accepted, correct
        idx = np.flatnonzero(feasible)
        if idx.size == 0:  # cannot happen on the default grid (tau 0 / 1.01); other grids
            continue
        distance = np.abs(taus[idx] - PAPER_TAU) + abs(beta - PAPER_BETA)
        # lexsort: last key is primary
        order = np.lexsort((taus[idx], -secondary[idx], np.round(distance, 9), -primary[idx]))
        i = int(idx[order[0]])
        # The latency goal prefers, among equal predictions, beta = 1: confidence alone needs
        # no grounding at all, so the engine skips its capture (less work per step).
        reads_grounding = int(goal == "latency" and beta < 1.0)
        key = (-int(primary[i]), reads_grounding, round(float(distance[order[0]]), 9),
               -int(secondary[i]), float(beta), float(taus[i]))
        tau = _round_tau(float(taus[i]), float(taus[i - 1]) if i > 0 else None)
        point = OperatingPoint(tau, float(beta), int(correct[i]) / n_problems,
                               int(accepted[i]) / n_steps, int(correct[i]), int(accepted[i]))
        per_beta.append(point)
        if best_key is None or key < best_key:
            best_key, best, best_grid = key, point, float(taus[i])
    if best is None:
        raise ValueError(f"no (tau, beta) on the grid satisfies: {constraint}")
    return FitResult(goal, constraint, best, best_grid, base_acc, n_steps, n_problems, per_beta)


def frontier(records: Sequence[StepSignal], target_correct: Mapping[str, bool], *,
             lpbv_floor: float, betas: Sequence[float] = BETA_GRID) -> list[OperatingPoint]:
    """The predicted accuracy-vs-acceptance frontier over the whole (tau, beta) grid.

    Ascending in acceptance; each point has the highest predicted accuracy of any grid
    point accepting at least as many steps (so the list is the upper-right hull's steps:
    what one can get, at best, for a given share of accepted steps).
    """
    _check_inputs(records, target_correct)
    points = []
    for beta in betas:
        grid = _Grid(records, target_correct, beta, lpbv_floor)
        taus = _tau_candidates(grid.scores)
        correct, accepted = grid.counts(taus)
        points += [(int(a), int(c), float(t), float(beta))
                   for t, c, a in zip(taus, correct, accepted)]
    # most accepted first; among equal acceptance the most correct, nearest the paper pair
    points.sort(key=lambda p: (-p[0], -p[1], abs(p[2] - PAPER_TAU) + abs(p[3] - PAPER_BETA)))
    best_correct, hull = -1, []
    for accepted, correct, tau, beta in points:
        if correct > best_correct:
            best_correct = correct
            hull.append(OperatingPoint(tau, beta, correct / len(target_correct),
                                       accepted / len(records), correct, accepted))
    return hull[::-1]


# --------------------------------------------------------------------------- config
def _quoting_safe_dumper():
    import yaml

    class QuotingSafeDumper(yaml.SafeDumper):
        """`yaml.safe_dump`'s dumper, writing strings with control characters (the "\\n"
        step delimiter) double-quoted on one line instead of as folded single quotes."""

    def represent_str(dumper, value: str):
        style = '"' if any(ch in value for ch in "\n\r\t") else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    QuotingSafeDumper.add_representer(str, represent_str)
    return QuotingSafeDumper


_SPECGUARD_BLOCK = re.compile(r"^specguard:[ \t]*(#.*)?$")
_BLOCK_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>tau|beta):(?P<gap>[ \t]*)(?P<value>[^#\n]*?)"
                        r"(?P<rest>[ \t]*(#.*)?)$")


def _edit_thresholds_in_place(text: str, tau: float, beta: float) -> str | None:
    """The base YAML text with only ``specguard.tau``/``beta``'s values rewritten, every
    comment kept; None where the file's layout is not the plain block form this can edit
    (flow mappings, a key missing, anchors...), then the caller dumps the data instead."""
    lines = text.splitlines(keepends=True)
    in_block, done = False, {}
    for i, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if _SPECGUARD_BLOCK.match(body):
            in_block = True
            continue
        if in_block and body and not body[0].isspace() and not body.startswith("#"):
            in_block = False  # the next top-level key ends the block
        match = _BLOCK_KEY.match(body) if in_block else None
        if match and match["key"] not in done:
            value = {"tau": tau, "beta": beta}[match["key"]]
            gap = match["gap"] or " "
            # keep the column where the comment started, when the new value fits before it
            rest = match["rest"]
            width = len(match["value"]) + len(rest) - len(rest.lstrip(" \t"))
            new_value = repr(float(value))
            pad = " " * max(width - len(new_value), 1 if rest.strip() else 0)
            lines[i] = (f"{match['indent']}{match['key']}:{gap}{new_value}{pad}{rest.lstrip(' ')}"
                        + line[len(body):])
            done[match["key"]] = i
    if len(done) != 2:
        return None
    # The base's leading comment block describes the base; the caller's header replaces it.
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")),
                 len(lines))
    return "".join(lines[first:])


def write_calibrated_config(base_config_path: str | Path, tau: float, beta: float,
                            out_path: str | Path, header_lines: Sequence[str] = ()) -> Path:
    """Write the base config with ``specguard.tau``/``beta`` replaced, under a comment header.

    Where the base file is plain block YAML, only those two values are rewritten and the
    base's comments are kept, all but its leading block, which the header replaces (a
    shipped config stays readable); otherwise the data is
    re-dumped with `yaml.safe_dump`'s SafeDumper (key order kept; strings holding a newline
    double-quoted) and the header says the comments were dropped. Either way the result must
    safe_load to exactly the base data with the two values replaced, and is validated with
    `config.load_config`; if that fails the file is not left behind and ConfigError is raised.
    """
    import os
    import tempfile

    import yaml

    from specguard_vllm.config import ConfigError, load_config

    base = Path(base_config_path)
    base_text = base.read_text(encoding="utf-8")
    data = yaml.safe_load(base_text)
    if not isinstance(data, dict):
        raise ConfigError([("<root>", "expected a mapping of keys")], str(base))
    block = data.get("specguard")
    block = dict(block) if isinstance(block, dict) else {}
    block["tau"] = float(tau)
    block["beta"] = float(beta)
    data["specguard"] = block
    body = _edit_thresholds_in_place(base_text, float(tau), float(beta))
    if body is not None:
        try:
            if yaml.safe_load(body) != data:
                body = None
        except yaml.YAMLError:
            body = None
    lines = list(header_lines)
    if body is None:
        lines.append(f"Comments of the base config are not carried over (see {base}).")
        body = yaml.dump(data, Dumper=_quoting_safe_dumper(), sort_keys=False,
                         default_flow_style=None, allow_unicode=True)
    header = "".join(f"# {line}\n" if line else "#\n" for line in lines)
    text = header + body
    out = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=".calibrated-", suffix=".yaml", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            load_config(tmp)
        except ConfigError as error:
            raise ConfigError(error.problems, str(out)) from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
