"""`make demo` / `specguard demo`: serve a SpecGuard pair with vLLM and answer one request.

Starts ``vllm serve TARGET --speculative-config CONFIG`` (the plugin loads through vLLM's
entry point), sends one chat request with the official ``openai`` client, prints the answer
and the step decisions the server's worker logged for it, then stops the server.
Paths default to the bundled pair as seen from a repository checkout; an installed wheel
does not ship the models, so pass ``--target`` and ``--config`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TARGET = "models/tiny-target"
DEFAULT_CONFIG = "configs/specguard.yaml"
DEMO_QUESTION = (
    "Mia has 12 red pencils and 7 blue pencils. She buys 5 more pencils. "
    "Then she gives away 6 pencils. How many pencils does Mia have now?"
)
EXIT_BAD_INPUT = 2


class DemoInputError(ValueError):
    """A model or config the demo cannot use; printed as one line, exit 2."""


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help=f"target model directory (default {DEFAULT_TARGET})")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"SpecGuard config; its draft path resolves from the current "
                        f"directory (default {DEFAULT_CONFIG})")
    parser.add_argument("--question", default=DEMO_QUESTION, help="the user message")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--run-dir", default=".run",
                        help="scratch folder for the server's log and caches (default .run)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    return parser


def check_inputs(target: str, config_path: str):
    """The loaded config, or DemoInputError naming what is missing and how to get it."""
    from specguard_vllm.config import ConfigError, load_config

    hint = ("the bundled pair lives in a repository checkout (run from its root), or pass "
            "--target and --config for your own pair")
    if not (Path(target) / "config.json").is_file():
        raise DemoInputError(f"no target model at {Path(target).resolve()} (no config.json); {hint}")
    if not Path(config_path).is_file():
        raise DemoInputError(f"no SpecGuard config at {Path(config_path).resolve()}; {hint}")
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise DemoInputError(error.render()) from None
    if not (Path(config.model) / "config.json").is_file():
        raise DemoInputError(f"{config_path}: no draft model at {Path(config.model).resolve()} "
                             f"(relative paths resolve from the current directory); {hint}")
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = check_inputs(args.target, args.config)
        if args.max_tokens < 1:
            raise DemoInputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    except DemoInputError as error:
        print(f"specguard demo: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from openai import OpenAI
    from transformers import AutoTokenizer

    from specguard_vllm.cli import format_step_table
    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.serving import vllm_server
    from specguard_vllm.trace_records import step_records

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        log_path = Path(tmp) / "decisions.jsonl"
        print("$ vllm serve", args.target, "--speculative-config", args.config, flush=True)
        # The server may run from another folder: hand it absolute paths, same config.
        resolved = config.model_copy(update={"model": str(Path(config.model).resolve())})
        spec = json.dumps(resolved.model_dump(mode="json", exclude_none=True))
        with vllm_server(Path(args.target).resolve(), "--speculative-config", spec,
                         "--served-model-name", "specguard-demo", scratch_dir=tmp,
                         startup_timeout_s=args.startup_timeout,
                         env_overrides={"SPECGUARD_DECISION_LOG": str(log_path)}) as base_url:
            client = OpenAI(base_url=base_url + "/v1", api_key="unused")
            started = time.perf_counter()
            response = client.chat.completions.create(
                model="specguard-demo", messages=[{"role": "user", "content": args.question}],
                max_tokens=args.max_tokens, temperature=0, extra_body={"return_token_ids": True})
            elapsed = time.perf_counter() - started
        choice = response.choices[0]
        print(f"\nuser: {args.question}\nassistant ({elapsed:.2f} s):\n{choice.message.content}\n")
        tokenizer = AutoTokenizer.from_pretrained(str(Path(args.target).resolve()))
        segmenter = StepSegmenter.from_tokenizer(tokenizer, config.specguard.step_delimiters)
        decisions = [json.loads(line) for line in log_path.read_text().splitlines()] \
            if log_path.exists() else []
        prompt_ids = list(getattr(response, "prompt_token_ids", None) or [])
        token_ids = list(getattr(choice, "token_ids", None) or [])
        steps = step_records(len(prompt_ids), token_ids, decisions, segmenter,
                             lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))
    print("step decisions (from the server's worker):")
    print(format_step_table(steps))
    accepted = sum(1 for s in steps if s["accepted"])
    verified = sum(1 for s in steps if s["accepted"] is not None)
    print(f"\n{accepted}/{verified} drafted steps accepted; "
          f"{response.usage.completion_tokens} tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser(prog="specguard demo",
                                                        description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
