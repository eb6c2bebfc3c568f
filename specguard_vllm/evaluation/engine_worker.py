"""One offline vLLM engine in its own process, driven one request at a time over pipes.

`specguard bench` keeps one of these per engine configuration (target-only, vLLM's
``draft_model`` SD, SpecGuard at each k) alive at once and sends them the same problems in
turn, so machine drift hits every configuration alike. Each engine lives in its own
process because vLLM's Prometheus collectors are per process: the engine-iteration and
spec-decode counters read around a request are that engine's alone.

Requests run one at a time, so the deltas read around one are that request's own:
engine iterations are its target forward passes, the spec-decode counters its drafts and
accepted tokens, SpecGuard's worker counters its steps and draft passes.

Protocol: one JSON object per line on stdin; each answer is one stdout line starting with
``@@bench `` (vLLM may print other lines there).
"""

from __future__ import annotations

import json
import sys
import time

ANSWER_PREFIX = "@@bench "

SPEC_METRICS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


def _engine_totals(llm) -> dict[str, float]:
    """Engine iterations and spec-decode totals, summed over labels."""
    totals = {"iterations": 0.0, **{v: 0.0 for v in SPEC_METRICS.values()}}
    for metric in llm.get_metrics():
        if metric.name == "vllm:iteration_tokens_total":
            totals["iterations"] += metric.count
        elif metric.name in SPEC_METRICS:
            totals[SPEC_METRICS[metric.name]] += metric.value
    return totals


def _specguard_totals(llm) -> dict[str, float]:
    from specguard_vllm.plugin.introspect import llm_counters

    try:
        counters = llm_counters(llm)
    except Exception:  # noqa: BLE001 - no SpecGuard RPC in this engine (plugin off)
        return {}
    return {k: float(v) for k, v in counters.items() if isinstance(v, (int, float))}


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _answer(obj: dict) -> None:
    sys.stdout.write(ANSWER_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(spec: dict) -> int:
    from vllm import SamplingParams

    from specguard_vllm.config import resolve_config
    from specguard_vllm.engine_trace import make_llm

    speculative = spec.get("speculative_config")
    if isinstance(speculative, dict) and speculative.get("method") == "specguard":
        speculative = resolve_config(speculative)
    llm = make_llm(spec["target"], speculative, max_model_len=spec.get("max_model_len"),
                   seed=spec.get("seed", 0), **spec.get("llm_kwargs", {}))
    _answer({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        params = SamplingParams(
            temperature=request.get("temperature", 0.0), max_tokens=request["max_tokens"],
            seed=request.get("seed"), extra_args=request.get("extra_args") or None)
        before_engine, before_sg = _engine_totals(llm), _specguard_totals(llm)
        started = time.perf_counter()
        try:
            output = llm.generate([{"prompt_token_ids": request["prompt_ids"]}], params,
                                  use_tqdm=False)[0]
        except Exception as error:  # noqa: BLE001 - report, keep serving the other requests
            _answer({"error": f"{type(error).__name__}: {error}"})
            continue
        latency = time.perf_counter() - started
        completion = output.outputs[0]
        metrics = getattr(output, "metrics", None)
        ttft = getattr(metrics, "first_token_latency", None) if metrics is not None else None
        _answer({
            "token_ids": list(completion.token_ids),
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "latency_s": latency,
            "ttft_s": ttft if ttft else None,
            "engine": _delta(_engine_totals(llm), before_engine),
            "specguard": _delta(_specguard_totals(llm), before_sg),
        })
    from specguard_vllm.engine_trace import shutdown_llm

    shutdown_llm(llm)
    return 0


def main() -> int:
    return serve(json.loads(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
