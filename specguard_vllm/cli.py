"""The `specguard` command: validate configs, trace decisions, train and evaluate the tiny pair.

Exit codes: 0 success, 2 bad input (config, arguments, prompt), 1 anything else.
Errors are printed as one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

from specguard_vllm.config import ConfigError, SpecGuardParams, load_config

EXIT_BAD_INPUT = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(config.normalised(), indent=2))
    return 0


def _param_overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "tau": args.tau,
        "beta": args.beta,
        "num_candidates": args.k,
        "draft_temperature": args.draft_temperature,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _resolve_params(base: SpecGuardParams, overrides: dict[str, Any]) -> SpecGuardParams:
    from pydantic import ValidationError

    from specguard_vllm.config import _problems_from

    try:
        return SpecGuardParams.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        raise ConfigError(
            [(f"--{p.replace('num_candidates', 'k').replace('_', '-')}", m)
             for p, m in _problems_from(error)],
            "command line",
        ) from None


def format_step_table(steps: list[dict]) -> str:
    """A plain-text table of a trace's steps (engine-neutral: reads the JSON form).

    ``step/prefix/sd/target`` counts the step's tokens by origin: an accepted step's drafts,
    a rejected step's prefix kept by token-level verification, drafts accepted by token-level
    SD (finishing a step, or an accepted step's tail), and the target's own tokens.
    """
    header = (f"{'#':>3}  {'source':<6}  {'lpbv':>8}  {'abgv':>6}  {'score':>6}  {'accepted':<8}  "
              f"{'step/prefix/sd/target':<21}  text")
    lines = [header, "-" * len(header)]

    def num(value, width, digits):
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for i, step in enumerate(steps):
        accepted = "-" if step["accepted"] is None else ("yes" if step["accepted"] else "no")
        tokens = step.get("tokens") or {}
        origins = "/".join(str(tokens.get(k, 0)) for k in ("step", "prefix", "sd", "target"))
        lines.append(
            f"{i:>3}  {step['source']:<6}  {num(step['lpbv'], 8, 3)}  {num(step['abgv'], 6, 3)}  "
            f"{num(step['score'], 6, 3)}  {accepted:<8}  {origins:<21}  {step['text']!r}"
        )
    return "\n".join(lines)


def _encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def _cmd_trace(args: argparse.Namespace) -> int:
    import torch

    try:
        config = load_config(args.config)
        params = _resolve_params(config.specguard, _param_overrides(args))
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.max_tokens < 1:
        print(f"--max-tokens must be >= 1, got {args.max_tokens}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not os.path.isdir(args.target):
        print(f"--target: no such model directory: {args.target}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = config.model_copy(update={"specguard": params})
    dtype = getattr(torch, args.dtype)

    if args.engine == "reference":
        from specguard_vllm.reference import PairMismatchError, ReferenceDecoder

        try:
            decoder = ReferenceDecoder.from_paths(args.target, config, dtype=dtype)
        except (PairMismatchError, ValueError, OSError) as error:
            print(f"cannot load the model pair: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for prompt in args.prompt:
            ids = _encode_prompt(decoder.tokenizer, prompt, args.chat)
            try:
                result = decoder.generate(ids, mode=args.mode, max_tokens=args.max_tokens,
                                          temperature=0.0, seed=args.seed)
            except ValueError as error:
                print(f"prompt refused: {error}", file=sys.stderr)
                return EXIT_BAD_INPUT
            record = {"prompt": prompt, "text": result.text,
                      "steps": [s.to_json() for s in result.steps]}
            _print_trace(record, args.json)
        return 0
    # vLLM logs to stdout by default; keep stdout for the trace itself.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from transformers import AutoTokenizer

    from specguard_vllm.engine_trace import trace_with_vllm

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts_ids = [_encode_prompt(tokenizer, prompt, args.chat) for prompt in args.prompt]
    try:
        results = trace_with_vllm(args.target, config, prompts_ids, mode=args.mode,
                                  max_tokens=args.max_tokens, dtype=args.dtype, seed=args.seed)
    except ValueError as error:  # vLLM's and the plugin's refusals of this config or prompt
        print(f"the vLLM engine refused the request: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for prompt, result in zip(args.prompt, results):
        _print_trace({"prompt": prompt, **result}, args.json)
    return 0


def _print_trace(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
        return
    print(f"=== prompt: {record['prompt']!r}")
    print(record["text"])
    print()
    print(format_step_table(record["steps"]))
    print(flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a SpecGuard config and print it normalised")
    validate.add_argument("config")
    validate.set_defaults(func=_cmd_validate)

    trace = sub.add_parser("trace", help="decode prompts greedily and show every step's decision")
    trace.add_argument("--target", required=True, help="target model directory")
    trace.add_argument("--config", required=True, help="SpecGuard config (draft model inside)")
    trace.add_argument("--prompt", action="append", required=True, help="repeatable")
    trace.add_argument("--engine", choices=["reference", "vllm"], default="reference")
    trace.add_argument("--mode", choices=["specguard", "target", "draft"], default="specguard")
    trace.add_argument("--tau", type=float)
    trace.add_argument("--beta", type=float)
    trace.add_argument("--k", type=int, help="number of draft candidates")
    trace.add_argument("--draft-temperature", type=float)
    trace.add_argument("--max-tokens", type=int, default=256)
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    trace.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    trace.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    trace.set_defaults(func=_cmd_trace)

    from specguard_vllm.evaluation.bench import add_bench_command
    from specguard_vllm.evaluation.calibrate_cli import add_calibrate_command

    add_bench_command(sub)
    add_calibrate_command(sub)
    from specguard_vllm.demo import add_demo_arguments
    from specguard_vllm.demo import run as run_demo

    demo = sub.add_parser("demo", help="serve a pair with `vllm serve` and answer one chat request")
    add_demo_arguments(demo).set_defaults(func=run_demo)
    if importlib.util.find_spec("specguard_vllm.training.commands") is not None:
        from specguard_vllm.training import commands as training_commands

        training_commands.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
