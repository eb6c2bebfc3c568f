"""`specguard bench`: SpecGuard against target-only and vLLM's own SD, in one run, interleaved.

Offline: one engine process per engine configuration, all alive at once; every problem is
sent to every configuration in turn (the order rotates per problem), one request at a
time, so drift hits all alike and per-request counters are exact. Server: real
`vllm serve` processes, all alive at once, driven through the OpenAI client at each
concurrency level: a warm-up round, then repeated timed rounds in rotating order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from specguard_vllm.config import ConfigError, load_config
from specguard_vllm.evaluation.bench_configs import BenchConfig, EngineSpec, build_matrix, sd_num_spec
from specguard_vllm.evaluation.bench_metrics import (
    ProblemResult,
    add_comparisons,
    paired_outcomes,
    summarise,
)
from specguard_vllm.evaluation.server_client import metric_delta, run_requests, scrape_metrics

REPO = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT = 2
SERVED = ("target", "sd", "specguard")  # and the other fallback and calibrated configs


def _calibrated_name(path: str) -> str:
    stem = Path(path).name.split(".yaml")[0].split(".json")[0]
    return stem.removeprefix("specguard.") or "calibrated"


def parse_concurrencies(text: str) -> list[int]:
    """``--concurrency``: one N (the server runs go at 1 and N) or a comma list (exactly those)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        levels = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--concurrency: expected N or a comma list like 1,8,32, got {text!r}") from None
    if any(level < 1 for level in levels):
        raise ValueError(f"--concurrency must be >= 1, got {text!r}")
    return sorted({1, *levels} if len(levels) == 1 else set(levels))


def parse_sd_ks(text: str) -> list[int]:
    """``--sd-k 3,4`` -> [3, 4]; a ValueError that names the option otherwise."""
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--sd-k: expected K or a comma list like 3,4, got {text!r}") from None
    if any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"--sd-k: each K must be >= 1 and given once, got {text!r}")
    return ks


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _problem_result(config: BenchConfig, item, answer: dict, num_spec: int, grade) -> ProblemResult:
    if "error" in answer:
        return ProblemResult(config.name, item.id, False, 0, 0.0, None, 0, 0, 0, 0,
                             error=answer["error"])
    engine, sg = answer["engine"], answer.get("specguard") or {}
    sd_k = sd_num_spec(config, num_spec)
    if sd_k is not None:
        draft_forwards = engine["num_drafts"] * sd_k  # vLLM's draft loop: K passes per round
    else:
        draft_forwards = sg.get("draft_forward_passes", 0.0)
    return ProblemResult(
        config=config.name, item_id=item.id, correct=bool(grade(item, answer["text"])),
        output_tokens=len(answer["token_ids"]), latency_s=answer["latency_s"],
        ttft_s=answer.get("ttft_s"), target_forwards=engine["iterations"],
        draft_forwards=draft_forwards, accepted_draft_tokens=engine["num_accepted_tokens"],
        proposed_draft_tokens=engine["num_draft_tokens"],
        steps_accepted=sg.get("steps_accepted", 0.0), steps_rejected=sg.get("steps_rejected", 0.0),
        scorer_s=sg.get("verify_seconds", 0.0) + sg.get("grounding_seconds", 0.0),
        text=answer["text"])


def run_offline(target: str, engines: list[EngineSpec], configs: list[BenchConfig], items,
                prompts: list[list[int]], *, max_tokens: int, num_spec: int, grade,
                progress=None, scratch_dir: str | None = None) -> dict[str, list[ProblemResult]]:
    """Every problem through every configuration; returns results per configuration."""
    from specguard_vllm.evaluation.engine_process import EngineProcess

    procs = {}
    try:
        for spec in engines:  # start all first: their start-ups overlap
            procs[spec.key] = EngineProcess(spec.key, {
                "target": target, "speculative_config": spec.speculative_config,
                "llm_kwargs": {"max_num_seqs": 4}}, scratch_dir)
        for proc in procs.values():
            proc.wait_ready()
        for config in configs:  # one warm-up request per configuration, not measured
            procs[config.engine].generate(prompts[0], max_tokens=8, extra_args=config.overrides or None)
        results: dict[str, list[ProblemResult]] = {c.name: [] for c in configs}
        for i, (item, ids) in enumerate(zip(items, prompts)):
            shift = i % len(configs)
            for config in configs[shift:] + configs[:shift]:
                answer = procs[config.engine].generate(ids, max_tokens=max_tokens,
                                                       extra_args=config.overrides or None)
                results[config.name].append(_problem_result(config, item, answer, num_spec, grade))
                if progress is not None:
                    progress(config.name)
        return results
    finally:
        for proc in procs.values():
            proc.close()


def _labelled_delta(before: dict, after: dict, name: str, label: str) -> float:
    """Change of every sample of ``name`` whose labels include ``label`` (any other labels)."""
    keys = [k for k in after if k.startswith(name + "{") and label in k]
    return sum(after[k] - before.get(k, 0.0) for k in keys)


def _served_model(base_url: str) -> str:
    import requests

    models = requests.get(base_url.rstrip("/") + "/v1/models", timeout=10).json()["data"]
    return models[0]["id"]


@contextlib.contextmanager
def _server_for(spec: EngineSpec, target: str, urls: dict[str, str], scratch_dir: str):
    """(base URL, model name): a running server given on the command line, or a fresh one."""
    if spec.key in urls:
        yield urls[spec.key], _served_model(urls[spec.key])
        return
    from specguard_vllm.serving import vllm_server

    extra = [] if spec.speculative_config is None else \
        ["--speculative-config", json.dumps(spec.speculative_config)]
    with vllm_server(target, *extra, scratch_dir=scratch_dir) as base_url:
        yield base_url, target


def run_server(target: str, engines: list[EngineSpec], configs: list[BenchConfig], items,
               prompts: list[list[int]], *, max_tokens: int, concurrencies: list[int], grade,
               progress=None, scratch_dir: str, urls: dict[str, str] | None = None,
               repeats: int = 3) -> list[dict]:
    """Each engine as a `vllm serve` (started here, or running at ``urls[engine key]``), all
    alive at once; its configurations at every concurrency level.

    Round 0 sends every cell (configuration x concurrency) once untimed: a server's first
    pass at a batch size it has not run yet is slow (measured: vLLM SD at concurrency 64,
    3.06 s and 207 engine iterations on its first pass, 0.81 s and 25 on the next), and
    would otherwise be charged to whichever cell comes first. Then ``repeats`` timed
    rounds, the order of the configurations rotating per round so drift on a shared box
    hits all alike; a cell's tokens/s is the median of its rounds (all of them in
    ``tokens_per_s_runs``), its accuracy that of the first timed round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    urls = urls or {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, str]] = {}
        for spec in engines:
            if any(c.engine == spec.key for c in configs) and (not urls or spec.key in urls):
                servers[spec.key] = stack.enter_context(_server_for(spec, target, urls, scratch_dir))
        for base_url, model in servers.values():
            run_requests(base_url, model, prompts[:1], max_tokens=8, concurrency=1)
        served = [c for c in configs if c.engine in servers]
        cells: dict[tuple[str, int], list[dict]] = {}
        for round_index in range(repeats + 1):
            shift = round_index % len(served) if served else 0
            for concurrency in concurrencies:
                for config in served[shift:] + served[:shift]:
                    base_url, model = servers[config.engine]
                    measured = _served_cell(base_url, model, config, items, prompts, grade,
                                            max_tokens=max_tokens, concurrency=concurrency,
                                            progress=progress)
                    if round_index > 0:
                        cells.setdefault((config.name, concurrency), []).append(measured)
    rows = []
    for concurrency in concurrencies:
        for config in served:
            rows.append(_served_row(config, concurrency, cells[(config.name, concurrency)]))
    return rows


def _served_cell(base_url: str, model: str, config: BenchConfig, items, prompts, grade, *,
                 max_tokens: int, concurrency: int, progress) -> dict:
    """One pass of every prompt at ``concurrency``: results, wall and the server's counters."""
    before = scrape_metrics(base_url)
    started = time.perf_counter()
    extra_body = {"vllm_xargs": config.overrides} if config.overrides else None
    answers = run_requests(base_url, model, prompts, max_tokens=max_tokens,
                           concurrency=concurrency, extra_body=extra_body, progress=progress)
    wall = time.perf_counter() - started
    after = scrape_metrics(base_url)
    results = [ProblemResult(
        config.name, item.id, a.error is None and bool(grade(item, a.text)),
        a.output_tokens, a.latency_s, a.ttft_s, 0, 0, 0, 0, error=a.error,
        text=a.text) for item, a in zip(items, answers)]
    return {
        "results": results, "wall": wall,
        "steps_accepted": _labelled_delta(before, after, "specguard_steps_total",
                                          'decision="accepted"'),
        "steps_rejected": _labelled_delta(before, after, "specguard_steps_total",
                                          'decision="rejected"'),
        "accepted_draft_tokens": metric_delta(
            before, after, "vllm:spec_decode_num_accepted_tokens_total"),
        # Engine iterations are shared by concurrent requests: per-request forward counts
        # come from the offline run.
        "engine_iterations": metric_delta(before, after, "vllm:iteration_tokens_total_count"),
    }


def _served_row(config: BenchConfig, concurrency: int, runs: list[dict]) -> dict:
    """The bench row of one served cell from its timed rounds."""
    row = summarise(config.name, runs[0]["results"], mode=f"server-c{concurrency}",
                    params=config.params, group=config.group)
    row["errors"] = sum(r.error is not None for run in runs for r in run["results"])
    rates = [sum(r.output_tokens for r in run["results"] if r.error is None) / run["wall"]
             if run["wall"] else 0.0 for run in runs]
    row["repeats"] = len(runs)
    row["tokens_per_s"] = statistics.median(rates)
    row["tokens_per_s_runs"] = rates
    row["wall_s"] = statistics.median(run["wall"] for run in runs)
    row["scorer_overhead"] = None  # measured in the worker: offline rows only
    accepted = sum(run["steps_accepted"] for run in runs)
    rejected = sum(run["steps_rejected"] for run in runs)
    row["step_acceptance"] = accepted / (accepted + rejected) if accepted + rejected else None
    tokens = sum(r.output_tokens for run in runs for r in run["results"] if r.error is None)
    row["draft_token_share"] = (sum(run["accepted_draft_tokens"] for run in runs) / tokens
                                if tokens else None)
    row["engine_iterations"] = statistics.median(run["engine_iterations"] for run in runs)
    row["target_forwards"] = row["draft_forwards"] = None
    row["tokens_per_target_forward"] = None
    return row


def _title(meta: dict) -> str:
    return (f"specguard bench: {meta['dataset']} ({meta['n']} problems), target "
            f"{meta['target']}, {meta['machine']}")


def _report(rows: list[dict], out_dir: Path, *, plots: bool, meta: dict | None,
            json_path: str | None) -> None:
    """bench.md, the plots and the JSON rows; the table and the written paths on stdout."""
    from specguard_vllm.evaluation.bench_report import markdown_table, write_report

    written = write_report(rows, out_dir, plots=plots, title=_title(meta) if meta else "")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
        written.append(Path(json_path))
    print()
    print(markdown_table(rows))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)


def _write_outputs(rows, results, args, meta) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "problems.jsonl", "w", encoding="utf-8") as fh:
        for config, rs in results.items():
            fh.writelines(json.dumps({"config": config, "item": r.item_id, "correct": r.correct,
                                     "tokens": r.output_tokens, "latency_s": r.latency_s,
                                     "target_forwards": r.target_forwards,
                                     "draft_forwards": r.draft_forwards, "error": r.error,
                                     "text": r.text}) + "\n" for r in rs)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _report(rows, out_dir, plots=not args.no_plots, meta=meta, json_path=args.json)


def _render(args: argparse.Namespace) -> int:
    """Tables and plots again from a saved ``--json`` (figures recomputed, nothing re-measured)."""
    try:
        rows = json.loads(Path(args.render).read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "config" in r for r in rows):
            raise ValueError("not a list of bench rows")
    except (OSError, ValueError) as error:
        print(f"specguard bench --render {args.render}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for row in rows:
        if row["mode"] != "offline":  # older files: no per-request counts for served rows
            row["target_forwards"] = row["draft_forwards"] = row["tokens_per_target_forward"] = None
    add_comparisons(rows)
    meta_path = Path(args.render).with_name("meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    _report(rows, Path(args.out_dir), plots=not args.no_plots, meta=meta, json_path=args.render)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.render:
        return _render(args)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from specguard_vllm.evaluation.datasets import is_correct, load_items, prompt_ids

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        config = load_config(args.config)
        n = args.n if args.n is not None else (24 if args.quick else 100)
        if n < 1 or args.max_tokens < 1 or args.repeats < 1:
            raise ValueError(f"--n, --max-tokens and --repeats must be >= 1 (got {n}, "
                             f"{args.max_tokens}, {args.repeats})")
        if not os.path.isdir(args.target):
            raise ValueError(f"--target: no such model directory: {args.target}")
        only = [c.strip() for c in args.configs.split(",")] if args.configs else None
        calibrated = {_calibrated_name(path): load_config(path) for path in args.calibrated or ()}
        sd_ks = parse_sd_ks(args.sd_k) if args.sd_k else None
        engines, configs = build_matrix(config, quick=args.quick, only=only, calibrated=calibrated,
                                        sd_ks=sd_ks)
        items = load_items(args.dataset, n, split=args.split, seed=args.seed, path=args.data_path)
        k0 = config.specguard.num_candidates
        urls = {key: url for key, url in (("target", args.target_url), ("sd", args.sd_url),
                                          (f"specguard-k{k0}", args.server_url)) if url}
        use_servers = args.server or bool(urls)
        concurrencies = parse_concurrencies(args.concurrency) if use_servers else []
        if args.skip_offline and not use_servers:
            raise ValueError("--skip-offline needs --server or a server URL")
        missing = [m for m, needed in (("matplotlib", not args.no_plots),
                                       ("openai", use_servers)) if needed and not _has(m)]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed: pip install "
                             f"'specguard-vllm[bench]' (or pass --no-plots)")
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:
        print(f"specguard bench: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    target = str(Path(args.target).resolve())
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [prompt_ids(item, tokenizer) for item in items]
    print(f"bench: {len(items)} {args.dataset} problems x {len(configs)} configurations "
          f"({', '.join(c.name for c in configs)}) on {len(engines)} engines", file=sys.stderr)
    scratch = tempfile.mkdtemp(prefix="specguard-bench-")
    if urls:  # everything a given server can serve
        served = [c for c in configs if c.engine in urls]
    else:
        served = [c for c in configs
                  if c.name in SERVED or c.group in ("fallback", "calibrated", "sd-k")] \
            if use_servers else []
    offline = [] if args.skip_offline else configs
    total = len(items) * (len(offline) + len(served) * len(concurrencies) * (args.repeats + 1))
    started = time.perf_counter()
    with tqdm(total=total, desc="bench", unit="req", mininterval=2.0, file=sys.stderr) as bar:
        def progress(_name=None):
            bar.update(1)

        results = {}
        if offline:
            results = run_offline(target, engines, offline, items, prompts,
                                  max_tokens=args.max_tokens, num_spec=config.num_speculative_tokens,
                                  grade=is_correct, progress=progress, scratch_dir=scratch)
        rows = [summarise(c.name, results[c.name], params=c.params, group=c.group) for c in offline]
        if served:
            rows += run_server(target, engines, served, items, prompts, max_tokens=args.max_tokens,
                               concurrencies=concurrencies, grade=is_correct, progress=progress,
                               scratch_dir=scratch, urls=urls, repeats=args.repeats)
    add_comparisons(rows)
    meta = {
        "command": "specguard bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "",
        "dataset": args.dataset, "split": args.split, "n": len(items), "target": args.target,
        "config": str(args.config), "num_speculative_tokens": config.num_speculative_tokens,
        "specguard": config.specguard.model_dump(mode="json"), "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "wall_s": time.perf_counter() - started,
        "paired_vs_target": paired_outcomes(results),
    }
    _write_outputs(rows, results, args, meta)
    return 0


def add_bench_command(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="accuracy and speed vs target-only and vLLM SD")
    bench.add_argument("--config", default=str(REPO / "configs/specguard.yaml"))
    bench.add_argument("--target", default=str(REPO / "models/tiny-target"))
    bench.add_argument("--dataset", default="tiny", choices=("tiny", "gsm8k", "math"))
    bench.add_argument("--data-path", help="dataset file (required for math)")
    bench.add_argument("--split", default="test")
    bench.add_argument("--n", type=int, help="problems (default 100; 24 with --quick)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--max-tokens", type=int, default=192)
    bench.add_argument("--quick", action="store_true",
                       help="target, sd, specguard and its other fallback only, fewer problems")
    bench.add_argument("--configs", help="comma-separated subset of configuration names")
    bench.add_argument("--calibrated", action="append", metavar="CONFIG",
                       help="a config from `specguard calibrate` (repeatable): adds a configuration "
                       "named after the file (specguard.calibrated.yaml -> calibrated), its "
                       "tau/beta/fallback as per-request overrides")
    bench.add_argument("--sd-k", metavar="K[,K...]",
                       help="also run vLLM's draft_model SD at these K (configurations sd-kK), "
                       "e.g. its best K for this pair, beside sd at num_speculative_tokens")
    bench.add_argument("--server", action="store_true",
                       help="also run target, sd, specguard (both fallbacks) and --calibrated "
                       "configs through real `vllm serve` + OpenAI client")
    bench.add_argument("--concurrency", default="8",
                       help="server runs: N (run at 1 and N) or a comma list, e.g. 1,8,32,64")
    bench.add_argument("--repeats", type=int, default=3,
                       help="server runs: timed rounds per cell after one untimed warm-up round "
                       "(tokens/s is their median)")
    bench.add_argument("--server-url", help="a running SpecGuard `vllm serve` (same config): run "
                       "the configurations it can serve through vllm_xargs against it")
    bench.add_argument("--target-url", help="a running target-only `vllm serve` of the same target")
    bench.add_argument("--sd-url", help="a running `vllm serve` with vLLM's draft_model SD")
    bench.add_argument("--skip-offline", action="store_true",
                       help="server runs only (needs --server or the URLs)")
    bench.add_argument("--json", help="write the rows as a JSON list here")
    bench.add_argument("--out-dir", default=str(REPO / "benchmarks/results/bench"))
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--render", metavar="JSON",
                       help="only redo the table and plots from a saved --json (into --out-dir)")
    bench.set_defaults(func=cmd_bench)
