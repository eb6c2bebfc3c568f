"""Run an offline vLLM engine with SpecGuard in its own process (vLLM spawns workers).

    python -m tests.engine_runner '<json spec>'

Spec: ``target``, ``config`` (path, or null with ``raw_speculative_config`` for stock vLLM
methods such as ``draft_model``), ``texts``, ``max_tokens``, ``rounds`` (generate the same
prompts that many times), ``sequential`` (one prompt at a time, so engine iterations are
that prompt's target forward passes) and ``llm_kwargs``. Prints one JSON line per round:
``{"round", "outputs": [{"req", "prompt_ids", "token_ids", "text"}], "prefix_cache_hits",
"iterations"}``.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(sys.argv[1])
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from specguard_vllm.config import load_config
    from specguard_vllm.engine_trace import make_llm

    tokenizer = AutoTokenizer.from_pretrained(spec["target"])
    config = load_config(spec["config"]) if spec.get("config") else spec.get("raw_speculative_config")
    llm = make_llm(spec["target"], config, **spec.get("llm_kwargs", {}))
    prompts = [{"prompt_token_ids": tokenizer(t)["input_ids"]} for t in spec["texts"]]
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 40))

    def iterations() -> float:
        return sum(m.count for m in llm.get_metrics() if m.name == "vllm:iteration_tokens_total")

    for round_index in range(spec.get("rounds", 1)):
        before = iterations()
        if spec.get("sequential"):
            outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        hits = sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")
        print(json.dumps({
            "round": round_index,
            "prefix_cache_hits": hits,
            "iterations": iterations() - before,
            "outputs": [{"req": o.request_id.split("-")[0], "prompt_ids": list(o.prompt_token_ids),
                         "token_ids": list(o.outputs[0].token_ids),
                         "text": tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)}
                        for o in outputs]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
