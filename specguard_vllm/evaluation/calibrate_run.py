"""`specguard calibrate`: fit tau and beta on a labelled dev split, then check by decoding.

Three phases, one offline vLLM engine (per-request ``extra_args`` overrides):

1. **Collect.** Greedy decode of the split's problems at ``tau = 1.01`` with
   ``fallback: target``: every step is rejected, so the output is exactly the target's own
   greedy output (target-only accuracy per problem), while the draft's proposal at the
   start of every target line is still verified, scored and logged
   (``SPECGUARD_DECISION_LOG``). Each proposal is graded with `tasks.grade_step` given the
   committed (target) lines before it -> `calibrate.StepSignal` records.
2. **Fit** (`calibrate.fit`, fixed-trajectory approximation) for the chosen goal.
3. **Validate.** Decode the same problems again under the paper defaults (0.5, 0.5) and
   under the fitted pair; accuracy from the graded outputs, step acceptance from the
   decision log entries of those requests.

`add_calibrate_command` registers the CLI command; ``python -m
specguard_vllm.evaluation.calibrate_run ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from specguard_vllm.evaluation.calibrate import (
    GOALS,
    PAPER_BETA,
    PAPER_TAU,
    TAU_REJECT_ALL,
    StepSignal,
    fit,
    predict,
    signal_power,
    target_only_accuracy,
    write_calibrated_config,
)
from specguard_vllm.trace_records import read_decision_log, request_key

EXIT_BAD_INPUT = 2
DEFAULT_CONFIG = "configs/specguard.yaml"
DEFAULT_TARGET = "models/tiny-target"
DEFAULT_OUT = "configs/specguard.calibrated.yaml"


class BadArguments(ValueError):
    """A one-line message; the command exits 2."""


# --------------------------------------------------------------------------- labelling
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
        body = text[:-1] if text.endswith("\n") else text
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


# --------------------------------------------------------------------------- engine
@dataclass
class Decoded:
    texts: list[str]
    correct: list[bool]
    entries: list[list[dict]]  # decision-log entries per request
    full_ids: list[list[int]]
    req_keys: list[str]
    seconds: float

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def n_steps(self) -> int:
        return sum(len(e) for e in self.entries)

    @property
    def n_accepted(self) -> int:
        return sum(bool(x["accepted"]) for e in self.entries for x in e)

    @property
    def acceptance(self) -> float:
        return self.n_accepted / self.n_steps if self.n_steps else float("nan")

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "acceptance": self.acceptance,
                "n_correct": sum(self.correct), "n_problems": len(self.correct),
                "n_steps": self.n_steps, "n_accepted": self.n_accepted,
                "n_rejected": self.n_steps - self.n_accepted,
                                "seconds": self.seconds, "request_ids": self.req_keys}


@dataclass
class Session:
    llm: object
    tokenizer: object
    problems: list
    prompts: list[list[int]]
    log_path: Path
    max_tokens: int
    decode: object = None
    segmenter: object = None
    extra: dict = field(default_factory=dict)

    def run(self, overrides: list[dict]) -> list[Decoded]:
        """Decode every problem once per override set, all in one generate call."""
        from vllm import SamplingParams

        from specguard_vllm.tasks import grade_solution

        requests, params = [], []
        for extra in overrides:
            for ids in self.prompts:
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                                             extra_args=dict(extra)))
        started = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        log = read_decision_log(self.log_path, steps_only=True)
        results = []
        n = len(self.prompts)
        for g in range(len(overrides)):
            chunk = outputs[g * n: (g + 1) * n]
            texts, correct, entries, full, keys = [], [], [], [], []
            for problem, out in zip(self.problems, chunk):
                gen = list(out.outputs[0].token_ids)
                text = self.decode(gen)
                key = request_key(out.request_id)
                texts.append(text)
                correct.append(bool(grade_solution(problem, text).correct))
                entries.append(list(log.get(key, [])))
                full.append(list(out.prompt_token_ids) + gen)
                keys.append(key)
            results.append(Decoded(texts, correct, entries, full, keys, seconds))
        return results


def open_session(target: str, config, problems, *, log_path: Path, max_tokens: int,
                 max_num_seqs: int, seed: int = 0) -> Session:
    os.environ["SPECGUARD_DECISION_LOG"] = str(log_path)
    from transformers import AutoConfig, AutoTokenizer

    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.engine_trace import make_llm
    from specguard_vllm.training.evaluate import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(target)
    max_len = int(getattr(AutoConfig.from_pretrained(target), "max_position_embeddings", 2048))
    prompts = prompt_ids(tokenizer, problems)
    longest = max(map(len, prompts))
    max_tokens = min(max_tokens, max_len - longest)
    if max_tokens < 1:
        raise BadArguments(f"the prompts ({longest} tokens) do not fit the target ({max_len})")
    llm = make_llm(target, config, max_model_len=max_len, seed=seed, max_num_seqs=max_num_seqs)
    session = Session(llm, tokenizer, problems, prompts, log_path, max_tokens)
    session.decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    session.segmenter = StepSegmenter.from_tokenizer(tokenizer, config.specguard.step_delimiters)
    return session


# --------------------------------------------------------------------------- calibrate
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
        raise BadArguments(f"the {split} split has only {len(problems)} problems (asked {n})")
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
            from specguard_vllm.engine_trace import shutdown_llm

            shutdown_llm(session.llm)
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
        "measured": {"target_only": _brief(base), "defaults": _brief(defaults),
                     "fitted": _brief(fitted)},
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
            f"Fit: {result.constraint}; fixed-trajectory prediction: accuracy "
            f"{result.best.accuracy:.3f}, step acceptance {result.best.acceptance:.3f}.",
            f"Measured by decoding the same problems: tau={tau:g} beta={beta:g}: accuracy "
            f"{fitted.accuracy:.3f}, acceptance {fitted.acceptance:.3f}; paper defaults "
            f"(0.5, 0.5): accuracy {defaults.accuracy:.3f}, acceptance {defaults.acceptance:.3f};",
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


def _brief(d: Decoded) -> dict:
    s = d.summary()
    s.pop("request_ids")
    return s


def _verdict(goal, defaults: Decoded, fitted: Decoded, target_acc: float,
             min_acceptance: float, max_drop: float) -> dict:
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


# --------------------------------------------------------------------------- report
def format_report(r: dict) -> str:
    p, m, fit_ = r["auroc"], r["measured"], r["fit"]
    lines = [f"specguard calibrate: {r['n_problems']} {r['split']} problems, goal {r['goal']} "
             f"({fit_['constraint']})",
             f"steps: {r['collect']['steps'].get('logged', 0)} logged, "
             f"{r['collect']['n_records']} graded "
             f"({r['collect']['n_wrong']} wrong); skipped: "
             + ", ".join(f"{k} {r['collect']['steps'].get(k, 0)}"
                         for k in ("incomplete", "blank"))
             + "; completing a line begun by the target: "
             + str(r["collect"]["steps"].get("joined", 0)),
             "",
             "AUROC (right vs wrong steps; 1 = every wrong step scores lowest, 0.5 = chance)",
             f"  LPBV_norm alone     {p['lpbv_norm']:.3f}",
             f"  ABGV alone          {p['abgv']:.3f}"]
    for b, auc in p["ensemble"].items():
        lines.append(f"  ensemble beta={b}  {auc:.3f}")
    lines += ["",
              f"fitted: tau={fit_['tau']:g} beta={fit_['beta']:g}  "
              f"(grid score {fit_['tau_grid']:.6g})",
              "",
              f"{'':<22}{'pred acc':>9}{'pred acc.':>10}{'meas acc':>10}{'meas acc.':>10}"
              f"{'rejected':>9}",
              f"{'target only':<22}{'':>9}{'':>10}{m['target_only']['accuracy']:>10.3f}"
              f"{'-':>10}{'-':>9}"]
    for name, label in (("defaults", "defaults (0.5, 0.5)"),
                        ("fitted", f"fitted ({fit_['tau']:g}, {fit_['beta']:g})")):
        pr, me = r["predicted"][name], m[name]
        lines.append(f"{label:<22}{pr['accuracy']:>9.3f}{pr['acceptance']:>10.3f}"
                     f"{me['accuracy']:>10.3f}{me['acceptance']:>10.3f}{me['n_rejected']:>9}")
    lines += ["(acc = accuracy, acc. = step acceptance; predicted = fixed-trajectory "
              "approximation",
              " on the collect run; measured = decoding the same problems)",
              "",
              r["verdict"]["summary"],
              f"wall: {r['wall_seconds']['total']:.0f} s (engine start "
              f"{r['wall_seconds']['engine_start']:.0f}, "
              f"collect {r['wall_seconds']['collect']:.0f}, "
              f"validate {r['wall_seconds']['validate']:.0f})"]
    if r.get("out"):
        lines.append(f"wrote {r['out']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _check_args(args: argparse.Namespace) -> None:
    if args.split == "test":
        raise BadArguments("--split test refused: do not tune tau/beta on the test split "
                           "(use dev, or train)")
    if args.n < 1:
        raise BadArguments(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.min_acceptance <= 1.0:
        raise BadArguments(f"--min-acceptance must be a share in [0, 1], got {args.min_acceptance}")
    if not args.max_accuracy_drop >= 0.0:
        raise BadArguments(f"--max-accuracy-drop must be >= 0 points, got {args.max_accuracy_drop}")
    if args.max_tokens < 1:
        raise BadArguments(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_num_seqs < 1:
        raise BadArguments(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if not os.path.isdir(args.target):
        raise BadArguments(f"--target: no such model directory: {args.target}")
    for flag, path in (("--out", args.out), ("--json", args.json),
                       ("--decision-log", args.decision_log)):
        if path:
            parent = Path(path).resolve().parent
            if not parent.is_dir():
                raise BadArguments(f"{flag}: directory does not exist: {parent}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from specguard_vllm.config import ConfigError, load_config

    try:
        _check_args(args)
        config = load_config(args.config)
        if not os.path.isdir(config.model):
            raise BadArguments(f"{args.config}: draft model directory not found: {config.model} "
                               "(relative paths resolve from the current directory)")
    except BadArguments as error:
        print(f"specguard calibrate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        report = calibrate(config_path=args.config, target=args.target, split=args.split,
                           n=args.n, goal=args.goal, min_acceptance=args.min_acceptance,
                           max_accuracy_drop=args.max_accuracy_drop, out=args.out or None,
                           max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                           seed=args.seed, decision_log=args.decision_log)
    except BadArguments as error:
        print(f"specguard calibrate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_report(report), flush=True)
    return 0


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    """Register ``calibrate`` on the ``specguard`` CLI's subparsers."""
    p = subparsers.add_parser(
        "calibrate", help="fit tau and beta on a labelled dev split and check them by decoding",
        description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="base SpecGuard config (draft inside)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model directory")
    p.add_argument("--split", choices=["train", "dev", "test"], default="dev",
                   help="problems to fit on (test is refused)")
    p.add_argument("--n", type=int, default=200, help="number of problems")
    p.add_argument("--goal", choices=list(GOALS), default="accuracy")
    p.add_argument("--min-acceptance", type=float, default=0.5,
                   help="accuracy goal: least step acceptance (share, default 0.5)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="latency goal: most accuracy lost vs target-only, in points (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help="calibrated config to write ('' = none)")
    p.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    p.add_argument("--max-tokens", type=int, default=160, help="per problem (default 160)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="engine batch (default 256)")
    p.add_argument("--seed", type=int, default=0, help="problem generator seed")
    p.add_argument("--decision-log", metavar="PATH",
                   help="keep the engine's decision log here (default: a temporary file)")
    p.set_defaults(func=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specguard")
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate_command(sub)
    args = parser.parse_args(["calibrate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
