"""The `specguard calibrate` command line: arguments, their checks, exit codes.

``python -m specguard_vllm.evaluation.calibrate_cli ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from specguard_vllm.evaluation.calibrate import GOALS, CannotCalibrate

EXIT_BAD_INPUT = 2
DEFAULT_CONFIG = "configs/specguard.yaml"
DEFAULT_TARGET = "models/tiny-target"
DEFAULT_OUT = "configs/specguard.calibrated.yaml"


def _check_args(args: argparse.Namespace) -> None:
    if args.split is None:  # the tiny task's dev split; a file's problems are labelled "test"
        args.split = "dev" if args.dataset == "tiny" else "test"
    if args.dataset == "tiny" and args.split == "test":
        raise CannotCalibrate("--split test refused: do not tune tau/beta on the test split "
                              "(use dev, or train)")
    if args.dataset == "tiny" and args.split not in ("train", "dev"):
        raise CannotCalibrate(f"--split for the tiny task: train or dev, got {args.split!r}")
    if args.dataset in ("math", "jsonl") and not args.data_path:
        raise CannotCalibrate(f"--dataset {args.dataset} needs --data-path FILE.jsonl")
    if args.dataset == "jsonl":
        if not args.prompt_field or not args.answer_regex:
            raise CannotCalibrate("--dataset jsonl needs --prompt-field and --answer-regex "
                                  "(and --answer-field for gold answers)")
    elif args.prompt_field or args.answer_field or args.answer_regex:
        raise CannotCalibrate("--prompt-field / --answer-field / --answer-regex go with "
                              f"--dataset jsonl, not {args.dataset}")
    if args.data_path and not os.path.isfile(args.data_path):
        raise CannotCalibrate(f"--data-path: no such file: {args.data_path}")
    if args.n < 1:
        raise CannotCalibrate(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.min_acceptance <= 1.0:
        raise CannotCalibrate(f"--min-acceptance must be a share in [0, 1], "
                              f"got {args.min_acceptance}")
    if not args.max_accuracy_drop >= 0.0:
        raise CannotCalibrate(f"--max-accuracy-drop must be >= 0 points, "
                              f"got {args.max_accuracy_drop}")
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-num-seqs", args.max_num_seqs),
                        ("--max-continuations", args.max_continuations)):
        if value < 1:
            raise CannotCalibrate(f"{flag} must be >= 1, got {value}")
    if not os.path.isdir(args.target):
        raise CannotCalibrate(f"--target: no such model directory: {args.target}")
    for flag, path in (("--out", args.out), ("--json", args.json), ("--plot", args.plot),
                       ("--decision-log", args.decision_log)):
        if path:
            parent = Path(path).resolve().parent
            if not parent.is_dir():
                raise CannotCalibrate(f"{flag}: directory does not exist: {parent}")


def _jsonl_format(args: argparse.Namespace):
    from specguard_vllm.evaluation.datasets import JsonlFormat

    if args.dataset != "jsonl":
        return None
    fmt = JsonlFormat(args.prompt_field, args.answer_field, args.answer_regex)
    try:
        fmt.compiled()
    except ValueError as error:
        raise CannotCalibrate(str(error)) from None
    return fmt


def _plot_path(args: argparse.Namespace) -> str | None:
    """``--plot``, else beside the ``--json`` report, else beside ``--out``."""
    if args.plot is not None:
        return args.plot or None
    for base in (args.json, args.out):
        if base:
            return str(Path(base).with_suffix("")) + ".frontier.png"
    return None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from specguard_vllm.config import ConfigError, load_config

    try:
        _check_args(args)
        jsonl = _jsonl_format(args)
        config = load_config(args.config)
        if not os.path.isdir(config.model):
            raise CannotCalibrate(f"{args.config}: draft model directory not found: "
                                  f"{config.model} (relative paths resolve from the current "
                                  "directory)")
    except CannotCalibrate as error:
        print(f"specguard calibrate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from specguard_vllm.evaluation.calibrate_report import format_report
    from specguard_vllm.evaluation.calibrate_run import calibrate

    try:
        report = calibrate(config_path=args.config, target=args.target, dataset=args.dataset,
                           split=args.split, n=args.n, labels=args.labels, data_path=args.data_path,
                           jsonl=jsonl, goal=args.goal, min_acceptance=args.min_acceptance,
                           max_accuracy_drop=args.max_accuracy_drop, out=args.out or None,
                           plot=_plot_path(args), max_continuations=args.max_continuations,
                           max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                           seed=args.seed, decision_log=args.decision_log)
    except CannotCalibrate as error:
        print(f"specguard calibrate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_report(report), flush=True)
    return 0


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    """Register ``calibrate`` on the ``specguard`` CLI's subparsers."""
    from specguard_vllm.evaluation.calibrate_labels import LABELS
    from specguard_vllm.evaluation.datasets import DATASETS

    p = subparsers.add_parser(
        "calibrate", help="fit tau and beta on labelled dev problems and check them by decoding",
        description="fit tau and beta on labelled dev problems, then check them by decoding")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="base SpecGuard config (draft inside)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model directory")
    p.add_argument("--dataset", choices=DATASETS, default="tiny",
                   help="tiny (bundled task), gsm8k (#### answers; bundled test file unless "
                   "--data-path), math (\\boxed{} answers), jsonl (your fields and regex)")
    p.add_argument("--data-path", help="the dataset's JSONL file (math, jsonl; gsm8k optional)")
    p.add_argument("--prompt-field", help="jsonl: the field holding the prompt")
    p.add_argument("--answer-field", help="jsonl: the field holding the gold final answer "
                   "(omit: only --labels agreement)")
    p.add_argument("--answer-regex", help="jsonl: a completion's final answer is the last match "
                   "(group 1 if the pattern has a group)")
    p.add_argument("--split", help="tiny: train or dev (default dev; test is refused); "
                   "files: a label for the problem ids (default test)")
    p.add_argument("--n", type=int, default=200, help="number of problems")
    p.add_argument("--labels", choices=LABELS,
                   help="how a drafted step is judged: step (the tiny task's step grader), "
                   "outcome (the target continuing from it reaches the gold answer), agreement "
                   "(... reaches the target-only answer). Default: the best the data allows")
    p.add_argument("--max-continuations", type=int, default=4000,
                   help="most target continuations for outcome/agreement labels (default 4000)")
    p.add_argument("--goal", choices=list(GOALS), default="accuracy")
    p.add_argument("--min-acceptance", type=float, default=0.5,
                   help="accuracy goal: least step acceptance (share, default 0.5)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="latency goal: most accuracy lost vs target-only, in points (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help="calibrated config to write ('' = none)")
    p.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    p.add_argument("--plot", metavar="PNG", help="the frontier plot (default: beside --json, "
                   "else beside --out; '' = none)")
    p.add_argument("--max-tokens", type=int, default=160, help="per problem (default 160)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="engine batch (default 256)")
    p.add_argument("--seed", type=int, default=0, help="problem generator and budget seed")
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
