"""Host time per engine step: SpecGuard vs vLLM's own SD, at batch 1, 8, 32, 64, broken down.

Each configuration runs in its own process with the engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the model runner's methods can be timed from
here: the whole step (``execute_model`` + ``sample_tokens``), and inside it the draft
(proposer), the candidate selection, the grounding capture, the verification (rejection
sampler) and SpecGuard's per-request bookkeeping; the rest is the target forward and
vLLM's own work. Only steady-state decode steps with exactly ``batch`` running requests
count (``ignore_eos``, so every request stays until ``max_tokens``). Both configurations
use the same draft, K and prompts; both engines stay alive for the run, a warm-up round
visits every batch size untimed, and the timed rounds alternate the two (order rotating),
so drift on a noisy box hits both alike. Ratios are what to read.

    .venv/bin/python benchmarks/engine_overhead.py [--batches 1,8,32,64] [--max-tokens 64]
        [--repeats 3] [--config configs/specguard.yaml] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from worker_process import WorkerProcess  # beside this script (sys.path[0])

REPO = Path(__file__).resolve().parents[1]
PARTS = ("draft_forward", "draft", "select", "capture", "verify", "bookkeeping")


# ----------------------------------------------------------------------- in the worker

class StepTimer:
    """Accumulates host seconds per part within one engine step; nested calls of the same
    part (SpecGuard's verifier calls vLLM's own for token-level rows) count once."""

    def __init__(self):
        self.parts = collections.defaultdict(float)
        self.depth = collections.Counter()
        self.steps: list[dict] = []
        self.step_started: float | None = None
        self.step_seconds = 0.0
        self.num_reqs = 0
        self.decode_only = True

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        timer = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            timer.depth[part] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.depth[part] -= 1
                if timer.depth[part] == 0:
                    timer.parts[part] += time.perf_counter() - started

        setattr(owner, name, timed)

    def wrap_draft_forward(self, proposer_cls) -> None:
        """Time the draft model's forwards apart (part ``draft_forward``): on a CPU they are
        host time too, and the k candidate rows make SpecGuard's larger than SD's; what is
        left of ``draft`` is the loop's own work (sampling, step ends, rows, metadata)."""
        timer, propose = self, proposer_cls.propose

        @functools.wraps(propose)
        def with_timed_model(proposer, *args, **kwargs):
            model = getattr(proposer, "model", None)
            if model is not None and "forward" not in vars(model):  # once per instance
                timer.wrap(model, "forward", "draft_forward")
            return propose(proposer, *args, **kwargs)

        proposer_cls.propose = with_timed_model

    def wrap_step(self, runner_cls) -> None:
        """execute_model opens a step, sample_tokens closes it (vLLM 0.32's split)."""
        timer = self
        execute, sample = runner_cls.execute_model, runner_cls.sample_tokens

        @functools.wraps(execute)
        def execute_model(runner, scheduler_output, *args, **kwargs):
            timer.parts.clear()
            timer.num_reqs = len(scheduler_output.num_scheduled_tokens)
            timer.decode_only = not scheduler_output.scheduled_new_reqs and all(
                n <= 1 + timer.max_spec for n in scheduler_output.num_scheduled_tokens.values())
            started = time.perf_counter()
            try:
                return execute(runner, scheduler_output, *args, **kwargs)
            finally:
                timer.step_seconds = time.perf_counter() - started

        @functools.wraps(sample)
        def sample_tokens(runner, *args, **kwargs):
            started = time.perf_counter()
            try:
                return sample(runner, *args, **kwargs)
            finally:
                total = timer.step_seconds + time.perf_counter() - started
                if timer.num_reqs and timer.decode_only:
                    parts = {p: timer.parts.get(p, 0.0) for p in PARTS}
                    # The selector and the draft model's forwards run inside the proposer.
                    parts["draft"] -= parts["select"] + parts["draft_forward"]
                    timer.steps.append({"num_reqs": timer.num_reqs, "total": total, **parts})

        runner_cls.execute_model = execute_model
        runner_cls.sample_tokens = sample_tokens


def install_timers(timer: StepTimer) -> None:
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specguard_vllm.plugin import grounding_capture, proposer, runner_state, verifier

    timer.wrap_step(GPUModelRunner)
    timer.wrap(DraftModelProposer, "propose", "draft")
    timer.wrap(proposer.SpecGuardDraftProposer, "propose", "draft")
    timer.wrap_draft_forward(DraftModelProposer)
    timer.wrap_draft_forward(proposer.SpecGuardDraftProposer)
    timer.wrap(proposer.SpecGuardDraftProposer, "_choose_among", "select")
    timer.wrap(grounding_capture.GroundingCapture, "on_attention", "capture")
    timer.wrap(RejectionSampler, "forward", "verify")
    timer.wrap(verifier.SpecGuardRejectionSampler, "forward", "verify")
    for name, value in vars(runner_state.SpecGuardRunnerState).items():
        if callable(value) and not name.startswith("__") and name != "for_runner":
            timer.wrap(runner_state.SpecGuardRunnerState, name, "bookkeeping")


def run_worker(spec: dict) -> None:
    """Serve measurement requests from the driver: one JSON line in (``{"batch": b}``), the
    batch's steady-state steps out; ``READY`` once warm, ends at EOF."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # runner in this process
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from specguard_vllm.engine_trace import make_llm, shutdown_llm
    from specguard_vllm.evaluation.datasets import load_items, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(spec["target"])
    items = load_items("tiny", spec["max_batch"], split="test")
    prompts = [prompt_ids(item, tokenizer) for item in items]
    llm = make_llm(spec["target"], spec["speculative_config"], max_num_seqs=spec["max_batch"])
    timer = StepTimer()
    timer.max_spec = int(spec["num_speculative_tokens"])
    install_timers(timer)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        timer.steps.clear()
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], params,
                               use_tqdm=False)
        wall = time.perf_counter() - started
        print(json.dumps({
            "batch": batch, "wall": wall, "all_steps": len(timer.steps),
            "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "steps": [s for s in timer.steps if s["num_reqs"] == batch]}), flush=True)
    shutdown_llm(llm)


def summarise(name: str, batch: int, runs: list[dict]) -> dict:
    """A row from a configuration's timed runs at one batch size: medians over all their
    steady-state steps."""
    steps = [s for run in runs for s in run["steps"]]
    if not steps:
        raise RuntimeError(f"{name}: no steady-state step with {batch} requests was recorded")
    row = {"config": name, "batch": batch, "steps": len(steps), "repeats": len(runs),
           "tokens_per_s": statistics.median(run["tokens"] / run["wall"] for run in runs),
           "step_ms": 1000 * statistics.median(s["total"] for s in steps),
           "step_ms_per_run": [1000 * statistics.median(s["total"] for s in run["steps"])
                               for run in runs if run["steps"]]}
    for part in PARTS:
        row[f"{part}_ms"] = 1000 * statistics.median(s[part] for s in steps)
    row["rest_ms"] = row["step_ms"] - sum(row[f"{p}_ms"] for p in PARTS)
    row["tokens_per_step"] = sum(run["tokens"] for run in runs) / max(
        sum(run["all_steps"] for run in runs), 1) / batch
    return row


# ----------------------------------------------------------------------- the driver

def speculative_configs(config_path: Path) -> list[dict]:
    from specguard_vllm.config import load_config

    config = load_config(config_path)
    spec = config.model_dump(mode="json", exclude_none=True)
    k = config.num_speculative_tokens
    return [
        {"name": "sd", "num_speculative_tokens": k,
         "speculative_config": {"method": "draft_model", "model": config.model,
                                "num_speculative_tokens": k}},
        {"name": "specguard", "num_speculative_tokens": k, "speculative_config": spec},
    ]


def render(rows: list[dict]) -> str:
    """The table; the last column leaves out both sides' draft-model forwards (host time
    here, device time on a GPU)."""
    sd = {r["batch"]: r for r in rows if r["config"] == "sd"}
    lines = ["| config | batch | ms/step | draft fwd | draft loop | select | capture | verify "
             "| bookkeeping | target + rest | tokens/step/req | ms/step ÷ SD "
             "| less draft fwd ÷ SD |", "|" + "---|" * 13]
    for r in rows:
        base = sd.get(r["batch"])
        ratio = r["step_ms"] / base["step_ms"] if base else float("nan")
        rest = r["step_ms"] - r["draft_forward_ms"]
        base_rest = base["step_ms"] - base["draft_forward_ms"] if base else float("nan")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['step_ms']:.1f} | {r['draft_forward_ms']:.1f} | "
            f"{r['draft_ms']:.1f} | {r['select_ms']:.1f} | {r['capture_ms']:.1f} | "
            f"{r['verify_ms']:.1f} | {r['bookkeeping_ms']:.1f} | {r['rest_ms']:.1f} | "
            f"{r['tokens_per_step']:.2f} | {ratio:.2f}x | {rest / base_rest:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--target", default=str(REPO / "models/tiny-target"))
    parser.add_argument("--config", default=str(REPO / "configs/specguard.yaml"))
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/engine_overhead.json"))
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per batch size after one untimed warm-up round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    if args.repeats < 1 or not batches or min(batches) < 1:
        parser.error("--repeats and every batch size must be >= 1")
    specs = speculative_configs(Path(args.config))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="engine-overhead-"))  # the engines' own output
    workers = []
    try:
        for spec in specs:  # both alive at once; their start-ups overlap
            spec.update(target=args.target, max_batch=max(batches), max_tokens=args.max_tokens)
            workers.append(WorkerProcess(__file__, spec["name"], spec, logs, REPO))
        for worker in workers:
            worker.line()  # READY
        # Round 0 warms every batch size untimed (a first pass at a new batch size is slow);
        # then the timed rounds alternate the configurations, their order rotating.
        runs: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
        for round_index in range(args.repeats + 1):
            for batch in batches:
                shift = round_index % len(workers)
                for worker in workers[shift:] + workers[:shift]:
                    result = worker.request(json.dumps({"batch": batch}))
                    if round_index > 0:
                        runs[(worker.name, batch)].append(result)
                        steps = [s["total"] for s in result["steps"]]
                        median = 1000 * statistics.median(steps) if steps else float("nan")
                        print(f"round {round_index} {worker.name} batch {batch}: "
                              f"{median:.1f} ms/step", file=sys.stderr, flush=True)
    finally:
        for worker in workers:
            worker.close()
    rows = [summarise(spec["name"], batch, runs[(spec["name"], batch)])
            for spec in specs for batch in batches]
    table = render(rows)
    print(f"\nHost time per engine step (median of the steady-state decode steps of "
          f"{args.repeats} timed rounds), {args.max_tokens} tokens per request, config "
          f"{args.config}\n\n{table}")
    out.write_text(json.dumps({"config": args.config, "repeats": args.repeats, "rows": rows},
                              indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
