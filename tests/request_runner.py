"""Run one offline vLLM engine (own process) over phases of requests, each with its own
sampling parameters (seeds, n > 1, ``vllm_xargs``).

    python -m tests.request_runner '<json spec>'

Spec: ``target``, ``config`` (a SpecGuard config path, or null with
``raw_speculative_config`` for stock methods such as ``draft_model``, or neither for the
target alone), ``llm_kwargs`` and ``phases``: ``[{"name", "sequential", "requests":
[{"text", "params": {SamplingParams keyword arguments}}]}]``. A sequential phase
generates one request at a time, so its engine iterations are those requests' target
forward passes. Prints one JSON line per phase: ``{"phase", "iterations", "counters"
(SpecGuard's worker totals gained in the phase, {} without SpecGuard), "outputs":
[{"req", "prompt_ids", "completions": [{"token_ids", "text"}]}]}``; ``req`` is the id
the decision log's ``req_id`` starts with (``<index>_<req>`` for n > 1 siblings).
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(sys.argv[1])
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from specguard_vllm.config import load_config
    from specguard_vllm.engine_trace import make_llm, shutdown_llm

    tokenizer = AutoTokenizer.from_pretrained(spec["target"])
    config = load_config(spec["config"]) if spec.get("config") else spec.get("raw_speculative_config")
    llm = make_llm(spec["target"], config, **spec.get("llm_kwargs", {}))

    def iterations() -> float:
        return sum(m.count for m in llm.get_metrics() if m.name == "vllm:iteration_tokens_total")

    def counters() -> dict:
        return llm.collective_rpc("specguard_counters")[0] if spec.get("config") else {}

    for phase in spec["phases"]:
        prompts = [{"prompt_token_ids": tokenizer(r["text"])["input_ids"]} for r in phase["requests"]]
        params = [SamplingParams(**{"max_tokens": 40, **r.get("params", {})})
                  for r in phase["requests"]]
        before, before_counters = iterations(), counters()
        if phase.get("sequential"):
            outputs = [llm.generate([p], q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        after_counters = counters()
        print(json.dumps({
            "phase": phase["name"],
            "iterations": iterations() - before,
            "counters": {k: v - before_counters[k] for k, v in after_counters.items()
                         if isinstance(v, (int, float))},
            "outputs": [{"req": o.request_id.split("-")[0], "prompt_ids": list(o.prompt_token_ids),
                         "completions": [{"token_ids": list(c.token_ids),
                                          "text": tokenizer.decode(c.token_ids,
                                                                   skip_special_tokens=True)}
                                         for c in o.outputs]}
                        for o in outputs]}), flush=True)
    shutdown_llm(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
