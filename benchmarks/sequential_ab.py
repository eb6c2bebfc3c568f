"""Concurrency-1 tokens/s of several engines, one request at a time, interleaved per prompt.

The served bench (``specguard bench --server``) runs whole rounds per configuration, and on a
shared 2-core box its rounds of one cell spread by up to ~40%: too much to see a 5% change.
Here every engine lives in its own process for the whole run and the prompts are sent one at
a time, rotating which engine goes first, so a slow minute of the machine hits every engine
alike. An engine is ``NAME=ROOT:KIND``: the checkout whose code it runs (its own
``configs/specguard.yaml`` and models; another commit's checkout gives an A/B of two commits)
and ``sd`` (vLLM's draft-model SD with that config's draft and K; ``sd@4``: at K = 4, since
SD's best K is often far below the longest step SpecGuard drafts), ``specguard`` (that config)
or ``target`` (no speculation). Greedy, real EOS; each engine's texts are hashed, so the table
also says which engines wrote the same tokens.

    .venv/bin/python benchmarks/sequential_ab.py --n 128 \\
        --engine sd=.:sd --engine before=/tmp/old-checkout:specguard --engine after=.:specguard
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from worker_process import WorkerProcess  # beside this script (sys.path[0])

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sd", "specguard", "target")


def parse_engine(text: str) -> dict:
    """``NAME=ROOT:KIND`` -> its spec; a clear error naming what is wrong."""
    name, sep, rest = text.partition("=")
    root, sep2, kind = rest.rpartition(":")
    if not sep or not sep2 or not name or not root:
        raise argparse.ArgumentTypeError(f"--engine {text!r}: expected NAME=ROOT:KIND")
    kind, at, sd_k = kind.partition("@")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"--engine {text!r}: KIND must be one of {', '.join(KINDS)}")
    if at and (kind != "sd" or not sd_k.isdigit() or int(sd_k) < 1):
        raise argparse.ArgumentTypeError(f"--engine {text!r}: only sd takes @K, K >= 1 (sd@4)")
    path = (REPO / root).resolve() if not os.path.isabs(root) else Path(root)
    if not (path / "configs" / "specguard.yaml").is_file():
        raise argparse.ArgumentTypeError(f"--engine {text!r}: {path} has no configs/specguard.yaml")
    return {"name": name, "root": str(path), "kind": kind,
            "num_speculative_tokens": int(sd_k) if at else None}


def run_worker(spec: dict) -> None:
    """One engine: ``READY`` once warm, then one JSON line per prompt index read on stdin."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from specguard_vllm.config import load_config
    from specguard_vllm.engine_trace import make_llm, shutdown_llm
    from specguard_vllm.evaluation.datasets import load_items, prompt_ids

    root = Path(spec["root"])
    config = load_config(root / "configs" / "specguard.yaml")
    speculative = {"specguard": config.model_dump(mode="json", exclude_none=True),
                   "sd": {"method": "draft_model", "model": config.model,
                          "num_speculative_tokens": spec.get("num_speculative_tokens")
                          or config.num_speculative_tokens},
                   "target": None}[spec["kind"]]
    target = str(root / "models" / "tiny-target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [prompt_ids(item, tokenizer) for item in load_items("tiny", spec["n"], split="test")]
    llm = make_llm(target, speculative, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    for prompt in prompts[: spec["warmup"]]:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    import specguard_vllm

    print("READY " + str(Path(specguard_vllm.__file__).resolve().parent.parent), flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        output = llm.generate([{"prompt_token_ids": prompts[int(line)]}], params, use_tqdm=False)
        tokens = list(output[0].outputs[0].token_ids)
        print(json.dumps({"wall": time.perf_counter() - started, "tokens": tokens}), flush=True)
    shutdown_llm(llm)


def summarise(specs: list[dict], results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for spec in specs:
        runs = results[spec["name"]]
        tokens = sum(len(r["tokens"]) for r in runs)
        wall = sum(r["wall"] for r in runs)
        digest = hashlib.md5(json.dumps([r["tokens"] for r in runs]).encode()).hexdigest()[:10]
        rows.append({"engine": spec["name"], "root": spec["root"], "code": spec["code"],
                     "kind": spec["kind"] if not spec.get("num_speculative_tokens")
                     else f"sd@{spec['num_speculative_tokens']}",
                     "requests": len(runs), "tokens": tokens, "seconds": wall,
                     "tokens_per_s": tokens / wall if wall else float("nan"), "texts_md5": digest})
    base = next((r for r in rows if r["kind"] == "sd"), rows[0])
    for row in rows:
        row["vs"] = base["engine"]
        row["ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| engine | kind | root | tokens | s | tok/s | ÷ " + rows[0]["vs"] + " | texts (md5) |",
             "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['kind']} | {r['root']} | {r['tokens']} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['ratio']:.3f}x | "
                     f"{r['texts_md5']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", type=parse_engine,
                        help="NAME=ROOT:KIND (repeat); default: sd=.:sd and specguard=.:specguard")
    parser.add_argument("--n", type=int, default=128, help="test problems, in order")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per engine first")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/sequential_ab.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    if args.n < 1 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--n and --max-tokens must be >= 1, --warmup >= 0")
    specs = args.engine or [parse_engine("sd=.:sd"), parse_engine("specguard=.:specguard")]
    if len({s["name"] for s in specs}) != len(specs):
        parser.error("every --engine needs its own NAME")
    logs = Path(tempfile.mkdtemp(prefix="sequential-ab-"))
    workers = []
    results: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    try:
        for spec in specs:
            spec.update(n=args.n, max_tokens=args.max_tokens, warmup=min(args.warmup, args.n))
            env = dict(os.environ, PYTHONPATH=spec["root"] + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
            workers.append(WorkerProcess(__file__, spec["name"], spec, logs, spec["root"], env))
        for spec, worker in zip(specs, workers):  # READY <the checkout it imported from>
            spec["code"] = worker.line().split(" ", 1)[1].strip()
        for index in range(args.n):
            shift = index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                results[worker.name].append(worker.request(str(index)))
    finally:
        for worker in workers:
            worker.close()
    rows = summarise(specs, results)
    print(f"\nConcurrency 1, {args.n} tiny test problems one at a time, engines interleaved per "
          f"prompt (greedy, max {args.max_tokens} tokens, real EOS)\n\n{render(rows)}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
