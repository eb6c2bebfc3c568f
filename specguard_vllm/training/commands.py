"""`specguard train-pair` and `specguard eval-pair`: the tiny pair's two CLI commands.

`add_commands` registers both on the `specguard` argparse CLI (cli.py wires it in).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = REPO_ROOT / "models" / "tiny-target"
DEFAULT_DRAFT = REPO_ROOT / "models" / "tiny-draft"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_eval_pair(args: argparse.Namespace) -> int:
    """Greedy accuracy and step error rate of both models, and their agreement."""
    _offline()
    import torch

    from specguard_vllm.tasks import generate
    from specguard_vllm.training.evaluate import evaluate_pair

    torch.set_num_threads(args.threads)
    problems = generate(args.split, args.n, seed=args.seed)
    report = evaluate_pair(args.target, args.draft, problems)
    report["split"] = args.split
    if not args.json:
        for name in ("target", "draft"):
            s = report[name]
            print(f"{name:6s} accuracy {s['accuracy']:.1%}  step error rate "
                  f"{s['step_error_rate']:.1%}  well-formed {s['well_formed']:.1%}")
        print(f"agreement {report['agreement']:.1%}  (n={report['n']}, {args.split})")
        for sample in report["sample_draft_errors"][:3]:
            print("\nQ:", sample["question"])
            print("draft wrong lines:", sample["wrong_lines"])
    else:
        print(json.dumps(report))
    return 0


def _train_one(which: str, out: Path, tokenizer_dir: Path, steps: int | None,
               stop_at: int | None) -> int:
    """Train one member's stages in order; each later stage starts from the one before."""
    import shutil

    from specguard_vllm.training.model_config import DRAFT, TARGET_STAGES
    from specguard_vllm.training.trainer import train_member

    stages = {"target": TARGET_STAGES, "draft": (DRAFT,)}[which]
    final = out / f"tiny-{which}"
    previous: Path | None = None
    for k, member in enumerate(stages):
        if steps is not None:
            member = dataclasses.replace(member, steps=steps, stop_at=None)
        if stop_at is not None:
            member = dataclasses.replace(member, stop_at=stop_at)
        dest = final if k == len(stages) - 1 else out / f"tiny-{which}-stage{k + 1}"
        log = train_member(member, tokenizer_dir, dest, init_from=previous)
        print(json.dumps(log), flush=True)
        if previous is not None:
            shutil.rmtree(previous)
        previous = dest
    return 0


def cmd_train_pair(args: argparse.Namespace) -> int:
    """Build the tokenizer, then train target and draft as two 1-thread processes."""
    _offline()
    out = Path(args.out)
    tokenizer_dir = out / "tokenizer"
    if args.only:
        return _train_one(args.only, out, tokenizer_dir, args.steps, args.stop_at)
    from specguard_vllm.training.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer(), tokenizer_dir)
    procs = []
    for which in ("target", "draft"):
        cmd = [sys.executable, "-m", "specguard_vllm.training.commands", "train-pair",
               "--out", str(out), "--only", which]
        if args.steps is not None:
            cmd += ["--steps", str(args.steps)]
        if args.stop_at is not None:
            cmd += ["--stop-at", str(args.stop_at)]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    return max(codes)


def add_commands(subparsers) -> None:
    """Register `train-pair` and `eval-pair` on the `specguard` CLI."""
    ev = subparsers.add_parser("eval-pair", help="score the tiny target/draft pair")
    ev.add_argument("--target", default=str(DEFAULT_TARGET))
    ev.add_argument("--draft", default=str(DEFAULT_DRAFT))
    ev.add_argument("--n", type=int, default=500, help="problems to score")
    ev.add_argument("--split", default="test", choices=("train", "dev", "test"))
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    ev.set_defaults(func=cmd_eval_pair)

    tr = subparsers.add_parser("train-pair", help="train the tiny pair from scratch on CPU")
    tr.add_argument("--out", default=str(REPO_ROOT / "models"),
                    help="writes OUT/tiny-target, OUT/tiny-draft and OUT/tokenizer")
    tr.add_argument("--only", choices=("target", "draft"),
                    help="train one member in this process (the tokenizer must exist)")
    tr.add_argument("--steps", type=int,
                    help="override every stage's schedule length (for smoke runs)")
    tr.add_argument("--stop-at", type=int, help="stop early on the schedule")
    tr.set_defaults(func=cmd_train_pair)


def main(argv: list[str] | None = None) -> int:
    """Run these commands without cli.py (`python -m specguard_vllm.training.commands`)."""
    parser = argparse.ArgumentParser(prog="specguard")
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
